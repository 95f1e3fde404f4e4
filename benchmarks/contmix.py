"""Benchmark the ContMix backends at the Focus-Net shapes of the presets, and whole models.

    python benchmarks/contmix.py                      # every preset at 224 and 512 (+ T at 448), batch 8
    python benchmarks/contmix.py --quick              # T at 224 only, few repetitions
    python benchmarks/contmix.py --model-batch 8      # also sets the whole-model batch
    python benchmarks/contmix.py --no-model           # operator table only

For every Focus-Net ContMix call of a preset (stage 3 at input/16 and stage 4 at input/32, a
small-kernel and a large-kernel call per block) it times the forward pass (inference, no grad)
and forward+backward, and measures the peak memory of each, for every backend that can run on
the device (`cpu`, `triton` on CUDA, `reference`), the reference's fallback algorithm (`unfold`:
F.unfold + replicate padding, plain autograd) and natten's `na2d_av` when natten imports.
Then images/s of a training step and of inference for whole XT and T models, with the default
backend and with the unfold algorithm swapped in.

Peak memory. CUDA: torch.cuda.max_memory_allocated() above what was allocated before the call.
CPU: there is no allocator counter, so the process's resident-set high-water mark is reset
(glibc malloc_trim, then writing 5 to /proc/self/clear_refs) and read back (VmHWM) after the
call: the peak *physical* memory the call added, outputs and gradients included. It is noisy by
a few MiB (allocator caching, thread stacks); tiny shapes read as ~0.

Bandwidth. ContMix moves far more bytes than it computes on, so each call is also reported as
the bandwidth its *compulsory* traffic implies: bytes that any implementation must move (forward:
read the logits and the values, write the output; backward: read the gradient, the logits and the
values, write the logit and value gradients; the bias table is negligible) divided by the time.
The count is the same for every method, so the column ranks them like the time does, and it is
compared with the device's copy bandwidth, measured here with one large tensor copy, and on CUDA
also with the peak the device properties imply (memory clock x bus width) where torch exposes them.

Results go to benchmarks/results/contmix_<device>.{json,md}, with the machine, the device, the
torch/triton versions and the load average before and after (other processes skew CPU timings).
Both are taken after a warm-up call; time is the median over the repetitions.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table

from overlock import kernels
from overlock.archspec import load
from overlock.bench import PeakMemory  # shared with `overlock bench`
from overlock.kernels import ops, reference
from overlock.kernels.native import cpuinfo_value

RESULTS = Path(__file__).resolve().parent / "results"
console = Console(highlight=False)


# --- shapes -------------------------------------------------------------------------------------


@dataclass
class Case:
    """One ContMix call shape; `uses` lists the (preset, input, stage, kernel, blocks) that make it."""

    batch: int
    heads: int
    height: int
    width: int
    channels: int
    kernel_size: int
    uses: list[dict] = field(default_factory=list)

    @property
    def key(self) -> tuple[int, ...]:
        return (self.batch, self.heads, self.height, self.width, self.channels, self.kernel_size)

    @property
    def label(self) -> str:
        return f"{self.height}x{self.width} h{self.heads} c{self.channels} K{self.kernel_size}"


def focus_cases(presets: list[str], resolutions: list[int], batch: int) -> list[Case]:
    """The ContMix calls of every preset's Focus-Net at each input size, shared shapes merged."""
    cases: dict[tuple[int, ...], Case] = {}
    for preset in presets:
        spec = load(preset)
        for resolution in resolutions:
            for index, stage in enumerate(spec.focus.stages):
                size = resolution // (16 * 2**index)
                size = max(size, stage.kernel_size)  # smaller maps are mixed at K x K (resize path)
                heads = 2 * stage.groups
                channels = stage.width // (2 * heads)
                for which, k in (("small", stage.small_kernel_size), ("large", stage.kernel_size)):
                    case = Case(batch, heads, size, size, channels, k)
                    case = cases.setdefault(case.key, case)
                    use = dict(preset=preset, resolution=resolution, stage=3 + index, kernel=which, blocks=stage.depth)
                    case.uses.append(use)
    return list(cases.values())


