"""The CPU path: ContMix as a few batched matrix products over tiles, never K*K copies of the values.

Why tiles. The aggregation is a sparse matrix product: every output position reads K*K values.
Gathering those windows (the unfold algorithm) costs K*K copies of the value map; looping over the
K*K slots costs K*K passes of small element-wise ops. Instead, cut the output map into R x S tiles.
Because window starts are clamped and move by at most one row per output row, all windows of a
tile lie inside one source region of min(R+K-1, H) x min(S+K-1, W) positions. Within a tile the
aggregation is then a small *dense* product (RS x region) @ (region x c) in which each row holds
the K*K probabilities of one position scattered to the columns of its window and zeros elsewhere.
All tiles of all (batch, head) pairs go through one `matmul`, so the work runs in BLAS and the
number of Python-level ops does not depend on K.

The tile size trades two costs, both per output position: the dense rows (`region` entries instead
of K*K) and the value regions gathered per tile (`region * c / (R*S)` entries, the halo overlap).
`_tile_size` minimises their sum; for the Focus-Net maps at 224 input (14x14 with K=13, 7x7 with
K=7) the best tile is the whole map, i.e. one dense (HW x HW) product per head.

Memory: the work is chunked over the (batch * heads) axis so that the transient buffers (the
probability map of the chunk, the dense tile matrices, the gathered regions) stay under
`CHUNK_BYTES`. The backward of `contmix` rebuilds the probabilities chunk by chunk from the
forward's log-sum-exp: the full probability map is never held, in the forward or the backward.

Threads. Each chunk is ~15 small ops; with PyTorch's intra-op threading every one of them is its
own parallel region, in which all threads meet at a barrier. That scales badly (most of the ops
are index copies and element-wise passes too small to split well) and collapses under contention:
when another process holds one core, every region waits for the descheduled thread. So with more
than one thread (`torch.get_num_threads()`) and CPU tensors the chunks themselves are the unit of
parallelism: a pool of that many worker threads, each running whole chunks with one intra-op
thread, takes chunks from a shared queue. One parallel region per call instead of ~15 per chunk,
and a stalled worker only delays its own chunk while the others keep taking work. Chunks are sized
so that every worker gets at least `CHUNKS_PER_THREAD` of them (load balance) within the same total
memory budget. Results do not depend on the thread count except for the summation order of the
bias gradient across chunks.

The functions only use PyTorch tensor ops, so they run on any device; `auto` picks them for CPU
tensors (and for CUDA tensors only when Triton is missing).
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from . import reference

# Budget for the transient buffers of one chunk of (batch * heads) rows: a few times the inputs
# (logits + values), so the peak stays a small multiple of what the caller already holds, within
# [MIN_CHUNK_BYTES, CHUNK_BYTES]. Every chunk costs ~15 ops; many small ops are what suffers most
# when other processes compete for the cores (OpenMP regions wait for descheduled threads).
CHUNK_BYTES = 32 * 2**20
MIN_CHUNK_BYTES = 2 * 2**20
INPUT_MULTIPLE = 4
CHUNKS_PER_THREAD = 2


@dataclass(frozen=True, eq=False)  # identity hash: plans are cached, and tensors have no == for dicts
class _Plan:
    """Index tensors that describe the tiling of one (H, W, K) map (built once, cached)."""

    tile: tuple[int, int]
    region: int  # positions in a tile's source region
    out_index: torch.Tensor  # (T, R*S) flat output position of every tile row
    src_index: torch.Tensor  # (T, region) flat source position of every region column
    slot_column: torch.Tensor  # (T, R*S, K*K) region column of the neighbour in each window slot
    owned_rows: torch.Tensor  # (P,) rows of the (T*R*S) tile layout that own a position (edge tiles overlap)
    owned_positions: torch.Tensor  # (P,) the flat positions those rows own (a permutation of 0..HW-1)
    owned_mask: torch.Tensor  # (T, R*S, 1) 1.0 where the tile row owns its position, else 0.0


def _axis_cost(length: int, tile: int, kernel_size: int) -> tuple[int, int]:
    """(source span of one tile, number of positions the tiles cover incl. overlap) along one axis."""
    tiles = -(-length // tile)
    return min(tile + kernel_size - 1, length), tiles * tile


@functools.lru_cache(maxsize=256)
def _tile_size(height: int, width: int, kernel_size: int, channels: int) -> tuple[int, int]:
    """The tile (R, S) minimising per-position work: dense-row entries plus gathered value entries."""
    best: tuple[float, int, int] | None = None
    for rows in range(1, height + 1):
        span_r, cover_r = _axis_cost(height, rows, kernel_size)
        for cols in range(1, width + 1):
            span_c, cover_c = _axis_cost(width, cols, kernel_size)
            region = span_r * span_c
            per_position = region * (1.0 + channels / (rows * cols)) * (cover_r * cover_c) / (height * width)
            if best is None or per_position < best[0]:
                best = (per_position, rows, cols)
    assert best is not None
    return best[1], best[2]


def _axis_tiles(
    length: int, tile: int, kernel_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Along one axis: output indices (n, tile), region starts (n,), local window columns (n, tile, K), owner mask.

    Tiles start at multiples of `tile`; the last one is moved back inside the map (it overlaps
    its neighbour, and the overlap is owned by the earlier tile).
    """
    span = min(tile + kernel_size - 1, length)
    count = -(-length // tile)
    nominal = torch.arange(count) * tile
    starts = nominal.clamp(max=length - tile)
    index = starts[:, None] + torch.arange(tile)[None, :]  # (n, tile)
    owner = index >= nominal[:, None]
    window = reference.window_starts(length, kernel_size)
    region_start = window[starts].clamp(max=length - span)  # first source row of each tile's region
    local = window[index][:, :, None] + torch.arange(kernel_size) - region_start[:, None, None]
    return index, region_start, local, owner


@functools.lru_cache(maxsize=64)
def _plan_cpu(height: int, width: int, kernel_size: int, channels: int) -> _Plan:
    rows, cols = _tile_size(height, width, kernel_size, channels)
    span_r, span_c = min(rows + kernel_size - 1, height), min(cols + kernel_size - 1, width)
    out_r, start_r, local_r, own_r = _axis_tiles(height, rows, kernel_size)
    out_c, start_c, local_c, own_c = _axis_tiles(width, cols, kernel_size)
    n_r, n_c = out_r.shape[0], out_c.shape[0]
    kk = kernel_size * kernel_size
    out_index = (out_r[:, None, :, None] * width + out_c[None, :, None, :]).reshape(n_r * n_c, rows * cols)
    src_r = start_r[:, None] + torch.arange(span_r)  # (n_r, span_r)
    src_c = start_c[:, None] + torch.arange(span_c)
    src_index = (src_r[:, None, :, None] * width + src_c[None, :, None, :]).reshape(n_r * n_c, span_r * span_c)
    slot = local_r[:, None, :, None, :, None] * span_c + local_c[None, :, None, :, None, :]
    slot_column = slot.reshape(n_r * n_c, rows * cols, kk)
    owned = (own_r[:, None, :, None] & own_c[None, :, None, :]).reshape(-1)
    owned_rows = owned.nonzero().flatten()
    owned_positions = out_index.flatten()[owned_rows]
    assert torch.equal(owned_positions.sort().values, torch.arange(height * width))
    mask = owned.to(torch.float32).reshape(n_r * n_c, rows * cols, 1)
    return _Plan((rows, cols), span_r * span_c, out_index, src_index, slot_column, owned_rows, owned_positions, mask)


def _plan(height: int, width: int, kernel_size: int, channels: int, device: torch.device) -> _Plan:
    """The cached plan, with its index tensors on `device` (a no-op for CPU)."""
    plan = _plan_cpu(height, width, kernel_size, channels)
    if device.type == "cpu":
        return plan
    return _plan_on(plan, device)


@functools.lru_cache(maxsize=64)
def _plan_on(plan: _Plan, device: torch.device) -> _Plan:
    moved = {
        name: getattr(plan, name).to(device)
        for name in plan.__dataclass_fields__
        if isinstance(getattr(plan, name), torch.Tensor)
    }
    return _Plan(plan.tile, plan.region, **moved)


def _chunk_rows(
    rows: int, plan: _Plan, height: int, width: int, kernel_size: int, channels: int, itemsize: int, workers: int = 1
) -> int:
    """How many (batch * heads) rows fit the transient budget (at least one).

    With several workers the budget is shared (each holds one chunk's buffers at a time) and
    every worker gets at least CHUNKS_PER_THREAD chunks where there are enough rows.
    """
    tiles, tile_rows = plan.out_index.shape
    kk = kernel_size * kernel_size
    per_row = tiles * tile_rows * plan.region * 2  # dense tile matrix and its gradient
    per_row += tiles * plan.region * channels * 2  # gathered regions and their gradient
    per_row += height * width * kk * 3 + tiles * tile_rows * (kk * 2 + channels * 2)  # probabilities, tile copies
    inputs = rows * height * width * (kk + channels) * itemsize
    budget = min(CHUNK_BYTES, max(MIN_CHUNK_BYTES, INPUT_MULTIPLE * inputs)) // workers
    chunk = max(1, min(rows, budget // (per_row * itemsize)))
    if workers > 1:
        chunk = min(chunk, max(1, -(-rows // (workers * CHUNKS_PER_THREAD))))
    return chunk


_POOL_LOCK = threading.Lock()
_POOL: ThreadPoolExecutor | None = None
_POOL_SIZE = 0


def _pool(workers: int) -> ThreadPoolExecutor:
    """The shared worker pool, (re)built when the thread count changes."""
    global _POOL, _POOL_SIZE
    with _POOL_LOCK:
        if _POOL is None or _POOL_SIZE != workers:
            if _POOL is not None:
                _POOL.shutdown(wait=True)
            _POOL = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="overlock-contmix")
            _POOL_SIZE = workers
        return _POOL


def _workers(device: torch.device) -> int:
    """Worker threads for the chunk loop: torch's intra-op thread count on CPU, else 1 (sequential).

    Nested calls (from inside a worker, or from a thread that is itself inside a parallel region)
    run sequentially.
    """
    if device.type != "cpu" or threading.current_thread().name.startswith("overlock-contmix"):
        return 1
    return max(1, torch.get_num_threads())


def _run_chunks(work: Callable[[int, int], object], shapes: _Shapes) -> list[object]:
    """work(start, stop) for every chunk of rows; in the worker pool when shapes.workers > 1.

    Workers run with one intra-op thread each (set per task: OpenMP's thread count is per
    thread, MKL's is global) and in the caller's grad/inference mode; the caller's thread count
    is restored afterwards.
    """
    bounds = [(start, min(start + shapes.chunk, shapes.rows)) for start in range(0, shapes.rows, shapes.chunk)]
    if shapes.workers == 1 or len(bounds) == 1:
        return [work(start, stop) for start, stop in bounds]
    threads = torch.get_num_threads()
    # Grad and inference mode are thread-local: the workers run in the caller's.
    grad, inference = torch.is_grad_enabled(), torch.is_inference_mode_enabled()

    def task(bound: tuple[int, int]) -> object:
        torch.set_num_threads(1)
        with torch.inference_mode(inference), torch.set_grad_enabled(grad):
            return work(*bound)

    try:
        return list(_pool(shapes.workers).map(task, bounds))
    finally:
        torch.set_num_threads(threads)


def _dense_tiles(probs: torch.Tensor, plan: _Plan) -> torch.Tensor:
    """(n, HW, K*K) probabilities -> (n, T, R*S, region) dense per-tile aggregation matrices."""
    rows = probs.shape[0]
    tiles, tile_rows = plan.out_index.shape
    per_tile = probs[:, plan.out_index]  # (n, T, R*S, K*K)
    dense = probs.new_zeros(rows, tiles, tile_rows, plan.region)
    return dense.scatter_(3, plan.slot_column.expand(rows, -1, -1, -1), per_tile)


def _untile(tiled: torch.Tensor, plan: _Plan, out: torch.Tensor) -> None:
    """Write (n, T, R*S, d) tile rows back to (n, HW, d) positions, each position exactly once."""
    rows = tiled.flatten(1, 2).index_select(1, plan.owned_rows)
    out.index_copy_(1, plan.owned_positions, rows)


class _Shapes:
    """Flattened views shared by the four entry points: (B*h, HW, ...) rows in the compute dtype."""

    def __init__(self, value: torch.Tensor, kernel_size: int, *others: torch.Tensor) -> None:
        self.batch, self.heads, self.height, self.width, self.channels = value.shape
        self.rows = self.batch * self.heads
        self.positions = self.height * self.width
        self.kk = kernel_size * kernel_size
        self.dtype = reference.compute_dtype(value, *others)
        self.plan = _plan(self.height, self.width, kernel_size, self.channels, value.device)
        itemsize = torch.finfo(self.dtype).bits // 8
        self.workers = min(_workers(value.device), self.rows)
        self.chunk = _chunk_rows(
            self.rows, self.plan, self.height, self.width, kernel_size, self.channels, itemsize, self.workers
        )
        self.head_of_row = torch.arange(self.rows, device=value.device) % self.heads

    def flat(self, tensor: torch.Tensor) -> torch.Tensor:
        """(B, h, H, W, d) -> (B*h, HW, d); a copy only where the layout or dtype requires one."""
        return tensor.reshape(self.rows, self.positions, tensor.shape[-1])

    def new_output(self, value: torch.Tensor) -> torch.Tensor:
        """An uninitialised (B, h, H, W, c) result in the compute dtype; `flat` of it is the view to fill.

        Allocated in its final shape so that what a forward returns is never a view: autograd
        forbids in-place edits of views returned from custom ops, even where they are harmless.
        """
        return torch.empty(value.shape, dtype=self.dtype, device=value.device)


def _softmax_rows(
    logits: torch.Tensor, bias: torch.Tensor, start: int, stop: int, shapes: _Shapes
) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(logits + bias) of rows [start, stop) as one fresh (n, HW, K*K) tensor, and its (n, HW) log-sum-exp."""
    probs = bias.index_select(0, shapes.head_of_row[start:stop])
    probs += logits[start:stop]
    peak = probs.amax(dim=-1, keepdim=True)
    probs -= peak
    probs.exp_()
    total = probs.sum(dim=-1, keepdim=True)
    probs /= total
    return probs, (peak + total.log_()).squeeze(-1)


def _saved_softmax_rows(
    logits: torch.Tensor, bias: torch.Tensor, lse: torch.Tensor, start: int, stop: int, shapes: _Shapes
) -> torch.Tensor:
    """The same probabilities rebuilt from the forward's log-sum-exp: exp(logits + bias - lse), one pass."""
    probs = bias.index_select(0, shapes.head_of_row[start:stop])
    probs += logits[start:stop]
    probs -= lse[start:stop].unsqueeze(-1)
    return probs.exp_()


def _flat_bias(rpb: torch.Tensor, shapes: _Shapes, kernel_size: int) -> torch.Tensor:
    """(h, 2K-1, 2K-1) -> (h, HW, K*K) bias of every window slot, in the compute dtype."""
    gathered = reference.gather_rpb(rpb.to(shapes.dtype), shapes.height, shapes.width, kernel_size)
    return gathered.reshape(shapes.heads, shapes.positions, shapes.kk)


def _aggregate_rows(probs: torch.Tensor, value: torch.Tensor, plan: _Plan, out: torch.Tensor) -> None:
    """out[n] = NA(probs[n], value[n]) for a chunk of rows (all (n, HW, .) in the compute dtype)."""
    dense = _dense_tiles(probs, plan)
    regions = value[:, plan.src_index]  # (n, T, region, c)
    _untile(torch.matmul(dense, regions), plan, out)


def aggregate_forward(probs: torch.Tensor, value: torch.Tensor, kernel_size: int) -> torch.Tensor:
    shapes = _Shapes(value, kernel_size, probs)
    p, v = shapes.flat(probs), shapes.flat(value).to(shapes.dtype)
    result = shapes.new_output(value)
    out = shapes.flat(result)
    _run_chunks(
        lambda start, stop: _aggregate_rows(
            p[start:stop].to(shapes.dtype), v[start:stop], shapes.plan, out[start:stop]
        ),
        shapes,
    )
    return result.to(value.dtype)


def contmix_forward(
    logits: torch.Tensor, rpb: torch.Tensor, value: torch.Tensor, kernel_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    shapes = _Shapes(value, kernel_size, logits, rpb)
    bias = _flat_bias(rpb, shapes, kernel_size)
    z, v = shapes.flat(logits), shapes.flat(value).to(shapes.dtype)
    result = shapes.new_output(value)
    out = shapes.flat(result)
    lse = torch.empty(value.shape[:4], dtype=shapes.dtype, device=value.device)
    lse_rows = lse.view(shapes.rows, shapes.positions)

    def work(start: int, stop: int) -> None:
        probs, lse_rows[start:stop] = _softmax_rows(z, bias, start, stop, shapes)
        _aggregate_rows(probs, v[start:stop], shapes.plan, out[start:stop])

    _run_chunks(work, shapes)
    return result.to(value.dtype), lse


def _backward_rows(
    grad: torch.Tensor, probs: torch.Tensor, value: torch.Tensor, plan: _Plan, dvalue: torch.Tensor
) -> torch.Tensor:
    """For a chunk of rows: add the value gradient into dvalue, return d probs in tile layout.

    dvalue[region] += dense^T @ grad (tile rows that do not own their position are masked out, so
    overlapping edge tiles count once); d dense = grad @ region^T, read back at the window slots.
    """
    rows = probs.shape[0]
    dense = _dense_tiles(probs, plan)
    grad_tiles = grad[:, plan.out_index]  # (n, T, R*S, c)
    regions = value[:, plan.src_index]  # (n, T, region, c)
    dregions = torch.matmul(dense.transpose(-1, -2), grad_tiles * plan.owned_mask)
    dvalue.index_add_(1, plan.src_index.flatten(), dregions.flatten(1, 2))
    del dense, dregions
    ddense = torch.matmul(grad_tiles, regions.transpose(-1, -2))  # (n, T, R*S, region)
    return ddense.gather(3, plan.slot_column.expand(rows, -1, -1, -1))  # (n, T, R*S, K*K)


def aggregate_backward(
    grad: torch.Tensor, probs: torch.Tensor, value: torch.Tensor, kernel_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    shapes = _Shapes(value, kernel_size, probs, grad)
    g, p, v = (shapes.flat(t) for t in (grad, probs, value))
    dvalue = torch.zeros(shapes.rows, shapes.positions, shapes.channels, dtype=shapes.dtype, device=value.device)
    dprobs = torch.empty(shapes.rows, shapes.positions, shapes.kk, dtype=probs.dtype, device=value.device)

    def work(start: int, stop: int) -> None:
        dp = _backward_rows(
            g[start:stop].to(shapes.dtype),
            p[start:stop].to(shapes.dtype),
            v[start:stop].to(shapes.dtype),
            shapes.plan,
            dvalue[start:stop],
        )
        _untile(dp.to(probs.dtype), shapes.plan, dprobs[start:stop])

    _run_chunks(work, shapes)
    return dprobs.view(probs.shape), dvalue.view(value.shape).to(value.dtype)


def contmix_backward(
    grad: torch.Tensor,
    logits: torch.Tensor,
    rpb: torch.Tensor,
    value: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    kernel_size: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rebuilds the probabilities per chunk from the saved log-sum-exp; d logits = p * (dp - D).

    D = sum_s p_s dp_s equals grad . out (out = sum_s p_s v_s), a c-long dot product per position
    instead of a K*K one. The bias gradient first sums d logits per head over the batch (an
    (h, HW, K*K) buffer, 1/B of the logits), then folds that into the (2K-1)^2 table once at the end.
    """
    shapes = _Shapes(value, kernel_size, logits, rpb, grad)
    bias = _flat_bias(rpb, shapes, kernel_size)
    g, z, v, o = shapes.flat(grad), shapes.flat(logits), shapes.flat(value), shapes.flat(out)
    lse = lse.reshape(shapes.rows, shapes.positions)
    plan = shapes.plan
    dvalue = torch.zeros(shapes.rows, shapes.positions, shapes.channels, dtype=shapes.dtype, device=value.device)
    dlogits = torch.empty(shapes.rows, shapes.positions, shapes.kk, dtype=shapes.dtype, device=value.device)

    def work(start: int, stop: int) -> torch.Tensor:
        """The chunk's rows of dlogits and dvalue; returns its (h, HW, K*K) share of the bias gradient."""
        grad_rows = g[start:stop].to(shapes.dtype)
        probs = _saved_softmax_rows(z, bias, lse, start, stop, shapes)
        dprobs = _backward_rows(grad_rows, probs, v[start:stop].to(shapes.dtype), plan, dvalue[start:stop])
        _untile(dprobs, plan, dlogits[start:stop])
        del dprobs
        dz = dlogits[start:stop]
        # softmax backward in place: dz = p * (dp - D), D = grad . out
        dz -= torch.linalg.vecdot(grad_rows, o[start:stop].to(shapes.dtype)).unsqueeze(-1)
        dz *= probs
        del probs
        return torch.zeros_like(bias).index_add_(0, shapes.head_of_row[start:stop], dz)

    partial = _run_chunks(work, shapes)
    dbias = partial[0]
    for share in partial[1:]:
        dbias += share
    index = reference.rpb_index(shapes.height, shapes.width, kernel_size, rpb.device).flatten()
    drpb = torch.zeros(shapes.heads, rpb[0].numel(), dtype=shapes.dtype, device=rpb.device)
    drpb.index_add_(1, index, dbias.reshape(shapes.heads, -1))
    return (
        dlogits.view(logits.shape).to(logits.dtype),
        drpb.view(rpb.shape).to(rpb.dtype),
        dvalue.view(value.shape).to(value.dtype),
    )
