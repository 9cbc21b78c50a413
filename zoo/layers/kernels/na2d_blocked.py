"""Neighbourhood attention in query tiles: small dense matrix products instead of one gather per window slot.

The idea of "Faster Neighborhood Attention" (Hassani et al., 2024): the queries of a T x T tile all look into one
key block, the tile plus its halo, at most (T + k - 1) x (T + k - 1) keys. One batched matrix product per tile
gives every logit a tile's queries can need; a mask keeps each query's own border-shifted window and the relative
position bias is a small additive table per tile. Memory stays bounded by the tiles: the key blocks are
((T + k - 1) / T)^2 times one input, the tile logits the same factor times the reference's (B, heads, H, W, k*k),
and nothing is O((HW)^2).

Exactly the reference's semantics (zoo.layers.neighborhood, NATTEN <= 0.17), reached through its geometry:

* dilation: position i = d * i' + g lies in dilation group g at in-group index i'. The map is viewed as its
  d x d groups, each an undilated neighbourhood attention over its own length L_g, so a tile lives in one group;
* along one axis, tile t holds in-group queries [t*T, t*T + T) (the last tile padded past L_g; padded queries
  take the window of the group's last query and are dropped from the output) and reads the key block
  [b, b + K) with K = min(T + k - 1, ceil(L / d)) and b = max(0, min(s_first, L_g - K)), s_first the window start
  of its first query: starts never decrease and grow by at most 1 per query, so every window of the tile lies in
  the block;
* a 2-D tile is the product of a row tile and a column tile, so its mask, window slots and bias index are outer
  combinations of per-axis tables. The tables are torch ops on index tensors: eager calls read them from a cache
  of read-only numpy arrays, a graph being captured (torch.compile) computes them in the graph, as
  zoo.layers.window_geometry does.

Padding for odd sizes costs at most T - 1 query rows and columns per dilation group.

Forward and backward run through autograd of a few large ops (index_select, matmul or
scaled_dot_product_attention, gather / scatter), whose saved tensors are the tile-sized ones above.
"""
from dataclasses import dataclass
from functools import lru_cache
from typing import Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from ..window_geometry import capturing_graph, rpb_index

__all__ = ['neighborhood_attention_2d', 'na2d_qk', 'na2d_av', 'TILE', 'axis_plan', 'AxisPlan']


# Query tile edge T. Measured on 2 CPU cores (benchmarks/RESULTS.md, "Blocked na2d"): T = 7-8 is fastest for k = 7
# at 14-56 wide maps and for k = 17 at 56 x 56 (T = 4 and 14 are up to 2x slower on one shape or another).
TILE = 8


@dataclass(frozen=True)
class AxisPlan:
    """Sizes of one axis's tiling (length L, kernel k, dilation d, tile T): d groups x n tiles of T queries.

    padded: d * n * T, the length the query map is padded to (group-major: position = d * (t*T + u) + g);
    key_len: K, keys per block.
    """
    groups: int
    tiles: int
    tile: int
    key_len: int

    @property
    def padded(self) -> int:
        return self.groups * self.tiles * self.tile