# --- methods ------------------------------------------------------------------------------------

Method = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor]


def natten_method() -> tuple[Method | None, str]:
    """natten's na2d_av on the softmax map (what the reference does with natten), if it imports."""
    try:
        import natten
        from natten.functional import na2d_av
    except Exception as exc:  # noqa: BLE001 - any import failure means "not available"
        return None, f"natten unavailable ({type(exc).__name__}: {exc})"

    def run(logits, rpb, value, k):
        probs = reference.probabilities(logits, rpb, k).to(value.dtype)
        return na2d_av(probs, value, kernel_size=k, dilation=1)

    return run, f"natten {getattr(natten, '__version__', '?')}"


def methods_for(device: torch.device, wanted: list[str]) -> tuple[dict[str, Method], dict[str, str]]:
    """The runnable methods on this device, and a note for each one left out."""
    available: dict[str, Method] = {}
    notes: dict[str, str] = {}
    for name in wanted:
        if name == "natten":
            run, note = natten_method()
            if run is None:
                notes[name] = note
            else:
                available[name] = run
            continue
        if name == "triton" and (device.type != "cuda" or not ops.triton_available()):
            notes[name] = "needs a CUDA device (the CPU interpreter is for tests, not timings)"
            continue
        available[name] = lambda logits, rpb, value, k, backend=name: kernels.contmix(
            logits, rpb, value, k, backend=backend
        )
    return available, notes


# --- measurement --------------------------------------------------------------------------------


def timed(fn: Callable[[], object], device: torch.device, reps: int, budget: float) -> list[float]:
    """Seconds per call over up to `reps` calls, stopping early once `budget` seconds are spent."""
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < reps and (not times or time.perf_counter() - start < budget):
        if device.type == "cuda":
            torch.cuda.synchronize()
        tick = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - tick)
    return times


def make_inputs(case: Case, device: torch.device, dtype: torch.dtype):
    """Inputs laid out as the model produces them: value is a permuted view of an NCHW tensor."""
    gen = torch.Generator().manual_seed(0)
    b, h, H, W, c, k = case.key
    logits = torch.randn(b, h, H, W, k * k, generator=gen).to(device, dtype)
    rpb = (torch.randn(h, 2 * k - 1, 2 * k - 1, generator=gen) * 0.02).to(device)
    value = torch.randn(b, 2, h, c, H, W, generator=gen).to(device, dtype).permute(1, 0, 2, 4, 5, 3)[0]
    grad = torch.randn(b, h, H, W, c, generator=gen).to(device, dtype)
    return logits, rpb, value, grad


def compulsory_bytes(case: Case, itemsize: int) -> dict[str, int]:
    """Bytes any implementation must move, forward and forward+backward (see the module docstring)."""
    positions = case.batch * case.heads * case.height * case.width
    logits = positions * case.kernel_size**2 * itemsize
    maps = positions * case.channels * itemsize  # value, output, gradient, value gradient: one each
    forward = logits + 2 * maps
    backward = 2 * logits + 3 * maps
    return {"fwd": forward, "fwd_bwd": forward + backward}


