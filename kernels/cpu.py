"""The CPU path: ContMix as a few batched matrix products over tiles, never K*K copies of the values.

Why tiles. The aggregation is a sparse matrix product: every output position reads K*K values.
Gathering those windows (the unfold algorithm) costs K*K copies of the value map; looping over the
K*K slots costs K*K passes of small element-wise ops. Instead, cut the output map into R x S tiles.
Because window starts are clamped and move by at most one row per output row, all windows of a
tile lie inside one source region of min(R+K-1, H) x min(S+K-1, W) positions. Within a tile the
aggregation is then a small *dense* product (RS x region) @ (region x c) in which each row holds
the K*K probabilities of one position placed at the columns of its window and zeros elsewhere.
All tiles of all (batch, head) pairs go through one `matmul`, so the work runs in BLAS and the
number of Python-level ops does not depend on K.

The tile size trades two costs, both per output position: the dense rows (`region` entries instead
of K*K) and the value regions gathered per tile (`region * c / (R*S)` entries, the halo overlap).
`_tile_size` minimises their sum; for the Focus-Net maps at 224 input (14x14 with K=13, 7x7 with
K=7 and K=5) the best tile is the whole map, i.e. one dense (HW x HW) product per head. Then
nothing is gathered or untiled: the product writes straight into the output (`_Plan.whole`).

Block copies, not index copies. Moving the K*K slots between the (HW, K*K) layout and the dense
tile matrices is the op's main memory traffic. Along each axis the window start moves by 0
(clamped at a border) or 1 (interior) per tile row, and interior tiles all look alike, so the
(tile, row) pairs of an axis fall into a handful of `_Run`s in which both layouts are affine in
(tile, row, slot): every run pair is one strided view of each layout (`_slot_views`), and a chunk
moves its slots with a few block copies (4 for 14x14 with K=13, 21 for 28x28) instead of a
per-entry scatter or gather through `slot_column` (which stays in the plan as the definition the
tests check the views against). The entries off the windows are the same zeros for every chunk,
so each thread fills its dense buffer once per call and reuses it (`_DenseBuffers`).

Softmax. It runs on the (HW, K*K) slots: bias added by a broadcast (or a slice; chunks hold whole
batch entries or rows of one), peak, exp, sum. The forward multiplies the unnormalised weights
and divides the (HW, c) output by the sum, c divisions per position instead of K*K. (Normalising
the dense rows instead, with -inf off the windows and one fused softmax, was tried: slower at
every Focus-Net shape, and an element-wise exp over -inf entries hits a slow path in MKL.)

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
memory budget. Each chunk writes only its own rows and the bias gradient is one sum over the batch
after all chunks, so the thread count changes results at most by rounding (chunk sizes differ).

The functions only use PyTorch tensor ops, so they run on any device; `auto` picks them for CPU
tensors (and for CUDA tensors only when Triton is missing). For float32 CPU tensors, where a C compiler
is at hand (kernels/native.py), `contmix_forward` and `contmix_backward` run kernels/csrc/contmix.c
instead: one position at a time, its K*K weights in a small buffer, no tiles (1.6-2.8x faster on the
Focus-Net's maps; `benchmarks/contmix_ab.py`). float64, torch.compile and the aggregation alone keep
the tiled path. The same kernels also take the logits as their factors, a query per position and
keys per (batch, head) (`ContMixFromQueries`, `kernels.contmix_from_queries`): they form each
position's logits where they use them, and the logits map, ContMix's widest, never exists.
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
# The forwards (no gradient buffers) take smaller chunks: their dense tile matrices and softmax
# weights stay near L2 size, passes over them hit the cache. Measured at one thread: 14x14 with K=13
# (batch 8, 8 heads) 8 rows per chunk vs 32: 1.3-1.5x; 28x28 with K=13: 2 rows vs 4 the same.
FORWARD_CHUNK_BYTES = 3 * 2**20


@dataclass(frozen=True)
class _Run:
    """Along one axis, tiles [t0, t1) x tile rows [r0, r1) whose windows all shift regularly.

    Tile row r of tile t is output position `position + (t - t0) * tile + (r - r0)`, and its window
    starts at `local + step * (r - r0)` in the tile's source region (the same for every tile of
    the run). step is 0 (windows clamped at a border) or 1 (interior: the window follows the row).
    So the window slots of a run are one strided view of the dense tile matrix, and the run's
    K*K entries per position one strided view of the (HW, K*K) logits: a block copy, no index.
    """

    t0: int
    t1: int
    r0: int
    r1: int
    local: int
    step: int
    position: int


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
    bias_index: torch.Tensor  # (HW*K*K,) index into the flat (2K-1)^2 bias table of every window slot
    kernel_size: int
    width: int  # W of the map
    grid: tuple[int, int]  # tiles along rows and columns (T = grid[0] * grid[1])
    span: tuple[int, int]  # the source region's rows and columns (region = span[0] * span[1])
    blocks: tuple[tuple[_Run, _Run], ...]  # every tile row's window slots as strided blocks (see _slot_views)
    owned_blocks: tuple[tuple[_Run, _Run], ...]  # the same, owned tile rows only (each position once)

    @property
    def whole(self) -> bool:
        """One tile covering the whole map: tile rows are positions and region columns are positions."""
        return self.grid == (1, 1) and self.tile == self.span


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


def _axis_runs(length: int, tile: int, kernel_size: int, owned_only: bool) -> tuple[_Run, ...]:
    """The tile rows of one axis as a few `_Run`s (every row once; with owned_only, owned rows only).

    Within a tile, window starts move by 0 or 1 per row (clamped at a border, else following the
    row), so each tile splits into at most a few runs; consecutive tiles with the same runs and
    evenly spaced starts merge (all interior tiles share one run). A handful of runs per axis.
    """
    index, _, local, owner = _axis_tiles(length, tile, kernel_size)
    starts = local[:, :, 0].tolist()
    owned = owner.tolist() if owned_only else [[True] * tile for _ in starts]
    per_tile = []
    for window, own in zip(starts, owned, strict=True):
        runs, row = [], 0
        while row < tile:
            if not own[row]:
                row += 1
                continue
            first = row
            step = window[row + 1] - window[row] if row + 1 < tile and own[row + 1] else 0
            row += 1
            while row < tile and own[row] and window[row] - window[row - 1] == step:
                row += 1
            runs.append((first, row, window[first], step))
        per_tile.append(tuple(runs))
    merged: list[_Run] = []
    first_tile = 0
    for t in range(1, len(per_tile) + 1):
        if t < len(per_tile) and per_tile[t] == per_tile[t - 1] and index[t, 0] - index[t - 1, 0] == tile:
            continue
        for r0, r1, start, step in per_tile[first_tile]:
            merged.append(_Run(first_tile, t, r0, r1, start, step, int(index[first_tile, r0])))
        first_tile = t
    return tuple(merged)


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
    blocks = {
        owned_only: tuple(
            (run_r, run_c)
            for run_r in _axis_runs(height, rows, kernel_size, owned_only)
            for run_c in _axis_runs(width, cols, kernel_size, owned_only)
        )
        for owned_only in (False, True)
    }
    return _Plan(
        (rows, cols),
        span_r * span_c,
        out_index,
        src_index,
        slot_column,
        owned_rows,
        owned_positions,
        mask,
        reference.rpb_index(height, width, kernel_size).flatten(),
        kernel_size,
        width,
        (n_r, n_c),
        (span_r, span_c),
        blocks[False],
        blocks[True],
    )


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
    fixed = {
        name: getattr(plan, name)
        for name in plan.__dataclass_fields__
        if not isinstance(getattr(plan, name), torch.Tensor)
    }
    return _Plan(**fixed, **moved)


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
    # probabilities and their copies (a bound: the slots no longer pass through a tile layout)
    per_row += height * width * kk * 3 + tiles * tile_rows * (kk * 2 + channels * 2)
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


def _dense_tiles(probs: torch.Tensor, plan: _Plan, buffers: _DenseBuffers | None = None) -> torch.Tensor:
    """(n, HW, K*K) probabilities -> (n, T, R*S, region) dense per-tile aggregation matrices (zero off-window).

    In a fresh zero tensor, or in the calling thread's buffer of `buffers` (zero off-window already).
    """
    if buffers is None:
        tiles, tile_rows = plan.out_index.shape
        dense = probs.new_zeros(probs.shape[0], tiles, tile_rows, plan.region)
    else:
        dense = buffers.get(probs.shape[0])
    for slots, entries in _slot_views(dense, probs, plan, plan.blocks):
        slots.copy_(entries)
    return dense


class _DenseBuffers:
    """One zeroed (chunk, T, R*S, region) dense tile buffer per thread, for the chunks of one call.

    Every chunk writes the same window slots (one plan), so the entries off the windows stay zero
    after the first fill: a thread's chunks reuse its buffer instead of allocating and zeroing a
    fresh one each (for 56x56 maps with K=13 that is one fill per thread instead of one per row).
    Readers must not write to a buffer, and must be done with it before their thread's next chunk.
    """

    def __init__(self, shapes: _Shapes) -> None:
        tiles, tile_rows = shapes.plan.out_index.shape
        self.shape = (shapes.chunk, tiles, tile_rows, shapes.plan.region)
        self.dtype = shapes.dtype
        self.device = shapes.plan.out_index.device
        self.local = threading.local()

    def get(self, rows: int) -> torch.Tensor:
        buffer = getattr(self.local, "buffer", None)
        if buffer is None:
            buffer = self.local.buffer = torch.zeros(self.shape, dtype=self.dtype, device=self.device)
        return buffer[:rows]


def _read_slots(dense: torch.Tensor, plan: _Plan, out: torch.Tensor) -> None:
    """out (n, HW, K*K) = the window slots of dense (n, T, R*S, region), each position from its owning tile row."""
    for slots, entries in _slot_views(dense, out, plan, plan.owned_blocks):
        entries.copy_(slots)


def _gather_rows(rows: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """rows[:, index] for (n, HW, d) rows and a (T, m) index: (n, T, m, d), by index_select (several
    times faster than advanced indexing on CPU)."""
    return rows.index_select(1, index.flatten()).view(rows.shape[0], *index.shape, rows.shape[-1])


def _untile(tiled: torch.Tensor, plan: _Plan, out: torch.Tensor) -> None:
    """Write (n, T, R*S, d) tile rows back to (n, HW, d) positions, each position exactly once."""
    rows = tiled.flatten(1, 2).index_select(1, plan.owned_rows)
    out.index_copy_(1, plan.owned_positions, rows)


def _slot_views(
    dense: torch.Tensor, rows: torch.Tensor, plan: _Plan, blocks: tuple[tuple[_Run, _Run], ...]
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Pairs of equal-shape strided views: the window slots in dense (n, T, R*S, region) tile
    matrices, and the same entries of (n, HW, K*K) rows, one pair per block of the plan.

    Copying (or adding) one view into the other moves every window slot between the two layouts:
    the block-copy form of `slot_column` (a scatter/gather per entry), a few strided copies per chunk.
    Both views are (n, tiles down, tiles across, rows, cols, K, K); `dense` must be contiguous.
    """
    kernel_size = plan.kernel_size
    n_c = plan.grid[1]
    span_c = plan.span[1]
    tile_c = plan.tile[1]
    d_n, d_tile, d_row = dense.stride()[:3]
    x_n, x_pos, x_slot = rows.stride()
    width = plan.width
    views = []
    for run_r, run_c in blocks:
        size = (
            dense.shape[0],
            run_r.t1 - run_r.t0,
            run_c.t1 - run_c.t0,
            run_r.r1 - run_r.r0,
            run_c.r1 - run_c.r0,
            kernel_size,
            kernel_size,
        )
        dense_stride = (
            d_n,
            n_c * d_tile,
            d_tile,
            tile_c * d_row + run_r.step * span_c,
            d_row + run_c.step,
            span_c,
            1,
        )
        dense_offset = (
            (run_r.t0 * n_c + run_c.t0) * d_tile
            + (run_r.r0 * tile_c + run_c.r0) * d_row
            + run_r.local * span_c
            + run_c.local
        )
        rows_stride = (
            x_n,
            plan.tile[0] * width * x_pos,
            tile_c * x_pos,
            width * x_pos,
            x_pos,
            kernel_size * x_slot,
            x_slot,
        )
        rows_offset = (run_r.position * width + run_c.position) * x_pos
        views.append(
            (
                dense.as_strided(size, dense_stride, dense.storage_offset() + dense_offset),
                rows.as_strided(size, rows_stride, rows.storage_offset() + rows_offset),
            )
        )
    return views


