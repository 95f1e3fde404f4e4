#!/usr/bin/env bash
# Everything that only a GPU can show, in one command: what issues 3 (ContMix kernels) and 4
# (`overlock train`) still need measured. No GPU has been lent to the sessions that wrote overlock
# so far, so none of this has run yet; run it on a CUDA machine with overlock installed.
#
#   bash benchmarks/gpu_session.sh [OUT_DIR]        # default OUT_DIR: benchmarks/results
#
# Writes at most 8 files into OUT_DIR:
#   gpu_triton_tests.log            the Triton kernels against the reference, compiled for real
#   contmix_<gpu>.{json,md}         ContMix ops (float32) at every preset shape + XT/T models, vs unfold (and natten)
#   contmix_<gpu>_fp16.{json,md}    the same ops in float16 (what --amp trains with on CUDA), no models
#   gpu_train_step.log              T training step, ContMix backends interleaved
#   gpu_train_t_amp_compile.log     a short T training with --amp --compile: images/s and peak memory in its summary
#   gpu_train_t_metrics.jsonl       that run's per-step metrics
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-benchmarks/results}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1

python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device: this script is for a GPU machine')"
unset TRITON_INTERPRET

python -m pytest -q tests/test_kernels_triton.py 2>&1 | tee "$out/gpu_triton_tests.log"
python benchmarks/contmix.py --out "$out"
python benchmarks/contmix.py --dtype float16 --tag fp16 --no-model --out "$out"
python benchmarks/train_step.py --preset t --batch-size 64 --rounds 4 2>&1 | tee "$out/gpu_train_step.log"

run="$(mktemp -d)/t-amp-compile"
overlock train t --data synthetic:classes=1000,train=4096,val=512 --img-size 224 --batch-size 128 \
    --steps 60 --warmup 0.5 --workers 8 --amp --compile --out "$run" 2>&1 | tee "$out/gpu_train_t_amp_compile.log"
cp "$run/metrics.jsonl" "$out/gpu_train_t_metrics.jsonl"
