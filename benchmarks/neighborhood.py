"""Benchmark neighbourhood attention: overlock's CPU (or Triton) path against the unfold formulation.

    python benchmarks/neighborhood.py --threads 1            # the issue's table (CPU, one thread)
    python benchmarks/neighborhood.py --quick                # 28x28 K7 only, few repetitions

Shapes: batch 8, 8 heads, c 32, 56x56 and 28x28, K 7 and 13, float32, with a relative position
bias. Methods: the default backend of the device ("cpu" or "triton"), the "unfold" formulation
(materialise the K*K neighbourhood of keys and values with F.unfold, then two matmuls, plain
autograd; kernels/neighborhood.py), the "reference" gather (index the K*K neighbours, multiply and
sum: also materialises the neighbourhood, and is the faster of the two naive formulations on CPU)
and NATTEN's fused `na2d` when natten imports.

Forward+backward time is the median over repetitions in which the methods are interleaved (one
call of each per round), so a change of load hits them alike; the speed-up is the ratio of those
medians. Peak memory is measured as in benchmarks/contmix.py (RSS high-water mark on CPU, the
allocator's peak on CUDA). The unfold formulation at 56x56, K=13, batch 8 needs ~17 GiB; where its
estimated peak exceeds --max-unfold-gib, every method of that shape is measured at the largest
batch that fits (time and memory are linear in the batch), and the table says so.

Results go to benchmarks/results/neighborhood_<device>.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

from overlock import kernels
from overlock.benchmarks.contmix import RESULTS, PeakMemory, device_slug, fmt, machine_info
from overlock.kernels import neighborhood, ops


def natten_method():
    """NATTEN's fused 2-D neighbourhood attention (heads-last layout), when natten imports."""
    try:
        import natten
        from natten.functional import na2d
    except Exception as exc:  # noqa: BLE001 - any import failure means "not available"
        return None, f"natten unavailable ({type(exc).__name__}: {exc})"

    def run(q, k, v, rpb, kernel_size):
        out = na2d(*(t.permute(0, 2, 3, 1, 4) for t in (q, k, v)), kernel_size=kernel_size)
        return out.permute(0, 3, 1, 2, 4)  # natten >= 0.20 has no bias; timed without it

    return run, f"natten {getattr(natten, '__version__', '?')} (no relative position bias)"


def unfold_peak_bytes(batch, heads, size, channels, kernel_size) -> int:
    """Rough peak of the unfold formulation: ~4 copies of one (B, h, H, W, K*K, c) window tensor."""
    return 4 * batch * heads * size * size * kernel_size**2 * channels * 4


