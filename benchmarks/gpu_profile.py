"""Where a preset's time goes on a GPU, kernel by kernel (torch.profiler with CUDA activity).

    python benchmarks/gpu_profile.py                               # XT: inference fp32 and bf16, training fp32
    python benchmarks/gpu_profile.py --presets t --batch-size 32 --out /tmp/res

`overlock bench --profile` attributes CPU time to sub-networks and block parts; on a GPU the ops
are asynchronous, so what counts is each CUDA kernel's device time. This times the step
`overlock bench` times (`bench.make_step`: inference in the training form, or forward, loss,
backward and AdamW), then profiles a few steps and prints the operators and kernels with the most
CUDA time, per step. GPU only (`gpu_session.sh` runs it as its `profile` step); the results go to
OUT/gpu_profile_<preset>_<gpu>.txt.
"""

from __future__ import annotations

import argparse
import re
import time
from pathlib import Path

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from overlock.bench import BenchSettings, make_step
from overlock.builder import build

# (label, training step, bfloat16 autocast)
CASES = {"infer": (False, False), "infer-bf16": (False, True), "train": (True, False), "train-bf16": (True, True)}


def profile_case(preset: str, batch_size: int, train: bool, amp: bool, steps: int) -> str:
    model = build(preset).cuda().train(train)
    step = make_step(model, BenchSettings(batch_size=batch_size, device="cuda", train=train, amp=amp), 1000)
    for _ in range(2 * steps):  # warm-up: Triton compiles, cuDNN's algorithm choice, the allocator's pool
        step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    wall_ms = (time.perf_counter() - start) / steps * 1e3
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    events = prof.key_averages()
    # The kernels' own rows (the operators' rows repeat their kernels' time), as the table's footer counts.
    kernels = [e for e in events if e.device_type == DeviceType.CUDA and not e.is_user_annotation]
    cuda_ms = sum(e.self_device_time_total for e in kernels) / 1e3 / steps
    table = events.table(sort_by="self_device_time_total", row_limit=30, max_name_column_width=90)
    header = (
        f"=== {preset}, {'training step' if train else 'inference'}, {'bf16 autocast' if amp else 'float32'}, "
        f"batch {batch_size}: wall {wall_ms:.1f} ms/step, CUDA kernels {cuda_ms:.1f} ms/step "
        f"(table: totals over {steps} steps) ==="
    )
    return f"{header}\n{table}\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", default="xt", type=lambda s: [p for p in s.split(",") if p])
    parser.add_argument("--cases", default="infer,infer-bf16,train", type=lambda s: [c for c in s.split(",") if c])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=3, help="profiled steps (and timed steps) per case")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        parser.error("no CUDA device here: this profiles GPU kernels")
    unknown = [c for c in args.cases if c not in CASES]
    if unknown:
        parser.error(f"unknown --cases {unknown} (valid: {', '.join(CASES)})")
    gpu = re.sub("[^a-z0-9]+", "-", torch.cuda.get_device_name().lower()).strip("-")
    args.out.mkdir(parents=True, exist_ok=True)
    for preset in args.presets:
        path = args.out / f"gpu_profile_{preset}_{gpu}.txt"
        path.write_text(f"{torch.cuda.get_device_name()}, torch {torch.__version__}\n")
        for case in args.cases:
            text = profile_case(preset, args.batch_size, *CASES[case], args.steps)
            print(text, flush=True)
            with path.open("a") as f:
                f.write(text)
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