class _Shapes:
    """Flattened views shared by the four entry points: (B*h, HW, ...) rows in the compute dtype."""

    def __init__(self, value: torch.Tensor, kernel_size: int, *others: torch.Tensor, forward: bool = False) -> None:
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
        if forward:  # a forward chunk's dense matrices and weights stay about cache-sized
            tiles, tile_rows = self.plan.out_index.shape
            per_row = (tiles * tile_rows * self.plan.region + self.positions * self.kk) * itemsize
            self.chunk = max(1, min(self.chunk, FORWARD_CHUNK_BYTES // per_row))
        # The same number of chunks, evenly filled, in whole batch entries where a chunk holds a
        # batch entry's rows (so the bias is added by a broadcast, not a gather).
        if self.chunk >= self.heads:
            chunks = -(-self.batch // (self.chunk // self.heads))
            self.chunk = -(-self.batch // chunks) * self.heads
        else:  # a divisor of heads: no chunk straddles two batch entries (the bias is a slice)
            self.chunk = max(d for d in range(1, self.chunk + 1) if self.heads % d == 0)
        self.head_of_row = torch.arange(self.rows, device=value.device) % self.heads  # (for cpu_neighborhood)

    def flat(self, tensor: torch.Tensor) -> torch.Tensor:
        """(B, h, H, W, d) -> (B*h, HW, d); a copy only where the layout or dtype requires one."""
        return tensor.reshape(self.rows, self.positions, tensor.shape[-1])

    def new_output(self, value: torch.Tensor) -> torch.Tensor:
        """An uninitialised (B, h, H, W, c) result in the compute dtype; `flat` of it is the view to fill.

        Allocated in its final shape so that what a forward returns is never a view: autograd
        forbids in-place edits of views returned from custom ops, even where they are harmless.
        """
        return torch.empty(value.shape, dtype=self.dtype, device=value.device)


def _flat_bias(rpb: torch.Tensor, shapes: _Shapes) -> torch.Tensor:
    """(h, 2K-1, 2K-1) -> (h, HW, K*K) bias of every window slot, in the compute dtype."""
    gathered = rpb.to(shapes.dtype).flatten(1).index_select(1, shapes.plan.bias_index)  # = reference.gather_rpb
    return gathered.view(shapes.heads, shapes.positions, shapes.kk)


def _biased_rows(logits: torch.Tensor, bias: torch.Tensor, start: int, stop: int, shapes: _Shapes) -> torch.Tensor:
    """logits + bias of rows [start, stop) at the window slots, one fresh (n, HW, K*K) tensor.

    The bias is broadcast over whole batch entries, or sliced for rows within one batch entry
    (`_Shapes` makes every chunk one or the other): never gathered by head.
    """
    batch = _per_head(shapes, start, stop)
    if batch:
        rows = logits[start:stop].reshape(batch, shapes.heads, shapes.positions, shapes.kk)
        return torch.add(rows, bias).view(stop - start, shapes.positions, shapes.kk)
    first = start % shapes.heads
    assert first + stop - start <= shapes.heads, "chunks hold whole batch entries or rows of one"
    return torch.add(logits[start:stop], bias[first : first + stop - start])


def _per_head(shapes: _Shapes, start: int, stop: int) -> int:
    """Whole batch entries in rows [start, stop) (they are (batch, head) rows): their count, else 0."""
    rows = stop - start
    return rows // shapes.heads if start % shapes.heads == 0 and rows % shapes.heads == 0 else 0


def _aggregate_dense(dense: torch.Tensor, value: torch.Tensor, plan: _Plan, out: torch.Tensor) -> None:
    """out = dense tile matrices @ value regions for a chunk of rows; one product straight into out for a whole-map tile."""
    if plan.whole:
        torch.matmul(dense[:, 0], value, out=out)
    else:
        _untile(torch.matmul(dense, _gather_rows(value, plan.src_index)), plan, out)


def _aggregate_rows(
    probs: torch.Tensor, value: torch.Tensor, plan: _Plan, out: torch.Tensor, buffers: _DenseBuffers | None = None
) -> None:
    """out[n] = NA(probs[n], value[n]) for a chunk of rows (all (n, HW, .) in the compute dtype)."""
    _aggregate_dense(_dense_tiles(probs, plan, buffers), value, plan, out)


def aggregate_forward(probs: torch.Tensor, value: torch.Tensor, kernel_size: int) -> torch.Tensor:
    shapes = _Shapes(value, kernel_size, probs, forward=True)
    p, v = shapes.flat(probs), shapes.flat(value).to(shapes.dtype)
    result = shapes.new_output(value)
    out = shapes.flat(result)
    buffers = _DenseBuffers(shapes)
    _run_chunks(
        lambda start, stop: _aggregate_rows(
            p[start:stop].to(shapes.dtype), v[start:stop], shapes.plan, out[start:stop], buffers
        ),
        shapes,
    )
    return result.to(value.dtype)


NATIVE_LIBRARY = "contmix"
# Value channels come to the C kernel in whole vectors (16 floats: AVX-512's, a multiple of the others').
NATIVE_CHANNEL_MULTIPLE = 16


def native_applies(*tensors: torch.Tensor) -> bool:
    """Whether `contmix_forward` and `contmix_backward` run the compiled kernels (kernels/csrc/contmix.c):
    float32 CPU tensors, eagerly, with the C library built (kernels/native.py); else the tiled PyTorch ops."""
    from . import native  # (native imports this module's worker pool)

    value = tensors[0]
    return (
        not torch.compiler.is_compiling()
        and all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors)
        and value.numel() > 0
        and native.library(NATIVE_LIBRARY) is not None
    )


def _check_native_shapes(logits: torch.Tensor, rpb: torch.Tensor, value: torch.Tensor, kernel_size: int) -> None:
    """What the C kernels read past their buffers without (`kernels.contmix` checks the same for users;
    these functions are also called directly): windows inside the map, K*K logits per position, a bias table per head."""
    batch, heads, height, width, _ = value.shape
    span = 2 * kernel_size - 1
    if (
        min(height, width) < kernel_size
        or tuple(logits.shape) != (batch, heads, height, width, kernel_size * kernel_size)
        or tuple(rpb.shape) != (heads, span, span)
    ):
        raise ValueError(
            f"contmix on the CPU needs H, W >= K={kernel_size}, logits (B, heads, H, W, K*K) and rpb "
            f"(heads, 2K-1, 2K-1) for value {tuple(value.shape)}; got logits {tuple(logits.shape)}, "
            f"rpb {tuple(rpb.shape)}"
        )


def _padded_channels(tensor: torch.Tensor, channels: int) -> torch.Tensor:
    """(..., c) -> the same values in a zeroed (..., channels) buffer, seen as (..., c) (the C kernels
    read whole vectors of channels: the slack keeps them inside the buffer)."""
    padded = tensor.new_zeros(*tensor.shape[:-1], channels)
    return padded[..., : tensor.shape[-1]].copy_(tensor)


def _contmix_forward_native(
    logits: torch.Tensor, rpb: torch.Tensor, value: torch.Tensor, kernel_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """`contmix_forward` by the C kernel, reading logits and value through their strides (the
    callers' channel slices of channels_last maps need no copy); rows split between workers."""
    _check_native_shapes(logits, rpb, value, kernel_size)
    logits = logits if logits.stride(-1) == 1 else logits.contiguous()
    return _native_forward(logits, None, _slot_bias(rpb, value, kernel_size), value, kernel_size)


def _slot_bias(
    rpb: torch.Tensor, value: torch.Tensor, kernel_size: int, key_bias: torch.Tensor | None = None, slack: int = 0
) -> torch.Tensor:
    """(heads, 2K-1, 2K-1) -> the flat (heads * H*W * K*K) bias of every window slot (= reference.gather_rpb),
    plus `key_bias` (K*K,) on every position's slots where given, with `slack` zeroed floats after it
    (for kernels that read whole vectors)."""
    _, heads, height, width, channels = value.shape
    bias_index = _plan_cpu(height, width, kernel_size, channels).bias_index
    size = heads * bias_index.numel()
    bias = rpb.new_empty(size + slack)
    bias[size:].zero_()
    torch.index_select(rpb.flatten(1), 1, bias_index, out=bias[:size].view(heads, -1))
    if key_bias is not None:
        bias[:size].view(-1, key_bias.shape[0]).add_(key_bias)
    return bias


@dataclass(frozen=True)
class _QueryKeys:
    """Logits given by their factors, logits[b, g, y, x, k] = query[b, g, y, x] . keys[b * heads + g, :, k]:
    the C kernels form each position's logits where they use them (`ContMixFromQueries`)."""

    query: torch.Tensor  # (B, heads, H, W, c_q), any strides
    keys: torch.Tensor  # (B * heads, c_q, KP): the K*K slots zero padded to whole vectors

    @staticmethod
    def pack(query: torch.Tensor, keys: torch.Tensor) -> _QueryKeys:
        """From keys (B, heads, c_q, K*K): packed per row, the slots padded to whole vectors."""
        batch, heads, channels, kk = keys.shape
        packed = keys.new_zeros(batch * heads, channels, -(-kk // NATIVE_CHANNEL_MULTIPLE) * NATIVE_CHANNEL_MULTIPLE)
        packed[..., :kk].copy_(keys.reshape(batch * heads, channels, kk))
        return _QueryKeys(query, packed)

    @property
    def channels(self) -> int:
        return self.query.shape[-1]

    def inputs(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.query, self.keys


@dataclass(frozen=True)
class _QueryGrads(_QueryKeys):
    """`_QueryKeys` with the backward's outputs: d query (B, heads, H, W, c_q), written; and per
    (batch, head) row, zeroed for the kernel to add into: d keys (c_q, KP), d slot bias (KP,) and d rpb
    ((2K-1)^2 and a vector of slack: the kernel adds a window row's slots as one vector)."""

    dquery: torch.Tensor
    dkeys: torch.Tensor
    dslots: torch.Tensor
    drpb: torch.Tensor

    @staticmethod
    def zeros(formed: _QueryKeys, kernel_size: int) -> _QueryGrads:
        rows, _, kp = formed.keys.shape
        return _QueryGrads(
            formed.query,
            formed.keys,
            formed.keys.new_empty(formed.query.shape),
            torch.zeros_like(formed.keys),
            formed.keys.new_zeros(rows, kp),
            formed.keys.new_zeros(rows, (2 * kernel_size - 1) ** 2 + NATIVE_CHANNEL_MULTIPLE),  # a vector of slack
        )

    def grads(self) -> tuple[torch.Tensor, ...]:
        return self.dquery, self.dkeys, self.dslots, self.drpb


class ContMixFromQueries(torch.autograd.Function):
    """ContMix's mixing step with logits = query @ keys + key_bias formed inside the C kernels.

    The (B, heads, H, W, K*K) logits are the widest map around ContMix (9.7 MiB per XT call): a
    product writes them, the mixing reads them, the backward forms them again and writes their
    gradient, which two more products read. Here each position forms its K*K logits from its
    c_q-long query where they are used (c_q * K*K multiply-adds) and turns their gradient into the
    query's, the keys' and the biases' on the spot: the map never exists. The key bias (one per
    slot) rides on the relative position bias of every slot. Eager float32 CPU with the C library
    only (`kernels.contmix_from_queries` checks and falls back); saves query, keys, values, output
    and the log-sum-exp, as `overlock::contmix` does.
    """

    @staticmethod
    def forward(ctx, query, keys, key_bias, rpb, value, kernel_size):
        bias = _slot_bias(rpb, value, kernel_size, key_bias)
        out, lse = _native_forward(None, _QueryKeys.pack(query, keys), bias, value, kernel_size)
        # the inputs, not the packed keys and the (heads, H*W, K*K) bias: the backward remakes both
        ctx.save_for_backward(query, keys, key_bias, rpb, value, out, lse)
        ctx.kernel_size = kernel_size
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        query, keys, key_bias, rpb, value, out, lse = ctx.saved_tensors
        kernel_size = ctx.kernel_size
        bias = _slot_bias(rpb, value, kernel_size, key_bias, slack=NATIVE_CHANNEL_MULTIPLE)
        formed = _QueryGrads.zeros(_QueryKeys.pack(query, keys), kernel_size)
        dvalue = _native_backward(grad, None, formed, bias, value, out, lse, kernel_size)
        batch, heads = value.shape[:2]
        kk = kernel_size * kernel_size
        dkeys = formed.dkeys[..., :kk].reshape(batch, heads, -1, kk)
        dkey_bias = formed.dslots[:, :kk].sum(dim=0) if key_bias is not None else None
        span = 2 * kernel_size - 1
        drpb = formed.drpb[:, : span * span].reshape(batch, heads, span, span).sum(dim=0)
        return formed.dquery, dkeys, dkey_bias, drpb, dvalue, None


def _native_values(value: torch.Tensor) -> torch.Tensor:
    """value with unit channel stride and its channels in whole vectors (zero padded), as the C kernels read it."""
    channels = value.shape[-1]
    if channels % NATIVE_CHANNEL_MULTIPLE:
        return _padded_channels(value, -(-channels // NATIVE_CHANNEL_MULTIPLE) * NATIVE_CHANNEL_MULTIPLE)
    return value if value.stride(-1) == 1 else value.contiguous()


def _native_forward(
    logits: torch.Tensor | None,
    formed: _QueryKeys | None,
    bias: torch.Tensor,
    value: torch.Tensor,
    kernel_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The C forward: from `logits`, or with every position's logits formed from `formed`'s query and keys."""
    from . import native

    batch, heads, height, width, channels = value.shape
    value = _native_values(value)  # (a padded buffer seen as c channels: the result has c)
    result = torch.empty(value.shape, dtype=value.dtype, device=value.device)
    peak = torch.empty(value.shape[:4], dtype=value.dtype, device=value.device)
    total = torch.empty_like(peak)
    sources = (logits, *(formed.inputs() if formed else (None, None)), bias, value, result, peak, total)
    pointers = [None if t is None else native.pointer(t) for t in sources]
    shape = (heads, height, width, channels, kernel_size, formed.channels if formed else 0)
    strides = (
        *(logits.stride()[:4] if logits is not None else (0,) * 4),
        *(formed.query.stride() if formed else (0,) * 5),
    )
    native.run(
        NATIVE_LIBRARY,
        "overlock_contmix_forward",
        native.image_ranges(batch * heads, native.workers()),
        (*pointers, *shape, *strides, *value.stride()[:4]),
    )
    return result, peak.add_(total.log_())


def contmix_forward(
    logits: torch.Tensor, rpb: torch.Tensor, value: torch.Tensor, kernel_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The output and the log-sum-exp of every position (saved for the backward).

    The aggregation multiplies the unnormalised exp(z - peak) and divides the (n, HW, c) result
    by their sum: c divisions per position instead of K*K. Where `native_applies`, the
    compiled kernel computes the same in one pass per position.
    """
    if native_applies(value, logits, rpb):
        return _contmix_forward_native(logits, rpb, value, kernel_size)
    shapes = _Shapes(value, kernel_size, logits, rpb, forward=True)
    plan = shapes.plan
    bias = _flat_bias(rpb, shapes)
    z, v = shapes.flat(logits), shapes.flat(value).to(shapes.dtype)
    result = shapes.new_output(value)
    out = shapes.flat(result)
    lse = torch.empty(value.shape[:4], dtype=shapes.dtype, device=value.device)
    lse_rows = lse.view(shapes.rows, shapes.positions)
    buffers = _DenseBuffers(shapes)

    def work(start: int, stop: int) -> None:
        weights = _biased_rows(z, bias, start, stop, shapes)
        peak = weights.amax(dim=-1, keepdim=True)
        weights -= peak
        weights.exp_()
        total = weights.sum(dim=-1, keepdim=True)
        _aggregate_rows(weights, v[start:stop], plan, out[start:stop], buffers)
        out[start:stop] /= total
        lse_rows[start:stop] = (peak + total.log_()).squeeze(-1)

    _run_chunks(work, shapes)
    return result.to(value.dtype), lse


def _dense_backward(
    grad: torch.Tensor, dense: torch.Tensor, value: torch.Tensor, plan: _Plan, dvalue: torch.Tensor
) -> torch.Tensor:
    """For a chunk of rows with dense tile matrices `dense`: add the value gradient into dvalue
    (n, HW, c; zeros, or any contents for a whole-map tile, which overwrites it), return
    d dense = grad @ region^T (n, T, R*S, region).

    dvalue[region] += dense^T @ grad; for a whole-map tile that is one product, else tile rows
    that do not own their position are masked out (overlapping edge tiles count once) and the
    regions are index-added back.
    """
    if plan.whole:
        torch.matmul(dense[:, 0].transpose(-1, -2), grad, out=dvalue)  # every position once: no accumulation
        return torch.matmul(grad, value.transpose(-1, -2)).unsqueeze(1)
    grad_tiles = _gather_rows(grad, plan.out_index)  # (n, T, R*S, c)
    dregions = torch.matmul(dense.transpose(-1, -2), grad_tiles * plan.owned_mask)
    dvalue.index_add_(1, plan.src_index.flatten(), dregions.flatten(1, 2))
    del dregions
    return torch.matmul(grad_tiles, _gather_rows(value, plan.src_index).transpose(-1, -2))


def _backward_rows(
    grad: torch.Tensor, probs: torch.Tensor, value: torch.Tensor, plan: _Plan, dvalue: torch.Tensor
) -> torch.Tensor:
    """For a chunk of rows: the value gradient into dvalue (see `_dense_backward`), d probs in tile layout (n, T, R*S, K*K).

    (The tile layout is what cpu_neighborhood.py consumes; `aggregate_backward` reads the slots
    straight into position layout instead.)
    """
    ddense = _dense_backward(grad, _dense_tiles(probs, plan), value, plan, dvalue)
    return ddense.gather(3, plan.slot_column.expand(probs.shape[0], -1, -1, -1))


def aggregate_backward(
    grad: torch.Tensor, probs: torch.Tensor, value: torch.Tensor, kernel_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    shapes = _Shapes(value, kernel_size, probs, grad)
    g, p, v = (shapes.flat(t) for t in (grad, probs, value))
    dvalue = torch.zeros(shapes.rows, shapes.positions, shapes.channels, dtype=shapes.dtype, device=value.device)
    dprobs = torch.empty(shapes.rows, shapes.positions, shapes.kk, dtype=probs.dtype, device=value.device)
    buffers = _DenseBuffers(shapes)

    def work(start: int, stop: int) -> None:
        dense = _dense_tiles(p[start:stop].to(shapes.dtype), shapes.plan, buffers)
        ddense = _dense_backward(
            g[start:stop].to(shapes.dtype), dense, v[start:stop].to(shapes.dtype), shapes.plan, dvalue[start:stop]
        )
        _read_slots(ddense, shapes.plan, dprobs[start:stop])

    _run_chunks(work, shapes)
    return dprobs.view(probs.shape), dvalue.view(value.shape).to(value.dtype)


def _contmix_backward_native(
    grad: torch.Tensor,
    logits: torch.Tensor,
    rpb: torch.Tensor,
    value: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    kernel_size: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`contmix_backward` by the C kernel; the bias gradient is d logits summed per head over the
    batch, folded into the (2K-1)^2 table."""
    _check_native_shapes(logits, rpb, value, kernel_size)
    batch, heads, height, width, channels = value.shape
    logits = logits if logits.stride(-1) == 1 else logits.contiguous()
    bias = _slot_bias(rpb, value, kernel_size, slack=NATIVE_CHANNEL_MULTIPLE)  # (read in whole vectors)
    dlogits = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    dvalue = _native_backward(grad, (logits, dlogits), None, bias, value, out, lse, kernel_size)
    bias_index = _plan_cpu(height, width, kernel_size, channels).bias_index
    drpb = rpb.new_zeros(heads, rpb[0].numel())
    drpb.index_add_(1, bias_index, dlogits.view(batch, heads, -1).sum(dim=0))
    return dlogits, drpb.view(rpb.shape), dvalue


def _native_backward(
    grad: torch.Tensor,
    logits: tuple[torch.Tensor, torch.Tensor] | None,
    formed: _QueryGrads | None,
    bias: torch.Tensor,
    value: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    kernel_size: int,
) -> torch.Tensor:
    """The C backward; returns d value. With `logits` = (logits, d logits to fill), from and into the
    logits map; with `formed`, every position's logits formed from its query and keys again, and
    their gradient added into `formed`'s buffers instead of written.

    The values go channel-major, (B*heads, c, P) planes with a vector of slack (P >= H*W + 16), so
    that a window row's neighbours are consecutive."""
    from . import native

    if grad.shape != value.shape or out.shape != value.shape or lse.shape != value.shape[:4]:
        raise ValueError(f"contmix backward: grad, out and lse must match value {tuple(value.shape)}")
    batch, heads, height, width, channels = value.shape
    rows, positions = batch * heads, height * width
    plane = positions + NATIVE_CHANNEL_MULTIPLE
    padded = -(-channels // NATIVE_CHANNEL_MULTIPLE) * NATIVE_CHANNEL_MULTIPLE
    dot = torch.linalg.vecdot(grad, out).reshape(rows, positions).contiguous()  # D = grad . out
    if padded != channels:
        grad = _padded_channels(grad, padded)
    elif grad.stride(-1) != 1:
        grad = grad.contiguous()
    value_t = value.new_empty(rows, channels, plane)
    value_t[..., :positions].view(batch, heads, channels, height, width).copy_(value.permute(0, 1, 4, 2, 3))
    value_t[..., positions:].zero_()
    dvalue = value.new_zeros(batch, heads, height, width, padded)
    lse = lse.reshape(rows, positions).contiguous()
    sources = (
        grad,
        *(logits[:1] if logits else (None,)),
        *(formed.inputs() if formed else (None, None)),
        bias,
        lse,
        dot,
        value_t,
        *(logits[1:] if logits else (None,)),
        dvalue,
        *(formed.grads() if formed else (None,) * 4),
    )
    pointers = [None if t is None else native.pointer(t) for t in sources]
    shape = (heads, height, width, channels, padded, kernel_size, formed.channels if formed else 0, plane)
    strides = (
        *grad.stride()[:4],
        *(logits[0].stride()[:4] if logits else (0,) * 4),
        *(formed.query.stride() if formed else (0,) * 5),
    )
    native.run(
        NATIVE_LIBRARY,
        "overlock_contmix_backward",
        native.image_ranges(rows, native.workers()),
        (*pointers, *shape, *strides),
    )
    return dvalue if padded == channels else dvalue[..., :channels].contiguous()


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
    instead of a K*K one. The bias gradient sums d logits per head over the batch once at the end
    (an (h, HW, K*K) buffer, 1/B of the logits), then folds that into the (2K-1)^2 table.
    """
    if native_applies(value, grad, logits, rpb, out, lse):
        return _contmix_backward_native(grad, logits, rpb, value, out, lse, kernel_size)
    shapes = _Shapes(value, kernel_size, logits, rpb, grad)
    plan = shapes.plan
    g, z, v, o = shapes.flat(grad), shapes.flat(logits), shapes.flat(value), shapes.flat(out)
    lse = lse.reshape(shapes.rows, shapes.positions)
    dvalue = torch.zeros(shapes.rows, shapes.positions, shapes.channels, dtype=shapes.dtype, device=value.device)
    dlogits = torch.empty(shapes.rows, shapes.positions, shapes.kk, dtype=shapes.dtype, device=value.device)
    bias = _flat_bias(rpb, shapes)
    buffers = _DenseBuffers(shapes)

    def work(start: int, stop: int) -> None:
        """The chunk's rows of dlogits and dvalue."""
        grad_rows = g[start:stop].to(shapes.dtype)
        probs = _biased_rows(z, bias, start, stop, shapes)
        probs -= lse[start:stop].to(shapes.dtype).unsqueeze(-1)
        probs.exp_()
        dense = _dense_tiles(probs, plan, buffers)
        ddense = _dense_backward(grad_rows, dense, v[start:stop].to(shapes.dtype), plan, dvalue[start:stop])
        del dense
        dz = dlogits[start:stop]
        _read_slots(ddense, plan, dz)
        del ddense
        # softmax backward in place: dz = p * (dp - D), D = grad . out
        dz -= torch.linalg.vecdot(grad_rows, o[start:stop].to(shapes.dtype)).unsqueeze(-1)
        dz *= probs

    _run_chunks(work, shapes)
    dbias = dlogits.view(shapes.batch, shapes.heads, shapes.positions, shapes.kk).sum(0)
    drpb = torch.zeros(shapes.heads, rpb[0].numel(), dtype=shapes.dtype, device=rpb.device)
    drpb.index_add_(1, plan.bias_index, dbias.view(shapes.heads, -1))
    return (
        dlogits.view(logits.shape).to(logits.dtype),
        drpb.view(rpb.shape).to(rpb.dtype),
        dvalue.view(value.shape).to(value.dtype),
    )
