"""The presets' 1x1 convs at inference: MKL's addmm (F.linear) against oneDNN's linear.

    python benchmarks/pointwise.py                 # XT, batch 8, 224x224, one thread
    python benchmarks/pointwise.py --preset t --threads 2

Every `Pointwise` of the preset records its product's shape (rows = images x pixels, input and output
channels) in one inference forward; each shape then runs both ways, interleaved, medians. This is the
measurement behind `builder.layers.ONEDNN_LINEAR_MIN_ROWS`: products with at least that many rows
take oneDNN's linear in the model (`pixel_linear`). The last row weighs each shape by its count.
"""

from __future__ import annotations

import argparse
import collections

import torch
import torch.nn.functional as F
from depthwise_weight_grad import interleaved_ms

from overlock.builder import build, layers


def pointwise_shapes(preset: str, batch: int, size: int) -> collections.Counter:
    """(rows, in channels, out channels) -> how many 1x1 products of an inference forward have it."""
    model = build(preset).eval()
    counts: collections.Counter = collections.Counter()

    def record(module, args) -> None:
        x = args[0]
        counts[(x.numel() // x.shape[1], x.shape[1], module.out_channels)] += 1

    hooks = [m.register_forward_pre_hook(record) for m in model.modules() if isinstance(m, layers.Pointwise)]
    with torch.inference_mode():
        model(torch.randn(batch, 3, size, size))
    for hook in hooks:
        hook.remove()
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="xt")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=11)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if not layers._onednn_linear_available():
        raise SystemExit("this PyTorch has no oneDNN linear: nothing to compare")
    contenders = {
        "F.linear": F.linear,
        "oneDNN": lambda x, w, b: torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], ""),
    }
    print(
        f"{args.preset}, batch {args.batch_size}, {args.img_size}px, {args.threads} thread(s), medians of "
        f"{args.rounds} interleaved calls; oneDNN in the model from {layers.ONEDNN_LINEAR_MIN_ROWS} rows"
    )
    print("| rows x in -> out (count) | F.linear ms | oneDNN ms | F.linear / oneDNN | largest difference |")
    print("|---|---|---|---|---|")
    total = dict.fromkeys(contenders, 0.0)
    for (rows, width, out), count in sorted(pointwise_shapes(args.preset, args.batch_size, args.img_size).items()):
        x, weight, bias = torch.randn(rows, width), torch.randn(out, width) / width**0.5, torch.randn(out)
        difference = (contenders["oneDNN"](x, weight, bias) - F.linear(x, weight, bias)).abs().max().item()
        ms = interleaved_ms(contenders, (x, weight, bias), args.rounds)
        for key in total:
            total[key] += count * ms[key]
        print(
            f"| {rows} x {width} -> {out} (x{count}) | {ms['F.linear']:.2f} | {ms['oneDNN']:.2f} | "
            f"{ms['F.linear'] / ms['oneDNN']:.2f}x | {difference:.1e} |"
        )
    print(
        f"| all, each as often as the preset has it | {total['F.linear']:.0f} | {total['oneDNN']:.0f} | "
        f"{total['F.linear'] / total['oneDNN']:.2f}x | |"
    )


if __name__ == "__main__":
    main()
