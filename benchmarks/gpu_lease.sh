#!/usr/bin/env bash
# A GPU lease through this workplace's device tool, in two halves (the tool copies the checkout to
# a bare GPU machine whose Python has torch, triton and timm but not pydantic or fvcore, and where
# nothing can be downloaded; ../shared/reference does not travel).
#
#   bash benchmarks/gpu_lease.sh prepare            # here, before the lease: wheels + reference -> .gpu/
#   bash benchmarks/gpu_lease.sh run STEP...        # there, as the device command, carrying .gpu:
#                                                   #   setup, then benchmarks/gpu_session.sh STEP...
#
# `run` writes $OUT/session.log (everything printed), $OUT/gpu_steps.txt (each step's outcome) and
# $OUT/results.tgz (the result files; unpack into benchmarks/results/). Setup happens in a fresh
# `mktemp -d` folder every call: a machine kept warm between calls still has the last call's
# files, and writing through a link left there once overwrote the image's own python3.
# Give the device call a timeout above the sum of the steps' limits (gpu_session.sh) plus a minute.
set -uo pipefail
cd "$(dirname "$0")/.."
carry=.gpu

prepare() {
    # The packages overlock needs that the GPU image lacks, for its Python (3.12, x86-64).
    local pyver="${GPU_PYTHON_VERSION:-3.12}" version
    rm -rf "$carry" && mkdir -p "$carry/whl"
    local binary=(pydantic pydantic_core annotated-types typing-inspection yacs termcolor)
    local pinned=()
    for name in "${binary[@]}"; do
        version="$(python -c "import importlib.metadata as m; print(m.version('$name'))" 2>/dev/null)" || {
            echo "prepare: $name is not installed here; install overlock's dependencies first" >&2
            return 1
        }
        pinned+=("$name==$version")
    done
    python -m pip download -q --no-deps --only-binary=:all: --python-version "$pyver" --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d "$carry/whl" "${pinned[@]}" || return 1
    python -m pip wheel -q --no-deps -w "$carry/whl" fvcore==0.1.5.post20221221 iopath==0.1.10 || return 1
    cp -r ../shared/reference "$carry/reference" || return 1
    du -sh "$carry"
    echo "now: device run with carry [\"$carry\"] and command: bash benchmarks/gpu_lease.sh run STEP..."
}

setup_and_run() {
    local root py
    root="$(mktemp -d)"
    py="$(command -v python3)"
    timeout 120 "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$root/site" \
        "$carry"/whl/*.whl || return 1
    mkdir -p "$root/w/shared" "$root/res"
    cp -r . "$root/w/overlock" && cp -r "$carry/reference" "$root/w/shared/reference" || return 1
    cd "$root/w/overlock" || return 1
    export PYTHONPATH="$root/w:$root/site" PYTHON="$py" PYTHONUNBUFFERED=1
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    timeout 120 "$py" -c "import torch, triton, overlock; print('torch', torch.__version__, 'triton', triton.__version__)" ||
        return 1
    bash benchmarks/gpu_session.sh "$root/res" "$@"
    tar czf "$OUT/results.tgz" -C "$root/res" . && cp "$root/res/gpu_steps.txt" "$OUT/"
}

case "${1:-}" in
prepare) prepare ;;
run)
    shift
    [ -n "${OUT:-}" ] || { echo "run is the device command: OUT (set by the device tool) names the folder that comes back" >&2; exit 2; }
    setup_and_run "$@" 2>&1 | tee "$OUT/session.log"
    ;;
*)
    echo "usage: bash benchmarks/gpu_lease.sh prepare | run STEP...   (steps: see benchmarks/gpu_session.sh)" >&2
    exit 2
    ;;
esac
