"""Fused Triton kernels for neighbourhood attention: a FlashAttention-style forward, a two-kernel backward.

Imported lazily (by kernels/neighborhood.py on the first Triton call) for the same reason as
triton_kernels.py: Triton decides at definition time whether it interprets (TRITON_INTERPRET=1).

Layout of the work, as in ContMix's kernels (triton_kernels.py): one program owns BLOCK_J query
positions of one row i for one (batch, head), with all c channels in registers.
- Forward: load the queries once; for each of the K window rows load a (BLOCK_J, K, c) tile of
  keys, form the K logits per lane (q . k plus the bias), fold them into an online softmax
  (running max and sum, rescaling the accumulator), and accumulate p * v over the same window row
  of values. Writes the output and the log-sum-exp per position; no logits or probabilities ever
  reach memory.
- Backward, kernel 1 (per query position): D = grad . out (= sum_s p_s dp_s), stored per position
  for kernel 2; then per window row p = exp(q . k + bias - lse), dp = grad . v, dz = p (dp - D),
  dq += dz k, and the bias gradient by atomics (one per lane and slot; float32 table).
- Backward, kernel 2 (per key/value position y): the query positions whose window holds y form one
  contiguous range per axis (window starts are monotonic; see triton_kernels._na_backward_value),
  so it gathers over them: dv[y] = sum p grad[x], dk[y] = sum dz q[x], with p and dz rebuilt from
  q, k, v, the bias, lse and D. No atomics on dk and dv: deterministic.
Everything accumulates in float32; inputs may be float16/bfloat16/float32 and any strides.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_kernels import INTERPRETED

# BLOCK_J * BLOCK_K * BLOCK_C: the ContMix kernels' register budget on a GPU; the interpreter takes rows whole.
_TILE_ELEMENTS = 65536 if INTERPRETED else 2048


@triton.jit
def _attention_forward(
    q_ptr, k_ptr, v_ptr, rpb_ptr, out_ptr, lse_ptr,
    heads, H, W, C, n_jblocks,
    sq_b, sq_g, sq_h, sq_w, sq_c,
    sk_b, sk_g, sk_h, sk_w, sk_c,
    sv_b, sv_g, sv_h, sv_w, sv_c,
    sr_g, sr_u, sr_v,
    so_b, so_g, so_h, so_w, so_c,
    K: tl.constexpr, HAS_BIAS: tl.constexpr,
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
    cc = tl.arange(0, BLOCK_C)
    jmask = j < W
    kmask = kk < K
    cmask = cc < C
    mask2 = jmask[:, None] & kmask[None, :]
    mask3 = mask2[:, :, None] & cmask[None, None, :]
    si = tl.minimum(tl.maximum(i - half, 0), H - K)
    sj = tl.minimum(tl.maximum(j - half, 0), W - K)
    col = sj[:, None] + kk[None, :]  # (BLOCK_J, BLOCK_K) key column of every lane and slot

    q = tl.load(
        q_ptr + b * sq_b + g * sq_g + i * sq_h + j[:, None] * sq_w + cc[None, :] * sq_c,
        mask=jmask[:, None] & cmask[None, :],
        other=0.0,
    ).to(tl.float32)
    k_tile = k_ptr + b * sk_b + g * sk_g + col[:, :, None] * sk_w + cc[None, None, :] * sk_c
    v_tile = v_ptr + b * sv_b + g * sv_g + col[:, :, None] * sv_w + cc[None, None, :] * sv_c
    bias_tile = rpb_ptr + g * sr_g + (K - 1 + col - j[:, None]) * sr_v

    m = tl.full([BLOCK_J], float("-inf"), tl.float32)
    total = tl.zeros([BLOCK_J], tl.float32)
    acc = tl.zeros([BLOCK_J, BLOCK_C], tl.float32)
    for a in range(K):
        row = si + a
        keys = tl.load(k_tile + row * sk_h, mask=mask3, other=0.0).to(tl.float32)
        x = tl.sum(q[:, None, :] * keys, axis=2)
        if HAS_BIAS:
            x += tl.load(bias_tile + (K - 1 + row - i) * sr_u, mask=mask2, other=0.0).to(tl.float32)
        x = tl.where(kmask[None, :], x, float("-inf"))
        m_new = tl.maximum(m, tl.max(x, axis=1))
        alpha = tl.exp(m - m_new)
        p = tl.exp(x - m_new[:, None])
        total = total * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None]
        m = m_new
        values = tl.load(v_tile + row * sv_h, mask=mask3, other=0.0).to(tl.float32)
        acc += tl.sum(p[:, :, None] * values, axis=1)
    acc = acc / total[:, None]
    tl.store(lse_ptr + bg.to(tl.int64) * H * W + i * W + j, m + tl.log(total), mask=jmask)
    out = out_ptr + b * so_b + g * so_g + i * so_h + j[:, None] * so_w + cc[None, :] * so_c
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=jmask[:, None] & cmask[None, :])


@triton.jit
def _attention_backward_query(
    q_ptr, k_ptr, v_ptr, rpb_ptr, go_ptr, out_ptr, lse_ptr, delta_ptr, dq_ptr, drpb_ptr,
    heads, H, W, C, n_jblocks,
    sq_b, sq_g, sq_h, sq_w, sq_c,
    sk_b, sk_g, sk_h, sk_w, sk_c,
    sv_b, sv_g, sv_h, sv_w, sv_c,
    sr_g, sr_u, sr_v,
    sg_b, sg_g, sg_h, sg_w, sg_c,
    so_b, so_g, so_h, so_w, so_c,
    sd_b, sd_g, sd_h, sd_w, sd_c,
    K: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_J: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr,
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
    cmask = cc < C
    mask2 = jmask[:, None] & kmask[None, :]
    mask3 = mask2[:, :, None] & cmask[None, None, :]
    maskc = jmask[:, None] & cmask[None, :]
    si = tl.minimum(tl.maximum(i - half, 0), H - K)
    sj = tl.minimum(tl.maximum(j - half, 0), W - K)
    col = sj[:, None] + kk[None, :]

    q = tl.load(q_ptr + b * sq_b + g * sq_g + i * sq_h + j[:, None] * sq_w + cc[None, :] * sq_c, mask=maskc, other=0.0)
    q = q.to(tl.float32)
    go = tl.load(
        go_ptr + b * sg_b + g * sg_g + i * sg_h + j[:, None] * sg_w + cc[None, :] * sg_c, mask=maskc, other=0.0
    )
    go = go.to(tl.float32)
    o = tl.load(
        out_ptr + b * so_b + g * so_g + i * so_h + j[:, None] * so_w + cc[None, :] * so_c, mask=maskc, other=0.0
    )
    position = bg.to(tl.int64) * H * W + i * W + j
    delta = tl.sum(o.to(tl.float32) * go, axis=1)  # D = grad . out = sum_s p_s dp_s
    tl.store(delta_ptr + position, delta, mask=jmask)
    lse = tl.load(lse_ptr + position, mask=jmask, other=0.0)

    k_tile = k_ptr + b * sk_b + g * sk_g + col[:, :, None] * sk_w + cc[None, None, :] * sk_c
    v_tile = v_ptr + b * sv_b + g * sv_g + col[:, :, None] * sv_w + cc[None, None, :] * sv_c
    bias_col = K - 1 + col - j[:, None]
    dq = tl.zeros([BLOCK_J, BLOCK_C], tl.float32)
    for a in range(K):
        row = si + a
        keys = tl.load(k_tile + row * sk_h, mask=mask3, other=0.0).to(tl.float32)
        x = tl.sum(q[:, None, :] * keys, axis=2)
        if HAS_BIAS:
            bias = rpb_ptr + g * sr_g + (K - 1 + row - i) * sr_u + bias_col * sr_v
            x += tl.load(bias, mask=mask2, other=0.0).to(tl.float32)
        p = tl.where(mask2, tl.exp(x - lse[:, None]), 0.0)
        values = tl.load(v_tile + row * sv_h, mask=mask3, other=0.0).to(tl.float32)
        dp = tl.sum(go[:, None, :] * values, axis=2)
        dz = p * (dp - delta[:, None])
        dq += tl.sum(dz[:, :, None] * keys, axis=1)
        if HAS_BIAS:
            tl.atomic_add(drpb_ptr + g * span * span + (K - 1 + row - i) * span + bias_col, dz, mask=mask2)
    dq_out = dq_ptr + b * sd_b + g * sd_g + i * sd_h + j[:, None] * sd_w + cc[None, :] * sd_c
    tl.store(dq_out, dq.to(dq_ptr.dtype.element_ty), mask=maskc)


@triton.jit
def _attention_backward_key_value(
    q_ptr, k_ptr, v_ptr, rpb_ptr, go_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr,
    heads, H, W, C, n_yblocks,
    sq_b, sq_g, sq_h, sq_w, sq_c,
    sk_b, sk_g, sk_h, sk_w, sk_c,
    sv_b, sv_g, sv_h, sv_w, sv_c,
    sr_g, sr_u, sr_v,
    sg_b, sg_g, sg_h, sg_w, sg_c,
    sd_b, sd_g, sd_h, sd_w, sd_c,
    K: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    bg = tl.program_id(1)
    r = pid // n_yblocks  # the key/value row this program writes
    yb = pid % n_yblocks
    b = (bg // heads).to(tl.int64)
    g = (bg % heads).to(tl.int64)
    half: tl.constexpr = K // 2
    y = yb * BLOCK_J + tl.arange(0, BLOCK_J)
    dd = tl.arange(0, BLOCK_D)
    cc = tl.arange(0, BLOCK_C)
    ymask = y < W
    cmask = cc < C
    maskc = ymask[:, None] & cmask[None, :]

    # the query rows (and per lane the query columns) whose clamped window holds (r, y): contiguous ranges
    i_lo = tl.where(r - K + 1 > 0, r - K + 1 + half, 0)
    i_hi = tl.where(r >= H - K, H - 1, r + half)
    j_lo = tl.where(y - K + 1 > 0, y - K + 1 + half, 0)
    j_hi = tl.where(y >= W - K, W - 1, y + half)
    n_j = tl.max(tl.where(ymask, j_hi - j_lo + 1, 0), axis=0)

    keys = tl.load(
        k_ptr + b * sk_b + g * sk_g + r * sk_h + y[:, None] * sk_w + cc[None, :] * sk_c, mask=maskc, other=0.0
    )
    keys = keys.to(tl.float32)
    values = tl.load(
        v_ptr + b * sv_b + g * sv_g + r * sv_h + y[:, None] * sv_w + cc[None, :] * sv_c, mask=maskc, other=0.0
    )
    values = values.to(tl.float32)
    q_head = q_ptr + b * sq_b + g * sq_g
    go_head = go_ptr + b * sg_b + g * sg_g
    stat_head = bg.to(tl.int64) * H * W
    dk = tl.zeros([BLOCK_J, BLOCK_C], tl.float32)
    dv = tl.zeros([BLOCK_J, BLOCK_C], tl.float32)
    for i in range(i_lo, i_hi + 1):
        for d0 in range(0, n_j, BLOCK_D):
            jq = j_lo[:, None] + d0 + dd[None, :]  # (BLOCK_J, BLOCK_D) query columns
            ok = ymask[:, None] & (jq <= j_hi[:, None])
            ok3 = ok[:, :, None] & cmask[None, None, :]
            qx = tl.load(q_head + i * sq_h + jq[:, :, None] * sq_w + cc[None, None, :] * sq_c, mask=ok3, other=0.0)
            qx = qx.to(tl.float32)
            x = tl.sum(qx * keys[:, None, :], axis=2)
            if HAS_BIAS:
                bias = rpb_ptr + g * sr_g + (K - 1 + r - i) * sr_u + (K - 1 + y[:, None] - jq) * sr_v
                x += tl.load(bias, mask=ok, other=0.0).to(tl.float32)
            lse = tl.load(lse_ptr + stat_head + i * W + jq, mask=ok, other=0.0)
            delta = tl.load(delta_ptr + stat_head + i * W + jq, mask=ok, other=0.0)
            p = tl.where(ok, tl.exp(x - lse), 0.0)
            gx = tl.load(go_head + i * sg_h + jq[:, :, None] * sg_w + cc[None, None, :] * sg_c, mask=ok3, other=0.0)
            gx = gx.to(tl.float32)
            dv += tl.sum(p[:, :, None] * gx, axis=1)
            dz = p * (tl.sum(gx * values[:, None, :], axis=2) - delta)
            dk += tl.sum(dz[:, :, None] * qx, axis=1)
    dk_out = dk_ptr + b * sd_b + g * sd_g + r * sd_h + y[:, None] * sd_w + cc[None, :] * sd_c
    tl.store(dk_out, dk.to(dk_ptr.dtype.element_ty), mask=maskc)
    dv_out = dv_ptr + b * sd_b + g * sd_g + r * sd_h + y[:, None] * sd_w + cc[None, :] * sd_c
    tl.store(dv_out, dv.to(dv_ptr.dtype.element_ty), mask=maskc)


def launch_configs(width: int, kernel_size: int, channels: int, has_bias: bool) -> dict[str, dict]:
    """The compile-time parameters of the three kernels for one call shape, keyed by kernel name.

    All c channels of a position sit in registers (BLOCK_C = c rounded up to a power of two);
    BLOCK_J fills the rest of the tile budget.
    """
    block_k = triton.next_power_of_2(kernel_size)
    block_c = triton.next_power_of_2(channels)
    block_j = max(1, min(triton.next_power_of_2(width), _TILE_ELEMENTS // (block_k * block_c)))
    common = dict(K=kernel_size, HAS_BIAS=has_bias, BLOCK_C=block_c)
    return {
        "_attention_forward": dict(common, BLOCK_J=block_j, BLOCK_K=block_k),
        "_attention_backward_query": dict(common, BLOCK_J=block_j, BLOCK_K=block_k),
        # two (BLOCK_J, BLOCK_D, c) tiles live at once (queries and output gradients): half the lanes,
        # or ptxas spills at c = 32 (sm_90)
        "_attention_backward_key_value": dict(common, BLOCK_J=max(1, block_j // 2), BLOCK_D=block_k),
    }


def _bias_args(rpb: torch.Tensor | None, fallback: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
    if rpb is None:  # never read: HAS_BIAS is False
        return fallback, (0, 0, 0)
    return rpb, rpb.stride()


def na_forward(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, rpb: torch.Tensor | None, kernel_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    batch, heads, height, width, channels = value.shape
    out = torch.empty(value.shape, dtype=value.dtype, device=value.device)
    lse = torch.empty((batch, heads, height, width), dtype=torch.float32, device=value.device)
    config = launch_configs(width, kernel_size, channels, rpb is not None)["_attention_forward"]
    n_jblocks = triton.cdiv(width, config["BLOCK_J"])
    rpb_arg, rpb_strides = _bias_args(rpb, query)
    _attention_forward[(height * n_jblocks, batch * heads)](
        query, key, value, rpb_arg, out, lse,
        heads, height, width, channels, n_jblocks,
        *query.stride(), *key.stride(), *value.stride(), *rpb_strides, *out.stride(),
        **config,
    )  # fmt: skip
    return out, lse


def na_backward(
    grad: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    rpb: torch.Tensor | None,
    out: torch.Tensor,
    lse: torch.Tensor,
    kernel_size: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    batch, heads, height, width, channels = value.shape
    configs = launch_configs(width, kernel_size, channels, rpb is not None)
    n_jblocks = triton.cdiv(width, configs["_attention_forward"]["BLOCK_J"])
    grid = (height * n_jblocks, batch * heads)
    lse = lse.to(torch.float32).contiguous()
    delta = torch.empty_like(lse)
    dq, dk, dv = (torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in (query, key, value))
    span = 2 * kernel_size - 1
    drpb = torch.zeros((heads, span, span), dtype=torch.float32, device=value.device)
    rpb_arg, rpb_strides = _bias_args(rpb, query)
    _attention_backward_query[grid](
        query, key, value, rpb_arg, grad, out, lse, delta, dq, drpb,
        heads, height, width, channels, n_jblocks,
        *query.stride(), *key.stride(), *value.stride(), *rpb_strides, *grad.stride(), *out.stride(), *dq.stride(),
        **configs["_attention_backward_query"],
    )  # fmt: skip
    assert dk.stride() == dv.stride()
    n_yblocks = triton.cdiv(width, configs["_attention_backward_key_value"]["BLOCK_J"])
    _attention_backward_key_value[(height * n_yblocks, batch * heads)](
        query, key, value, rpb_arg, grad, lse, delta, dk, dv,
        heads, height, width, channels, n_yblocks,
        *query.stride(), *key.stride(), *value.stride(), *rpb_strides, *grad.stride(), *dk.stride(),
        **configs["_attention_backward_key_value"],
    )  # fmt: skip
    return dq, dk, dv, (drpb.to(rpb.dtype) if rpb is not None else None)
