"""The CPU path of neighbourhood attention: ContMix's tiles (cpu.py) for the query-key step too.

Why this works. cpu.py cuts the map into R x S tiles whose windows all lie in one source region,
so the aggregation of a tile is one dense (RS x region) @ (region x c) product. The query-key step
is the same sparse pattern transposed: the logits of a tile are (RS x c) @ (c x region) read back
at the window slots (a gather), so both halves of attention run as batched BLAS products and
nothing ever holds K*K copies of the keys or values.

Memory. Work is chunked over (batch * heads) rows with cpu.py's budget; per chunk the logits are
computed, biased and soft-maxed, and aggregated, so the full (B, heads, H, W, K*K) map never
exists. The op saves only the output and the log-sum-exp per position; the backward recomputes a
chunk's logits from q and k (one more product), rebuilds p = exp(z - lse), and gets
D = sum_s p dp as grad . out (the FlashAttention identity). Then
  dv = p^T grad and dp = grad v^T  (cpu._backward_rows, shared with ContMix),
  dz = p (dp - D), dq = NA(dz, k)  (cpu's aggregation), dk = dz^T q  (the dv product with dz and q).
"""

from __future__ import annotations

import torch

from . import cpu, reference


def _tile_logits(q: torch.Tensor, k: torch.Tensor, plan) -> torch.Tensor:
    """(n, HW, c) queries and keys -> (n, T, R*S, K*K) q . k at every window slot, in tile layout."""
    rows = q.shape[0]
    dense = torch.matmul(q[:, plan.out_index], k[:, plan.src_index].transpose(-1, -2))  # (n, T, RS, region)
    return dense.gather(3, plan.slot_column.expand(rows, -1, -1, -1))


def _biased_logits(q, k, bias, start: int, stop: int, shapes) -> torch.Tensor:
    """(n, HW, K*K) q . k + bias of rows [start, stop), a fresh tensor."""
    logits = torch.empty(stop - start, shapes.positions, shapes.kk, dtype=shapes.dtype, device=q.device)
    cpu._untile(_tile_logits(q[start:stop], k[start:stop], shapes.plan), shapes.plan, logits)
    if bias is not None:
        logits += bias.index_select(0, shapes.head_of_row[start:stop])
    return logits


def _transposed_aggregate(weights: torch.Tensor, source: torch.Tensor, plan, out: torch.Tensor) -> None:
    """out[y] += sum of weights[x, s] source[x] over the (x, s) whose neighbour is y (the adjoint of NA).

    Tile rows that do not own their position are masked, so overlapping edge tiles count once.
    """
    dense = cpu._dense_tiles(weights, plan)
    regions = torch.matmul(dense.transpose(-1, -2), source[:, plan.out_index] * plan.owned_mask)
    out.index_add_(1, plan.src_index.flatten(), regions.flatten(1, 2))


def _prepare(query, key, value, rpb, kernel_size, *others):
    extra = [] if rpb is None else [rpb]
    shapes = cpu._Shapes(value, kernel_size, query, key, *extra, *others)
    bias = None
    if rpb is not None:
        bias = cpu._flat_bias(rpb, shapes)
    q, k, v = (shapes.flat(t).to(shapes.dtype) for t in (query, key, value))
    return shapes, bias, q, k, v


def na_forward(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, rpb: torch.Tensor | None, kernel_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    shapes, bias, q, k, v = _prepare(query, key, value, rpb, kernel_size)
    result = shapes.new_output(value)
    out = shapes.flat(result)
    lse = torch.empty(value.shape[:4], dtype=shapes.dtype, device=value.device)
    lse_rows = lse.view(shapes.rows, shapes.positions)

    def work(start: int, stop: int) -> None:  # rows start:stop only: chunks may run in parallel
        probs = _biased_logits(q, k, bias, start, stop, shapes)
        peak = probs.amax(dim=-1, keepdim=True)
        probs -= peak
        probs.exp_()
        total = probs.sum(dim=-1, keepdim=True)
        probs /= total
        lse_rows[start:stop] = (peak + total.log_()).squeeze(-1)
        cpu._aggregate_rows(probs, v[start:stop], shapes.plan, out[start:stop])

    cpu._run_chunks(work, shapes)
    return result.to(value.dtype), lse


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
    shapes, bias, q, k, v = _prepare(query, key, value, rpb, kernel_size, grad)
    plan = shapes.plan
    g, o = shapes.flat(grad), shapes.flat(out)
    lse = lse.reshape(shapes.rows, shapes.positions)
    grads = [
        torch.zeros(shapes.rows, shapes.positions, shapes.channels, dtype=shapes.dtype, device=value.device)
        for _ in range(3)
    ]
    dq, dk, dv = grads

    def work(start: int, stop: int) -> torch.Tensor | None:  # rows start:stop only; returns its bias share
        grad_rows = g[start:stop].to(shapes.dtype)
        probs = _biased_logits(q, k, bias, start, stop, shapes)
        probs -= lse[start:stop].to(shapes.dtype).unsqueeze(-1)
        probs.exp_()
        dprobs = cpu._backward_rows(grad_rows, probs, v[start:stop], plan, dv[start:stop])
        dz = torch.empty_like(probs)
        cpu._untile(dprobs, plan, dz)
        del dprobs
        dz -= torch.linalg.vecdot(grad_rows, o[start:stop].to(shapes.dtype)).unsqueeze(-1)
        dz *= probs
        del probs
        share = None
        if bias is not None:
            share = torch.zeros_like(bias).index_add_(0, shapes.head_of_row[start:stop], dz)
        cpu._aggregate_rows(dz, k[start:stop], plan, dq[start:stop])
        _transposed_aggregate(dz, q[start:stop], plan, dk[start:stop])
        return share

    shares = cpu._run_chunks(work, shapes)
    dbias = None if bias is None else torch.stack(shares).sum(0)
    drpb = None
    if rpb is not None:
        index = reference.rpb_index(shapes.height, shapes.width, kernel_size, rpb.device).flatten()
        table = torch.zeros(shapes.heads, rpb[0].numel(), dtype=shapes.dtype, device=rpb.device)
        table.index_add_(1, index, dbias.reshape(shapes.heads, -1))
        drpb = table.view(rpb.shape).to(rpb.dtype)
    dq, dk, dv = (t.view(s.shape).to(s.dtype) for t, s in zip(grads, (query, key, value), strict=True))
    return dq, dk, dv, drpb
