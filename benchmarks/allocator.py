"""What glibc's heap adds to a CPU training step's resident peak, and what an mmap threshold costs.

    python benchmarks/allocator.py                         # XT and T, batch 8, 224, one thread
    python benchmarks/allocator.py --presets t --thresholds 1048576 --processes 3

Why. The resident peak (`overlock bench`'s "peak MiB", `bench.PeakMemory`) counts memory glibc keeps
after frees in holes too small for the next larger map; the tensors alive at once
(`bench.LiveMemory`) do not. OverLoCK's many map sizes fragment the heap much more than ConvNeXt's.
glibc sends allocations of `MALLOC_MMAP_THRESHOLD_` bytes or more to fresh mmapped pages, returned
at every free: no holes, but every such map is page-faulted (zeroed) again on each use.

Each setting ("default" = glibc's own, which rises to 32 MiB as large maps are freed) runs in fresh
processes with the variable in the environment from the start, as a user would set it: the
threshold only applies when the heap has no free chunk that fits, so switching it inside a process
whose heap has already grown (`mallopt`) hides most of its cost (an earlier version of this script
did that and read 1.03-1.09x where a fresh process reads 1.4-1.5x). Processes of the different
settings alternate, so a busy spell on the machine falls on all of them; each reports the resident
and live peaks of a training step (forward, loss, backward, AdamW), the median step time and the
page faults per step. The time column is the median step time over the default's.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

CHILD = "--child"


def child(preset: str, batch: int, steps: int) -> dict:
    """Run in a fresh process: both peaks of a training step, its median time and page faults."""
    import resource
    import time

    import torch  # here, not at the top: the parent process never needs it

    from overlock.bench import BenchSettings, LiveMemory, PeakMemory, make_step, prepare
    from overlock.builder import build

    torch.set_num_threads(1)
    settings = BenchSettings(batch_size=batch, threads=1, train=True)
    step = make_step(prepare(build(preset), settings), settings, 1000)
    for _ in range(2):
        step()
    resident = min(PeakMemory(torch.device("cpu")).measure(step) for _ in range(2))
    live = LiveMemory().measure(step)
    times, faults = [], resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / steps
    return {
        "resident_mib": resident / batch,
        "live_mib": live / batch,
        "step_s": statistics.median(times),
        "faults": faults,
    }


def spawn(preset: str, batch: int, threshold: str, steps: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("MALLOC_MMAP_THRESHOLD_", None)
    if threshold != "default":
        env["MALLOC_MMAP_THRESHOLD_"] = threshold
    command = [sys.executable, __file__, CHILD, preset, str(batch), str(steps)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{preset} {threshold}: the child failed\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", default="xt,t")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--thresholds", default="131072,1048576", help="bytes, comma-separated")
    parser.add_argument("--processes", type=int, default=2, help="fresh processes per setting")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per process")
    args = parser.parse_args()
    settings = ["default", *args.thresholds.split(",")]
    print(
        f"training step, batch {args.batch_size}, 224x224, one thread, {args.processes} fresh processes per "
        f"setting; MiB per image (smallest over processes); time: median step over the default's"
    )
    print("| preset | MALLOC_MMAP_THRESHOLD_ | resident peak | live tensors | step time | page faults per step |")
    print("|---|---|---|---|---|---|")
    for preset in args.presets.split(","):
        runs: dict[str, list[dict]] = {setting: [] for setting in settings}
        for _ in range(args.processes):
            for setting in settings:
                runs[setting].append(spawn(preset, args.batch_size, setting, args.steps))
        default_s = statistics.median(run["step_s"] for run in runs["default"])
        for setting, results in runs.items():
            step_s = statistics.median(run["step_s"] for run in results)
            ratio = f"{step_s:.2f} s" if setting == "default" else f"{step_s / default_s:.2f}x"
            print(
                f"| {preset} | {setting} | {min(r['resident_mib'] for r in results):.1f} "
                f"| {min(r['live_mib'] for r in results):.1f} | {ratio} "
                f"| {statistics.median(r['faults'] for r in results) / 1000:.0f} thousand |",
                flush=True,
            )


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == CHILD:
        preset, batch, steps = sys.argv[2:5]
        print(json.dumps(child(preset, int(batch), int(steps))))
    else:
        main()
