"""Fused Triton kernels for ContMix: forward, and a two-kernel backward, for both operators.

Imported lazily by `ops` on the first Triton call, because Triton decides at kernel definition
time whether to compile or to interpret (TRITON_INTERPRET=1, how the tests run these on CPU).

Design, for memory traffic (the op is bandwidth-bound: per position it reads K*K logits and only
c values, c = 8..16 in OverLoCK, so the logits dominate):
- One program owns a segment of BLOCK_J output positions of one row i, for one (batch, head) and
  one block of channels. It walks the K rows of the window; for each it loads a (BLOCK_J, K)
  tile of logits (contiguous per position), adds the bias, and folds it into an online softmax
  (running max and sum, rescaling the accumulator), then accumulates p * v over a
  (BLOCK_J, K, BLOCK_C) tile of values. Window clamping is two min/max per program and lane.
- The fused forward writes the output and the log-sum-exp per position (B, h, H, W floats, 1/K^2
  of the logits); no probability map. The op saves both for the backward.
- Backward, kernel 1 (per output position, like the forward): D = sum_s p_s dp_s is grad . out (a
  c-long dot product, the FlashAttention identity), and p = exp(logit + bias - lse), so a single
  pass over the logits writes d logits = p (dp - D), with dp_s = grad . v_s. It accumulates the
  bias gradient: inside a row segment every interior position maps a slot to the same bias entry,
  so interior lanes are reduced in registers first and added with K atomics per window row; only
  the K//2 border columns add per lane.
- Backward, kernel 2 (per *value* position y): d v[y] = sum of p[x, s] grad[x] over the (x, s)
  whose neighbour is y, a gather over the inverse neighbourhood, so no atomics on d v and the
  result is deterministic. Window starts are monotonic in the query position, so the query rows
  whose window holds row r form one contiguous range (K rows in the interior, up to K + K//2 next
  to a clamped border), and per lane so do the query columns. It rebuilds p from the logits, the
  bias and the saved log-sum-exp.
- Traffic per position, fused op: the forward reads K*K logits and the window's values and writes c
  outputs; the backward reads the logits twice (once per kernel) and writes K*K d logits. The values
  of a window are shared by neighbouring lanes and mostly come from cache.
- Everything accumulates in float32; inputs may be float16/bfloat16/float32 and any strides.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl


def _interpreting() -> bool:
    knobs = getattr(triton, "knobs", None)  # triton >= 3.3; older releases read the variable directly
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# Whether the kernels below were defined for Triton's CPU interpreter (TRITON_INTERPRET=1 at import).
INTERPRETED: bool = _interpreting()

# BLOCK_J * BLOCK_K * BLOCK_C. On a GPU 2048 keeps the kernels at 70-165 registers per thread with no
# spills (sm_90 cubins, 4 warps; 4096 needed up to 255); untuned, no GPU was at hand. The interpreter has
# no registers but pays Python overhead per program and per op, so it takes whole rows at once.
_TILE_ELEMENTS = 65536 if INTERPRETED else 2048
_MAX_BLOCK_C = 32


@triton.jit
def _na_forward(
    w_ptr, rpb_ptr, v_ptr, out_ptr, lse_ptr,
    heads, H, W, C, n_jblocks,
    sw_b, sw_g, sw_h, sw_w, sw_k,
    sr_g, sr_u, sr_v,
    sv_b, sv_g, sv_h, sv_w, sv_c,
    so_b, so_g, so_h, so_w,
    K: tl.constexpr, SOFTMAX: tl.constexpr,
    BLOCK_J: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    bg = tl.program_id(1)
    i = pid // n_jblocks
    jb = pid % n_jblocks
    b = (bg // heads).to(tl.int64)
    g = (bg % heads).to(tl.int64)
    half: tl.constexpr = K // 2
    j = jb * BLOCK_J + tl.arange(0, BLOCK_J)
    kk = tl.arange(0, BLOCK_K)
    cc = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    jmask = j < W
    kmask = kk < K
    cmask = cc < C
    mask2 = jmask[:, None] & kmask[None, :]
    mask3 = mask2[:, :, None] & cmask[None, None, :]
    si = tl.minimum(tl.maximum(i - half, 0), H - K)
    sj = tl.minimum(tl.maximum(j - half, 0), W - K)

    w_tile = w_ptr + b * sw_b + g * sw_g + i * sw_h + j[:, None] * sw_w + kk[None, :] * sw_k
    bias_tile = rpb_ptr + g * sr_g + (K - 1 + sj[:, None] + kk[None, :] - j[:, None]) * sr_v
    v_tile = v_ptr + b * sv_b + g * sv_g + (sj[:, None, None] + kk[None, :, None]) * sv_w + cc[None, None, :] * sv_c

    m = tl.full([BLOCK_J], float("-inf"), tl.float32)
    total = tl.zeros([BLOCK_J], tl.float32)
    acc = tl.zeros([BLOCK_J, BLOCK_C], tl.float32)
    for a in range(K):
        row = si + a
        x = tl.load(w_tile + a * K * sw_k, mask=mask2, other=0.0).to(tl.float32)
        if SOFTMAX:
            x += tl.load(bias_tile + (K - 1 + row - i) * sr_u, mask=mask2, other=0.0).to(tl.float32)
            x = tl.where(kmask[None, :], x, float("-inf"))
            m_new = tl.maximum(m, tl.max(x, axis=1))
            alpha = tl.exp(m - m_new)
            x = tl.exp(x - m_new[:, None])
            total = total * alpha + tl.sum(x, axis=1)
            acc = acc * alpha[:, None]
            m = m_new
        v = tl.load(v_tile + row * sv_h, mask=mask3, other=0.0).to(tl.float32)
        acc += tl.sum(x[:, :, None] * v, axis=1)
    if SOFTMAX:
        acc = acc / total[:, None]
        if tl.program_id(2) == 0:  # every channel block has the same statistics; the first one stores them
            tl.store(lse_ptr + bg.to(tl.int64) * H * W + i * W + j, m + tl.log(total), mask=jmask)
    out = out_ptr + b * so_b + g * so_g + i * so_h + j[:, None] * so_w + cc[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=jmask[:, None] & cmask[None, :])


@triton.jit
def _slot_grad(
    v_tile, row, sv_h, sv_c, go, go_tile, sg_c, mask2, jmask, C,
    BLOCK_J: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr, ONE_C_BLOCK: tl.constexpr,
):  # fmt: skip
    """dp of one window row: the (BLOCK_J, BLOCK_K) dot products grad . v over all channels.

    With one channel block (c <= BLOCK_C, the OverLoCK case) the caller has loaded the gradient
    tile `go` once; otherwise the channels are looped here.
    """
    if ONE_C_BLOCK:
        cmask = tl.arange(0, BLOCK_C) < C
        v = tl.load(v_tile + row * sv_h, mask=mask2[:, :, None] & cmask[None, None, :], other=0.0)
        dp = tl.sum(v.to(tl.float32) * go[:, None, :], axis=2)
    else:
        dp = tl.zeros([BLOCK_J, BLOCK_K], tl.float32)
        for c0 in range(0, C, BLOCK_C):
            cmask = (c0 + tl.arange(0, BLOCK_C)) < C
            v = tl.load(v_tile + row * sv_h + c0 * sv_c, mask=mask2[:, :, None] & cmask[None, None, :], other=0.0)
            go_c = tl.load(go_tile + c0 * sg_c, mask=jmask[:, None] & cmask[None, :], other=0.0)
            dp += tl.sum(v.to(tl.float32) * go_c.to(tl.float32)[:, None, :], axis=2)
    return dp


@triton.jit
def _na_backward_weights(
    w_ptr, rpb_ptr, v_ptr, go_ptr, out_ptr, lse_ptr, dw_ptr, drpb_ptr,
    heads, H, W, C, n_jblocks,
    sw_b, sw_g, sw_h, sw_w, sw_k,
    sr_g, sr_u, sr_v,
    sv_b, sv_g, sv_h, sv_w, sv_c,
    sg_b, sg_g, sg_h, sg_w, sg_c,
    so_b, so_g, so_h, so_w, so_c,
    sd_b, sd_g, sd_h, sd_w,
    K: tl.constexpr, SOFTMAX: tl.constexpr,
    BLOCK_J: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr, ONE_C_BLOCK: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    bg = tl.program_id(1)
    i = pid // n_jblocks
    jb = pid % n_jblocks
    b = (bg // heads).to(tl.int64)
    g = (bg % heads).to(tl.int64)
    half: tl.constexpr = K // 2
    span: tl.constexpr = 2 * K - 1
    j = jb * BLOCK_J + tl.arange(0, BLOCK_J)
    kk = tl.arange(0, BLOCK_K)
    cc = tl.arange(0, BLOCK_C)
    jmask = j < W
    kmask = kk < K
    mask2 = jmask[:, None] & kmask[None, :]
    si = tl.minimum(tl.maximum(i - half, 0), H - K)
    sj = tl.minimum(tl.maximum(j - half, 0), W - K)

    w_tile = w_ptr + b * sw_b + g * sw_g + i * sw_h + j[:, None] * sw_w + kk[None, :] * sw_k
    bias_col = K - 1 + sj[:, None] + kk[None, :] - j[:, None]  # bias column of each lane and slot
    bias_tile = rpb_ptr + g * sr_g + bias_col * sr_v
    v_tile = v_ptr + b * sv_b + g * sv_g + (sj[:, None, None] + kk[None, :, None]) * sv_w + cc[None, None, :] * sv_c
    go_tile = go_ptr + b * sg_b + g * sg_g + i * sg_h + j[:, None] * sg_w + cc[None, :] * sg_c
    dw_tile = dw_ptr + b * sd_b + g * sd_g + i * sd_h + j[:, None] * sd_w + kk[None, :]
    go = tl.load(go_tile, mask=jmask[:, None] & (cc < C)[None, :], other=0.0).to(tl.float32) if ONE_C_BLOCK else None

    if SOFTMAX:
        # D = sum_s p_s dp_s = grad . out, and p = exp(logit + bias - lse) from the forward's statistics:
        # one pass over the logits writes d logits = p (dp - D) and the bias gradient.
        o_tile = out_ptr + b * so_b + g * so_g + i * so_h + j[:, None] * so_w + cc[None, :] * so_c
        d = tl.zeros([BLOCK_J], tl.float32)
        for c0 in range(0, C, BLOCK_C):
            cmask = jmask[:, None] & ((c0 + cc) < C)[None, :]
            o = tl.load(o_tile + c0 * so_c, mask=cmask, other=0.0).to(tl.float32)
            go_c = tl.load(go_tile + c0 * sg_c, mask=cmask, other=0.0).to(tl.float32)
            d += tl.sum(o * go_c, axis=1)
        lse = tl.load(lse_ptr + bg.to(tl.int64) * H * W + i * W + j, mask=jmask, other=0.0)
        interior = jmask & (j >= half) & (j < W - half)
        has_border = (jb * BLOCK_J < half) | ((jb + 1) * BLOCK_J > W - half)
        drpb_head = drpb_ptr + g * span * span
        for a in range(K):
            row = si + a
            x = tl.load(w_tile + a * K * sw_k, mask=mask2, other=0.0).to(tl.float32)
            x += tl.load(bias_tile + (K - 1 + row - i) * sr_u, mask=mask2, other=0.0).to(tl.float32)
            p = tl.where(mask2, tl.exp(x - lse[:, None]), 0.0)
            dp = _slot_grad(
                v_tile, row, sv_h, sv_c, go, go_tile, sg_c, mask2, jmask, C, BLOCK_J, BLOCK_K, BLOCK_C, ONE_C_BLOCK
            )
            dz = p * (dp - d[:, None])
            tl.store(dw_tile + a * K, dz.to(dw_ptr.dtype.element_ty), mask=mask2)
            # inside a row segment every interior lane maps a slot to the same bias entry: reduce the
            # interior in registers (K atomics per window row); only border lanes add one by one
            bias_row = drpb_head + (K - 1 + row - i) * span
            inner = tl.sum(tl.where(interior[:, None], dz, 0.0), axis=0)
            tl.atomic_add(bias_row + half + kk, inner, mask=kmask)
            if has_border:
                tl.atomic_add(bias_row + bias_col, dz, mask=mask2 & ~interior[:, None])
    else:
        for a in range(K):
            dp = _slot_grad(
                v_tile, si + a, sv_h, sv_c, go, go_tile, sg_c, mask2, jmask, C, BLOCK_J, BLOCK_K, BLOCK_C, ONE_C_BLOCK
            )
            tl.store(dw_tile + a * K, dp.to(dw_ptr.dtype.element_ty), mask=mask2)


@triton.jit
def _na_backward_value(
    w_ptr, rpb_ptr, lse_ptr, go_ptr, dv_ptr,
    heads, H, W, C, n_yblocks,
    sw_b, sw_g, sw_h, sw_w, sw_k,
    sr_g, sr_u, sr_v,
    sg_b, sg_g, sg_h, sg_w, sg_c,
    sd_b, sd_g, sd_h, sd_w,
    K: tl.constexpr, SOFTMAX: tl.constexpr,
    BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    bg = tl.program_id(1)
    r = pid // n_yblocks  # the value row this program writes
    yb = pid % n_yblocks
    b = (bg // heads).to(tl.int64)
    g = (bg % heads).to(tl.int64)
    half: tl.constexpr = K // 2
    y = yb * BLOCK_J + tl.arange(0, BLOCK_J)  # the value columns this program writes
    dd = tl.arange(0, BLOCK_D)
    cc = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    ymask = y < W
    cmask = cc < C

    # Window starts are monotonic in the query position, so the query rows whose window holds row
    # r are one contiguous range [i_lo, i_hi]: K of them in the interior, up to K + K//2 next to a
    # clamped border. The same per lane for the query columns that read column y.
    i_lo = tl.where(r - K + 1 > 0, r - K + 1 + half, 0)
    i_hi = tl.where(r >= H - K, H - 1, r + half)
    j_lo = tl.where(y - K + 1 > 0, y - K + 1 + half, 0)
    j_hi = tl.where(y >= W - K, W - 1, y + half)
    n_j = tl.max(tl.where(ymask, j_hi - j_lo + 1, 0), axis=0)

    w_head = w_ptr + b * sw_b + g * sw_g
    go_head = go_ptr + b * sg_b + g * sg_g
    lse_head = lse_ptr + bg.to(tl.int64) * H * W
    acc = tl.zeros([BLOCK_J, BLOCK_C], tl.float32)
    for i in range(i_lo, i_hi + 1):
        a = r - tl.minimum(tl.maximum(i - half, 0), H - K)  # window row through which i reads r
        for d0 in range(0, n_j, BLOCK_D):
            j = j_lo[:, None] + d0 + dd[None, :]  # (BLOCK_J, BLOCK_D) query columns
            ok = ymask[:, None] & (j <= j_hi[:, None])
            slot = a * K + y[:, None] - tl.minimum(tl.maximum(j - half, 0), W - K)
            x = tl.load(w_head + i * sw_h + j * sw_w + slot * sw_k, mask=ok, other=0.0).to(tl.float32)
            if SOFTMAX:
                bias = rpb_ptr + g * sr_g + (K - 1 + r - i) * sr_u + (K - 1 + y[:, None] - j) * sr_v
                x += tl.load(bias, mask=ok, other=0.0).to(tl.float32)
                lse = tl.load(lse_head + i * W + j, mask=ok, other=0.0)
                x = tl.where(ok, tl.exp(x - lse), 0.0)
            go = go_head + i * sg_h + j[:, :, None] * sg_w + cc[None, None, :] * sg_c
            go = tl.load(go, mask=ok[:, :, None] & cmask[None, None, :], other=0.0).to(tl.float32)
            acc += tl.sum(x[:, :, None] * go, axis=1)
    dv = dv_ptr + b * sd_b + g * sd_g + r * sd_h + y[:, None] * sd_w + cc[None, :]
    tl.store(dv, acc.to(dv_ptr.dtype.element_ty), mask=ymask[:, None] & cmask[None, :])


def _blocks(width: int, kernel_size: int, channels: int) -> tuple[int, int, int]:
    """(BLOCK_J, BLOCK_K, BLOCK_C): K and c padded to powers of two (masked), positions fill the tile."""
    block_k = triton.next_power_of_2(kernel_size)
    block_c = min(triton.next_power_of_2(channels), _MAX_BLOCK_C)
    block_j = max(1, min(triton.next_power_of_2(width), _TILE_ELEMENTS // (block_k * block_c)))
    return block_j, block_k, block_c


def launch_configs(width: int, kernel_size: int, channels: int, softmax: bool) -> dict[str, dict]:
    """The compile-time parameters of the three kernels for one call shape, keyed by kernel name.

    The launchers below use exactly these, and `triton_aot` compiles exactly these ahead of time.
    """
    block_j, block_k, block_c = _blocks(width, kernel_size, channels)
    common = dict(K=kernel_size, SOFTMAX=softmax, BLOCK_J=block_j, BLOCK_C=block_c)
    return {
        "_na_forward": dict(common, BLOCK_K=block_k),
        "_na_backward_weights": dict(common, BLOCK_K=block_k, ONE_C_BLOCK=channels <= block_c),
        "_na_backward_value": dict(common, BLOCK_D=block_k),
    }


def _launch_forward(
    weights: torch.Tensor, rpb: torch.Tensor | None, value: torch.Tensor, kernel_size: int
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The output, and with a bias (the fused softmax) the log-sum-exp per position, float32."""
    batch, heads, height, width, channels = value.shape
    out = torch.empty(value.shape, dtype=value.dtype, device=value.device)
    softmax = rpb is not None
    lse = torch.empty((batch, heads, height, width), dtype=torch.float32, device=value.device) if softmax else None
    config = launch_configs(width, kernel_size, channels, softmax)["_na_forward"]
    n_jblocks = triton.cdiv(width, config["BLOCK_J"])
    grid = (height * n_jblocks, batch * heads, triton.cdiv(channels, config["BLOCK_C"]))
    rpb_arg = rpb if softmax else weights
    rpb_strides = rpb.stride() if softmax else (0, 0, 0)
    _na_forward[grid](
        weights, rpb_arg, value, out, lse if softmax else out,
        heads, height, width, channels, n_jblocks,
        *weights.stride(), *rpb_strides, *value.stride(), *out.stride()[:4],
        **config,
    )  # fmt: skip
    return out, lse