def copy_bandwidth(device: torch.device, mib: int, reps: int = 10) -> float:
    """GB/s of the best of `reps` copies of a `mib` MiB float32 tensor (read + write counted)."""
    source = torch.ones(mib * 2**20 // 4, device=device)
    target = torch.empty_like(source)
    target.copy_(source)
    seconds = min(timed(lambda: target.copy_(source), device, reps, budget=float("inf")))
    return 2 * source.numel() * 4 / seconds / 1e9


def peak_bandwidth(device: torch.device) -> float | None:
    """GB/s from the CUDA device properties (DDR: 2 transfers per clock), when this torch exposes them."""
    if device.type != "cuda":
        return None
    props = torch.cuda.get_device_properties(device)
    clock_khz = getattr(props, "memory_clock_rate", None)
    bus_bits = getattr(props, "memory_bus_width", None)
    if not clock_khz or not bus_bits:
        return None
    return 2 * clock_khz * 1e3 * bus_bits / 8 / 1e9


def measure_case(case: Case, method: Method, device, dtype, memory: PeakMemory, reps: int, budget: float) -> dict:
    logits, rpb, value, grad = make_inputs(case, device, dtype)
    leaves = [t.detach().requires_grad_() for t in (logits, rpb, value)]
    k = case.kernel_size

    def forward():
        with torch.no_grad():
            return method(logits, rpb, value, k)

    def forward_backward():
        out = method(*leaves, k)
        out.backward(grad)
        for leaf in leaves:
            leaf.grad = None

    moved = compulsory_bytes(case, logits.element_size())
    result = {}
    for name, fn in (("fwd", forward), ("fwd_bwd", forward_backward)):
        fn()  # warm-up: lazy library initialisation and cached index plans stay out of the numbers
        peak = memory.measure(fn)
        times = timed(fn, device, reps, budget)
        median = statistics.median(times)
        result[name] = {"median_ms": median * 1e3, "min_ms": min(times) * 1e3, "reps": len(times)}
        result[name].update(peak_mib=peak, bytes=moved[name], gb_per_s=moved[name] / median / 1e9)
    return result


# --- whole models -------------------------------------------------------------------------------


def model_throughput(preset: str, backend: str, batch: int, resolution: int, device, reps: int, budget: float) -> dict:
    """images/s of an SGD training step and of an inference forward pass at batch `batch`."""
    from overlock.builder import build

    torch.manual_seed(0)
    model = build(preset).to(device)
    model.set_contmix_backend(backend)
    images = torch.randn(batch, 3, resolution, resolution, device=device)
    labels = torch.randint(0, 1000, (batch,), device=device)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)

    def train_step():
        out = model(images)
        outs = out.values() if isinstance(out, dict) else [out]
        loss = sum(F.cross_entropy(o, labels) for o in outs)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def inference():
        with torch.no_grad():
            model(images)

    result = {}
    model.train()
    train_step()  # warm-up
    times = timed(train_step, device, reps, budget)
    result["train_images_per_s"] = batch / statistics.median(times)
    result["train_reps"] = len(times)
    model.eval()
    inference()
    times = timed(inference, device, reps, budget)
    result["infer_images_per_s"] = batch / statistics.median(times)
    result["infer_reps"] = len(times)
    return result


# --- machine ------------------------------------------------------------------------------------


def machine_info(device: torch.device) -> dict:
    cpu = cpuinfo_value("model name") or platform.processor() or "unknown"
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu,
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    try:
        commit = subprocess.run(
            ["git", "describe", "--always", "--dirty"], capture_output=True, text=True, check=True, cwd=RESULTS.parent
        )
        info["git_commit"] = commit.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        info["git_commit"] = None
    return info


def device_slug(info: dict) -> str:
    name = info["device_name"] if info["device"].startswith("cuda") else f"cpu {info['cpu']}"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


# --- goals and reports --------------------------------------------------------------------------


def goal_summary(cases: list[Case], results: dict, fast: str, preset: str, resolutions: list[int]) -> list[dict]:
    """Per input size: a preset's Focus-Net ContMix time per batch (sum over blocks of both calls),
    fast backend vs unfold (and natten), and the worst per-call peak-memory ratio."""
    rows = []
    for resolution in resolutions:
        total: dict[str, float] = {}
        moved: dict[str, float] = {}
        mem_ratio = []
        for case in cases:
            for use in case.uses:
                if use["preset"] != preset or use["resolution"] != resolution:
                    continue
                for method, res in results[case.label].items():
                    total[method] = total.get(method, 0.0) + use["blocks"] * res["fwd_bwd"]["median_ms"]
                    moved[method] = moved.get(method, 0.0) + use["blocks"] * res["fwd_bwd"]["bytes"]
                ours, base = results[case.label].get(fast), results[case.label].get("unfold")
                if ours and base and ours["fwd_bwd"]["peak_mib"] and base["fwd_bwd"]["peak_mib"]:
                    mem_ratio.append(ours["fwd_bwd"]["peak_mib"] / base["fwd_bwd"]["peak_mib"])
        if fast not in total or "unfold" not in total:
            continue
        row = {
            "preset": preset,
            "resolution": resolution,
            f"{fast}_ms": total[fast],
            "unfold_ms": total["unfold"],
            "speedup_vs_unfold": total["unfold"] / total[fast],
            "worst_peak_memory_ratio": max(mem_ratio) if mem_ratio else None,
            f"{fast}_gb_per_s": moved[fast] / total[fast] / 1e6,
        }
        if "natten" in total:
            row["speedup_vs_natten"] = total["natten"] / total[fast]
        rows.append(row)
    return rows


