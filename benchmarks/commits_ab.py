"""Two commits of overlock against each other, in alternating fresh processes.

    python benchmarks/commits_ab.py df276c4            # that commit against the working tree
    python benchmarks/commits_ab.py df276c4 HEAD --presets xt,t --runs 3 --no-train
    python benchmarks/commits_ab.py df276c4 HEAD --threads 2   # torch's thread count in each process

What `benchmarks/layers_ab.py` cannot switch in one process (a C kernel's source, the code of a
whole round) is compared here: each commit is checked out into a temporary git worktree, and one
process per commit and run imports overlock from it (its C kernels compile from its own sources)
and times inference (training form and deploy form at batch 8, training form at batch 1) and a
training step, at one thread (or `--threads`), medians of 5 / 15 / 3 calls. The processes alternate
old, new, old, new ..., so a change in the machine's load reaches both. Prints every run and the
median per commit.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# What one process measures (run with `python -c`, overlock importable from PYTHONPATH).
CHILD = r"""
import json, statistics, sys, time
import torch
import torch.nn.functional as F
from overlock.builder import build
from overlock.training.optim import build_optimizer

presets, train, threads = sys.argv[1].split(","), sys.argv[2] == "1", int(sys.argv[3])
torch.set_num_threads(threads)
results = {}
for preset in presets:
    for form in ("infer", "deploy", "infer-b1") + (("train",) if train else ()):
        torch.manual_seed(0)
        model = build(preset, deploy=form == "deploy")
        batch = 1 if form == "infer-b1" else 8
        image, target = torch.randn(batch, 3, 224, 224), torch.randint(0, 1000, (batch,))
        if form == "train":
            model.train()
            optimizer = build_optimizer(model, lr=1e-4, weight_decay=0.05)

            def step():
                optimizer.zero_grad(set_to_none=True)
                out = model(image)
                (F.cross_entropy(out["main"], target) + 0.4 * F.cross_entropy(out["aux"], target)).backward()
                optimizer.step()

            calls = 3
        else:
            model.eval()

            def step():
                with torch.inference_mode():
                    model(image)

            calls = 15 if batch == 1 else 5
        step()
        times = []
        for _ in range(calls):
            tick = time.perf_counter()
            step()
            times.append(time.perf_counter() - tick)
        results[f"{preset} {form}"] = statistics.median(times)
print(json.dumps(results))
"""


def worktree(revision: str, root: Path) -> Path:
    """A PYTHONPATH entry under which `import overlock` is `revision`'s tree."""
    tree = root / revision.replace("/", "_")
    subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", "-q", str(tree), revision], check=True)
    shim = root / f"{tree.name}.path"
    shim.mkdir()
    (shim / "overlock").symlink_to(tree)
    return shim


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("old", help="a git revision (commit, tag, branch)")
    parser.add_argument("new", nargs="?", default=None, help="a git revision; default: the working tree")
    parser.add_argument("--presets", default="xt")
    parser.add_argument("--runs", type=int, default=2, help="processes per commit")
    parser.add_argument("--no-train", action="store_true", help="inference only")
    parser.add_argument("--threads", type=int, default=1, help="torch's (and OpenMP's) thread count")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="overlock-ab-") as tmp:
        root = Path(tmp)
        paths = {args.old: worktree(args.old, root)}
        if args.new is None:
            (root / "working.path").mkdir()
            (root / "working.path" / "overlock").symlink_to(REPO)
            paths["working tree"] = root / "working.path"
        else:
            paths[args.new] = worktree(args.new, root)
        runs: dict[str, list[dict[str, float]]] = {name: [] for name in paths}
        try:
            for run in range(args.runs):
                for name, path in paths.items():
                    env = {**os.environ, "PYTHONPATH": str(path), "OMP_NUM_THREADS": str(args.threads)}
                    train = "0" if args.no_train else "1"
                    child = [sys.executable, "-c", CHILD, args.presets, train, str(args.threads)]
                    done = subprocess.run(child, env=env, cwd=tmp, capture_output=True, text=True, check=True)
                    runs[name].append(json.loads(done.stdout.strip().splitlines()[-1]))
                    print(
                        f"run {run + 1} {name}: "
                        + ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in runs[name][-1].items())
                    )
        finally:
            for name in paths:
                if name != "working tree":
                    subprocess.run(
                        ["git", "-C", str(REPO), "worktree", "remove", "--force", str(root / name.replace("/", "_"))]
                    )
        (first, old), (second, new) = runs.items()
        print(f"\nmedian ms over {args.runs} processes, {args.threads} thread(s): {first} | {second} | old/new")
        for key in old[0]:
            a, b = statistics.median(r[key] for r in old), statistics.median(r[key] for r in new)
            print(f"  {key:16} {a * 1e3:9.1f} | {b * 1e3:9.1f} | {a / b:.2f}x")


if __name__ == "__main__":
    main()