def _launch_backward(
    grad: torch.Tensor,
    weights: torch.Tensor,
    rpb: torch.Tensor | None,
    value: torch.Tensor,
    out: torch.Tensor | None,
    lse: torch.Tensor | None,
    kernel_size: int,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    batch, heads, height, width, channels = value.shape
    softmax = rpb is not None
    dweights = torch.empty(weights.shape, dtype=weights.dtype, device=value.device)
    dvalue = torch.empty(value.shape, dtype=value.dtype, device=value.device)
    span = 2 * kernel_size - 1
    drpb = torch.zeros((heads, span, span), dtype=torch.float32, device=value.device)
    if softmax:
        assert out is not None and lse is not None
        lse = lse.to(torch.float32).contiguous()
    else:  # no softmax: the pointers are never read
        out, lse = grad, grad
    rpb_arg = rpb if softmax else weights
    rpb_strides = rpb.stride() if softmax else (0, 0, 0)
    configs = launch_configs(width, kernel_size, channels, softmax)
    n_jblocks = triton.cdiv(width, configs["_na_forward"]["BLOCK_J"])
    # kernel 1 needs all channels of a position for dp: one program per position block, channels looped
    _na_backward_weights[(height * n_jblocks, batch * heads)](
        weights, rpb_arg, value, grad, out, lse, dweights, drpb,
        heads, height, width, channels, n_jblocks,
        *weights.stride(), *rpb_strides, *value.stride(), *grad.stride(), *out.stride(), *dweights.stride()[:4],
        **configs["_na_backward_weights"],
    )  # fmt: skip
    grid = (height * n_jblocks, batch * heads, triton.cdiv(channels, configs["_na_backward_value"]["BLOCK_C"]))
    _na_backward_value[grid](
        weights, rpb_arg, lse, grad, dvalue,
        heads, height, width, channels, n_jblocks,
        *weights.stride(), *rpb_strides, *grad.stride(), *dvalue.stride()[:4],
        **configs["_na_backward_value"],
    )  # fmt: skip
    return dweights, (drpb.to(rpb.dtype) if softmax else None), dvalue


def contmix_forward(
    logits: torch.Tensor, rpb: torch.Tensor, value: torch.Tensor, kernel_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    out, lse = _launch_forward(logits, rpb, value, kernel_size)
    assert lse is not None
    return out, lse


def contmix_backward(
    grad: torch.Tensor,
    logits: torch.Tensor,
    rpb: torch.Tensor,
    value: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    kernel_size: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dlogits, drpb, dvalue = _launch_backward(grad, logits, rpb, value, out, lse, kernel_size)
    assert drpb is not None
    return dlogits, drpb, dvalue


def aggregate_forward(probs: torch.Tensor, value: torch.Tensor, kernel_size: int) -> torch.Tensor:
    return _launch_forward(probs, None, value, kernel_size)[0]


def aggregate_backward(
    grad: torch.Tensor, probs: torch.Tensor, value: torch.Tensor, kernel_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    dprobs, _, dvalue = _launch_backward(grad, probs, None, value, None, None, kernel_size)
    return dprobs, dvalue
