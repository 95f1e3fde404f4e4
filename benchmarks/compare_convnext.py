"""OverLoCK presets against timm's convnext_tiny, resnet50 and swin_tiny: GFLOP/s, images/s, memory.

    python benchmarks/compare_convnext.py                         # xt, t vs the three timm models
    python benchmarks/compare_convnext.py --presets xt --timm convnext_tiny --rounds 3
    python benchmarks/compare_convnext.py --modes infer,train     # skip the deploy form
    python benchmarks/compare_convnext.py --readme                # and replace the summary table in README.md
    python benchmarks/compare_convnext.py --timm-products onednn  # timm's F.linear through oneDNN as OverLoCK's

The question it answers (issue 10): does a FLOP of OverLoCK cost what a FLOP of ConvNeXt costs?
Every contender runs in this one process at one thread (`--threads`), interleaved call by call
(round 1: every contender once, round 2: ...), so all see the same machine load; the table gives
medians and each contender's achieved GFLOP/s as a ratio to convnext_tiny's. Modes:
- `infer`: eval-mode forward under inference_mode, training form (OverLoCK's DilatedRepConv
  branches present; timm models as built);
- `deploy`: the same after `reparameterize()` (OverLoCK; timm models: their deploy form where
  timm has one, otherwise unchanged);
- `train`: one step: forward, cross-entropy (+0.4 x aux for OverLoCK), backward, AdamW.
FLOPs: fvcore, one multiply-add = one FLOP, of one eval-mode forward at 1x3xSxS (OverLoCK through
`count_flops`, which also counts ContMix); a training step is counted as 3x the forward (the usual
convention; the ratios do not depend on it). Peak memory: `overlock.bench.PeakMemory` (RSS
high-water mark above the resident set before the call on CPU), per image; on the CPU also the
peak of the tensors alive at once (`overlock.bench.LiveMemory`, without what glibc's heap keeps
in holes after frees, which RSS counts and which OverLoCK's many map sizes make large:
`benchmarks/allocator.py`).

timm needs torchvision, which does not import beside this machine's CPU torch 2.13. Run the
script in a separate environment, with overlock on PYTHONPATH:

    python -m venv /work/venv-timm
    /work/venv-timm/bin/pip install torch==2.14.1 torchvision==0.29.1 timm fvcore pydantic pyyaml typer rich safetensors
    PYTHONPATH=<dir holding the overlock checkout as "overlock"> /work/venv-timm/bin/python benchmarks/compare_convnext.py

On a GPU (`--device cuda`, with `--amp` for bfloat16 autocast and `--compile` for torch.compile)
the contenders are measured the same way, each timed sample being `--calls` consecutive calls
between two synchronisations, and peak memory is the CUDA allocator's. A contender that
torch.compile cannot compile is reported and left out; the others are still measured.

    python benchmarks/compare_convnext.py --device cuda --batch-size 64 --calls 10 --amp --compile \
        --timm convnext_tiny --modes infer,train --label h200_bf16_compile

The table goes to benchmarks/results/compare_convnext_<label>.md (and .json).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from overlock.archspec.docs import write_readme_section
from overlock.bench import BenchSettings, LiveMemory, PeakMemory, _sync, device_name, make_step, prepare, warm_up
from overlock.builder import build, layers
from overlock.builder.flops import count_flops
from overlock.errors import OverlockError
from overlock.kernels import depthwise

TIMM_NAMES = {"convnext_tiny": "convnext_tiny", "resnet50": "resnet50", "swin_tiny": "swin_tiny_patch4_window7_224"}
RESULTS = Path(__file__).resolve().parent / "results"
# The CPU's peak is the resident set's high-water mark, which one call can overstate.
MEMORY_CALLS = 3
README = Path(__file__).resolve().parent.parent / "README.md"


def import_timm():
    try:
        import timm
    except Exception as exc:  # ImportError, or torchvision failing to load beside this torch
        sys.exit(
            f"timm does not import here ({type(exc).__name__}: {exc}).\n"
            "This benchmark needs timm and a torchvision that matches torch. On the 2-core CPU machine:\n"
            "  python -m venv /work/venv-timm\n"
            "  /work/venv-timm/bin/pip install torch==2.14.1 torchvision==0.29.1 timm fvcore pydantic pyyaml "
            "typer rich safetensors\n"
            "  PYTHONPATH=<folder with overlock> /work/venv-timm/bin/python benchmarks/compare_convnext.py"
        )
    return timm


def fvcore_flops(model: nn.Module, size: int) -> int:
    if hasattr(model, "spec"):
        return count_flops(model, (size, size)).total
    from fvcore.nn import FlopCountAnalysis

    analysis = FlopCountAnalysis(model.eval(), torch.zeros(1, 3, size, size))
    analysis.unsupported_ops_warnings(False)
    analysis.uncalled_modules_warnings(False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return int(analysis.total())


class Contender:
    """One model in one mode, with its step function (overlock.bench's, so `overlock bench` and this
    script time the same thing) and the samples collected so far."""

    def __init__(self, name: str, model: nn.Module, mode: str, flops: int, args) -> None:
        self.name, self.mode, self.batch, self.calls = name, mode, args.batch_size, args.calls
        self.flops = flops * self.batch * (3 if mode == "train" else 1)
        self.times: list[float] = []
        self.peak_mib: float | None = None
        self.live_mib: float | None = None
        self.device = torch.device(args.device)
        self.settings = BenchSettings(
            batch_size=args.batch_size,
            img_size=args.img_size,
            device=args.device,
            train=mode == "train",
            amp=args.amp,
            compile=args.compile,
        )
        head = getattr(getattr(model, "spec", None), "head", None)
        self.step = make_step(prepare(model, self.settings), self.settings, getattr(head, "num_classes", None) or 1000)
        if args.timm_products == "onednn" and not hasattr(model, "spec"):  # a timm model
            self.step = products_through_onednn(self.step)

    def warm_up(self) -> bool:
        """The first calls (compilation with --compile); False, with the reason printed, when they fail."""
        try:
            for _ in range(2):
                warm_up(self.step, self.settings)
        except OverlockError as exc:
            print(f"{self.name} ({self.mode}) left out: {exc}")
            return False
        return True

    def timed_step(self) -> None:
        """One sample: `calls` consecutive steps between two synchronisations, per step."""
        _sync(self.device)
        tick = time.perf_counter()
        for _ in range(self.calls):
            self.step()
        _sync(self.device)
        self.times.append((time.perf_counter() - tick) / self.calls)

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    @property
    def gflops_per_s(self) -> float:
        return self.flops / self.median / 1e9


def products_through_onednn(inner: Callable[[], object]) -> Callable[[], object]:
    """`inner` with every F.linear that OverLoCK's own 1x1 products would send to oneDNN sent there too
    (`layers.onednn_linear_applies`: float32 CPU, this CPU's row limit; `layers.onednn_linear`, with
    its gradients in training): timm's models as OverLoCK runs its products, which separates the
    kernels' vendor from the models' structure."""
    linear = F.linear

    def routed(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if layers.onednn_linear_applies(x, weight, bias):
            return layers.onednn_linear(x, weight, bias)
        return linear(x, weight, bias)

    def step() -> object:
        F.linear = routed
        try:
            return inner()
        finally:
            F.linear = linear

    return step


def make_models(args, timm) -> dict[str, tuple[nn.Module, int]]:
    """name -> (training-form model, fvcore FLOPs of one image); built on the CPU, seeded."""
    models = {}
    for preset in args.presets:
        torch.manual_seed(0)
        model = build(preset)
        models[f"overlock-{preset}"] = (model, fvcore_flops(model, args.img_size))
    for short in args.timm:
        torch.manual_seed(0)
        model = timm.create_model(TIMM_NAMES[short], pretrained=False)
        models[short] = (model, fvcore_flops(model, args.img_size))
    return models


def deploy_form(model: nn.Module) -> nn.Module:
    import copy

    model = copy.deepcopy(model)
    if hasattr(model, "reparameterize"):
        model.reparameterize()
    else:
        try:
            from timm.utils.model import reparameterize_model

            model = reparameterize_model(model)
        except ImportError:
            pass
    return model


def run(args) -> dict:
    timm = import_timm()
    torch.set_num_threads(args.threads)
    models = make_models(args, timm)
    memory = PeakMemory(torch.device(args.device))
    live = LiveMemory() if args.device == "cpu" and not args.compile else None
    table: dict[str, dict[str, dict]] = {}
    left_out: dict[str, list[str]] = {}
    for mode in args.modes:
        contenders = []
        for name, (model, flops) in models.items():
            used = model
            if mode == "deploy":  # FLOPs of the deploy form itself (OverLoCK's merged kernels count less)
                used = deploy_form(model.to("cpu"))  # counted on the CPU; `prepare` moves it to the device
                flops = fvcore_flops(used, args.img_size)
            contenders.append(Contender(name, used, mode, flops, args))
        # Each contender's peak memory right after its own warm-up (the median of MEMORY_CALLS
        # calls), before the next one runs: warming every model up first leaves the heap shaped by
        # the others, which read as +40% for XT's training step.
        ready = []
        for contender in contenders:
            if contender.warm_up():
                peaks = [memory.measure(contender.step) for _ in range(MEMORY_CALLS)]
                contender.peak_mib = None if None in peaks else statistics.median(peaks)
                contender.live_mib = live.measure(contender.step) if live is not None else None
                ready.append(contender)
        left_out[mode] = [c.name for c in contenders if c not in ready]
        contenders = ready
        for round_ in range(args.rounds):
            for contender in contenders if round_ % 2 == 0 else reversed(contenders):
                contender.timed_step()
            print(
                f"{mode} round {round_ + 1}/{args.rounds}: "
                + ", ".join(f"{c.name} {c.times[-1]:.4f}s" for c in contenders)
            )
        if not contenders:
            continue
        reference = next((c for c in contenders if c.name == "convnext_tiny"), contenders[0])
        table[mode] = {
            c.name: {
                "median_s": c.median,
                "times_s": c.times,
                "images_per_s": c.batch / c.median,
                "gflops_per_image": c.flops / c.batch / 1e9 / (3 if mode == "train" else 1),
                "gflops_per_s": c.gflops_per_s,
                "ratio_vs_" + reference.name: c.gflops_per_s / reference.gflops_per_s,
                "peak_mib_per_image": None if c.peak_mib is None else c.peak_mib / c.batch,
                "live_mib_per_image": None if c.live_mib is None else c.live_mib / c.batch,
            }
            for c in contenders
        }
        del contenders
        if args.device == "cuda":
            torch.cuda.empty_cache()
    device = torch.device(args.device)
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "label": args.label,
        "device": device_name(device),
        "device_type": device.type,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "batch_size": args.batch_size,
        "img_size": args.img_size,
        "rounds": args.rounds,
        "calls_per_sample": args.calls,
        "dtype": "bfloat16 autocast" if args.amp else "float32",
        "compile": args.compile,
        "timm_products": args.timm_products,
        "left_out": {mode: names for mode, names in left_out.items() if names},
        "load_average": os.getloadavg(),
        "memory_method": memory.method,
        "memory_calls": MEMORY_CALLS,
        "results": table,
        # on CUDA: per depthwise shape, whether cuDNN or overlock's Triton kernel ran, and their times
        "depthwise_cuda": depthwise.cuda_choices() if device.type == "cuda" else [],
    }


def markdown(report: dict) -> str:
    lines = [
        f"# OverLoCK vs timm models, {report['label']}",
        "",
        f"{report['date']}; {report['device']}, {report['threads']} thread(s); torch {report['torch']}, timm "
        f"{report['timm']}; batch {report['batch_size']}, {report['img_size']}x{report['img_size']}, "
        f"{report.get('dtype', 'float32')}{', torch.compile' if report.get('compile') else ''}"
        f"{'; timm products through oneDNN' if report.get('timm_products') == 'onednn' else ''}; "
        f"{report['rounds']} interleaved rounds of {report.get('calls_per_sample', 1)} call(s), medians; "
        f"load average at the end {report['load_average'][0]:.1f}.",
        f"Peak memory: {report['memory_method']}, median of {report.get('memory_calls', 1)} calls.",
        *(
            f"Left out of {mode} (torch.compile failed): {', '.join(names)}."
            for mode, names in report.get("left_out", {}).items()
        ),
        *depthwise_line(report.get("depthwise_cuda", [])),
        "",
        "| model | mode | GFLOPs/img | median s/batch | images/s | GFLOP/s | vs convnext_tiny | peak MiB/img "
        "| live MiB/img |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for mode, rows in report["results"].items():
        for name, r in rows.items():
            ratio = next(v for k, v in r.items() if k.startswith("ratio_vs_"))
            peak, live = (mib(r.get(key)) for key in ("peak_mib_per_image", "live_mib_per_image"))
            lines.append(
                f"| {name} | {mode} | {r['gflops_per_image']:.2f} | {r['median_s']:.3f} | {r['images_per_s']:.2f} | "
                f"{r['gflops_per_s']:.2f} | {ratio:.2f}x | {peak} | {live} |"
            )
    return "\n".join(lines) + "\n"


def depthwise_line(choices: list[dict]) -> list[str]:
    """How often overlock's Triton depthwise kernels beat cuDNN in the models' shapes (`depthwise.cuda_choices`)."""
    if not choices:
        return []
    counts = {
        operation: (sum(c["choice"] == "triton" for c in rows), len(rows))
        for operation in ("conv", "weight_grad")
        if (rows := [c for c in choices if c["operation"] == operation])
    }
    names = {"conv": "forward / input-gradient", "weight_grad": "weight-gradient"}
    parts = [f"{won} of {total} {names[operation]} shapes" for operation, (won, total) in counts.items()]
    return [f"Depthwise convolutions: overlock's Triton kernels beat cuDNN in {' and '.join(parts)} (timed per shape)."]


def mib(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def summary(report: dict, results_file: str) -> str:
    """The README's table: every model's GFLOP/s ratio per mode and its training memory per image."""
    modes = list(report["results"])
    names = list(next(iter(report["results"].values())))
    titles = {"infer": "inference", "deploy": "deploy form", "train": "training step"}
    header = ["GFLOP/s vs convnext_tiny", *(titles[m] for m in modes)]
    if "train" in modes:
        header.append("training MiB/img: peak (live tensors)")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name in names:
        cells = [name]
        for mode in modes:
            row = report["results"][mode][name]
            cells.append(f"{next(v for k, v in row.items() if k.startswith('ratio_vs_')):.2f}x")
        if "train" in modes:
            row = report["results"]["train"][name]
            live = row.get("live_mib_per_image")
            cells.append(mib(row["peak_mib_per_image"]) + ("" if live is None else f" ({live:.0f})"))
        lines.append("| " + " | ".join(cells) + " |")
    load = report["load_average"][0]
    lines += [
        "",
        f"({report['device']}, {report['threads']} thread(s), torch {report['torch']}, batch {report['batch_size']}, "
        f"{report['img_size']}x{report['img_size']}, {report.get('dtype', 'float32')}"
        f"{', torch.compile' if report.get('compile') else ''}, {report['rounds']} interleaved rounds, load average {load:.1f} "
        f"at the end; `{results_file}`.)",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", default="xt,t", type=lambda s: [p for p in s.split(",") if p])
    parser.add_argument(
        "--timm", default="convnext_tiny,resnet50,swin_tiny", type=lambda s: [p for p in s.split(",") if p]
    )
    parser.add_argument("--modes", default="infer,deploy,train", type=lambda s: s.split(","))
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--amp", action="store_true", help="bfloat16 autocast")
    parser.add_argument("--compile", action="store_true", help="torch.compile every contender")
    parser.add_argument("--calls", type=int, default=1, help="consecutive calls per timed sample (GPU: 10 or so)")
    parser.add_argument("--label", default="cpu_1thread", help="file-name suffix and title of the results")
    parser.add_argument(
        "--timm-products",
        choices=["as-built", "onednn"],
        default="as-built",
        help="onednn: the timm models' F.linear through oneDNN where OverLoCK's 1x1 products take it",
    )
    parser.add_argument(
        "--readme", action="store_true", help="replace the summary table between its markers in README.md"
    )
    parser.add_argument(
        "--readme-section",
        default="compare-convnext",
        help="the README markers' name (<!-- NAME:start -->): one table per device and dtype",
    )
    parser.add_argument(
        "--from-json",
        type=Path,
        metavar="FILE",
        help="render a recorded report (e.g. one a GPU lease brought back) instead of measuring; with --readme",
    )
    args = parser.parse_args(argv)
    if args.from_json is not None:
        return render_recorded(args.from_json, args.readme_section if args.readme else None, parser)
    unknown = [t for t in args.timm if t not in TIMM_NAMES]
    bad_modes = [m for m in args.modes if m not in ("infer", "deploy", "train")]
    if unknown or bad_modes:
        parser.error(
            f"unknown --timm {unknown} (valid: {sorted(TIMM_NAMES)}) or --modes {bad_modes} (infer, deploy, train)"
        )
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available here")
    if args.calls < 1:
        parser.error(f"--calls {args.calls}: give at least 1")
    report = run(args)
    RESULTS.mkdir(exist_ok=True)
    stem = RESULTS / f"compare_convnext_{args.label}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=1))
    text = markdown(report)
    stem.with_suffix(".md").write_text(text)
    print(text)
    if args.readme:
        write_readme_section(README, args.readme_section, summary(report, f"benchmarks/results/{stem.name}.md"))
    return report


def render_recorded(path: Path, readme_section: str | None, parser: argparse.ArgumentParser) -> dict:
    """Print (and with a README section, write there) the summary of a report this script wrote earlier."""
    results_file = path.with_suffix(".md").resolve()
    if results_file.is_relative_to(README.parent.resolve()):
        results_file = results_file.relative_to(README.parent.resolve())
    try:
        text = summary(json.loads(path.read_text()), results_file.as_posix())
    except (OSError, ValueError, KeyError, StopIteration) as error:
        parser.error(f"--from-json {path}: not a report written by this script ({type(error).__name__}: {error})")
    print(text)
    if readme_section is not None:
        write_readme_section(README, readme_section, text)
    return json.loads(path.read_text())


if __name__ == "__main__":
    main()