def measure(shape, methods, device, memory, reps, budget):
    batch, heads, size, channels, k = shape
    gen = torch.Generator().manual_seed(0)
    tensors = [torch.randn(batch, heads, size, size, channels, generator=gen).to(device) for _ in range(3)]
    rpb = (torch.randn(heads, 2 * k - 1, 2 * k - 1, generator=gen) * 0.02).to(device)
    grad = torch.randn(batch, heads, size, size, channels, generator=gen).to(device)
    leaves = [t.requires_grad_() for t in (*tensors, rpb)]

    def step(method):
        def run():
            out = method(*leaves, k)
            out.backward(grad)
            for leaf in leaves:
                leaf.grad = None

        return run

    runs = {name: step(method) for name, method in methods.items()}
    result = {}
    for name, run in runs.items():
        run()  # warm-up (plans, lazy initialisation)
        result[name] = {"peak_mib": memory.measure(run), "times": []}
    start = time.perf_counter()
    rounds = 0
    while rounds < reps and (rounds < 2 or time.perf_counter() - start < budget):
        for name, run in runs.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            tick = time.perf_counter()
            run()
            if device.type == "cuda":
                torch.cuda.synchronize()
            result[name]["times"].append(time.perf_counter() - tick)
        rounds += 1
    for res in result.values():
        res["median_ms"] = statistics.median(res["times"]) * 1e3
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--channels", type=int, default=32)
    parser.add_argument("--sizes", nargs="+", type=int, default=[28, 56])
    parser.add_argument("--kernels", nargs="+", type=int, default=[7, 13])
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--budget", type=float, default=60.0, help="seconds of timed rounds per shape")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--max-unfold-gib", type=float, default=6.0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.quick:
        args.sizes, args.kernels, args.reps = [28], [7], 3
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    fast = ops.resolve_backend("auto", (torch.empty(0, device=device),))
    methods = {
        fast: lambda q, k, v, rpb, ks: kernels.neighborhood_attention(q, k, v, rpb, ks, backend=fast),
        "unfold": lambda q, k, v, rpb, ks: kernels.neighborhood_attention(q, k, v, rpb, ks, backend="unfold"),
        "reference": lambda q, k, v, rpb, ks: neighborhood.reference_attention(q, k, v, rpb, ks),
    }
    notes = {}
    natten, note = natten_method()
    if natten is None:
        notes["natten"] = note
    else:
        methods["natten"] = natten
    memory = PeakMemory(device)
    info = machine_info(device)
    load_before = [round(x, 2) for x in os.getloadavg()]
    print(f"neighbourhood attention on {info['device_name']}, {torch.get_num_threads()} threads; {memory.method}")

    rows = []
    for size in args.sizes:
        for k in args.kernels:
            batch = args.batch
            limit = args.max_unfold_gib * 2**30
            while batch > 1 and unfold_peak_bytes(batch, args.heads, size, args.channels, k) > limit:
                batch //= 2
            shape = (batch, args.heads, size, args.channels, k)
            started = time.perf_counter()
            res = measure(shape, methods, device, memory, args.reps, args.budget)
            row = {"size": size, "kernel_size": k, "batch": batch, "heads": args.heads, "channels": args.channels}
            row["results"] = {name: {key: r[key] for key in ("median_ms", "peak_mib")} for name, r in res.items()}
            row["rounds"] = len(res[fast]["times"])
            base = res["unfold"]
            row["speedup_vs_unfold"] = base["median_ms"] / res[fast]["median_ms"]
            row["speedup_vs_reference"] = res["reference"]["median_ms"] / res[fast]["median_ms"]
            if base["peak_mib"] and res[fast]["peak_mib"] is not None:
                row["peak_memory_ratio"] = res[fast]["peak_mib"] / base["peak_mib"]
            rows.append(row)
            print(
                f"  {size}x{size} K{k} B{batch}: "
                + ", ".join(f"{n} {r['median_ms']:.1f} ms / {fmt(r['peak_mib'], '.0f')} MiB" for n, r in res.items())
                + f"; speed-up {row['speedup_vs_unfold']:.1f}x (vs gather {row['speedup_vs_reference']:.1f}x), memory ratio {fmt(row.get('peak_memory_ratio'), '.3f')}"
                f" ({time.perf_counter() - started:.0f}s)"
            )

    report = {
        "machine": info,
        "settings": vars(args) | {"out": str(args.out)},
        "fast_backend": fast,
        "memory_method": memory.method,
        "notes": notes,
        "rows": rows,
        "load_before": load_before,
        "load_after": [round(x, 2) for x in os.getloadavg()],
    }
    m = info
    lines = [
        f"# Neighbourhood attention benchmark: {m['device_name']}",
        "",
        f"{m['date']}, torch {m['torch']}, triton {m['triton']}, {m['cpu']} ({m['cpu_count']} cores, "
        f"{m['torch_threads']} torch threads), commit {m['git_commit']}. Load average before/after: "
        f"{report['load_before']} / {report['load_after']}.",
        "",
        f"float32, {args.heads} heads, c {args.channels}, relative position bias; forward+backward; time = median of "
        f"interleaved rounds after a warm-up; peak memory = {memory.method}. Batch {args.batch} unless the "
        f"batch column says less (the unfold formulation's estimated peak above {args.max_unfold_gib} GiB; "
        "all methods of that row then run at that batch).",
        "",
        "| map | K | batch | method | fwd+bwd ms | peak MiB | speed-up vs unfold | peak memory / unfold "
        "| speed-up vs reference gather |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        base = row["results"]["unfold"]
        for name, r in row["results"].items():
            speed = base["median_ms"] / r["median_ms"]
            ratio = r["peak_mib"] / base["peak_mib"] if r["peak_mib"] and base["peak_mib"] else None
            lines.append(
                f"| {row['size']}x{row['size']} | {row['kernel_size']} | {row['batch']} | {name} | "
                f"{r['median_ms']:.1f} | {fmt(r['peak_mib'], '.0f')} | {speed:.1f}x | {fmt(ratio, '.3f')} | "
                f"{row['results']['reference']['median_ms'] / r['median_ms']:.1f}x |"
            )
    if notes:
        lines += ["", "Not measured: " + "; ".join(f"{k}: {v}" for k, v in notes.items()) + "."]
    args.out.mkdir(parents=True, exist_ok=True)
    tag = f"_{torch.get_num_threads()}thread" if device.type == "cpu" else ""
    stem = args.out / f"neighborhood_{device_slug(info)}{tag}{'_quick' if args.quick else ''}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"wrote {stem}.json and {stem}.md")
    return report


if __name__ == "__main__":
    main()
