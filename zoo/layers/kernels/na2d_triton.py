"""Triton backend of 2-D neighbourhood attention (semantics: zoo.layers.neighborhood).

Public entry points (inputs already validated by zoo.layers.neighborhood):

* `na2d_qk(query, key, kernel_size, dilation, rpb)` -> (B, heads, H, W, k*k) logits, no scale;
* `na2d_av(attn, value, kernel_size, dilation)` -> (B, heads, H, W, value_dim);
* `neighborhood_attention_2d(query, key, value, kernel_size, dilation, rpb, scale)`: fused, online
  softmax; the forward never writes the (B, heads, H, W, k*k) weights to memory.

Each is a `torch.library.custom_op` in the `zoo` namespace with a fake (meta) kernel and autograd,
so torch.compile and torch.export see single ops.

Kernel design. Every program owns one tile of TILE_H x TILE_W cells of ONE dilation group of one
(batch, head), in group coordinates (cell (i, j) of group (gr, gc) is token (gr + d*i, gc + d*j)).
Because a window start s(i) = clamp(i - k//2, 0, L_g - k) never decreases with i and grows by at
most one per step, the keys seen by a tile of queries form a rectangle of at most
(TILE_H + k - 1) x (TILE_W + k - 1) group cells ("query-side" kernels: forward, qk, av, dq), and the
queries that see a tile of keys form a rectangle too ("key-side" kernels: dk/dv and the transpose
of av). A program walks that rectangle flattened, BLOCK_N cells at a time, does the dense tile
product with tl.dot, and masks each (query, key) pair that is not in the query's window. The fused
backward recomputes the probabilities from the forward's log-sum-exp; dq comes from the query-side
pass, dk and dv from the key-side pass (no atomics), and the rpb gradient from fp32 atomics spread
over a few partial buffers (summed afterwards) to limit same-address contention.
"""
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ..window_geometry import scatter_rpb
from .triton_common import block_dim, dot_precision, on_device

__all__ = ['na2d_qk', 'na2d_av', 'neighborhood_attention_2d']

_LOG2E = tl.constexpr(1.4426950408889634)
# Partial rpb-gradient buffers: atomics from program p go to buffer p % _RPB_GRAD_COPIES.
_RPB_GRAD_COPIES = 16


@dataclass(frozen=True)
class TileConfig:
    """Launch shape: tile_h x tile_w cells per program (powers of two, product >= 16), block_n
    neighbour cells per inner step (power of two >= 16), and the CUDA launch knobs."""
    tile_h: int
    tile_w: int
    block_n: int
    num_warps: int
    num_stages: int


def _tile_config(device: torch.device) -> TileConfig:
    """Launch shape of every kernel on `device`.

    CUDA: 8 x 8 tiles with 32 neighbour cells per step keep the kernels free of register spills on
    sm_90 (ptxas: 70-200 registers at head_dim 32 and 64 in fp16/bf16; 8 x 16 tiles or 64-cell
    steps spill), and the flattened neighbour rectangle of a tile, (8+k-1)^2 cells, wastes little of
    its last step: 196 of 224 cells for k = 7, 400 of 416 for k = 13. Not yet tuned on a GPU:
    benchmarks/na2d_gpu.py --sweep times alternatives.
    Elsewhere the kernels run in the Triton interpreter, whose cost is per operation, not per
    element: one large tile per group is fastest there.
    """
    if device.type == 'cuda':
        return TileConfig(8, 8, 32, 4, 2)
    return TileConfig(16, 16, 128, 4, 1)


# ----------------------------------------------------------------------------------------------
# Index helpers shared by the kernels. "Group coordinates" are in-group indices (see module doc).
# ----------------------------------------------------------------------------------------------

@triton.jit
def _program_tile(H, W, dilation, TILE_H: tl.constexpr, TILE_W: tl.constexpr):
    """Decode the flat program id, ordered (bh, group row, group col, tile row, tile col).

    Returns bh, group (gr, gc), tile origin (row0, col0) in group coordinates and the group's
    extent (len_h, len_w) = (ceil((H - gr) / d), ceil((W - gc) / d)).
    """
    pid = tl.program_id(0)
    tiles_w = tl.cdiv(tl.cdiv(W, dilation), TILE_W)
    tiles_h = tl.cdiv(tl.cdiv(H, dilation), TILE_H)
    tile_col = pid % tiles_w
    rest = pid // tiles_w
    tile_row = rest % tiles_h
    rest = rest // tiles_h
    gc = rest % dilation
    rest = rest // dilation
    gr = rest % dilation
    bh = rest // dilation
    len_h = (H - gr + dilation - 1) // dilation
    len_w = (W - gc + dilation - 1) // dilation
    return bh, gr, gc, tile_row * TILE_H, tile_col * TILE_W, len_h, len_w


@triton.jit
def _tile_cells(row0, col0, len_h, len_w, gr, gc, W, dilation, TILE_H: tl.constexpr,
                TILE_W: tl.constexpr):
    """The TILE_H*TILE_W cells of a tile, row-major: (row, col, token, live), each (TILE_H*TILE_W,).

    token is the flat H*W index of the cell. Cells past the group's edge are clamped onto its last
    row/column, so every load stays in bounds and every window is well formed; `live` marks the
    real ones (the only ones stored).
    """
    m = tl.arange(0, TILE_H * TILE_W)
    row = row0 + m // TILE_W
    col = col0 + m % TILE_W
    live = (row < len_h) & (col < len_w)
    row = tl.minimum(row, len_h - 1)
    col = tl.minimum(col, len_w - 1)
    return row, col, (gr + dilation * row) * W + gc + dilation * col, live