def axis_plan(length: int, kernel_size: int, dilation: int, tile: int) -> AxisPlan:
    """The tiling of one axis (unchecked: the operator has validated the window)."""
    longest = -(-length // dilation)
    tile = min(tile, longest)
    return AxisPlan(dilation, -(-longest // tile), tile, min(tile + kernel_size - 1, longest))


def _axis_tables(length: int, kernel_size: int, dilation: int, tile: int,
                 device: torch.device) -> Tuple[torch.Tensor, ...]:
    """The tables of one axis, in torch ops so that a captured graph can compute them:

    keys (d * n * K,): map position of every block's keys (order g, t, c), clamped into the map where a short
        group's block runs past its end (masked there);
    inside (d, n, T, K) bool: key c of the block lies in query u's window;
    slots (d, n, T, k): block position of each of query u's window slots;
    bias (d, n, T, K): relative position (key - query) / d + k - 1, clipped into [0, 2k-2].
    """
    plan = axis_plan(length, kernel_size, dilation, tile)
    queries = torch.arange(plan.tiles * plan.tile, device=device)
    slot, key_offset = torch.arange(kernel_size, device=device), torch.arange(plan.key_len, device=device)
    tables = []
    for group in range(dilation):
        group_len = (length - group + dilation - 1) // dilation
        query = queries.clamp(max=group_len - 1)  # padded queries borrow the last query's window
        start = (query - kernel_size // 2).clamp(min=0).clamp(max=group_len - kernel_size)
        block = start[::plan.tile].clamp(max=group_len - plan.key_len).clamp(min=0)  # (n,)
        block_keys = block[:, None] + key_offset  # (n, K) in-group key index
        start, query = start.view(plan.tiles, plan.tile), query.view(plan.tiles, plan.tile)
        offset = block_keys[:, None, :] - start[:, :, None]  # (n, T, K)
        tables.append(((dilation * block_keys + group).clamp(max=length - 1), (offset >= 0) & (offset < kernel_size),
                       start[:, :, None] - block[:, None, None] + slot,
                       (block_keys[:, None, :] - query[:, :, None] + kernel_size - 1).clamp(0, 2 * kernel_size - 2)))
    keys, inside, slots, bias = (torch.stack(column) for column in zip(*tables))
    return keys.reshape(-1), inside, slots, bias


def _combine(row: torch.Tensor, col: torch.Tensor, op) -> torch.Tensor:
    """(dr, nr, Tr, Xr) and (dc, nc, Tc, Xc) -> (dr*nr*dc*nc tiles, Tr*Tc, Xr*Xc) by op on every pair."""
    pair = op(row[:, :, None, None, :, None, :, None], col[None, None, :, :, None, :, None, :])
    return pair.reshape(pair.shape[0] * pair.shape[1] * pair.shape[2] * pair.shape[3],
                        pair.shape[4] * pair.shape[5], -1)


def _map_tables(height: int, width: int, kernel_size: int, dilation: int, tile: int,
                device: torch.device) -> Tuple[torch.Tensor, ...]:
    """row keys, column keys, inside (tiles, Tq, Kb) bool, slots (tiles, Tq, k*k) block index of each window slot,
    bias (tiles, Tq, Kb) flat rpb index row * (2k-1) + col."""
    row_keys, row_inside, row_slots, row_bias = _axis_tables(height, kernel_size, dilation, tile, device)
    col_keys, col_inside, col_slots, col_bias = _axis_tables(width, kernel_size, dilation, tile, device)
    col_len = axis_plan(width, kernel_size, dilation, tile).key_len
    return (row_keys, col_keys, _combine(row_inside, col_inside, torch.logical_and),
            _combine(row_slots, col_slots, lambda r, c: r * col_len + c),
            _combine(row_bias, col_bias, lambda r, c: r * (2 * kernel_size - 1) + c))


@lru_cache(maxsize=64)
def _map_tables_numpy(height: int, width: int, kernel_size: int, dilation: int, tile: int) -> Tuple[np.ndarray, ...]:
    """`_map_tables` as read-only numpy arrays: the eager calls' cache (see zoo.layers.window_geometry)."""
    arrays = tuple(t.numpy() for t in _map_tables(height, width, kernel_size, dilation, tile, torch.device('cpu')))
    for array in arrays:
        array.flags.writeable = False
    return arrays


def _tables(geometry: Tuple[int, ...], device: torch.device) -> Tuple[torch.Tensor, ...]:
    """`_map_tables` of geometry (H, W, k, d, T) on device: computed in the graph while one is captured, else
    copied from the cache."""
    if capturing_graph():
        return _map_tables(*geometry, device)
    return tuple(torch.tensor(array, device=device) for array in _map_tables_numpy(*geometry))


@dataclass(frozen=True)
class _Plan:
    """Both axes of one map. Tile batch order everywhere: (row group, row tile, column group, column tile)."""
    rows: AxisPlan
    cols: AxisPlan

    @property
    def num_tiles(self) -> int:
        return self.rows.groups * self.rows.tiles * self.cols.groups * self.cols.tiles


def _plan(height: int, width: int, kernel_size: int, dilation: int, tile: int) -> _Plan:
    return _Plan(axis_plan(height, kernel_size, dilation, tile), axis_plan(width, kernel_size, dilation, tile))


# (B, heads, nr, Tr, dr, nc, Tc, dc, X) -> (B, heads, dr, nr, dc, nc, Tr, Tc, X), and back
_TO_TILES = (0, 1, 4, 2, 7, 5, 3, 6, 8)
_FROM_TILES = tuple(int(i) for i in np.argsort(_TO_TILES))


def _to_tiles(x: torch.Tensor, plan: _Plan) -> torch.Tensor:
    """(B, heads, H, W, X) map -> (B, heads, tiles, Tr*Tc, X) query tiles, padded with zeros past the map."""
    rows, cols = plan.rows, plan.cols
    height, width = x.shape[2:4]
    x = F.pad(x, (0, 0, 0, cols.padded - width, 0, rows.padded - height))
    x = x.view(*x.shape[:2], rows.tiles, rows.tile, rows.groups, cols.tiles, cols.tile, cols.groups, x.shape[-1])
    return x.permute(_TO_TILES).reshape(*x.shape[:2], plan.num_tiles, rows.tile * cols.tile, x.shape[-1])


def _from_tiles(x: torch.Tensor, plan: _Plan, height: int, width: int) -> torch.Tensor:
    """Inverse of `_to_tiles`: (B, heads, tiles, Tr*Tc, X) -> (B, heads, H, W, X)."""
    rows, cols = plan.rows, plan.cols
    x = x.view(*x.shape[:2], rows.groups, rows.tiles, cols.groups, cols.tiles, rows.tile, cols.tile, x.shape[-1])
    x = x.permute(_FROM_TILES).reshape(*x.shape[:2], rows.padded, cols.padded, x.shape[-1])
    return x[:, :, :height, :width]


def _key_blocks(x: torch.Tensor, plan: _Plan, tables: Tuple[torch.Tensor, ...]) -> torch.Tensor:
    """(B, heads, H, W, X) map -> (B, heads, tiles, Kr*Kc, X): each tile's key block."""
    rows, cols = plan.rows, plan.cols
    x = x.index_select(2, tables[0]).index_select(3, tables[1])
    x = x.view(*x.shape[:2], rows.groups, rows.tiles, rows.key_len, cols.groups, cols.tiles, cols.key_len,
               x.shape[-1])
    return x.permute(0, 1, 2, 3, 5, 6, 4, 7, 8).reshape(*x.shape[:2], plan.num_tiles, -1, x.shape[-1])


def _tile_bias(rpb: Optional[torch.Tensor], tables: Tuple[torch.Tensor, ...], dtype: torch.dtype) -> torch.Tensor:
    """Additive mask of the tile logits, (heads or 1, tiles, Tq, Kb): rpb inside each window, -inf outside."""
    outside = ~tables[2]
    if rpb is None:
        return torch.zeros(outside.shape, dtype=dtype, device=outside.device).masked_fill(outside, float('-inf'))[None]
    return rpb.flatten(1).to(dtype)[:, tables[4]].masked_fill(outside, float('-inf'))


def _slot_index(tables: Tuple[torch.Tensor, ...], like: torch.Tensor) -> torch.Tensor:
    """(B, heads, tiles, Tq, k*k) block index of every window slot, expanded over like's (B, heads)."""
    return tables[3].expand(*like.shape[:2], *tables[3].shape)


def _geometry(x: torch.Tensor, kernel_size: int, dilation: int, tile: Optional[int]) -> Tuple[int, ...]:
    """(H, W, k, d, T) of x's map: what the plan and the tables depend on."""
    return (x.shape[2], x.shape[3], kernel_size, dilation, TILE if tile is None else tile)


def neighborhood_attention_2d(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, kernel_size: int,
                              dilation: int, rpb: Optional[torch.Tensor], scale: float,
                              tile: Optional[int] = None) -> torch.Tensor:
    """softmax(scale * q.k + rpb) @ v over each query's window, one masked attention per tile.

    query, key, value: (B, heads, H, W, d), already checked by the caller; rpb: (heads, 2k-1, 2k-1) or None;
    tile: query tile edge T (default `TILE`). Returns (B, heads, H, W, d).
    """
    geometry = _geometry(query, kernel_size, dilation, tile)
    plan, tables = _plan(*geometry), _tables(geometry, query.device)
    out = F.scaled_dot_product_attention(
        _to_tiles(query, plan), _key_blocks(key, plan, tables), _key_blocks(value, plan, tables),
        attn_mask=_tile_bias(rpb, tables, query.dtype)[None], scale=scale)
    return _from_tiles(out, plan, *geometry[:2])


def na2d_qk(query: torch.Tensor, key: torch.Tensor, kernel_size: int, dilation: int, rpb: Optional[torch.Tensor],
            tile: Optional[int] = None) -> torch.Tensor:
    """The reference's na2d_qk: (B, heads, H, W, d) twice -> (B, heads, H, W, k*k) logits (+ rpb)."""
    geometry = _geometry(query, kernel_size, dilation, tile)
    plan, tables = _plan(*geometry), _tables(geometry, query.device)
    logits = _to_tiles(query, plan) @ _key_blocks(key, plan, tables).transpose(-1, -2)  # (B, heads, tiles, Tq, Kb)
    out = _from_tiles(logits.gather(-1, _slot_index(tables, logits)), plan, *geometry[:2])
    if rpb is None:
        return out
    index = rpb_index(*geometry[:4], rpb.device)
    return out + rpb.flatten(1)[:, index].flatten(-2).to(out.dtype)


def na2d_av(attn: torch.Tensor, value: torch.Tensor, kernel_size: int, dilation: int,
            tile: Optional[int] = None) -> torch.Tensor:
    """The reference's na2d_av: weights (B, heads, H, W, k*k) and values (B, heads, H, W, d) -> (B, heads, H, W, d).

    Each tile's weights are spread over its key block (zeros outside the windows), then one matmul per tile.
    """
    geometry = _geometry(value, kernel_size, dilation, tile)
    plan, tables = _plan(*geometry), _tables(geometry, value.device)
    weights = _to_tiles(attn, plan)
    blocks = weights.new_zeros(*weights.shape[:-1], plan.rows.key_len * plan.cols.key_len)
    out = blocks.scatter(-1, _slot_index(tables, weights), weights) @ _key_blocks(value, plan, tables)
    return _from_tiles(out, plan, *geometry[:2])
