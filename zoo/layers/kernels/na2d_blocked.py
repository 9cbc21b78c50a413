"""Neighbourhood attention in query tiles: small dense matrix products instead of one gather per window slot.

The idea of "Faster Neighborhood Attention" (Hassani et al., 2024): the queries of a T x T tile all look into one
key block, the tile plus its halo, at most (T + k - 1) x (T + k - 1) keys. One batched matrix product per tile
gives every logit a tile's queries can need; a mask keeps each query's own border-shifted window and the relative
position bias is a small additive table per tile.

Exactly the reference's semantics (zoo.layers.neighborhood, NATTEN <= 0.17), reached through its geometry:

* dilation: position i = d * i' + g lies in dilation group g at in-group index i'. The map is viewed as its
  d x d groups, each an undilated neighbourhood attention over its own length L_g, so a tile lives in one group;
* along one axis, tile t holds in-group queries [t*T, t*T + T) (the last tile padded past L_g; padded queries
  take the window of the group's last query and are dropped from the output) and reads the key block
  [b, b + K) with K = min(T + k - 1, ceil(L / d)) and b = max(0, min(s_first, L_g - K)), s_first the window start
  of its first query: starts never decrease and grow by at most 1 per query, so every window of the tile lies in
  the block;
* a 2-D tile is the product of a row tile and a column tile, so its query and key positions, mask, window slots
  and bias index are outer combinations of small per-axis tables, built for the tiles a chunk needs. The per-axis
  tables are torch ops on index tensors: eager calls read them from a cache of read-only numpy arrays, a graph being
  captured (torch.compile, torch.export, torch.jit.trace, a CUDA graph) computes them in the graph, as
  zoo.layers.window_geometry does.

Tiles are gathered from the (B, heads, H*W, d) map with one index_select per tensor (of its rows, the fast form on a
CPU), and scattered back with one more. The fused operator runs in chunks of about `CHUNK_LOGITS` logits (whole
images while they fit, else bands of tile rows): on a CPU a chunk's temporaries stay in cache instead of being
fresh, page-faulted allocations four times the size of the map, which made the unchunked form about three times
slower (benchmarks/RESULTS.md, "Blocked na2d, chunked"). Its backward recomputes each chunk's probabilities (as
flash attention does), so training saves only q, k, v and rpb, never the (B, heads, tiles, Tq, Kb) probabilities.
It is the custom operator `zoo::na2d_blocked`, so that torch.compile keeps the chunks as one opaque call; exported
and traced graphs hold its plain ops as one chunk.
The two halves, na2d_qk and na2d_av, produce or take the full (B, heads, H, W, k*k) weights anyway and run through
autograd of a few large ops.

Padding for odd sizes costs at most T - 1 query rows and columns per dilation group.
"""
from dataclasses import dataclass
from functools import lru_cache
from typing import Iterator, List, NamedTuple, Optional, Tuple

import numpy as np
import torch

from ..window_geometry import capturing_graph, rpb_index

__all__ = ['neighborhood_attention_2d', 'na2d_qk', 'na2d_av', 'TILE', 'ONE_TILE', 'CHUNK_LOGITS', 'DEVICE_CHUNK_LOGITS',
           'default_tile', 'axis_plan', 'AxisPlan']


# Query tile edge T along an axis whose dilation groups are longer than ONE_TILE; a group of at most ONE_TILE
# positions is one tile (its key block is the group itself, so no logit is wasted beyond the window's own).
# Measured on 2 CPU cores (benchmarks/RESULTS.md, "Blocked na2d, chunked"): against T = 8, T = 4 took 0.84-0.88x
# the time of the fused operator at 56 x 56 and 0.57-0.64x at 28 x 28 (k 7), and 0.71-0.93x of na2d_av at k 5, 13
# and 17 (one case, 14 x 14 k 13 forward + backward, 1.27x); a single tile of 7 beat T = 4 by 1.5x on 7-long groups.
TILE = 4
ONE_TILE = 8
# Logits per chunk of the fused operator on a CPU (4 MiB in float32): the size that kept a chunk's temporaries in a
# 2-core CPU's caches in the sweep of benchmarks/RESULTS.md ("Blocked na2d"); 4x smaller or larger was up to 1.4x
# slower. Other devices have no such cache to fit; their chunks only bound memory (64 MiB of float32 logits), a
# size no GPU run has measured yet.
CHUNK_LOGITS = 1 << 20
DEVICE_CHUNK_LOGITS = 1 << 24