def fmt(value: float | None, spec: str = ".2f") -> str:
    return "n/a" if value is None else format(value, spec)


def op_rows(cases: list[Case], results: dict, methods: list[str], copy_gb_per_s: float) -> list[list[str]]:
    rows = []
    for case in cases:
        uses = sorted({f"{u['preset']}@{u['resolution']}" for u in case.uses})
        for method in methods:
            res = results[case.label].get(method)
            if res is None:
                continue
            base = results[case.label].get("unfold")
            speed = base["fwd_bwd"]["median_ms"] / res["fwd_bwd"]["median_ms"] if base else None
            rows.append(
                [
                    case.label,
                    ", ".join(uses),
                    method,
                    fmt(res["fwd"]["median_ms"]),
                    fmt(res["fwd_bwd"]["median_ms"]),
                    fmt(speed, ".1f") + "x" if speed else "n/a",
                    fmt(res["fwd"]["peak_mib"], ".1f"),
                    fmt(res["fwd_bwd"]["peak_mib"], ".1f"),
                    fmt(res["fwd_bwd"]["gb_per_s"], ".1f"),
                    fmt(100 * res["fwd_bwd"]["gb_per_s"] / copy_gb_per_s, ".0f") + "%",
                ]
            )
    return rows


OP_HEADER = [
    "shape (B=batch)",
    "used by",
    "method",
    "fwd ms",
    "fwd+bwd ms",
    "fwd+bwd vs unfold",
    "fwd MiB",
    "fwd+bwd MiB",
    "fwd+bwd GB/s",
    "of copy bw",
]


