#!/usr/bin/env bash
# Everything that only a GPU can show, in one command: correctness of the CUDA paths (Triton
# kernels compiled for real, whole models against the CPU), issue 10's table (OverLoCK XT/T
# against timm's convnext_tiny on the GPU, float32 and bfloat16 autocast, eager and compiled),
# the ContMix and neighbourhood-attention operators, and the training steps of issues 3 and 4.
# Run it on a CUDA machine with overlock and timm importable (on the device tool's machines,
# `benchmarks/gpu_lease.sh` sets that up and calls this script).
#
#   bash benchmarks/gpu_session.sh [OUT_DIR [STEP...]]   # default OUT_DIR: benchmarks/results; all steps
#   bash benchmarks/gpu_session.sh /tmp/res tests compare compare_compile
#
# Steps, in order of what a short lease should get first (each under its own time limit, in
# seconds, overridable as LIMIT_<step>=...; a failing or timed-out step does not stop the rest):
#   tests            tests/test_cuda.py + the Triton kernel tests, serially -> gpu_tests.log, gpu_test_failures.log
#                    (every test's outcome and every failure's traceback the moment it happens)
#   compare          compare_convnext.py against convnext_tiny, eager, float32 and bf16 autocast
#                                                                           -> compare_convnext_<gpu>_{fp32,bf16}.{json,md}
#   depthwise        the depthwise convs, cuDNN against Triton, per shape  -> depthwise_gpu_<gpu>.{json,md}
#   compare_cudnn    compare's float32 table with the depthwise convs forced to cuDNN (the
#                    baseline of the Triton kernels, same machine)          -> compare_convnext_<gpu>_fp32_cudnn.*
#   profile          XT's CUDA kernels by time (inference fp32/bf16, train) -> gpu_profile_xt_<gpu>.txt, and
#                    `overlock bench --profile` of the same (time per block part) -> gpu_bench_profile_xt_<gpu>.txt
#   layouts          `overlock bench xt` with and without --channels-last (inference and training,
#                    float32 and bf16): whether the model should run NHWC on a GPU -> gpu_layouts_<gpu>.jsonl
#   compare_compile  the same with --compile, bf16 (XT, T, convnext_tiny)  -> compare_convnext_<gpu>_bf16_compile.*
#                    (torch.compile of 3 models x 2 modes: minutes; on the CPU a pico+convnext run took 7)
#   contmix          ContMix ops at the preset shapes, float32 and float16 -> contmix_<gpu>[_fp16].{json,md}
#   neighborhood     neighbourhood attention vs unfold (and natten)         -> neighborhood_<gpu>.{json,md}
#   train_step       T training step, ContMix backends interleaved          -> gpu_train_step.log
#   train            a short `overlock train t --amp --compile`             -> gpu_train_t_amp_compile.log, ..._metrics.jsonl
#   compare_compile_fp32  compare_compile in float32                        -> compare_convnext_<gpu>_fp32_compile.*
# The outcome of every step (rc 0, failed, timed out) is appended to OUT_DIR/gpu_steps.txt.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-benchmarks/results}"
shift || true
steps=("$@")
all_steps=(tests compare depthwise compare_cudnn profile layouts compare_compile contmix neighborhood train_step train compare_compile_fp32)
[ ${#steps[@]} -eq 0 ] && steps=("${all_steps[@]}")
# Seconds per step (LIMIT_<step> overrides); a typo in a step name is caught before anything runs.
declare -A limit=([tests]=240 [compare]=240 [depthwise]=150 [compare_cudnn]=150 [profile]=180 [layouts]=150 [compare_compile]=420 [compare_compile_fp32]=420
    [contmix]=180 [neighborhood]=90 [train_step]=120 [train]=300)
for step in "${steps[@]}"; do
    if [ -z "${limit[$step]:-}" ]; then
        echo "unknown step '$step' (valid: ${all_steps[*]})" >&2
        exit 2
    fi
done
mkdir -p "$out"
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
# The interpreter that holds torch: $PYTHON, else `python`, else `python3` (GPU images often have only python3).
PY="${PYTHON:-$(command -v python || command -v python3)}"
export PY

"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device: this script is for a GPU machine')" || exit 1
gpu="$("$PY" -c "import re, torch; print(re.sub('[^a-z0-9]+', '-', torch.cuda.get_device_name().lower()).strip('-'))")"
echo "$(date -u +%FT%TZ) $gpu, torch $("$PY" -c 'import torch; print(torch.__version__)'), steps: ${steps[*]}" | tee -a "$out/gpu_steps.txt"

# run LIMIT_SECONDS NAME COMMAND...: one step under `timeout`, its outcome recorded.
run() {
    local limit="$1" name="$2"
    shift 2
    local start=$SECONDS
    timeout --kill-after=10 "$limit" "$@"
    local rc=$?
    local what="rc $rc"
    [ $rc -eq 124 ] || [ $rc -eq 137 ] && what="timed out after ${limit}s"
    echo "$name: $what ($((SECONDS - start)) s)" | tee -a "$out/gpu_steps.txt"
}

compare() {  # compare LABEL ARGS...: issue 10's interleaved table at a GPU batch size
    local label="$1"
    shift
    "$PY" benchmarks/compare_convnext.py --device cuda --batch-size 64 --calls 5 --rounds 5 --threads 8 \
        --label "${gpu}_$label" "$@" && cp benchmarks/results/compare_convnext_"${gpu}_$label".{json,md} "$out"/ 2>/dev/null
}

step_tests() {
    # Serially: under pytest -n 6 each process started CUDA and compiled the same Triton kernels at
    # once (first lease: 7 tests in 200 s; serially 45 in about 150 s). pytest prints tracebacks only
    # at the end, which a step's time limit can cut off: OVERLOCK_FAILURE_LOG (tests/conftest.py)
    # writes each as it happens, and a per-test limit keeps one hang from taking the step.
    local per_test=()
    "$PY" -c "import pytest_timeout" 2>/dev/null && per_test=(--timeout 150)
    OVERLOCK_FAILURE_LOG="$out/gpu_test_failures.log" "$PY" -m pytest -v -p no:cacheprovider "${per_test[@]}" \
        tests/test_depthwise_triton.py tests/test_kernels_triton.py tests/test_neighborhood_triton.py tests/test_cuda.py \
        2>&1 | tee "$out/gpu_tests.log"
}
step_compare() {
    # convnext_tiny only (the issue's baseline; resnet50 and swin_tiny are in the first lease's table):
    # the first call of each depthwise shape now also compiles and times the Triton kernels
    compare fp32 --modes infer,deploy,train --timm convnext_tiny
    compare bf16 --modes infer,deploy,train --amp --timm convnext_tiny
}
step_depthwise() {
    "$PY" benchmarks/depthwise_gpu.py --out "$out"
}
step_compare_cudnn() {
    OVERLOCK_DEPTHWISE_CUDA=pytorch compare fp32_cudnn --modes infer,train --timm convnext_tiny
}
step_profile() {
    "$PY" benchmarks/gpu_profile.py --presets xt --out "$out"
    # the same GPU time by sub-network, block part and operator (which convolutions the kernels serve)
    local mode
    for mode in "" --train; do
        # shellcheck disable=SC2086  # an empty flag vanishes
        COLUMNS=140 "$PY" -m overlock.cli bench xt --device cuda --batch-size 64 --reps 5 --profile $mode \
            >>"$out/gpu_bench_profile_xt_$gpu.txt" || return 1
    done
}
step_layouts() {
    local mode amp layout
    for mode in "" --train; do
        for amp in "" --amp; do
            for layout in "" --channels-last; do
                # shellcheck disable=SC2086  # empty flags vanish
                "$PY" -m overlock.cli bench xt --device cuda --batch-size 64 --reps 10 --json $mode $amp $layout \
                    >>"$out/gpu_layouts_$gpu.jsonl" || return 1
            done
        done
    done
}
step_compare_compile() {
    compare bf16_compile --modes infer,train --amp --compile --timm convnext_tiny
}
step_compare_compile_fp32() {
    compare fp32_compile --modes infer,train --compile --timm convnext_tiny
}
step_contmix() {
    "$PY" benchmarks/contmix.py --presets xt t --resolutions 224 --reps 5 --budget 0.5 --model-reps 2 --model-budget 5 \
        --out "$out"
    "$PY" benchmarks/contmix.py --presets xt t --resolutions 224 --reps 5 --budget 0.5 --dtype float16 --tag fp16 \
        --no-model --out "$out"
}
step_neighborhood() {
    "$PY" benchmarks/neighborhood.py --device cuda --reps 5 --budget 10 --out "$out"
}
step_train_step() {
    "$PY" benchmarks/train_step.py --preset t --batch-size 64 --rounds 4 2>&1 | tee "$out/gpu_train_step.log"
}
step_train() {
    local run_dir
    run_dir="$(mktemp -d)/t-amp-compile"
    "$PY" -m overlock.cli train t --data synthetic:classes=1000,train=4096,val=512 --img-size 224 --batch-size 128 \
        --steps 60 --warmup 0.5 --workers 8 --amp --compile --out "$run_dir" 2>&1 | tee "$out/gpu_train_t_amp_compile.log"
    cp "$run_dir/metrics.jsonl" "$out/gpu_train_t_metrics.jsonl"
}

for step in "${steps[@]}"; do
    var="LIMIT_$step"
    export -f "step_$step" compare
    export out gpu
    run "${!var:-${limit[$step]}}" "$step" bash -c "step_$step"
done
