"""The paper's mixer comparison (Table 7) run on this machine: every `specs/paper/table7/*.yaml`
trained with the same command and budget, then measured.

    python benchmarks/table7_train.py                  # train, measure, write benchmarks/results/table7_train.{md,json}
    python benchmarks/table7_train.py --readme         # and replace the table in README.md
    python benchmarks/table7_train.py --only contmix   # (re)do some specs, keep the other rows

Per spec, through `overlock compare`'s machinery (explore/compare.py): inference parameters and
FLOPs of the deploy form at 224x224 (the paper's columns), a training run through
`training.runner.train` with identical options (the spec's 1000 classes overridden to the data's
through the ordinary `--set head.num_classes=N`) and its validation top-1, and CPU images/s of
the deploy form through `overlock.bench` at one thread. The speeds are taken after training, all
specs interleaved round by round (median of the rounds), so that a change in the machine's load
hits every spec alike: compare them as ratios, not absolute numbers.

Resumable: the JSON keeps one row per spec with the settings and the spec file's hash; a rerun
with the same settings skips every spec whose row is there and whose file is unchanged, so a
killed run continues with the next spec (a spec cut off mid-training starts over).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from overlock import archspec
from overlock.archspec.docs import write_readme_section
from overlock.archspec.paper import paper_rows
from overlock.bench import device_name
from overlock.builder import build
from overlock.checkpoint import write_atomic
from overlock.explore.compare import TrainSettings, measure, static_row, trained_row

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
RESULTS = ROOT / "benchmarks" / "results"
# 10 classes of digits; synthetic sources name theirs (synthetic:classes=N,...).
DIGITS_CLASSES = 10


def classes_of(data: str) -> int:
    found = re.search(r"classes=(\d+)", data)
    if data.startswith("synthetic"):
        return int(found.group(1)) if found else 4
    if data == "digits":
        return DIGITS_CLASSES
    return sum(1 for p in (Path(data) / "train").iterdir() if p.is_dir())


def file_hash(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def load_store(path: Path, settings: dict[str, Any]) -> dict[str, Any]:
    """Rows of an earlier run with the same settings (else an empty store)."""
    if path.exists():
        store = json.loads(path.read_text())
        if store.get("settings") == settings:
            return store
        print(f"{path}: earlier results used other settings; starting over", flush=True)
    return {"settings": settings, "rows": {}}


def save_store(path: Path, store: dict[str, Any]) -> None:
    text = json.dumps(store, indent=1, sort_keys=True) + "\n"
    write_atomic(path, lambda handle: handle.write(text.encode("utf-8")))


def train_spec(path: Path, args: argparse.Namespace, runs: Path) -> dict[str, Any]:
    overrides = [f"head.num_classes={classes_of(args.data)}"]
    settings = TrainSettings(
        data=args.data, steps=args.steps, batch_size=args.batch_size, img_size=args.img_size, seed=args.seed
    )
    spec = archspec.load(path)
    row = {"source": f"specs/paper/table7/{path.name}", **static_row(spec, (224, 224))}  # 1000 classes, as the paper
    start = time.perf_counter()
    row.update(trained_row(str(path), overrides, settings, runs / path.stem))
    row["train_seconds"] = round(time.perf_counter() - start, 1)
    row["mixer"] = spec.stages[0].block.mixer.type
    if args.runs is None:  # a temporary directory: gone after this run
        del row["run_dir"]
    return row


def measure_speeds(paths: list[Path], args: argparse.Namespace) -> dict[str, float]:
    """images/s of each deploy model at 224x224, one thread, interleaved over `args.rounds` rounds."""
    overrides = [f"head.num_classes={classes_of(args.data)}"]
    models = {p.stem: build(archspec.load(p, overrides), deploy=True).eval() for p in paths}
    speeds: dict[str, list[float]] = {name: [] for name in models}
    for round_ in range(args.rounds):
        for name, model in models.items():
            result = measure(model, (224, 224), batch=args.bench_batch, reps=args.bench_reps, threads=1)
            speeds[name].append(result["images_per_s"])
            print(f"  speed round {round_ + 1}/{args.rounds} {name}: {result['images_per_s']:.2f} images/s", flush=True)
    return {name: statistics.median(values) for name, values in speeds.items()}


def render(store: dict[str, Any], names: list[str]) -> str:
    s = store["settings"]
    lines = [
        "| spec | mixer | inference params (M) | GFLOPs (224) | images/s (224, CPU, 1 thread) | val top-1 (%) |",
        "|---|---|---|---|---|---|",
    ]
    for name in names:
        row = store["rows"].get(name)
        if row is None:
            lines.append(f"| `{name}` | (not run) | | | | |")
            continue
        speed = row.get("images_per_s")
        lines.append(
            f"| `{name}` | {row['mixer']} | {row['inference_params'] / 1e6:.2f} | {row['flops'] / 1e9:.2f} "
            f"| {'-' if speed is None else f'{speed:.2f}'} | {100 * row['top1']:.1f} |"
        )
    lines.append("")
    lines.append(
        f"Training: `{s['data']}`, {s['img_size']}x{s['img_size']}, {s['steps']} steps of batch {s['batch_size']}, "
        f"seed {s['seed']}, {s['threads']} thread(s), the trainer's defaults otherwise (AdamW, lr 2e-3, cosine, label smoothing 0.1); "
        f"top-1 on the held-out split after the last step. Speed: the deploy form, batch {s['bench_batch']}, "
        f"median of {s['rounds']} interleaved rounds. {store.get('machine', '')}"
    )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="digits", help="data source as for `overlock train` (default: digits)")
    parser.add_argument("--img-size", type=int, default=64, help="training size; 64 puts the /32 stage at 2x2")
    parser.add_argument("--steps", type=int, default=80, help="optimizer steps per spec")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads", type=int, default=1, help="intra-op threads for training (1: steady on a shared machine)"
    )
    parser.add_argument("--rounds", type=int, default=3, help="interleaved speed rounds")
    parser.add_argument("--bench-batch", type=int, default=8)
    parser.add_argument("--bench-reps", type=int, default=2, help="timed calls per model and round")
    parser.add_argument("--only", nargs="*", default=None, help="spec names (file stems) to (re)run")
    parser.add_argument("--runs", type=Path, default=None, help="keep the run directories here (default: temporary)")
    parser.add_argument("--out", type=Path, default=RESULTS / "table7_train", help="results path without suffix")
    parser.add_argument("--readme", action="store_true", help="replace the table between its markers in README.md")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    rows = paper_rows("table7")
    paths = [row.path for row in rows]
    names = [p.stem for p in paths]
    unknown = set(args.only or []) - set(names)
    if unknown:
        raise SystemExit(f"--only: no such Table 7 spec {sorted(unknown)}; valid: {', '.join(names)}")
    settings = {
        key: getattr(args, key)
        for key in ("data", "img_size", "steps", "batch_size", "seed", "threads", "rounds", "bench_batch", "bench_reps")
    }
    json_path = args.out.with_suffix(".json")
    store = load_store(json_path, settings)
    for row in store["rows"].values():  # run directories of earlier invocations may be gone (temporary)
        if row.get("run_dir") and not Path(row["run_dir"]).exists():
            del row["run_dir"]
    store["machine"] = (
        f"Machine: {device_name(torch.device('cpu'))}, torch {torch.__version__}, Python {platform.python_version()}."
    )
    with tempfile.TemporaryDirectory() as scratch:
        runs = args.runs or Path(scratch)
        for path in paths:
            if args.only is not None and path.stem not in args.only:
                continue
            row = store["rows"].get(path.stem)
            if args.only is None and row is not None and row.get("spec_hash") == file_hash(path):
                print(f"{path.stem}: kept (trained earlier with these settings)", flush=True)
                continue
            print(f"{path.stem}: training ...", flush=True)
            row = train_spec(path, args, runs)
            row["spec_hash"] = file_hash(path)
            store["rows"][path.stem] = row
            save_store(json_path, store)
            print(f"{path.stem}: top-1 {100 * row['top1']:.1f}% in {row['train_seconds']:.0f} s", flush=True)
    print("speed (interleaved) ...", flush=True)
    for name, speed in measure_speeds([p for p in paths if p.stem in store["rows"]], args).items():
        store["rows"][name]["images_per_s"] = speed
    save_store(json_path, store)
    text = render(store, names)
    command = "python benchmarks/table7_train.py " + " ".join(sys.argv[1:])
    md = f"# Table 7 trained on this machine\n\n`{command.strip()}`\n\n{text}"
    write_atomic(args.out.with_suffix(".md"), lambda handle: handle.write(md.encode("utf-8")))
    print()
    print(text)
    if args.readme:
        write_readme_section(README, "table7-train", text)
        print(f"updated {README}")


if __name__ == "__main__":
    main()