@dataclass(frozen=True)
class AxisPlan:
    """Sizes of one axis's tiling (length L, kernel k, dilation d, tile T): d groups x n tiles of T queries.

    padded: d * n * T query slots (group-major: slot (g, t, u) holds position d * (t*T + u) + g);
    key_len: K, keys per block.
    """
    groups: int
    tiles: int
    tile: int
    key_len: int

    @property
    def padded(self) -> int:
        return self.groups * self.tiles * self.tile

    @property
    def blocks(self) -> int:
        """Row (or column) tiles over all groups: d * n."""
        return self.groups * self.tiles


def default_tile(length: int, dilation: int) -> int:
    """The tile edge of an axis: its whole dilation group when the longest group fits in ONE_TILE, else TILE."""
    longest = -(-length // dilation)
    return longest if longest <= ONE_TILE else TILE


def axis_plan(length: int, kernel_size: int, dilation: int, tile: int) -> AxisPlan:
    """The tiling of one axis (unchecked: the operator has validated the window)."""
    longest = -(-length // dilation)
    tile = min(tile, longest)
    return AxisPlan(dilation, -(-longest // tile), tile, min(tile + kernel_size - 1, longest))


class _Axis(NamedTuple):
    """One axis's tables, tiles in group-major order (g, t) -> row g * n + t of the first dimension.

    queries (d*n, T): map position of each query slot (past the map for padding slots);
    keys (d*n, K): map position of each block key, clamped into the map where a short group's block runs past its
        end (masked there);
    inside (d*n, T, K) bool: key c of the block lies in query u's window;
    slots (d*n, T, k): block position of each of query u's window slots;
    bias (d*n, T, K): relative position (key - query) / d + k - 1, clipped into [0, 2k-2];
    tile_of (L,), offset_of (L,): the tile (g * n + t) and in-tile slot u of each map position.
    """
    queries: torch.Tensor
    keys: torch.Tensor
    inside: torch.Tensor
    slots: torch.Tensor
    bias: torch.Tensor
    tile_of: torch.Tensor
    offset_of: torch.Tensor


def _axis_tables(length: int, kernel_size: int, dilation: int, tile: int, device: torch.device) -> _Axis:
    """`_Axis` of one axis, in torch ops so that a captured graph can compute them."""
    plan = axis_plan(length, kernel_size, dilation, tile)
    in_group = torch.arange(plan.tiles * plan.tile, device=device)
    slot, key_offset = torch.arange(kernel_size, device=device), torch.arange(plan.key_len, device=device)
    columns = []
    for group in range(dilation):
        group_len = (length - group + dilation - 1) // dilation
        query = in_group.clamp(max=group_len - 1)  # padded queries borrow the last query's window
        start = (query - kernel_size // 2).clamp(min=0).clamp(max=group_len - kernel_size)
        block = start[::plan.tile].clamp(max=group_len - plan.key_len).clamp(min=0)  # (n,)
        block_keys = block[:, None] + key_offset  # (n, K) in-group key index
        start, query = start.view(plan.tiles, plan.tile), query.view(plan.tiles, plan.tile)
        offset = block_keys[:, None, :] - start[:, :, None]  # (n, T, K)
        columns.append((dilation * in_group.view(plan.tiles, plan.tile) + group,
                        (dilation * block_keys + group).clamp(max=length - 1),
                        (offset >= 0) & (offset < kernel_size),
                        start[:, :, None] - block[:, None, None] + slot,
                        (block_keys[:, None, :] - query[:, :, None] + kernel_size - 1).clamp(0, 2 * kernel_size - 2)))
    queries, keys, inside, slots, bias = (torch.cat(column) for column in zip(*columns))
    position = torch.arange(length, device=device)
    in_group = position // dilation
    return _Axis(queries, keys, inside, slots, bias, (position % dilation) * plan.tiles + in_group // plan.tile,
                 in_group % plan.tile)


@lru_cache(maxsize=64)
def _axis_numpy(length: int, kernel_size: int, dilation: int, tile: int) -> Tuple[np.ndarray, ...]:
    """`_axis_tables` as read-only numpy arrays: the eager calls' cache (see zoo.layers.window_geometry)."""
    arrays = tuple(t.numpy() for t in _axis_tables(length, kernel_size, dilation, tile, torch.device('cpu')))
    for array in arrays:
        array.flags.writeable = False
    return arrays


def _axis(length: int, kernel_size: int, dilation: int, tile: int, device: torch.device) -> _Axis:
    """`_axis_tables` on device: computed in the graph while one is captured, else copied from the cache."""
    if capturing_graph() or (device.type == 'cuda' and torch.cuda.is_current_stream_capturing()):
        return _axis_tables(length, kernel_size, dilation, tile, device)
    return _Axis(*(torch.tensor(array, device=device) for array in _axis_numpy(length, kernel_size, dilation, tile)))


def _combine(row: torch.Tensor, col: torch.Tensor, op) -> torch.Tensor:
    """(R, Tr, Xr) and (C, Tc, Xc) -> (R*C tiles, Tr*Tc, Xr*Xc) by op on every pair."""
    pair = op(row[:, None, :, None, :, None], col[None, :, None, :, None, :])
    return pair.reshape(pair.shape[0] * pair.shape[1], pair.shape[2] * pair.shape[3], -1)


class _Geometry(NamedTuple):
    """What the tiling of a call depends on: map (H, W), kernel k, dilation d, tile edge T (None: `default_tile` of
    each axis)."""
    height: int
    width: int
    kernel_size: int
    dilation: int
    tile: Optional[int]


class _Map:
    """Both axes' tables of one map, and the tables of any band of tile rows. Tile order everywhere: row tile
    (g_r * n_r + t_r) major, column tile minor."""

    def __init__(self, geometry: _Geometry, device: torch.device):
        self.geometry, self.device = geometry, device
        height, width, kernel_size, dilation, tile = geometry
        row_tile, col_tile = (tile or default_tile(length, dilation) for length in (height, width))
        self.rows = _axis(height, kernel_size, dilation, row_tile, device)
        self.cols = _axis(width, kernel_size, dilation, col_tile, device)
        self.row_plan = axis_plan(height, kernel_size, dilation, row_tile)
        self.col_plan = axis_plan(width, kernel_size, dilation, col_tile)

    @property
    def tile_queries(self) -> int:
        return self.row_plan.tile * self.col_plan.tile

    @property
    def block_keys(self) -> int:
        return self.row_plan.key_len * self.col_plan.key_len

    @property
    def num_tiles(self) -> int:
        return self.row_plan.blocks * self.col_plan.blocks

    def inverse(self) -> torch.Tensor:
        """(H*W,): index of each map position among the (tiles * Tq) query slots."""
        rows, cols = self.rows, self.cols
        tile = rows.tile_of[:, None] * self.col_plan.blocks + cols.tile_of[None, :]
        return (tile * self.tile_queries + rows.offset_of[:, None] * self.col_plan.tile
                + cols.offset_of[None, :]).reshape(-1)

    def queries(self, band: slice) -> Tuple[torch.Tensor, torch.Tensor]:
        """Flat map index (clamped into the map) and validity of every query slot of the band's tiles, (n*Tq,)."""
        height, width = self.geometry.height, self.geometry.width
        rows, cols = self.rows.queries[band, :, None], self.cols.queries[:, :, None]
        index = _combine(rows.clamp(max=height - 1), cols.clamp(max=width - 1), lambda r, c: r * width + c)
        return index.reshape(-1), _combine(rows < height, cols < width, torch.logical_and).reshape(-1)

    def keys(self, band: slice) -> torch.Tensor:
        """Flat map index of every block key of the band's tiles, (n*Kb,)."""
        width = self.geometry.width
        return _combine(self.rows.keys[band, None, :], self.cols.keys[:, None, :],
                        lambda r, c: r * width + c).reshape(-1)

    def slots(self, band: slice) -> torch.Tensor:
        """(n, Tq, k*k): block index of each query's window slots."""
        key_cols = self.col_plan.key_len
        return _combine(self.rows.slots[band], self.cols.slots, lambda r, c: r * key_cols + c)

    def mask(self, band: slice, rpb: Optional[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        """Additive mask of the band's tile logits, (heads or 1, n, Tq, Kb): rpb inside each window, -inf outside."""
        outside = ~_combine(self.rows.inside[band], self.cols.inside, torch.logical_and)
        if rpb is None:
            zeros = torch.zeros(outside.shape, dtype=dtype, device=outside.device)
            return zeros.masked_fill(outside, float('-inf'))[None]
        return rpb.flatten(1).to(dtype)[:, self.bias_index(band)].masked_fill(outside, float('-inf'))

    def bias_index(self, band: slice) -> torch.Tensor:
        """(n, Tq, Kb) flat rpb index of every tile logit."""
        span = 2 * self.geometry.kernel_size - 1
        return _combine(self.rows.bias[band], self.cols.bias, lambda r, c: r * span + c)

    def bands(self, batch: int, heads: int) -> Iterator[Tuple[slice, slice]]:
        """Chunks of about CHUNK_LOGITS logits (DEVICE_CHUNK_LOGITS off the CPU) as (batch slice, row-tile band):
        whole images while one fits, else bands of tile rows of one image, band by band; a single chunk while a
        graph is captured."""
        rows = self.row_plan.blocks
        per_row = heads * self.col_plan.blocks * self.tile_queries * self.block_keys
        budget = CHUNK_LOGITS if self.device.type == 'cpu' else DEVICE_CHUNK_LOGITS
        if capturing_graph() or batch * rows * per_row <= budget:
            yield slice(0, batch), slice(0, rows)
            return
        if rows * per_row <= budget:
            images = budget // (rows * per_row)
            for start in range(0, batch, images):
                yield slice(start, start + images), slice(0, rows)
            return
        band = max(1, budget // per_row)
        for start in range(0, rows, band):  # band-major: a band's tables serve every image
            for image in range(batch):
                yield slice(image, image + 1), slice(start, start + band)


def _plan(x: torch.Tensor, kernel_size: int, dilation: int, tile: Optional[int]) -> _Map:
    """The tiling tables of x's (B, heads, H, W, d) map, on x's device."""
    return _Map(_Geometry(x.shape[2], x.shape[3], kernel_size, dilation, tile), x.device)


def _flat_rows(index: torch.Tensor, images: int, heads: int, length: int) -> torch.Tensor:
    """Row index (images * heads * m,) into a (images * heads * length, X) view of rows `index` (m,) of each map."""
    return (torch.arange(images * heads, device=index.device)[:, None] * length + index).reshape(-1)


def _gather(rows: torch.Tensor, index: torch.Tensor, count: int) -> torch.Tensor:
    """Contiguous (b, heads, H*W, X) map rows at index (count * m,) -> (b, heads, count, m, X).

    One index_select along dim 0 of the 2-D view: four times faster on a CPU than along dim 2 of the 4-D map."""
    images, heads, length, width = rows.shape
    flat = rows.view(-1, width).index_select(0, _flat_rows(index, images, heads, length))
    return flat.view(images, heads, count, -1, width)


def _scatter_add(rows: torch.Tensor, index: torch.Tensor, tiles: torch.Tensor) -> None:
    """rows (b, heads, H*W, X) contiguous += tiles (b, heads, n, m, X) at map rows index (n * m,)."""
    images, heads, length, width = rows.shape
    rows.view(-1, width).index_add_(0, _flat_rows(index, images, heads, length), tiles.reshape(-1, width))


def _map_rows(x: torch.Tensor) -> torch.Tensor:
    """(B, heads, H, W, X) -> contiguous (B, heads, H*W, X)."""
    return x.reshape(*x.shape[:2], -1, x.shape[-1]).contiguous()


def _probabilities(query_tiles: torch.Tensor, key_blocks: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """softmax(q . k + mask) over each tile's key block: (b, heads, n, Tq, d) x (b, heads, n, Kb, d) ->
    (b, heads, n, Tq, Kb), in the queries' dtype (the softmax itself in float32 for half-precision inputs)."""
    logits = torch.matmul(query_tiles, key_blocks.transpose(-1, -2)).add_(mask)
    if logits.dtype in (torch.float16, torch.bfloat16):
        return logits.softmax(-1, dtype=torch.float32).to(logits.dtype)
    return logits.softmax(-1)


def _fused_forward(query, key, value, rpb, scale, plan: _Map) -> torch.Tensor:
    """The fused operator on (B, heads, H, W, d) maps, chunk by chunk -> (B, heads, H, W, d)."""
    batch, heads, height, width, dim = query.shape
    q, k, v = (_map_rows(t) for t in (query, key, value))
    tiled = q.new_empty(batch, heads, plan.num_tiles * plan.tile_queries, dim)
    current, tables = None, ()
    for images, band in plan.bands(batch, heads):
        if band != current:  # bands repeat across the images of a batch: build their tables once
            current, tables = band, (plan.mask(band, rpb, query.dtype), plan.queries(band)[0], plan.keys(band))
        mask, query_index, key_index = tables
        count = mask.shape[1]
        probs = _probabilities(_gather(q[images], query_index, count) * scale, _gather(k[images], key_index, count),
                               mask)
        first = band.start * plan.col_plan.blocks * plan.tile_queries
        tiled[images, :, first:first + query_index.numel()] = (
            torch.matmul(probs, _gather(v[images], key_index, count)).flatten(2, 3))
    return _gather(tiled, plan.inverse(), 1).view(batch, heads, height, width, dim)


def _fused_backward(query, key, value, rpb, scale: float, plan: _Map, grad: torch.Tensor, rpb_grad: bool):
    """Gradients of the fused operator in query, key, value and rpb (None where rpb is None or not needed).

    Per chunk, with P the probabilities and dO the output gradient of the tile queries (zero on padding slots):
    dV += P^T dO;  dS = P * (dO V^T - rowsum(P * dO V^T));  dQ = scale * dS K;  dK += dS^T (scale * Q);
    d rpb += dS summed over the batch at each logit's bias index. dK, dV and d rpb accumulate in float32 for
    half-precision inputs (many tiles add into one key).
    """
    batch, heads, height, width, dim = query.shape
    accumulate = torch.float32 if query.dtype in (torch.float16, torch.bfloat16) else query.dtype
    q, k, v, grad = (_map_rows(t) for t in (query, key, value, grad))
    grad_q = q.new_empty(batch, heads, plan.num_tiles * plan.tile_queries, dim)
    grad_k = torch.zeros(k.shape, dtype=accumulate, device=k.device)
    grad_v = torch.zeros(v.shape, dtype=accumulate, device=v.device)
    grad_rpb = None if not rpb_grad else torch.zeros(rpb.shape[0], rpb[0].numel(), dtype=accumulate,
                                                     device=rpb.device)
    current, tables = None, ()
    for images, band in plan.bands(batch, heads):
        if band != current:
            current = band
            tables = (plan.mask(band, rpb, query.dtype), *plan.queries(band), plan.keys(band),
                      plan.bias_index(band) if rpb_grad else None)
        mask, query_index, valid, key_index, bias_index = tables
        count = mask.shape[1]
        query_tiles = _gather(q[images], query_index, count) * scale
        key_blocks, value_blocks = _gather(k[images], key_index, count), _gather(v[images], key_index, count)
        probs = _probabilities(query_tiles, key_blocks, mask)
        grad_out = _gather(grad[images], query_index, count) * valid.view(count, -1, 1).to(grad.dtype)
        _scatter_add(grad_v[images], key_index, torch.matmul(probs.transpose(-1, -2), grad_out).to(accumulate))
        grad_probs = torch.matmul(grad_out, value_blocks.transpose(-1, -2))
        # probs * (grad_probs - rowsum(probs * grad_probs)) in one fused pass
        grad_logits = torch.ops.aten._softmax_backward_data(grad_probs, probs, -1, probs.dtype)
        first = band.start * plan.col_plan.blocks * plan.tile_queries
        grad_q[images, :, first:first + query_index.numel()] = (
            torch.matmul(grad_logits, key_blocks).flatten(2, 3) * scale)
        _scatter_add(grad_k[images], key_index, torch.matmul(grad_logits.transpose(-1, -2), query_tiles).to(accumulate))
        if grad_rpb is not None:
            grad_rpb.index_add_(1, bias_index.reshape(-1), grad_logits.sum(0).flatten(1).to(accumulate))
    grad_q = _gather(grad_q, plan.inverse(), 1).view(query.shape)
    grad_k, grad_v = grad_k.to(key.dtype).view(key.shape), grad_v.to(value.dtype).view(value.shape)
    return grad_q, grad_k, grad_v, None if grad_rpb is None else grad_rpb.to(rpb.dtype).view(rpb.shape)


@torch.library.custom_op('zoo::na2d_blocked', mutates_args=())
def _fused_op(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, rpb: Optional[torch.Tensor], scale: float,
              kernel_size: int, dilation: int, tile: Optional[int]) -> torch.Tensor:
    """The chunked fused operator as one operator: torch.compile calls it as it is, because its chunk loop unrolled
    into a static graph keeps inductor compiling for minutes (benchmarks/RESULTS.md, compiled vs eager)."""
    return _fused_forward(query, key, value, rpb, scale, _plan(query, kernel_size, dilation, tile))


@_fused_op.register_fake
def _fused_op_shape(query, key, value, rpb, scale, kernel_size, dilation, tile) -> torch.Tensor:
    return query.new_empty(query.shape)  # contiguous, as _fused_forward returns it


@torch.library.custom_op('zoo::na2d_blocked_backward', mutates_args=())
def _fused_backward_op(grad: torch.Tensor, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       rpb: Optional[torch.Tensor], scale: float, kernel_size: int, dilation: int, tile: Optional[int],
                       rpb_grad: bool) -> List[torch.Tensor]:
    """[d query, d key, d value] (+ [d rpb] when rpb_grad) of `_fused_op`, recomputing each chunk's probabilities."""
    grads = _fused_backward(query, key, value, rpb, scale, _plan(query, kernel_size, dilation, tile), grad, rpb_grad)
    return list(grads[:3]) + ([grads[3]] if rpb_grad else [])


@_fused_backward_op.register_fake
def _fused_backward_op_shapes(grad, query, key, value, rpb, scale, kernel_size, dilation, tile,
                              rpb_grad) -> List[torch.Tensor]:
    return [t.new_empty(t.shape) for t in (query, key, value, *((rpb,) if rpb_grad else ()))]


def _save_fused_inputs(ctx, inputs, output) -> None:
    query, key, value, rpb, *settings = inputs
    ctx.save_for_backward(query, key, value, rpb)
    ctx.settings = settings


def _fused_op_backward(ctx, grad):
    """Training saves only q, k, v and rpb: the backward operator recomputes the probabilities chunk by chunk."""
    query, key, value, rpb = ctx.saved_tensors
    rpb_grad = rpb is not None and ctx.needs_input_grad[3]
    grads = _fused_backward_op(grad, query, key, value, rpb, *ctx.settings, rpb_grad)
    return *grads[:3], grads[3] if rpb_grad else None, None, None, None, None


_fused_op.register_autograd(_fused_op_backward, setup_context=_save_fused_inputs)


def neighborhood_attention_2d(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, kernel_size: int,
                              dilation: int, rpb: Optional[torch.Tensor], scale: float,
                              tile: Optional[int] = None) -> torch.Tensor:
    """softmax(scale * q.k + rpb) @ v over each query's window, one masked attention per tile, chunk by chunk.

    query, key, value: (B, heads, H, W, d), already checked by the caller; rpb: (heads, 2k-1, 2k-1) or None;
    tile: query tile edge T (default: `default_tile` of each axis). Returns (B, heads, H, W, d).
    Eager calls and torch.compile run the chunked operator `zoo::na2d_blocked` (its backward recomputes the
    probabilities). An exported or traced graph holds the same ops as one chunk under autograd instead: a program
    for other runtimes (ONNX) cannot call a zoo operator.
    """
    if torch.compiler.is_exporting() or torch.jit.is_tracing():
        return _fused_forward(query, key, value, rpb, scale, _plan(query, kernel_size, dilation, tile))
    return _fused_op(query, key, value, rpb, scale, kernel_size, dilation, tile)


def na2d_qk(query: torch.Tensor, key: torch.Tensor, kernel_size: int, dilation: int, rpb: Optional[torch.Tensor],
            tile: Optional[int] = None) -> torch.Tensor:
    """The reference's na2d_qk: (B, heads, H, W, d) twice -> (B, heads, H, W, k*k) logits (+ rpb)."""
    plan, every = _plan(query, kernel_size, dilation, tile), slice(0, None)
    count = plan.num_tiles
    query_tiles = _gather(_map_rows(query), plan.queries(every)[0], count)
    logits = torch.matmul(query_tiles, _gather(_map_rows(key), plan.keys(every), count).transpose(-1, -2))
    window = logits.gather(-1, plan.slots(every).expand(*logits.shape[:2], -1, -1, -1))  # (B, heads, n, Tq, k*k)
    out = _gather(window.flatten(2, 3), plan.inverse(), 1).view(*query.shape[:4], -1)
    if rpb is None:
        return out
    index = rpb_index(*plan.geometry[:4], rpb.device)
    return out + rpb.flatten(1)[:, index].flatten(-2).to(out.dtype)


def na2d_av(attn: torch.Tensor, value: torch.Tensor, kernel_size: int, dilation: int,
            tile: Optional[int] = None) -> torch.Tensor:
    """The reference's na2d_av: weights (B, heads, H, W, k*k) and values (B, heads, H, W, d) -> (B, heads, H, W, d).

    Each tile's weights are spread over its key block (zeros outside the windows), then one matmul per tile.
    """
    plan, every = _plan(value, kernel_size, dilation, tile), slice(0, None)
    count = plan.num_tiles
    weights = _gather(_map_rows(attn), plan.queries(every)[0], count)  # (B, heads, n, Tq, k*k)
    blocks = weights.new_zeros(*weights.shape[:-1], plan.block_keys)
    blocks = blocks.scatter(-1, plan.slots(every).expand(*weights.shape[:2], -1, -1, -1), weights)
    out = torch.matmul(blocks, _gather(_map_rows(value), plan.keys(every), count))
    return _gather(out.flatten(2, 3), plan.inverse(), 1).view(value.shape)
