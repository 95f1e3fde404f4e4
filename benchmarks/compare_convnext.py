"""OverLoCK presets against timm's convnext_tiny, resnet50 and swin_tiny: GFLOP/s, images/s, memory.

    python benchmarks/compare_convnext.py                         # xt, t vs the three timm models
    python benchmarks/compare_convnext.py --presets xt --timm convnext_tiny --rounds 3
    python benchmarks/compare_convnext.py --modes infer,train     # skip the deploy form
    python benchmarks/compare_convnext.py --readme                # and replace the summary table in README.md

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
high-water mark above the resident set before the call on CPU), per image.

timm needs torchvision, which does not import beside this machine's CPU torch 2.13. Run the
script in a separate environment, with overlock on PYTHONPATH:

    python -m venv /work/venv-timm
    /work/venv-timm/bin/pip install torch==2.14.1 torchvision==0.29.1 timm fvcore pydantic pyyaml typer rich safetensors
    PYTHONPATH=<dir holding the overlock checkout as "overlock"> /work/venv-timm/bin/python benchmarks/compare_convnext.py

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
from pathlib import Path

import torch
from torch import nn

from overlock.archspec.docs import write_readme_section
from overlock.bench import PeakMemory, _loss, device_name
from overlock.builder import build
from overlock.builder.flops import count_flops

TIMM_NAMES = {"convnext_tiny": "convnext_tiny", "resnet50": "resnet50", "swin_tiny": "swin_tiny_patch4_window7_224"}
RESULTS = Path(__file__).resolve().parent / "results"
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
    """One model in one mode, with its step function and the samples collected so far."""

    def __init__(self, name: str, model: nn.Module, mode: str, batch: int, size: int, flops: int) -> None:
        self.name, self.mode, self.batch = name, mode, batch
        self.flops = flops * batch * (3 if mode == "train" else 1)
        self.times: list[float] = []
        self.peak_mib: float | None = None
        gen = torch.Generator().manual_seed(0)
        self.image = torch.randn(batch, 3, size, size, generator=gen)
        classes = getattr(getattr(model, "spec", None), "head", None)
        classes = getattr(classes, "num_classes", None) or 1000
        self.target = torch.randint(0, classes, (batch,), generator=gen)
        self.model = model
        if mode == "train":
            model.train()
            self.optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05)
        else:
            model.eval()

    def step(self) -> None:
        if self.mode == "train":
            self.optimizer.zero_grad(set_to_none=True)
            _loss(self.model(self.image), self.target).backward()
            self.optimizer.step()
        else:
            with torch.inference_mode():
                self.model(self.image)

    def timed_step(self) -> None:
        tick = time.perf_counter()
        self.step()
        self.times.append(time.perf_counter() - tick)

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    @property
    def gflops_per_s(self) -> float:
        return self.flops / self.median / 1e9


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
    memory = PeakMemory(torch.device("cpu"))
    table: dict[str, dict[str, dict]] = {}
    for mode in args.modes:
        contenders = []
        for name, (model, flops) in models.items():
            used = model
            if mode == "deploy":  # FLOPs of the deploy form itself (OverLoCK's merged kernels count less)
                used = deploy_form(model)
                flops = fvcore_flops(used, args.img_size)
            contenders.append(Contender(name, used, mode, args.batch_size, args.img_size, flops))
        for contender in contenders:  # warm-up, then the peak memory of one more call
            contender.step()
            contender.peak_mib = memory.measure(contender.step)
        for round_ in range(args.rounds):
            for contender in contenders if round_ % 2 == 0 else reversed(contenders):
                contender.timed_step()
            print(
                f"{mode} round {round_ + 1}/{args.rounds}: "
                + ", ".join(f"{c.name} {c.times[-1]:.2f}s" for c in contenders)
            )
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
            }
            for c in contenders
        }
        del contenders
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "label": args.label,
        "device": device_name(torch.device("cpu")),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "batch_size": args.batch_size,
        "img_size": args.img_size,
        "rounds": args.rounds,
        "load_average": os.getloadavg(),
        "memory_method": memory.method,
        "results": table,
    }


def markdown(report: dict) -> str:
    lines = [
        f"# OverLoCK vs timm models, {report['label']}",
        "",
        f"{report['date']}; {report['device']}, {report['threads']} thread(s); torch {report['torch']}, timm "
        f"{report['timm']}; batch {report['batch_size']}, {report['img_size']}x{report['img_size']}, float32; "
        f"{report['rounds']} interleaved rounds, medians; load average at the end {report['load_average'][0]:.1f}.",
        f"Peak memory: {report['memory_method']}.",
        "",
        "| model | mode | GFLOPs/img | median s/batch | images/s | GFLOP/s | vs convnext_tiny | peak MiB/img |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for mode, rows in report["results"].items():
        for name, r in rows.items():
            ratio = next(v for k, v in r.items() if k.startswith("ratio_vs_"))
            peak = "-" if r["peak_mib_per_image"] is None else f"{r['peak_mib_per_image']:.0f}"
            lines.append(
                f"| {name} | {mode} | {r['gflops_per_image']:.2f} | {r['median_s']:.3f} | {r['images_per_s']:.2f} | "
                f"{r['gflops_per_s']:.2f} | {ratio:.2f}x | {peak} |"
            )
    return "\n".join(lines) + "\n"


def summary(report: dict, results_file: str) -> str:
    """The README's table: every model's GFLOP/s ratio per mode and its training memory per image."""
    modes = list(report["results"])
    names = list(next(iter(report["results"].values())))
    titles = {"infer": "inference", "deploy": "deploy form", "train": "training step"}
    header = ["GFLOP/s vs convnext_tiny", *(titles[m] for m in modes)]
    if "train" in modes:
        header.append("training MiB/img")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name in names:
        cells = [name]
        for mode in modes:
            row = report["results"][mode][name]
            cells.append(f"{next(v for k, v in row.items() if k.startswith('ratio_vs_')):.2f}x")
        if "train" in modes:
            peak = report["results"]["train"][name]["peak_mib_per_image"]
            cells.append("-" if peak is None else f"{peak:.0f}")
        lines.append("| " + " | ".join(cells) + " |")
    load = report["load_average"][0]
    lines += [
        "",
        f"({report['device']}, {report['threads']} thread(s), torch {report['torch']}, batch {report['batch_size']}, "
        f"{report['img_size']}x{report['img_size']}, {report['rounds']} interleaved rounds, load average {load:.1f} "
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
    parser.add_argument("--label", default="cpu_1thread", help="file-name suffix and title of the results")
    parser.add_argument(
        "--readme", action="store_true", help="replace the summary table between its markers in README.md"
    )
    args = parser.parse_args(argv)
    unknown = [t for t in args.timm if t not in TIMM_NAMES]
    bad_modes = [m for m in args.modes if m not in ("infer", "deploy", "train")]
    if unknown or bad_modes:
        parser.error(
            f"unknown --timm {unknown} (valid: {sorted(TIMM_NAMES)}) or --modes {bad_modes} (infer, deploy, train)"
        )
    report = run(args)
    RESULTS.mkdir(exist_ok=True)
    stem = RESULTS / f"compare_convnext_{args.label}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=1))
    text = markdown(report)
    stem.with_suffix(".md").write_text(text)
    print(text)
    if args.readme:
        write_readme_section(README, "compare-convnext", summary(report, f"benchmarks/results/{stem.name}.md"))
    return report


if __name__ == "__main__":
    main()