def markdown(report: dict, rows: list[list[str]]) -> str:
    m = report["machine"]
    lines = [
        f"# ContMix benchmark: {m['device_name']}",
        "",
        f"{m['date']}, torch {m['torch']}, triton {m['triton']}, {m['cpu']} ({m['cpu_count']} cores, "
        f"{m['torch_threads']} torch threads), commit {m['git_commit']}. Load average before/after: "
        f"{report['load_before']} / {report['load_after']}.",
        "",
        f"Batch {report['settings']['batch']}, {report['settings']['dtype']}; time = median of up to "
        f"{report['settings']['reps']} calls after a warm-up; peak memory = {report['memory_method']}.",
        "",
        f"GB/s = compulsory bytes (see benchmarks/contmix.py) / time; copy bandwidth of this device "
        f"{report['bandwidth']['copy_gb_per_s']:.1f} GB/s (one {report['bandwidth']['copy_mib']} MiB tensor copy), "
        f"peak from the device properties {fmt(report['bandwidth']['peak_gb_per_s'], '.0f')} GB/s.",
        "",
        "| " + " | ".join(OP_HEADER) + " |",
        "|" + "---|" * len(OP_HEADER),
    ]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    if report["notes"]:
        lines += ["", "Not measured: " + "; ".join(f"{k}: {v}" for k, v in report["notes"].items()) + "."]
    if report["goals"]:
        lines += [
            "",
            "## Focus-Net ContMix of one training step (forward+backward, both calls of every block, one batch)",
            "",
            "| preset | input | ours ms | unfold ms | speed-up | vs natten | worst peak-memory ratio (ours / unfold) "
            "| ours GB/s | of copy bw |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        fast = report["fast_backend"]
        copy = report["bandwidth"]["copy_gb_per_s"]
        for g in report["goals"]:
            natten = g.get("speedup_vs_natten")
            lines.append(
                f"| {g['preset']} | {g['resolution']} | {g[f'{fast}_ms']:.1f} | {g['unfold_ms']:.1f} | "
                f"{g['speedup_vs_unfold']:.1f}x | {fmt(natten, '.1f') + 'x' if natten else 'n/a'} | "
                f"{fmt(g['worst_peak_memory_ratio'], '.3f')} | {g[f'{fast}_gb_per_s']:.1f} | "
                f"{100 * g[f'{fast}_gb_per_s'] / copy:.0f}% |"
            )
    if report.get("models"):
        lines += [
            "",
            f"## Whole models (batch {report['settings']['model_batch']}, {report['settings']['model_resolution']}px)",
            "",
            "| preset | ContMix | train images/s | inference images/s |",
            "|---|---|---|---|",
        ]
        for row in report["models"]:
            lines.append(
                f"| {row['preset']} | {row['backend']} | {row['train_images_per_s']:.2f} | {row['infer_images_per_s']:.2f} |"
            )
    if report.get("model_note"):
        lines += ["", report["model_note"]]
    return "\n".join(lines) + "\n"


# --- main ---------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", nargs="+", default=["xt", "t", "s", "b"])
    parser.add_argument("--resolutions", nargs="+", type=int, default=[224, 512])
    parser.add_argument("--goal-resolutions", nargs="+", type=int, default=[224, 448], help="extra sizes for preset T")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--methods", nargs="+", default=["auto", "reference", "unfold", "natten"])
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--budget", type=float, default=3.0, help="seconds of timed calls per measurement")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-model", action="store_true", help="skip the whole-model throughput")
    parser.add_argument("--model-presets", nargs="+", default=["xt", "t"])
    parser.add_argument("--model-batch", type=int, default=None, help="default: --batch")
    parser.add_argument("--model-resolution", type=int, default=224)
    parser.add_argument("--model-reps", type=int, default=3)
    parser.add_argument("--model-budget", type=float, default=60.0, help="seconds of timed steps per model measurement")
    parser.add_argument("--quick", action="store_true", help="T at 224 only, 3 repetitions")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--tag", default="", help="suffix of the result files, e.g. 1thread")
    args = parser.parse_args(argv)
    if args.quick:
        args.presets, args.resolutions, args.goal_resolutions, args.reps = ["t"], [224], [], 3
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    fast = ops.resolve_backend("auto", (torch.empty(0, device=device),))
    wanted = [fast if m == "auto" else m for m in args.methods]
    methods, notes = methods_for(device, list(dict.fromkeys(wanted)))
    memory = PeakMemory(device)

    cases = focus_cases(args.presets, sorted(set(args.resolutions)), args.batch)
    if "t" in args.presets and args.goal_resolutions:
        extra = focus_cases(["t"], [r for r in args.goal_resolutions if r not in args.resolutions], args.batch)
        known = {c.key: c for c in cases}
        for case in extra:
            if case.key in known:
                known[case.key].uses += case.uses
            else:
                cases.append(case)
    cases.sort(key=lambda c: (c.height * c.width, c.kernel_size, c.heads))

    info = machine_info(device)
    load_before = [round(x, 2) for x in os.getloadavg()]
    copy_mib = 1024 if device.type == "cuda" else 256
    bandwidth = {
        "copy_mib": copy_mib,
        "copy_gb_per_s": copy_bandwidth(device, copy_mib),
        "peak_gb_per_s": peak_bandwidth(device),
    }
    console.print(f"[bold]ContMix benchmark[/] on {info['device_name']} ({device}), torch {info['torch']}")
    console.print(f"methods: {', '.join(methods)}; peak memory: {memory.method}")
    console.print(
        f"copy bandwidth {bandwidth['copy_gb_per_s']:.1f} GB/s; peak from device properties "
        f"{fmt(bandwidth['peak_gb_per_s'], '.0f')} GB/s"
    )
    for name, note in notes.items():
        console.print(f"  [yellow]{name}[/]: {note}")

    results: dict[str, dict] = {}
    for case in cases:
        results[case.label] = {}
        for name, method in methods.items():
            started = time.perf_counter()
            results[case.label][name] = measure_case(case, method, device, dtype, memory, args.reps, args.budget)
            r = results[case.label][name]
            console.print(
                f"  {case.label:<24} {name:<9} fwd {r['fwd']['median_ms']:9.2f} ms  fwd+bwd "
                f"{r['fwd_bwd']['median_ms']:9.2f} ms  peak {fmt(r['fwd_bwd']['peak_mib'], '.1f'):>7} MiB "
                f"({time.perf_counter() - started:.0f}s)"
            )

    rows = op_rows(cases, results, list(methods), bandwidth["copy_gb_per_s"])
    table = Table(title=f"ContMix, batch {args.batch}, {args.dtype}, {info['device_name']}")
    for column in OP_HEADER:
        table.add_column(column, justify="left" if column in ("shape (B=batch)", "used by", "method") else "right")
    for row in rows:
        table.add_row(*row)
    console.print(table)

    goals = []
    if "t" in args.presets:
        goals = goal_summary(cases, results, fast, "t", sorted(set(args.resolutions) | set(args.goal_resolutions)))
    for g in goals:
        console.print(
            f"[bold]T @ {g['resolution']}[/]: Focus-Net ContMix fwd+bwd per batch {g[f'{fast}_ms']:.1f} ms vs unfold "
            f"{g['unfold_ms']:.1f} ms = {g['speedup_vs_unfold']:.1f}x; worst peak-memory ratio "
            f"{fmt(g['worst_peak_memory_ratio'], '.3f')}; {g[f'{fast}_gb_per_s']:.1f} GB/s = "
            f"{100 * g[f'{fast}_gb_per_s'] / bandwidth['copy_gb_per_s']:.0f}% of the copy bandwidth"
        )

    report = {
        "machine": info,
        "settings": {
            "batch": args.batch,
            "dtype": args.dtype,
            "reps": args.reps,
            "budget_s": args.budget,
            "model_batch": args.model_batch or args.batch,
            "model_resolution": args.model_resolution,
        },
        "memory_method": memory.method,
        "bandwidth": bandwidth,
        "fast_backend": fast,
        "notes": notes,
        "cases": [dict(asdict(c), label=c.label, results=results[c.label]) for c in cases],
        "goals": goals,
        "models": [],
    }
    if not args.no_model:
        try:
            from overlock.builder import build  # noqa: F401
        except ImportError as exc:
            report["model_note"] = f"whole-model numbers skipped: overlock.builder.build is unavailable ({exc})"
        else:
            for preset in args.model_presets:
                for backend in (fast, "unfold"):
                    row = model_throughput(
                        preset,
                        backend,
                        report["settings"]["model_batch"],
                        args.model_resolution,
                        device,
                        args.model_reps,
                        args.model_budget,
                    )
                    row.update(preset=preset, backend=backend)
                    report["models"].append(row)
                    console.print(
                        f"  model {preset:<3} {backend:<7} train {row['train_images_per_s']:.2f} img/s, "
                        f"inference {row['infer_images_per_s']:.2f} img/s"
                    )
    report["load_before"] = load_before
    report["load_after"] = [round(x, 2) for x in os.getloadavg()]

    args.out.mkdir(parents=True, exist_ok=True)
    suffix = "".join(f"_{part}" for part in (args.tag, "quick" if args.quick else "") if part)
    stem = args.out / f"contmix_{device_slug(info)}{suffix}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
    stem.with_suffix(".md").write_text(markdown(report, rows))
    console.print(f"wrote {stem}.json and {stem}.md")
    return report


if __name__ == "__main__":
    main()
