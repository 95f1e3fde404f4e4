"""What glibc's heap adds to a CPU training step's resident peak, and what an mmap threshold costs.

    python benchmarks/allocator.py                         # XT and T, batch 8, 224, one thread
    python benchmarks/allocator.py --presets t --thresholds 1048576 --rounds 7

Why. The resident peak (`overlock bench`'s "peak MiB", `bench.PeakMemory`) counts memory glibc keeps
after frees in holes too small for the next larger map; the tensors alive at once
(`bench.LiveMemory`) do not. OverLoCK's many map sizes fragment the heap much more than ConvNeXt's.
glibc sends allocations of `MALLOC_MMAP_THRESHOLD_` bytes or more to fresh mmapped pages, returned
at every free: no holes, but every such map is page-faulted (zeroed) again on each use.

For each preset and each threshold ("default" = glibc's own, which rises to 32 MiB as large maps
are freed) a fresh process (the variable must be set before the heap is used) reports both peaks
of a training step (forward, loss, backward, AdamW); then one process times the step with the
threshold set and with a fixed 32 MiB one (glibc's ceiling), interleaved step by step through
`mallopt`, and prints the ratio of the medians.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

CHILD = "--child"
M_MMAP_THRESHOLD = -3  # mallopt's parameter number (malloc.h)
GLIBC_CEILING = 32 * 2**20


def child(preset: str, batch: int, mode: str, threshold: int, rounds: int) -> dict:
    """Run in a fresh process: the peaks (mode "memory") or the interleaved timing (mode "time")."""
    import torch  # here, not at the top: the parent process never needs it

    from overlock.bench import BenchSettings, make_step, prepare
    from overlock.builder import build

    torch.set_num_threads(1)
    settings = BenchSettings(batch_size=batch, threads=1, train=True)
    step = make_step(prepare(build(preset), settings), settings, 1000)
    for _ in range(2):
        step()
    if mode == "memory":
        from overlock.bench import LiveMemory, PeakMemory

        resident = min(PeakMemory(torch.device("cpu")).measure(step) for _ in range(2))
        return {"resident_mib": resident / batch, "live_mib": LiveMemory().measure(step) / batch}
    import ctypes

    libc = ctypes.CDLL("libc.so.6")
    times: dict[str, list[float]] = {"ceiling": [], "threshold": []}
    for _ in range(rounds):
        for key, value in (("ceiling", GLIBC_CEILING), ("threshold", threshold)):
            libc.mallopt(M_MMAP_THRESHOLD, value)
            step()  # the heap settles under the new threshold
            start = time.perf_counter()
            step()
            times[key].append(time.perf_counter() - start)
    return {key: statistics.median(values) for key, values in times.items()}


def spawn(preset: str, batch: int, mode: str, threshold: str, rounds: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if mode == "memory" and threshold != "default":
        env["MALLOC_MMAP_THRESHOLD_"] = threshold
    command = [sys.executable, __file__, CHILD, preset, str(batch), mode, threshold, str(rounds)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{preset} {mode} {threshold}: the child failed\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", default="xt,t")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--thresholds", default="131072,1048576", help="bytes, comma-separated")
    parser.add_argument("--rounds", type=int, default=5, help="timed steps per setting")
    args = parser.parse_args()
    thresholds = args.thresholds.split(",")
    print(f"training step, batch {args.batch_size}, 224x224, one thread; MiB per image; time: threshold / 32 MiB")
    print("| preset | MALLOC_MMAP_THRESHOLD_ | resident peak | live tensors | step time |")
    print("|---|---|---|---|---|")
    for preset in args.presets.split(","):
        for threshold in ["default", *thresholds]:
            peaks = spawn(preset, args.batch_size, "memory", threshold, 0)
            ratio = "-"
            if threshold != "default":
                times = spawn(preset, args.batch_size, "time", threshold, args.rounds)
                ratio = f"{times['threshold'] / times['ceiling']:.2f}x"
            print(
                f"| {preset} | {threshold} | {peaks['resident_mib']:.1f} | {peaks['live_mib']:.1f} | {ratio} |",
                flush=True,
            )


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == CHILD:
        preset, batch, mode, threshold, rounds = sys.argv[2:7]
        limit = int(threshold) if threshold != "default" else GLIBC_CEILING
        print(json.dumps(child(preset, int(batch), mode, limit, int(rounds))))
    else:
        main()
