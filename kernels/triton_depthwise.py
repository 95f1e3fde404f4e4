"""Triton kernels for the same-padded, stride-1 depthwise convolutions of DilatedRepConv, for CUDA.

Why. On an H100 (torch 2.11, cuDNN 9.19) cuDNN runs OverLoCK's large depthwise kernels (17x17 at
56x56, 15x15 at 28x28, the dilated branches) through its direct grouped kernels: 2 ms for one 17x17
forward at batch 64, half of XT's inference and more than half of a training step with the
weight gradients (`benchmarks/results/gpu_profile_xt_nvidia-h100-80gb-hbm3.md`). The arithmetic
is small (289 multiply-adds per output) and the maps fit in cache; what costs is reloading the
window for every output. `kernels/depthwise.py` times these kernels against PyTorch's on first use
of each shape and runs the faster (no GPU had run them when they were written).

- Forward (`_depthwise_forward`): one program owns ROWS output rows, spaced by the dilation so
  that they share input rows, times BLOCK_W columns times BLOCK_C channels, of one image. It walks
  the ROWS + K - 1 input rows the window touches; each input row segment, shifted by each of the K
  horizontal taps, is loaded once and multiplied into every one of the ROWS outputs it reaches,
  with the tap weights (kh = input row - output row) as a (ROWS, BLOCK_C) vector. Loads per output:
  K (ROWS + K - 1) / ROWS instead of K*K.
- Input gradient: the same kernel on the output gradient with the kernel mirrored (the adjoint of
  a same-padded correlation), as in depthwise.py.
- Weight gradient (`_depthwise_weight_grad`): grad_w[c, kh, kw] = sum over b, y, x of
  grad[b, c, y, x] * x[b, c, y - pad + d*kh, x - pad + d*kw]. One program owns one kernel row kh
  and a channel block, for a strided share of the B*H output rows: per row it loads the gradient
  segment once and, per horizontal tap, the shifted input segment, and reduces their product over
  the columns. Each program writes its own (K, BLOCK_C) partial sums; the shares are summed after
  (deterministic, no atomics).
Inputs may be float16, bfloat16 or float32 in any memory layout (strides are arguments);
everything accumulates in float32. On a GPU Triton's autotuner picks the tiles (FORWARD_TILES, of
which `forward_tiles_for` keeps those that suit the map's layout, and WEIGHT_GRAD_TILES), timing
each briefly and keeping its choice on disk; the interpreter takes whole maps.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import triton
import triton.language as tl
import triton.testing

from .triton_kernels import INTERPRETED

# Programs per streaming multiprocessor the weight gradient aims for when it splits the rows.
_WGRAD_PROGRAMS_PER_SM = 4


@triton.jit
def _depthwise_forward(
    x_ptr, w_ptr, bias_ptr, out_ptr,
    H, W, C,
    sx_b, sx_c, sx_h, sx_w,
    so_b, so_c, so_h, so_w,
    K: tl.constexpr, DILATION: tl.constexpr, HAS_BIAS: tl.constexpr,
    ROWS: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    n_wblocks = tl.cdiv(W, BLOCK_W)
    groups_per_residue = tl.cdiv(tl.cdiv(H, DILATION), ROWS)
    group = pid // n_wblocks
    wb = pid % n_wblocks
    # Output rows residue, residue + d, ... share input rows; each group holds ROWS of one residue.
    residue = group // groups_per_residue
    first = residue + (group % groups_per_residue) * (ROWS * DILATION)
    pad: tl.constexpr = DILATION * (K - 1) // 2
    rr = tl.arange(0, ROWS)
    rows = first + rr * DILATION
    cols = wb * BLOCK_W + tl.arange(0, BLOCK_W)
    cc = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cc < C
    x_image = x_ptr + b * sx_b + cc[None, :] * sx_c
    acc = tl.zeros((ROWS, BLOCK_W, BLOCK_C), dtype=tl.float32)
    for j in range(0, ROWS + K - 1):
        y = first - pad + j * DILATION
        y_lanes = tl.zeros((BLOCK_W,), dtype=tl.int32) + y  # a vector: the interpreter cannot mask with scalar & vector
        y_ok = (y_lanes >= 0) & (y_lanes < H)
        y_safe = tl.minimum(tl.maximum(y, 0), H - 1)
        kh = j - rr  # the tap row that input row y is for each output row
        taps = (kh >= 0) & (kh < K)
        w_rows = w_ptr + cc[None, :] * (K * K) + tl.where(taps, kh, 0)[:, None] * K
        wmask = taps[:, None] & cmask[None, :]
        for kw in range(0, K):
            xc = cols - pad + kw * DILATION
            xmask = ((xc >= 0) & (xc < W) & y_ok)[:, None] & cmask[None, :]
            xc_safe = tl.minimum(tl.maximum(xc, 0), W - 1)
            xt = tl.load(x_image + y_safe * sx_h + xc_safe[:, None] * sx_w, mask=xmask, other=0.0).to(tl.float32)
            wt = tl.load(w_rows + kw, mask=wmask, other=0.0).to(tl.float32)
            acc += xt[None, :, :] * wt[:, None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cc, mask=cmask, other=0.0).to(tl.float32)[None, None, :]
    omask = (rows < H)[:, None, None] & (cols < W)[None, :, None] & cmask[None, None, :]
    offsets = rows[:, None, None] * so_h + cols[None, :, None] * so_w + cc[None, None, :] * so_c
    tl.store(out_ptr + b * so_b + offsets, acc.to(out_ptr.dtype.element_ty), mask=omask)


@triton.jit
def _depthwise_weight_grad(
    x_ptr, g_ptr, part_ptr,
    H, W, C, n_rows, n_splits,
    sx_b, sx_c, sx_h, sx_w,
    sg_b, sg_c, sg_h, sg_w,
    K: tl.constexpr, DILATION: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    cb = tl.program_id(0)
    kh = tl.program_id(1)
    split = tl.program_id(2)
    pad: tl.constexpr = DILATION * (K - 1) // 2
    cc = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cc < C
    kk = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_K, BLOCK_C), dtype=tl.float32)
    for r in range(split, n_rows, n_splits):  # output rows (b, h), flattened
        b = (r // H).to(tl.int64)
        h = r % H
        y = h - pad + kh * DILATION
        if (y >= 0) & (y < H):
            g_row = g_ptr + b * sg_b + h * sg_h + cc[None, :] * sg_c
            x_row = x_ptr + b * sx_b + y * sx_h + cc[None, :] * sx_c
            for w0 in range(0, W, BLOCK_W):
                cols = w0 + tl.arange(0, BLOCK_W)
                gmask = (cols < W)[:, None] & cmask[None, :]
                gt = tl.load(g_row + cols[:, None] * sg_w, mask=gmask, other=0.0).to(tl.float32)
                for kw in range(0, K):
                    xc = cols - pad + kw * DILATION
                    xmask = ((xc >= 0) & (xc < W))[:, None] & gmask
                    xc_safe = tl.minimum(tl.maximum(xc, 0), W - 1)
                    xt = tl.load(x_row + xc_safe[:, None] * sx_w, mask=xmask, other=0.0).to(tl.float32)
                    tap = tl.sum(gt * xt, axis=0)
                    acc += tl.where(kk[:, None] == kw, tap[None, :], 0.0)
    # partials: (n_splits, C, K, K) float32, contiguous
    offsets = split * (C * K * K) + cc[None, :] * (K * K) + kh * K + kk[:, None]
    tl.store(part_ptr + offsets, acc, mask=(kk < K)[:, None] & cmask[None, :])


def _pow2_at_most(n: int, cap: int) -> int:
    return min(cap, triton.next_power_of_2(max(n, 1)))


# On a GPU Triton's autotuner picks the tiles per map shape and layout (the first call of each times
# the configs `forward_tiles_for` keeps for its layout; no GPU had run these when they were written,
# so the list spans the layouts rather than being tuned). Forward: ROWS x BLOCK_W x BLOCK_C float32
# accumulators, 2048-8192 (16 to 64 registers a thread at 4 warps); wide BLOCK_W suits NCHW maps
# (columns contiguous), wide BLOCK_C channels_last ones. Weight gradient: the segment width and
# warps; BLOCK_C stays 32 (the row splits and their partial sums are sized by it).
FORWARD_TILES = [(8, 16, 32, 4), (8, 32, 16, 4), (4, 64, 8, 4), (16, 16, 16, 4), (4, 8, 64, 4), (8, 32, 32, 8)]
WEIGHT_GRAD_TILES = [(64, 4), (32, 4), (128, 8)]
WEIGHT_GRAD_BLOCK_C = 32


def forward_config(height: int, width: int, channels: int, dilation: int) -> dict[str, int]:
    """The interpreter's tiles: whole maps (it pays per program and per op, not per register)."""
    return {
        "ROWS": _pow2_at_most(-(-height // dilation), 64),
        "BLOCK_W": _pow2_at_most(width, 64),
        "BLOCK_C": _pow2_at_most(channels, 64),
    }


def _forward_configs() -> list[triton.Config]:
    return [
        triton.Config({"ROWS": rows, "BLOCK_W": block_w, "BLOCK_C": block_c}, num_warps=warps)
        for rows, block_w, block_c, warps in FORWARD_TILES
    ]


def _weight_grad_configs() -> list[triton.Config]:
    return [triton.Config({"BLOCK_W": block_w}, num_warps=warps) for block_w, warps in WEIGHT_GRAD_TILES]


def forward_tiles_for(configs: list[triton.Config], named_args: dict, **_) -> list[triton.Config]:
    """The forward tiles worth timing for a map (the autotuner's `early_config_prune`): those whose
    block along the map's contiguous dimension (channels in channels_last, columns in NCHW) is at
    least that dimension rounded up to a power of two, or 32, whichever is smaller, and at most
    twice it: a narrower block reads the contiguous rows in short pieces, a wider one leaves more
    than half its lanes idle. Three or four of the six remain per map, which halves what the first
    call of each shape compiles and times (every tile is a compilation per kernel size, dilation
    and dtype, and a timing per map shape: XT and T have about 50 depthwise shapes)."""
    if named_args["sx_c"] == 1:
        extent, field = named_args["C"], "BLOCK_C"
    elif named_args["sx_w"] == 1:
        extent, field = named_args["W"], "BLOCK_W"
    else:  # neither layout: nothing to say which tiles read well
        return configs
    span = triton.next_power_of_2(max(int(extent), 1))
    kept = [c for c in configs if min(span, 32) <= c.kwargs[field] <= 2 * span]
    return kept or configs


def _quick_bench(kernel_call: Callable[[], object], quantiles: tuple[float, ...]) -> list[float]:
    """The autotuner's timing of one tile, shorter than Triton's default (25 ms of warm-up and 100 ms
    of repetitions a tile): enough to rank tiles whose times differ by more than a few percent, and
    a model's first call, which tunes the forward and the weight gradient of each of its shapes,
    should take seconds, not minutes."""
    return triton.testing.do_bench(kernel_call, warmup=5, rep=20, quantiles=quantiles)


_LAYOUT_KEY = ["H", "W", "C", "K", "DILATION", "sx_c", "sx_w"]
# cache_results: the tiles chosen per shape are kept beside Triton's compiled kernels, so a later
# process (the next benchmark, a resumed training run) does not time them again.
_TUNING = {"key": _LAYOUT_KEY, "do_bench": _quick_bench, "cache_results": True}
_forward_tuned = triton.autotune(
    _forward_configs(), prune_configs_by={"early_config_prune": forward_tiles_for}, **_TUNING
)(_depthwise_forward)
_weight_grad_tuned = triton.autotune(_weight_grad_configs(), **_TUNING)(_depthwise_weight_grad)


def aot_variants(width: int, kernel_size: int, channels: int) -> list[tuple[str, dict, int]]:
    """(kernel, constexprs, warps) of every variant a GPU may launch for a square map of this width
    and kernel: triton_aot compiles them ahead of time to check registers and spills."""
    shape = {"K": kernel_size, "DILATION": 1}
    variants = [
        ("_depthwise_forward", {**shape, "HAS_BIAS": True, **config.kwargs}, config.num_warps)
        for config in _forward_configs()
    ]
    weight_grad = {**shape, "BLOCK_K": triton.next_power_of_2(kernel_size), "BLOCK_C": WEIGHT_GRAD_BLOCK_C}
    variants += [
        ("_depthwise_weight_grad", {**weight_grad, **config.kwargs}, config.num_warps)
        for config in _weight_grad_configs()
    ]
    return variants


def forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, dilation: int) -> torch.Tensor:
    """F.conv2d(x, weight, bias, padding=dilation*(K-1)//2, dilation=dilation, groups=C), in x's layout."""
    batch, channels, height, width = x.shape
    kernel_size = weight.shape[-1]
    weight = weight.contiguous()
    out = torch.empty_like(x)  # keeps x's memory format

    def grid(tiles: dict) -> tuple[int, int, int]:
        row_groups = dilation * triton.cdiv(triton.cdiv(height, dilation), tiles["ROWS"])
        return row_groups * triton.cdiv(width, tiles["BLOCK_W"]), batch, triton.cdiv(channels, tiles["BLOCK_C"])

    arguments = (
        x,
        weight,
        bias if bias is not None else weight,
        out,
        height,
        width,
        channels,
        *x.stride(),
        *out.stride(),
    )
    shape = {"K": kernel_size, "DILATION": dilation, "HAS_BIAS": bias is not None}
    if INTERPRETED:
        tiles = forward_config(height, width, channels, dilation)
        _depthwise_forward[grid(tiles)](*arguments, **shape, **tiles)
    else:
        _forward_tuned[grid](*arguments, **shape)
    return out


def _row_splits(rows: int, programs_per_split: int, device: torch.device) -> int:
    """Into how many strided shares the weight gradient splits the B*H rows: enough programs to
    fill the GPU a few times over (each share costs a (C, K, K) partial sum). Two in the interpreter."""
    if INTERPRETED or device.type != "cuda":
        return min(rows, 2)
    programs = _WGRAD_PROGRAMS_PER_SM * torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(rows, triton.cdiv(programs, programs_per_split)))


def weight_grad(x: torch.Tensor, grad: torch.Tensor, kernel_size: int, dilation: int) -> torch.Tensor:
    """d loss / d weight, (C, 1, K, K) float32, of the same-padded depthwise conv of x whose output gradient is grad."""
    batch, channels, height, width = x.shape
    block_c = _pow2_at_most(channels, WEIGHT_GRAD_BLOCK_C)
    channel_blocks = triton.cdiv(channels, block_c)
    rows = batch * height
    splits = _row_splits(rows, channel_blocks * kernel_size, x.device)
    partial = torch.empty((splits, channels, kernel_size, kernel_size), dtype=torch.float32, device=x.device)
    arguments = (x, grad, partial, height, width, channels, rows, splits, *x.stride(), *grad.stride())
    fixed = {"K": kernel_size, "DILATION": dilation, "BLOCK_K": triton.next_power_of_2(kernel_size), "BLOCK_C": block_c}
    grid = (channel_blocks, kernel_size, splits)
    if INTERPRETED:
        _depthwise_weight_grad[grid](*arguments, **fixed, BLOCK_W=_pow2_at_most(width, 256))
    else:
        _weight_grad_tuned[grid](*arguments, **fixed)
    return partial.sum(dim=0).unsqueeze(1)