@triton.jit
def _window_start(pos, length, kernel_size):
    """First key of the border-shifted window of in-group position `pos` along one axis."""
    return tl.minimum(tl.maximum(pos - kernel_size // 2, 0), length - kernel_size)


@triton.jit
def _key_span(first, last, length, kernel_size):
    """Keys seen by the queries first..last (last clamped to the axis) along one axis.

    Returns (first key, number of keys); window starts are monotone, so the keys are contiguous.
    """
    start = _window_start(first, length, kernel_size)
    stop = _window_start(tl.minimum(last, length - 1), length, kernel_size) + kernel_size
    return start, stop - start


@triton.jit
def _query_span(first, last, length, kernel_size):
    """Queries whose windows hold any of the keys first..last (last clamped) along one axis.

    Returns (first query, number of queries). Query i sees key a iff s(i) <= a < s(i) + k; the
    lowest i with s(i) >= first - k + 1 and the highest with s(i) <= last bound a contiguous range.
    """
    last = tl.minimum(last, length - 1)
    low = first - kernel_size + 1
    q_first = tl.where(low > 0, low + kernel_size // 2, 0)
    q_last = tl.where(last >= length - kernel_size, length - 1, last + kernel_size // 2)
    return q_first, q_last - q_first + 1


@triton.jit
def _span_cells(n0, row0, col0, rows, cols, gr, gc, W, dilation, BLOCK_N: tl.constexpr):
    """Cells n0..n0+BLOCK_N of the rows x cols rectangle at (row0, col0), flattened row-major.

    Returns (row, col, token, live), each (BLOCK_N,); cells past the end are clamped onto the last.
    """
    n = n0 + tl.arange(0, BLOCK_N)
    total = rows * cols
    live = n < total
    n = tl.minimum(n, total - 1)
    row = row0 + n // cols
    col = col0 + n % cols
    return row, col, (gr + dilation * row) * W + gc + dilation * col, live


@triton.jit
def _in_window(start_row, start_col, key_row, key_col, kernel_size):
    """Broadcast mask: key (key_row, key_col) lies in the k x k window starting at (start_row, start_col)."""
    return ((key_row >= start_row) & (key_row < start_row + kernel_size)
            & (key_col >= start_col) & (key_col < start_col + kernel_size))


@triton.jit
def _slot(start_row, start_col, key_row, key_col, kernel_size):
    """Broadcast window slot t_row * k + t_col of a key inside a window (valid where _in_window)."""
    return (key_row - start_row) * kernel_size + (key_col - start_col)


@triton.jit
def _bias_index(q_row, q_col, key_row, key_col, kernel_size):
    """Broadcast flat index into a (2k-1, 2k-1) rpb table: (key - query) + k - 1 per axis, in group cells."""
    return (key_row - q_row + kernel_size - 1) * (2 * kernel_size - 1) + (key_col - q_col + kernel_size - 1)


@triton.jit
def _bias(rpb_head, index, mask):
    """rpb_head[index] as fp32, 0 where mask is False (there the index may lie outside the table)."""
    return tl.load(rpb_head + index, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _load_rows(base, token, DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """(len(token), BLOCK_D) block of a (tokens, DIM) matrix; columns DIM..BLOCK_D read as 0."""
    d = tl.arange(0, BLOCK_D)
    ptrs = base + token[:, None] * DIM + d[None, :]
    if DIM == BLOCK_D:
        return tl.load(ptrs)
    return tl.load(ptrs, mask=d[None, :] < DIM, other=0.0)


@triton.jit
def _store_rows(base, token, value, live, DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """Store the live rows of a (len(token), BLOCK_D) block into a (tokens, DIM) matrix."""
    d = tl.arange(0, BLOCK_D)
    tl.store(base + token[:, None] * DIM + d[None, :], value.to(base.dtype.element_ty),
             mask=live[:, None] & (d[None, :] < DIM))


# ----------------------------------------------------------------------------------------------
# Fused attention.
# ----------------------------------------------------------------------------------------------

@triton.jit
def _fused_fwd_kernel(q_ptr, k_ptr, v_ptr, rpb_ptr, out_ptr, lse_ptr, H, W, heads, qk_scale,
                      kernel_size, dilation, QK_DIM: tl.constexpr, V_DIM: tl.constexpr,
                      BLOCK_QK: tl.constexpr, BLOCK_V: tl.constexpr, TILE_H: tl.constexpr,
                      TILE_W: tl.constexpr, BLOCK_N: tl.constexpr, HAS_RPB: tl.constexpr,
                      PRECISION: tl.constexpr):
    """out = softmax(scale * q.k + rpb) @ v for one query tile, online softmax in base 2.

    qk_scale is scale * log2(e); lse (B, heads, H, W) fp32 is stored in natural-log units.
    """
    bh, gr, gc, row0, col0, len_h, len_w = _program_tile(H, W, dilation, TILE_H, TILE_W)
    if (row0 >= len_h) | (col0 >= len_w):
        return
    q_row, q_col, q_tok, q_live = _tile_cells(row0, col0, len_h, len_w, gr, gc, W, dilation, TILE_H, TILE_W)
    start_row = _window_start(q_row, len_h, kernel_size)
    start_col = _window_start(q_col, len_w, kernel_size)
    span_row, span_rows = _key_span(row0, row0 + TILE_H - 1, len_h, kernel_size)
    span_col, span_cols = _key_span(col0, col0 + TILE_W - 1, len_w, kernel_size)
    slice_tokens = bh.to(tl.int64) * H * W
    rpb_head = rpb_ptr + (bh % heads) * (2 * kernel_size - 1) * (2 * kernel_size - 1)
    q = _load_rows(q_ptr + slice_tokens * QK_DIM, q_tok, QK_DIM, BLOCK_QK)

    # A finite floor keeps exp2(m_old - m_new) at 1 (not NaN) while a row has only seen masked keys.
    row_max = tl.full([TILE_H * TILE_W], -1.0e30, tl.float32)
    row_sum = tl.zeros([TILE_H * TILE_W], tl.float32)
    acc = tl.zeros([TILE_H * TILE_W, BLOCK_V], tl.float32)
    for n0 in range(0, span_rows * span_cols, BLOCK_N):
        k_row, k_col, k_tok, k_live = _span_cells(
            n0, span_row, span_col, span_rows, span_cols, gr, gc, W, dilation, BLOCK_N)
        keys = _load_rows(k_ptr + slice_tokens * QK_DIM, k_tok, QK_DIM, BLOCK_QK)
        mask = _in_window(start_row[:, None], start_col[:, None], k_row[None, :], k_col[None, :], kernel_size)
        mask = mask & k_live[None, :]
        logits = tl.dot(q, tl.trans(keys), input_precision=PRECISION) * qk_scale
        if HAS_RPB:
            index = _bias_index(q_row[:, None], q_col[:, None], k_row[None, :], k_col[None, :], kernel_size)
            logits += _bias(rpb_head, index, mask) * _LOG2E
        logits = tl.where(mask, logits, float('-inf'))
        new_max = tl.maximum(row_max, tl.max(logits, 1))
        alpha = tl.exp2(row_max - new_max)
        p = tl.exp2(logits - new_max[:, None])
        row_sum = row_sum * alpha + tl.sum(p, 1)
        values = _load_rows(v_ptr + slice_tokens * V_DIM, k_tok, V_DIM, BLOCK_V)
        acc = acc * alpha[:, None] + tl.dot(p.to(values.dtype), values, input_precision=PRECISION)
        row_max = new_max
    acc = acc / row_sum[:, None]
    _store_rows(out_ptr + slice_tokens * V_DIM, q_tok, acc, q_live, V_DIM, BLOCK_V)
    lse = (row_max + tl.log2(row_sum)) / _LOG2E
    tl.store(lse_ptr + slice_tokens + q_tok, lse, mask=q_live)


@triton.jit
def _fused_bwd_q_kernel(q_ptr, k_ptr, v_ptr, rpb_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr, drpb_ptr,
                        H, W, heads, qk_scale, scale,
                        kernel_size, dilation, QK_DIM: tl.constexpr, V_DIM: tl.constexpr,
                        BLOCK_QK: tl.constexpr, BLOCK_V: tl.constexpr, TILE_H: tl.constexpr,
                        TILE_W: tl.constexpr, BLOCK_N: tl.constexpr, HAS_RPB: tl.constexpr,
                        RPB_GRAD: tl.constexpr, RPB_COPIES: tl.constexpr, PRECISION: tl.constexpr):
    """dq for one query tile, and (RPB_GRAD) the tile's share of drpb.

    With p recomputed from lse, dS = p * (dO.v - delta) with delta = rowsum(dO * O); dq = scale *
    dS @ k, drpb[offset] += dS. drpb_ptr is (RPB_COPIES, heads, 2k-1, 2k-1) fp32.
    """
    bh, gr, gc, row0, col0, len_h, len_w = _program_tile(H, W, dilation, TILE_H, TILE_W)
    if (row0 >= len_h) | (col0 >= len_w):
        return
    q_row, q_col, q_tok, q_live = _tile_cells(row0, col0, len_h, len_w, gr, gc, W, dilation, TILE_H, TILE_W)
    start_row = _window_start(q_row, len_h, kernel_size)
    start_col = _window_start(q_col, len_w, kernel_size)
    span_row, span_rows = _key_span(row0, row0 + TILE_H - 1, len_h, kernel_size)
    span_col, span_cols = _key_span(col0, col0 + TILE_W - 1, len_w, kernel_size)
    slice_tokens = bh.to(tl.int64) * H * W
    rpb_size = (2 * kernel_size - 1) * (2 * kernel_size - 1)
    rpb_head = rpb_ptr + (bh % heads) * rpb_size
    drpb_head = drpb_ptr + ((tl.program_id(0) % RPB_COPIES) * heads + bh % heads) * rpb_size
    q = _load_rows(q_ptr + slice_tokens * QK_DIM, q_tok, QK_DIM, BLOCK_QK)
    d_out = _load_rows(do_ptr + slice_tokens * V_DIM, q_tok, V_DIM, BLOCK_V)
    lse = tl.load(lse_ptr + slice_tokens + q_tok) * _LOG2E
    delta = tl.load(delta_ptr + slice_tokens + q_tok)

    dq = tl.zeros([TILE_H * TILE_W, BLOCK_QK], tl.float32)
    for n0 in range(0, span_rows * span_cols, BLOCK_N):
        k_row, k_col, k_tok, k_live = _span_cells(
            n0, span_row, span_col, span_rows, span_cols, gr, gc, W, dilation, BLOCK_N)
        keys = _load_rows(k_ptr + slice_tokens * QK_DIM, k_tok, QK_DIM, BLOCK_QK)
        values = _load_rows(v_ptr + slice_tokens * V_DIM, k_tok, V_DIM, BLOCK_V)
        mask = _in_window(start_row[:, None], start_col[:, None], k_row[None, :], k_col[None, :], kernel_size)
        mask = mask & k_live[None, :]
        logits = tl.dot(q, tl.trans(keys), input_precision=PRECISION) * qk_scale
        if HAS_RPB:
            index = _bias_index(q_row[:, None], q_col[:, None], k_row[None, :], k_col[None, :], kernel_size)
            logits += _bias(rpb_head, index, mask) * _LOG2E
        p = tl.where(mask, tl.exp2(logits - lse[:, None]), 0.0)
        dp = tl.dot(d_out, tl.trans(values), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(keys.dtype), keys, input_precision=PRECISION)
        if RPB_GRAD:  # implies HAS_RPB, so `index` is set
            tl.atomic_add(drpb_head + index, ds, mask=mask & q_live[:, None], sem='relaxed')
    _store_rows(dq_ptr + slice_tokens * QK_DIM, q_tok, dq * scale, q_live, QK_DIM, BLOCK_QK)


@triton.jit
def _fused_bwd_kv_kernel(q_ptr, k_ptr, v_ptr, rpb_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr,
                         H, W, heads, qk_scale, scale,
                         kernel_size, dilation, QK_DIM: tl.constexpr, V_DIM: tl.constexpr,
                         BLOCK_QK: tl.constexpr, BLOCK_V: tl.constexpr, TILE_H: tl.constexpr,
                         TILE_W: tl.constexpr, BLOCK_N: tl.constexpr, HAS_RPB: tl.constexpr,
                         PRECISION: tl.constexpr):
    """dk and dv for one key tile, walking the queries whose windows hold any of its keys.

    Works on transposed tiles (keys x queries): dv = p^T @ dO, dk = scale * dS^T @ q.
    """
    bh, gr, gc, row0, col0, len_h, len_w = _program_tile(H, W, dilation, TILE_H, TILE_W)
    if (row0 >= len_h) | (col0 >= len_w):
        return
    k_row, k_col, k_tok, k_live = _tile_cells(row0, col0, len_h, len_w, gr, gc, W, dilation, TILE_H, TILE_W)
    span_row, span_rows = _query_span(row0, row0 + TILE_H - 1, len_h, kernel_size)
    span_col, span_cols = _query_span(col0, col0 + TILE_W - 1, len_w, kernel_size)
    slice_tokens = bh.to(tl.int64) * H * W
    rpb_head = rpb_ptr + (bh % heads) * (2 * kernel_size - 1) * (2 * kernel_size - 1)
    keys = _load_rows(k_ptr + slice_tokens * QK_DIM, k_tok, QK_DIM, BLOCK_QK)
    values = _load_rows(v_ptr + slice_tokens * V_DIM, k_tok, V_DIM, BLOCK_V)

    dk = tl.zeros([TILE_H * TILE_W, BLOCK_QK], tl.float32)
    dv = tl.zeros([TILE_H * TILE_W, BLOCK_V], tl.float32)
    for n0 in range(0, span_rows * span_cols, BLOCK_N):
        q_row, q_col, q_tok, q_live = _span_cells(
            n0, span_row, span_col, span_rows, span_cols, gr, gc, W, dilation, BLOCK_N)
        start_row = _window_start(q_row, len_h, kernel_size)
        start_col = _window_start(q_col, len_w, kernel_size)
        mask = _in_window(start_row[None, :], start_col[None, :], k_row[:, None], k_col[:, None], kernel_size)
        mask = mask & q_live[None, :]
        q = _load_rows(q_ptr + slice_tokens * QK_DIM, q_tok, QK_DIM, BLOCK_QK)
        d_out = _load_rows(do_ptr + slice_tokens * V_DIM, q_tok, V_DIM, BLOCK_V)
        lse = tl.load(lse_ptr + slice_tokens + q_tok) * _LOG2E
        delta = tl.load(delta_ptr + slice_tokens + q_tok)
        logits = tl.dot(keys, tl.trans(q), input_precision=PRECISION) * qk_scale
        if HAS_RPB:
            index = _bias_index(q_row[None, :], q_col[None, :], k_row[:, None], k_col[:, None], kernel_size)
            logits += _bias(rpb_head, index, mask) * _LOG2E
        p = tl.where(mask, tl.exp2(logits - lse[None, :]), 0.0)
        dv += tl.dot(p.to(d_out.dtype), d_out, input_precision=PRECISION)
        dp = tl.dot(values, tl.trans(d_out), input_precision=PRECISION)
        ds = p * (dp - delta[None, :])
        dk += tl.dot(ds.to(q.dtype), q, input_precision=PRECISION)
    _store_rows(dk_ptr + slice_tokens * QK_DIM, k_tok, dk * scale, k_live, QK_DIM, BLOCK_QK)
    _store_rows(dv_ptr + slice_tokens * V_DIM, k_tok, dv, k_live, V_DIM, BLOCK_V)


# ----------------------------------------------------------------------------------------------
# Unfused halves: logits (qk), weighted sum (av) and the transpose of av in its value (scatter).
# ----------------------------------------------------------------------------------------------

@triton.jit
def _qk_kernel(q_ptr, k_ptr, rpb_ptr, logits_ptr, H, W, heads,
               kernel_size, dilation, DIM: tl.constexpr, BLOCK_D: tl.constexpr,
               TILE_H: tl.constexpr, TILE_W: tl.constexpr, BLOCK_N: tl.constexpr, HAS_RPB: tl.constexpr,
               PRECISION: tl.constexpr):
    """logits[q, slot] = q . k[key(q, slot)] (+ rpb) for one query tile, written slot by slot."""
    bh, gr, gc, row0, col0, len_h, len_w = _program_tile(H, W, dilation, TILE_H, TILE_W)
    if (row0 >= len_h) | (col0 >= len_w):
        return
    q_row, q_col, q_tok, q_live = _tile_cells(row0, col0, len_h, len_w, gr, gc, W, dilation, TILE_H, TILE_W)
    start_row = _window_start(q_row, len_h, kernel_size)
    start_col = _window_start(q_col, len_w, kernel_size)
    span_row, span_rows = _key_span(row0, row0 + TILE_H - 1, len_h, kernel_size)
    span_col, span_cols = _key_span(col0, col0 + TILE_W - 1, len_w, kernel_size)
    slice_tokens = bh.to(tl.int64) * H * W
    rpb_head = rpb_ptr + (bh % heads) * (2 * kernel_size - 1) * (2 * kernel_size - 1)
    q = _load_rows(q_ptr + slice_tokens * DIM, q_tok, DIM, BLOCK_D)
    out_rows = logits_ptr + (slice_tokens + q_tok) * (kernel_size * kernel_size)

    for n0 in range(0, span_rows * span_cols, BLOCK_N):
        k_row, k_col, k_tok, k_live = _span_cells(
            n0, span_row, span_col, span_rows, span_cols, gr, gc, W, dilation, BLOCK_N)
        keys = _load_rows(k_ptr + slice_tokens * DIM, k_tok, DIM, BLOCK_D)
        mask = _in_window(start_row[:, None], start_col[:, None], k_row[None, :], k_col[None, :], kernel_size)
        mask = mask & k_live[None, :] & q_live[:, None]
        logits = tl.dot(q, tl.trans(keys), input_precision=PRECISION)
        if HAS_RPB:
            index = _bias_index(q_row[:, None], q_col[:, None], k_row[None, :], k_col[None, :], kernel_size)
            logits += _bias(rpb_head, index, mask)
        slot = _slot(start_row[:, None], start_col[:, None], k_row[None, :], k_col[None, :], kernel_size)
        tl.store(out_rows[:, None] + slot, logits.to(logits_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _av_kernel(attn_ptr, v_ptr, out_ptr, H, W,
               kernel_size, dilation, DIM: tl.constexpr, BLOCK_D: tl.constexpr,
               TILE_H: tl.constexpr, TILE_W: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
    """out[q] = sum_slot attn[q, slot] * v[key(q, slot)] for one query tile."""
    bh, gr, gc, row0, col0, len_h, len_w = _program_tile(H, W, dilation, TILE_H, TILE_W)
    if (row0 >= len_h) | (col0 >= len_w):
        return
    q_row, q_col, q_tok, q_live = _tile_cells(row0, col0, len_h, len_w, gr, gc, W, dilation, TILE_H, TILE_W)
    start_row = _window_start(q_row, len_h, kernel_size)
    start_col = _window_start(q_col, len_w, kernel_size)
    span_row, span_rows = _key_span(row0, row0 + TILE_H - 1, len_h, kernel_size)
    span_col, span_cols = _key_span(col0, col0 + TILE_W - 1, len_w, kernel_size)
    slice_tokens = bh.to(tl.int64) * H * W
    attn_rows = attn_ptr + (slice_tokens + q_tok) * (kernel_size * kernel_size)

    acc = tl.zeros([TILE_H * TILE_W, BLOCK_D], tl.float32)
    for n0 in range(0, span_rows * span_cols, BLOCK_N):
        k_row, k_col, k_tok, k_live = _span_cells(
            n0, span_row, span_col, span_rows, span_cols, gr, gc, W, dilation, BLOCK_N)
        mask = _in_window(start_row[:, None], start_col[:, None], k_row[None, :], k_col[None, :], kernel_size)
        mask = mask & k_live[None, :]
        slot = _slot(start_row[:, None], start_col[:, None], k_row[None, :], k_col[None, :], kernel_size)
        weights = tl.load(attn_rows[:, None] + slot, mask=mask, other=0.0)
        values = _load_rows(v_ptr + slice_tokens * DIM, k_tok, DIM, BLOCK_D)
        acc += tl.dot(weights.to(values.dtype), values, input_precision=PRECISION)
    _store_rows(out_ptr + slice_tokens * DIM, q_tok, acc, q_live, DIM, BLOCK_D)


@triton.jit
def _scatter_kernel(w_ptr, x_ptr, out_ptr, H, W,
                    kernel_size, dilation, DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                    TILE_H: tl.constexpr, TILE_W: tl.constexpr, BLOCK_N: tl.constexpr,
                    PRECISION: tl.constexpr):
    """out[key] = sum over queries q whose window holds key of w[q, slot(q, key)] * x[q], one key tile."""
    bh, gr, gc, row0, col0, len_h, len_w = _program_tile(H, W, dilation, TILE_H, TILE_W)
    if (row0 >= len_h) | (col0 >= len_w):
        return
    k_row, k_col, k_tok, k_live = _tile_cells(row0, col0, len_h, len_w, gr, gc, W, dilation, TILE_H, TILE_W)
    span_row, span_rows = _query_span(row0, row0 + TILE_H - 1, len_h, kernel_size)
    span_col, span_cols = _query_span(col0, col0 + TILE_W - 1, len_w, kernel_size)
    slice_tokens = bh.to(tl.int64) * H * W

    acc = tl.zeros([TILE_H * TILE_W, BLOCK_D], tl.float32)
    for n0 in range(0, span_rows * span_cols, BLOCK_N):
        q_row, q_col, q_tok, q_live = _span_cells(
            n0, span_row, span_col, span_rows, span_cols, gr, gc, W, dilation, BLOCK_N)
        start_row = _window_start(q_row, len_h, kernel_size)
        start_col = _window_start(q_col, len_w, kernel_size)
        mask = _in_window(start_row[None, :], start_col[None, :], k_row[:, None], k_col[:, None], kernel_size)
        mask = mask & q_live[None, :]
        slot = _slot(start_row[None, :], start_col[None, :], k_row[:, None], k_col[:, None], kernel_size)
        w_rows = w_ptr + (slice_tokens + q_tok) * (kernel_size * kernel_size)
        weights = tl.load(w_rows[None, :] + slot, mask=mask, other=0.0)
        x = _load_rows(x_ptr + slice_tokens * DIM, q_tok, DIM, BLOCK_D)
        acc += tl.dot(weights.to(x.dtype), x, input_precision=PRECISION)
    _store_rows(out_ptr + slice_tokens * DIM, k_tok, acc, k_live, DIM, BLOCK_D)


# ----------------------------------------------------------------------------------------------
# Launchers.
# ----------------------------------------------------------------------------------------------

def _launch(x: torch.Tensor, kernel_size: int, dilation: int) -> Tuple[Tuple[int], dict]:
    """Grid and shared meta-parameters for a kernel over x (B, heads, H, W, ...).

    One program per (batch, head, dilation group, tile); a group has at most ceil(H/d) x ceil(W/d)
    cells, and the programs of smaller groups that fall past their edge return at once.
    """
    batch, heads, height, width = x.shape[:4]
    cfg = _tile_config(x.device)
    tiles_h = triton.cdiv(triton.cdiv(height, dilation), cfg.tile_h)
    tiles_w = triton.cdiv(triton.cdiv(width, dilation), cfg.tile_w)
    grid = (batch * heads * dilation * dilation * tiles_h * tiles_w,)
    meta = dict(kernel_size=kernel_size, dilation=dilation, TILE_H=cfg.tile_h, TILE_W=cfg.tile_w,
                BLOCK_N=cfg.block_n, PRECISION=dot_precision(x.dtype), num_warps=cfg.num_warps,
                num_stages=cfg.num_stages)
    return grid, meta


def _fused_forward(query, key, value, rpb, kernel_size, dilation, scale):
    """(out (B, heads, H, W, value_dim), lse (B, heads, H, W) fp32)."""
    query, key, value = query.contiguous(), key.contiguous(), value.contiguous()
    batch, heads, height, width, qk_dim = query.shape
    v_dim = value.shape[-1]
    out = value.new_empty(batch, heads, height, width, v_dim)
    lse = query.new_empty(batch, heads, height, width, dtype=torch.float32)
    grid, meta = _launch(query, kernel_size, dilation)
    with on_device(query):
        _fused_fwd_kernel[grid](
            query, key, value, query if rpb is None else rpb.contiguous(), out, lse, height, width, heads,
            scale * _LOG2E.value, QK_DIM=qk_dim, V_DIM=v_dim, BLOCK_QK=block_dim(qk_dim),
            BLOCK_V=block_dim(v_dim), HAS_RPB=rpb is not None, **meta)
    return out, lse


def _fused_backward(grad_out, query, key, value, out, lse, rpb, kernel_size, dilation, scale, rpb_grad):
    """(dq, dk, dv, drpb (heads, 2k-1, 2k-1) fp32 or None)."""
    grad_out, query, key, value = (t.contiguous() for t in (grad_out, query, key, value))
    batch, heads, height, width, qk_dim = query.shape
    v_dim = value.shape[-1]
    # rowsum(dO * O): the softmax-Jacobian term shared by every key of a query.
    delta = (grad_out.float() * out.float()).sum(-1)
    grad_query, grad_key, grad_value = torch.empty_like(query), torch.empty_like(key), torch.empty_like(value)
    rpb_arg = query if rpb is None else rpb.contiguous()
    drpb_parts = query
    if rpb_grad:
        drpb_parts = torch.zeros(_RPB_GRAD_COPIES, *rpb.shape, device=query.device, dtype=torch.float32)
    grid, meta = _launch(query, kernel_size, dilation)
    dims = dict(QK_DIM=qk_dim, V_DIM=v_dim, BLOCK_QK=block_dim(qk_dim), BLOCK_V=block_dim(v_dim),
                HAS_RPB=rpb is not None)
    with on_device(query):
        _fused_bwd_q_kernel[grid](
            query, key, value, rpb_arg, grad_out, lse, delta, grad_query, drpb_parts, height, width, heads,
            scale * _LOG2E.value, scale, RPB_GRAD=rpb_grad, RPB_COPIES=_RPB_GRAD_COPIES, **dims, **meta)
        _fused_bwd_kv_kernel[grid](
            query, key, value, rpb_arg, grad_out, lse, delta, grad_key, grad_value, height, width, heads,
            scale * _LOG2E.value, scale, **dims, **meta)
    return grad_query, grad_key, grad_value, drpb_parts.sum(0) if rpb_grad else None


def _qk_forward(query, key, rpb, kernel_size, dilation):
    """(B, heads, H, W, k*k) logits in query's dtype."""
    query, key = query.contiguous(), key.contiguous()
    batch, heads, height, width, dim = query.shape
    logits = query.new_empty(batch, heads, height, width, kernel_size * kernel_size)
    grid, meta = _launch(query, kernel_size, dilation)
    with on_device(query):
        _qk_kernel[grid](query, key, query if rpb is None else rpb.contiguous(), logits, height, width, heads,
                         DIM=dim, BLOCK_D=block_dim(dim), HAS_RPB=rpb is not None, **meta)
    return logits


def _av_forward(attn, value, kernel_size, dilation):
    """(B, heads, H, W, value_dim)."""
    attn, value = attn.contiguous(), value.contiguous()
    dim = value.shape[-1]
    out = torch.empty_like(value)
    grid, meta = _launch(value, kernel_size, dilation)
    with on_device(value):
        _av_kernel[grid](attn, value, out, value.shape[2], value.shape[3], DIM=dim, BLOCK_D=block_dim(dim),
                         **meta)
    return out


def _scatter_forward(weights, x, kernel_size, dilation):
    """Transpose of av in its value: (B, heads, H, W, k*k), (B, heads, H, W, dim) -> (B, heads, H, W, dim)."""
    weights, x = weights.contiguous(), x.contiguous()
    dim = x.shape[-1]
    out = torch.empty_like(x)
    grid, meta = _launch(x, kernel_size, dilation)
    with on_device(x):
        _scatter_kernel[grid](weights, x, out, x.shape[2], x.shape[3], DIM=dim, BLOCK_D=block_dim(dim), **meta)
    return out


# ----------------------------------------------------------------------------------------------
# torch.library custom ops.
# ----------------------------------------------------------------------------------------------

@torch.library.custom_op('zoo::na2d_fused_fwd', mutates_args=())
def _fused_fwd_op(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, rpb: Optional[torch.Tensor],
                  kernel_size: int, dilation: int, scale: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """Fused neighbourhood attention: (out (B, heads, H, W, value_dim), lse (B, heads, H, W) fp32)."""
    return _fused_forward(query, key, value, rpb, kernel_size, dilation, scale)


@_fused_fwd_op.register_fake
def _(query, key, value, rpb, kernel_size, dilation, scale):
    return (value.new_empty(*query.shape[:4], value.shape[-1]),
            query.new_empty(query.shape[:4], dtype=torch.float32))


@torch.library.custom_op('zoo::na2d_fused_bwd', mutates_args=())
def _fused_bwd_op(grad_out: torch.Tensor, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  out: torch.Tensor, lse: torch.Tensor, rpb: Optional[torch.Tensor], kernel_size: int,
                  dilation: int, scale: float, rpb_grad: bool
                  ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of na2d_fused_fwd: (dq, dk, dv, drpb); drpb is (heads, 2k-1, 2k-1) in rpb's dtype
    when rpb_grad, else an empty (0,) tensor (custom ops cannot return None)."""
    grad_query, grad_key, grad_value, drpb = _fused_backward(
        grad_out, query, key, value, out, lse, rpb, kernel_size, dilation, scale, rpb_grad)
    drpb = drpb.to(rpb.dtype) if rpb_grad else query.new_empty(0)
    return grad_query, grad_key, grad_value, drpb


@_fused_bwd_op.register_fake
def _(grad_out, query, key, value, out, lse, rpb, kernel_size, dilation, scale, rpb_grad):
    drpb = rpb.new_empty(rpb.shape) if rpb_grad else query.new_empty(0)
    return torch.empty_like(query), torch.empty_like(key), torch.empty_like(value), drpb


def _fused_setup_context(ctx, inputs, output):
    query, key, value, rpb, kernel_size, dilation, scale = inputs
    out, lse = output
    ctx.save_for_backward(query, key, value, rpb, out, lse)
    ctx.kernel_size, ctx.dilation, ctx.scale = kernel_size, dilation, scale
    ctx.mark_non_differentiable(lse)


def _fused_grad(ctx, grad_out, grad_lse):
    query, key, value, rpb, out, lse = ctx.saved_tensors
    rpb_grad = rpb is not None and ctx.needs_input_grad[3]
    grad_query, grad_key, grad_value, drpb = torch.ops.zoo.na2d_fused_bwd(
        grad_out, query, key, value, out, lse, rpb, ctx.kernel_size, ctx.dilation, ctx.scale, rpb_grad)
    return grad_query, grad_key, grad_value, drpb if rpb_grad else None, None, None, None


_fused_fwd_op.register_autograd(_fused_grad, setup_context=_fused_setup_context)


@torch.library.custom_op('zoo::na2d_rpb_grad', mutates_args=())
def _rpb_grad_op(grad_logits: torch.Tensor, kernel_size: int, dilation: int) -> torch.Tensor:
    """Sum of grad_logits (B, heads, H, W, k*k) per relative offset -> (heads, 2k-1, 2k-1) fp32.

    An op of its own so that tracing (dynamic shapes included) never sees the index tables, which
    are built from concrete sizes.
    """
    return scatter_rpb(grad_logits.float(), kernel_size, dilation)


@_rpb_grad_op.register_fake
def _(grad_logits, kernel_size, dilation):
    span = 2 * kernel_size - 1
    return grad_logits.new_empty(grad_logits.shape[1], span, span, dtype=torch.float32)


@torch.library.custom_op('zoo::na2d_qk', mutates_args=())
def _qk_op(query: torch.Tensor, key: torch.Tensor, rpb: Optional[torch.Tensor], kernel_size: int,
           dilation: int) -> torch.Tensor:
    """(B, heads, H, W, k*k) neighbourhood logits, no scale."""
    return _qk_forward(query, key, rpb, kernel_size, dilation)


@_qk_op.register_fake
def _(query, key, rpb, kernel_size, dilation):
    return query.new_empty(*query.shape[:4], kernel_size * kernel_size)


def _qk_setup_context(ctx, inputs, output):
    query, key, rpb, kernel_size, dilation = inputs
    ctx.save_for_backward(query, key)
    ctx.kernel_size, ctx.dilation = kernel_size, dilation
    ctx.rpb_dtype = None if rpb is None else rpb.dtype


def _qk_grad(ctx, grad_logits):
    query, key = ctx.saved_tensors
    k, d = ctx.kernel_size, ctx.dilation
    grad_logits = grad_logits.contiguous()
    grad_query = torch.ops.zoo.na2d_av(grad_logits, key, k, d) if ctx.needs_input_grad[0] else None
    grad_key = torch.ops.zoo.na2d_scatter(grad_logits, query, k, d) if ctx.needs_input_grad[1] else None
    grad_rpb = None
    if ctx.rpb_dtype is not None and ctx.needs_input_grad[2]:
        grad_rpb = torch.ops.zoo.na2d_rpb_grad(grad_logits, k, d).to(ctx.rpb_dtype)
    return grad_query, grad_key, grad_rpb, None, None


_qk_op.register_autograd(_qk_grad, setup_context=_qk_setup_context)


@torch.library.custom_op('zoo::na2d_av', mutates_args=())
def _av_op(attn: torch.Tensor, value: torch.Tensor, kernel_size: int, dilation: int) -> torch.Tensor:
    """(B, heads, H, W, value_dim) weighted sums of each query's window."""
    return _av_forward(attn, value, kernel_size, dilation)


@_av_op.register_fake
def _(attn, value, kernel_size, dilation):
    return torch.empty_like(value)


def _pair_setup_context(ctx, inputs, output):
    """Shared by na2d_av and na2d_scatter: both take (weights, tensor, kernel_size, dilation)."""
    weights, tensor, kernel_size, dilation = inputs
    ctx.save_for_backward(weights, tensor)
    ctx.kernel_size, ctx.dilation = kernel_size, dilation


def _av_grad(ctx, grad_out):
    attn, value = ctx.saved_tensors
    k, d = ctx.kernel_size, ctx.dilation
    grad_out = grad_out.contiguous()
    grad_attn = torch.ops.zoo.na2d_qk(grad_out, value, None, k, d) if ctx.needs_input_grad[0] else None
    grad_value = torch.ops.zoo.na2d_scatter(attn, grad_out, k, d) if ctx.needs_input_grad[1] else None
    return grad_attn, grad_value, None, None


_av_op.register_autograd(_av_grad, setup_context=_pair_setup_context)


@torch.library.custom_op('zoo::na2d_scatter', mutates_args=())
def _scatter_op(weights: torch.Tensor, x: torch.Tensor, kernel_size: int, dilation: int) -> torch.Tensor:
    """Transpose of na2d_av in its value: out[key] = sum_q weights[q, slot(q, key)] * x[q]."""
    return _scatter_forward(weights, x, kernel_size, dilation)


@_scatter_op.register_fake
def _(weights, x, kernel_size, dilation):
    return torch.empty_like(x)


def _scatter_grad(ctx, grad_out):
    weights, x = ctx.saved_tensors
    k, d = ctx.kernel_size, ctx.dilation
    grad_out = grad_out.contiguous()
    grad_weights = torch.ops.zoo.na2d_qk(x, grad_out, None, k, d) if ctx.needs_input_grad[0] else None
    grad_x = torch.ops.zoo.na2d_av(weights, grad_out, k, d) if ctx.needs_input_grad[1] else None
    return grad_weights, grad_x, None, None


_scatter_op.register_autograd(_scatter_grad, setup_context=_pair_setup_context)


# ----------------------------------------------------------------------------------------------
# Public functions (called by zoo.layers.neighborhood after validation).
# ----------------------------------------------------------------------------------------------

def na2d_qk(query: torch.Tensor, key: torch.Tensor, kernel_size: int, dilation: int,
            rpb: Optional[torch.Tensor]) -> torch.Tensor:
    """query, key (B, heads, H, W, head_dim), rpb (heads, 2k-1, 2k-1) or None -> (B, heads, H, W, k*k) logits."""
    return torch.ops.zoo.na2d_qk(query, key, rpb, kernel_size, dilation)


def na2d_av(attn: torch.Tensor, value: torch.Tensor, kernel_size: int, dilation: int) -> torch.Tensor:
    """attn (B, heads, H, W, k*k), value (B, heads, H, W, value_dim) -> (B, heads, H, W, value_dim)."""
    return torch.ops.zoo.na2d_av(attn, value, kernel_size, dilation)


def neighborhood_attention_2d(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, kernel_size: int,
                              dilation: int, rpb: Optional[torch.Tensor], scale: float) -> torch.Tensor:
    """Fused softmax(scale * q.k + rpb) @ v: query, key (B, heads, H, W, head_dim), value
    (B, heads, H, W, value_dim), rpb (heads, 2k-1, 2k-1) or None -> (B, heads, H, W, value_dim)."""
    return torch.ops.zoo.na2d_fused_fwd(query, key, value, rpb, kernel_size, dilation, float(scale))[0]
