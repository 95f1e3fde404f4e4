"""The memory estimate that guards build/flops/train/eval (builder/estimate.py) against measured peaks.

    python benchmarks/memory_estimate.py                   # pico, xt, t; inference and a training step
    python benchmarks/memory_estimate.py --cases pico:64:1,pico:224:8 --out -

`check_fits` refuses a command when `estimate(spec, size).bytes(training, batch)` exceeds the limit,
so the estimate must be an upper bound of what the command really needs, and not so loose that it
refuses what would fit. Each case runs in a fresh process (a peak resident set depends on what the
process did before) and is measured as `overlock.bench` measures memory: one thread, a warm-up call,
then the peak resident set one more call adds on Linux CPUs (CUDA: the allocator's peak).

- inference: one forward in inference mode. Measured total = weights and buffers + the peak the
  forward adds. Estimate = 4 bytes per parameter + batch x 2 x the most bytes alive at once in a
  meta forward;
- training: one step (forward, loss, backward, AdamW) after a warm-up step. Measured total = weights,
  buffers and AdamW's moments (resident) + the peak the step adds (activations, gradients, optimizer
  temporaries). Estimate = 20 bytes per parameter + batch x 2 x the most bytes alive at once in a
  meta training forward whose graph is kept;
- checkpointed: a training step with `model.set_grad_checkpointing(True)`, measured the same way.
  Estimate: as training, from a checkpointed meta forward plus the largest block's whole graph,
  which its recomputation holds in the backward.

estimate / measured must stay at or above 1 (an upper bound) and small; tests/test_memory_estimate.py
checks both for pico.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from overlock import archspec
from overlock.bench import BenchSettings, PeakMemory, device_name, make_step, prepare, threads
from overlock.builder import build
from overlock.builder.estimate import estimate

DEFAULT_CASES = (
    "pico:64:1,pico:64:8,pico:224:1,pico:224:8,xt:224:1,xt:224:4,t:224:1,t:224:4,"
    "pico:32:128:inference,xt:224:16:inference,"  # eval's default batch at the synthetic/digits size; a large batch
    "pico:224:8:checkpointed,xt:224:4:checkpointed,t:224:4:checkpointed"
)
MODES = ("inference", "training", "checkpointed")  # checkpointed: a training step with gradient checkpointing
RESULTS = Path(__file__).resolve().parent / "results" / "memory_estimate.md"


@dataclass
class Row:
    preset: str
    size: int
    batch: int
    mode: str  # one of MODES
    params: int
    estimate_mib: float
    measured_mib: float
    estimated_activations_mib: float
    measured_added_mib: float

    @property
    def ratio(self) -> float:
        return self.estimate_mib / self.measured_mib


def _resident_bytes(model: torch.nn.Module, training: bool) -> int:
    """Weights and buffers, plus AdamW's two fp32 moments per trained parameter after the warm-up step."""
    weights = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    moments = 8 * sum(p.numel() for p in model.parameters() if p.requires_grad) if training else 0
    return weights + moments


def measure(preset: str, size: int, batch: int, mode: str, device: str = "cpu") -> Row:
    """Estimate and measured peak (MiB) of one inference forward or one training step (`mode`, one of
    MODES), at one thread."""
    spec = archspec.load(preset)
    training, checkpointed = mode != "inference", mode == "checkpointed"
    settings = BenchSettings(
        batch_size=batch, img_size=size, device=device, threads=1, train=training, grad_checkpoint=checkpointed
    )
    torch.manual_seed(0)
    with threads(1):
        model = prepare(build(spec), settings)
        step = make_step(model, settings, spec.head.num_classes)
        step()  # warm-up: AdamW's moments exist from here on, as in every later step
        resident = _resident_bytes(model, training)
        gc.collect()
        added = PeakMemory(torch.device(device)).measure(step)
    if added is None:
        raise SystemExit("peak memory cannot be measured here (needs Linux /proc or CUDA)")
    del model, step
    gc.collect()
    # after the measurement: it must not disturb it
    found = estimate(spec, (size, size), training=training, grad_checkpoint=checkpointed)
    mib = 2**20
    row = Row(
        preset=preset,
        size=size,
        batch=batch,
        mode=mode,
        params=found.params,
        estimate_mib=found.bytes(training=training, batch=batch) / mib,
        measured_mib=resident / mib + added,
        estimated_activations_mib=(
            found.bytes(training=training, batch=batch) - found.bytes(training=training, batch=0)
        )
        / mib,
        measured_added_mib=added,
    )
    return row


def table(rows: list[Row], device: str) -> str:
    lines = [
        f"# Memory estimate vs measured peak ({device_name(torch.device(device))}, 1 thread, torch "
        f"{torch.__version__}, Python {platform.python_version()})",
        "",
        "Measured with `python benchmarks/memory_estimate.py` (see its docstring for what is counted).",
        "",
        "| model | input | batch | mode | params | estimate MiB | measured peak MiB | estimate / measured "
        "| est. activations MiB | measured added by the step MiB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.preset} | {r.size}x{r.size} | {r.batch} | {r.mode} | {r.params:,} | {r.estimate_mib:,.0f} | "
            f"{r.measured_mib:,.0f} | {r.ratio:.2f} | {r.estimated_activations_mib:,.0f} | {r.measured_added_mib:,.0f} |"
        )
    return "\n".join(lines) + "\n"


def measure_fresh(preset: str, size: int, batch: int, mode: str, device: str = "cpu") -> Row:
    """`measure` in a new Python process: a peak resident set depends on what the process did before."""
    case = f"{preset}:{size}:{batch}:{mode}"
    done = subprocess.run(
        [sys.executable, __file__, "--one", case, "--device", device], capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise SystemExit(f"{case} failed:\n{done.stderr[-2000:]}")
    return Row(**json.loads(done.stdout.strip().splitlines()[-1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--cases", default=DEFAULT_CASES, help=f"preset:size:batch[:mode], comma-separated; modes: {', '.join(MODES)}"
    )
    parser.add_argument("--modes", default="inference,training", help="the modes of a case that names none")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default=str(RESULTS), help="markdown file, or - for stdout only")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # preset:size:batch:mode, in this process, as JSON
    args = parser.parse_args()
    if args.one:
        preset, size, batch, mode = args.one.split(":")
        print(json.dumps(asdict(measure(preset, int(size), int(batch), mode, args.device))))
        return
    rows = []
    for case in args.cases.split(","):
        preset, size, batch, *only = case.split(":")
        for mode in only or args.modes.split(","):
            if mode not in MODES:
                raise SystemExit(f"{case}: unknown mode {mode!r}; modes: {', '.join(MODES)}")
            row = measure_fresh(preset, int(size), int(batch), mode, args.device)
            rows.append(row)
            print(
                f"{case} {mode}: estimate {row.estimate_mib:,.0f} MiB, measured {row.measured_mib:,.0f} MiB",
                file=sys.stderr,
            )
    text = table(rows, args.device)
    print(text)
    if args.out != "-":
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
