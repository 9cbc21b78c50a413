"""Triton backend of halo attention (semantics: zoo.layers.halo_attn).

Entry point (inputs already validated by zoo.layers.halo_attn.halo_attention_2d):
`halo_attention_2d(query, key, value, rel_h, rel_w, block_size, halo_size, scale, masked)`, where the
factorised relative logits come in per-query, per-window-row/column form (computed by the reference's
`halo_relative_logits`, so their gradients to the query and the tables flow through ordinary autograd).

Two `torch.library.custom_op`s in the `zoo` namespace (`halo_fwd`, `halo_bwd`) with fake kernels and autograd,
so torch.compile and torch.export see single ops.

Kernel design. One program per (batch * head, query block, chunk of at most MAX_QUERY_ROWS of the block's (b/s)^2
queries, padded to a power of two >= 16 rows for tl.dot); it walks its (b + 2h)^2 window one key row at a time (a
row padded to a power of two >= 16 columns), with an online softmax; keys outside the map load as zeros and, in
masked mode, are excluded. The relative logit of (query m, key (ky, kx)) is rel_h[m, ky] + rel_w[m, kx]: a column
and a tile held in registers. The backward recomputes the probabilities from the forward's log-sum-exp; each
program writes dq, d rel_h, d rel_w of its own queries and its chunk's share of dk, dv of the block's window (no
atomics); the chunks' shares are summed and the overlapping windows then folded onto the map with F.fold, the exact
transpose of the reference's unfold.
"""
from typing import Tuple

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .triton_common import block_dim, dot_precision, on_device

__all__ = ['halo_attention_2d']


@triton.jit
def _block_queries(blk, chunk, n_w, Wq, BQ: tl.constexpr, BLOCK_M: tl.constexpr):
    """Query rows of chunk `chunk` of block `blk`: (m, token in the (Hq, Wq) map, live), each (BLOCK_M,)."""
    m = chunk * BLOCK_M + tl.arange(0, BLOCK_M)
    live = m < BQ * BQ
    m_safe = tl.where(live, m, 0)
    by = blk // n_w
    bx = blk % n_w
    token = (by * BQ + m_safe // BQ) * Wq + bx * BQ + m_safe % BQ
    return m_safe, token, live


@triton.jit
def _load_rows(base, token, mask, DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """(len(token), BLOCK_D) rows of a (tokens, DIM) matrix; masked rows and columns >= DIM read as 0."""
    d = tl.arange(0, BLOCK_D)
    return tl.load(base + token[:, None] * DIM + d[None, :], mask=mask[:, None] & (d[None, :] < DIM), other=0.0)


@triton.jit
def _window_row(ky, by, bx, H, W, block_size, halo_size, WIN: tl.constexpr, BLOCK_W: tl.constexpr):
    """Window row ky: (kx, key token, inside the map, a real slot), each (BLOCK_W,)."""
    kx = tl.arange(0, BLOCK_W)
    slot = kx < WIN
    y = by * block_size - halo_size + ky
    x = bx * block_size - halo_size + kx
    inside = slot & (x >= 0) & (x < W) & (y >= 0) & (y < H)
    token = tl.where(inside, y * W + x, 0)
    return kx, token, inside, slot


@triton.jit
def _row_logits(q, keys, rel_h_col, rel_w_tile, inside, slot, scale, MASKED: tl.constexpr,
                PRECISION: tl.constexpr):
    """(BLOCK_M, BLOCK_W) logits of one window row; -inf where the slot is padding (or outside, if MASKED)."""
    s = tl.dot(q, tl.trans(keys), input_precision=PRECISION) * scale + rel_h_col[:, None] + rel_w_tile
    allowed = inside if MASKED else slot
    return tl.where(allowed[None, :], s, float('-inf'))


@triton.jit
def _halo_fwd_kernel(q_ptr, k_ptr, v_ptr, rel_h_ptr, rel_w_ptr, out_ptr, lse_ptr, H, W, Hq, Wq, n_w, n_blocks,
                     n_chunks, block_size, halo_size, scale, BQ: tl.constexpr, WIN: tl.constexpr, QK_DIM: tl.constexpr,
                     V_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_QK: tl.constexpr,
                     BLOCK_V: tl.constexpr, MASKED: tl.constexpr, PRECISION: tl.constexpr):
    """out = softmax(logits) @ v for one chunk of a query block; lse (natural log) per query."""
    pid = tl.program_id(0)
    chunk = pid % n_chunks
    bh = pid // (n_blocks * n_chunks)
    blk = (pid // n_chunks) % n_blocks
    by = blk // n_w
    bx = blk % n_w
    m, q_tok, m_live = _block_queries(blk, chunk, n_w, Wq, BQ, BLOCK_M)
    q_base = bh.to(tl.int64) * Hq * Wq
    kv_base = bh.to(tl.int64) * H * W
    rel_base = (bh.to(tl.int64) * n_blocks + blk) * (BQ * BQ * WIN)
    q = _load_rows(q_ptr + q_base * QK_DIM, q_tok, m_live, QK_DIM, BLOCK_QK)
    kx = tl.arange(0, BLOCK_W)
    rel_w_tile = tl.load(rel_w_ptr + rel_base + m[:, None] * WIN + kx[None, :],
                         mask=m_live[:, None] & (kx[None, :] < WIN), other=0.0).to(tl.float32)
    # A finite floor keeps exp(m_old - m_new) at 1 (not NaN) while a row has only seen excluded keys.
    row_max = tl.full([BLOCK_M], -1.0e30, tl.float32)
    row_sum = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_V], tl.float32)
    for ky in range(0, WIN):
        kx, k_tok, inside, slot = _window_row(ky, by, bx, H, W, block_size, halo_size, WIN, BLOCK_W)
        keys = _load_rows(k_ptr + kv_base * QK_DIM, k_tok, inside, QK_DIM, BLOCK_QK)
        rel_h_col = tl.load(rel_h_ptr + rel_base + m * WIN + ky, mask=m_live, other=0.0).to(tl.float32)
        s = _row_logits(q, keys, rel_h_col, rel_w_tile, inside, slot, scale, MASKED, PRECISION)
        new_max = tl.maximum(row_max, tl.max(s, 1))
        alpha = tl.exp(row_max - new_max)
        p = tl.exp(s - new_max[:, None])
        row_sum = row_sum * alpha + tl.sum(p, 1)
        values = _load_rows(v_ptr + kv_base * V_DIM, k_tok, inside, V_DIM, BLOCK_V)
        acc = acc * alpha[:, None] + tl.dot(p.to(values.dtype), values, input_precision=PRECISION)
        row_max = new_max
    acc = acc / row_sum[:, None]
    d = tl.arange(0, BLOCK_V)
    tl.store(out_ptr + (q_base + q_tok[:, None]) * V_DIM + d[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=m_live[:, None] & (d[None, :] < V_DIM))
    tl.store(lse_ptr + q_base + q_tok, row_max + tl.log(row_sum), mask=m_live)


@triton.jit
def _halo_bwd_kernel(q_ptr, k_ptr, v_ptr, rel_h_ptr, rel_w_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr, dk_win_ptr,
                     dv_win_ptr, drel_h_ptr, drel_w_ptr, H, W, Hq, Wq, n_w, n_blocks, n_chunks, block_size, halo_size,
                     scale,
                     BQ: tl.constexpr, WIN: tl.constexpr, QK_DIM: tl.constexpr, V_DIM: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_QK: tl.constexpr, BLOCK_V: tl.constexpr,
                     MASKED: tl.constexpr, PRECISION: tl.constexpr):
    """Gradients of one query chunk of a block: dq, d rel_h, d rel_w, and the chunk's dk / dv of the block's window
    (fp32, one window per chunk, summed later).

    With p recomputed from lse: dS = p * (dO.v - delta), delta = rowsum(dO * O); dq = scale * dS @ k,
    dk = scale * dS^T @ q, dv = p^T @ dO, d rel_h[m, ky] = sum_kx dS, d rel_w[m, kx] = sum_ky dS.
    """
    pid = tl.program_id(0)
    chunk = pid % n_chunks
    bh = pid // (n_blocks * n_chunks)
    blk = (pid // n_chunks) % n_blocks
    by = blk // n_w
    bx = blk % n_w
    m, q_tok, m_live = _block_queries(blk, chunk, n_w, Wq, BQ, BLOCK_M)
    q_base = bh.to(tl.int64) * Hq * Wq
    kv_base = bh.to(tl.int64) * H * W
    rel_base = (bh.to(tl.int64) * n_blocks + blk) * (BQ * BQ * WIN)
    win_base = ((bh.to(tl.int64) * n_blocks + blk) * n_chunks + chunk) * (WIN * WIN)
    q = _load_rows(q_ptr + q_base * QK_DIM, q_tok, m_live, QK_DIM, BLOCK_QK)
    d_out = _load_rows(do_ptr + q_base * V_DIM, q_tok, m_live, V_DIM, BLOCK_V)
    lse = tl.load(lse_ptr + q_base + q_tok, mask=m_live, other=0.0)
    delta = tl.load(delta_ptr + q_base + q_tok, mask=m_live, other=0.0)
    kx = tl.arange(0, BLOCK_W)
    rel_mask = m_live[:, None] & (kx[None, :] < WIN)
    rel_w_tile = tl.load(rel_w_ptr + rel_base + m[:, None] * WIN + kx[None, :], mask=rel_mask,
                         other=0.0).to(tl.float32)
    dq = tl.zeros([BLOCK_M, BLOCK_QK], tl.float32)
    drel_w = tl.zeros([BLOCK_M, BLOCK_W], tl.float32)
    d_qk = tl.arange(0, BLOCK_QK)
    d_v = tl.arange(0, BLOCK_V)
    for ky in range(0, WIN):
        kx, k_tok, inside, slot = _window_row(ky, by, bx, H, W, block_size, halo_size, WIN, BLOCK_W)
        keys = _load_rows(k_ptr + kv_base * QK_DIM, k_tok, inside, QK_DIM, BLOCK_QK)
        values = _load_rows(v_ptr + kv_base * V_DIM, k_tok, inside, V_DIM, BLOCK_V)
        rel_h_col = tl.load(rel_h_ptr + rel_base + m * WIN + ky, mask=m_live, other=0.0).to(tl.float32)
        s = _row_logits(q, keys, rel_h_col, rel_w_tile, inside, slot, scale, MASKED, PRECISION)
        # padded query rows (m_live False) get p = 0, so they add nothing to dk, dv
        p = tl.where(m_live[:, None], tl.exp(s - lse[:, None]), 0.0)
        dp = tl.dot(d_out, tl.trans(values), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(keys.dtype), keys, input_precision=PRECISION) * scale
        drel_w += ds
        tl.store(drel_h_ptr + rel_base + m * WIN + ky, tl.sum(ds, 1), mask=m_live)
        slot_index = win_base + ky * WIN + kx
        dk_row = tl.dot(tl.trans(ds).to(q.dtype), q, input_precision=PRECISION) * scale
        tl.store(dk_win_ptr + slot_index[:, None] * QK_DIM + d_qk[None, :], dk_row,
                 mask=slot[:, None] & (d_qk[None, :] < QK_DIM))
        dv_row = tl.dot(tl.trans(p).to(d_out.dtype), d_out, input_precision=PRECISION)
        tl.store(dv_win_ptr + slot_index[:, None] * V_DIM + d_v[None, :], dv_row,
                 mask=slot[:, None] & (d_v[None, :] < V_DIM))
    d = tl.arange(0, BLOCK_QK)
    tl.store(dq_ptr + (q_base + q_tok[:, None]) * QK_DIM + d[None, :], dq.to(dq_ptr.dtype.element_ty),
             mask=m_live[:, None] & (d[None, :] < QK_DIM))
    tl.store(drel_w_ptr + rel_base + m[:, None] * WIN + kx[None, :], drel_w, mask=rel_mask)


# ----------------------------------------------------------------------------------------------
# Launchers.
# ----------------------------------------------------------------------------------------------

# Query rows per program. A whole 14x14 block (196 rows, padded to 256) with 80-dim values (padded to 128) would
# hold a 256x128 fp32 accumulator per program, far past the register file: on an H100 that configuration did not
# finish within a minute. Larger blocks are split into chunks of this many rows, each walking the whole window.
MAX_QUERY_ROWS = 64


def _launch(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, block_size: int, halo_size: int,
            masked: bool) -> Tuple[Tuple[int], dict]:
    """Grid (one program per batch * head * block * query chunk) and the shared arguments of both kernels."""
    batch, heads, q_height, q_width, qk_dim = query.shape
    height, width = key.shape[2:4]
    block_q = block_size * q_height // height
    win = block_size + 2 * halo_size
    n_w = width // block_size
    n_blocks = (height // block_size) * n_w
    rows = min(block_dim(block_q * block_q), MAX_QUERY_ROWS)
    n_chunks = triton.cdiv(block_q * block_q, rows)
    meta = dict(H=height, W=width, Hq=q_height, Wq=q_width, n_w=n_w, n_blocks=n_blocks, n_chunks=n_chunks,
                block_size=block_size, halo_size=halo_size, BQ=block_q, WIN=win, QK_DIM=qk_dim,
                V_DIM=value.shape[-1], BLOCK_M=rows, BLOCK_W=block_dim(win), BLOCK_QK=block_dim(qk_dim),
                BLOCK_V=block_dim(value.shape[-1]), MASKED=masked, PRECISION=dot_precision(query.dtype))
    return (batch * heads * n_blocks * n_chunks,), meta


def _forward(query, key, value, rel_h, rel_w, block_size, halo_size, scale, masked):
    """(out (B, heads, Hq, Wq, d_v), lse (B, heads, Hq, Wq) fp32)."""
    query, key, value, rel_h, rel_w = (t.contiguous() for t in (query, key, value, rel_h, rel_w))
    out = value.new_empty(*query.shape[:4], value.shape[-1])
    lse = query.new_empty(query.shape[:4], dtype=torch.float32)
    grid, meta = _launch(query, key, value, block_size, halo_size, masked)
    with on_device(query):
        _halo_fwd_kernel[grid](query, key, value, rel_h, rel_w, out, lse, scale=scale, **meta)
    return out, lse


def _fold_windows(windows: torch.Tensor, height: int, width: int, block_size: int, halo_size: int) -> torch.Tensor:
    """Sum per-block window gradients onto the map: (B, heads, n_blocks, win, win, d) -> (B, heads, H, W, d).

    The transpose of the reference's pad + unfold: overlapping windows add up, padding is cropped away.
    """
    batch, heads, n_blocks, win, _, dim = windows.shape
    # fold's columns: channel-major (d, win * win) per block, blocks row-major, as unfold lists them
    cols = windows.reshape(batch * heads, n_blocks, win * win, dim).permute(0, 3, 2, 1)
    cols = cols.reshape(batch * heads, dim * win * win, n_blocks)
    padded = F.fold(cols, (height + 2 * halo_size, width + 2 * halo_size), win, stride=block_size)
    out = padded[:, :, halo_size:halo_size + height, halo_size:halo_size + width]
    return out.reshape(batch, heads, dim, height, width).permute(0, 1, 3, 4, 2).contiguous()


def _backward(grad_out, query, key, value, rel_h, rel_w, out, lse, block_size, halo_size, scale, masked):
    """(dq, dk, dv, d rel_h, d rel_w), each in its input's dtype."""
    grad_out, query, key, value, rel_h, rel_w = (
        t.contiguous() for t in (grad_out, query, key, value, rel_h, rel_w))
    # rowsum(dO * O): the softmax-Jacobian term shared by every key of a query.
    delta = (grad_out.float() * out.float()).sum(-1)
    grid, meta = _launch(query, key, value, block_size, halo_size, masked)
    win = meta['WIN']
    window_shape = (*query.shape[:2], meta['n_blocks'], meta['n_chunks'], win, win)
    dk_win = query.new_zeros(*window_shape, query.shape[-1], dtype=torch.float32)
    dv_win = query.new_zeros(*window_shape, value.shape[-1], dtype=torch.float32)
    grad_query = query.new_empty(query.shape)
    grad_rel_h = rel_h.new_empty(rel_h.shape, dtype=torch.float32)
    grad_rel_w = rel_w.new_empty(rel_w.shape, dtype=torch.float32)
    with on_device(query):
        _halo_bwd_kernel[grid](query, key, value, rel_h, rel_w, grad_out, lse, delta, grad_query, dk_win, dv_win,
                               grad_rel_h, grad_rel_w, scale=scale, **meta)
    height, width = key.shape[2:4]
    grad_key = _fold_windows(dk_win.sum(3), height, width, block_size, halo_size).to(key.dtype)
    grad_value = _fold_windows(dv_win.sum(3), height, width, block_size, halo_size).to(value.dtype)
    return grad_query, grad_key, grad_value, grad_rel_h.to(rel_h.dtype), grad_rel_w.to(rel_w.dtype)


# ----------------------------------------------------------------------------------------------
# torch.library custom ops.
# ----------------------------------------------------------------------------------------------

@torch.library.custom_op('zoo::halo_fwd', mutates_args=())
def _fwd_op(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, rel_h: torch.Tensor, rel_w: torch.Tensor,
            block_size: int, halo_size: int, scale: float, masked: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """Halo attention: (out (B, heads, Hq, Wq, d_v), lse (B, heads, Hq, Wq) fp32)."""
    return _forward(query, key, value, rel_h, rel_w, block_size, halo_size, scale, masked)


@_fwd_op.register_fake
def _(query, key, value, rel_h, rel_w, block_size, halo_size, scale, masked):
    return (value.new_empty(*query.shape[:4], value.shape[-1]),
            query.new_empty(query.shape[:4], dtype=torch.float32))


@torch.library.custom_op('zoo::halo_bwd', mutates_args=())
def _bwd_op(grad_out: torch.Tensor, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
            rel_h: torch.Tensor, rel_w: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, block_size: int,
            halo_size: int, scale: float, masked: bool
            ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of halo_fwd: (dq, dk, dv, d rel_h, d rel_w)."""
    return _backward(grad_out, query, key, value, rel_h, rel_w, out, lse, block_size, halo_size, scale, masked)


@_bwd_op.register_fake
def _(grad_out, query, key, value, rel_h, rel_w, out, lse, block_size, halo_size, scale, masked):
    return tuple(t.new_empty(t.shape) for t in (query, key, value, rel_h, rel_w))


def _setup_context(ctx, inputs, output):
    query, key, value, rel_h, rel_w, block_size, halo_size, scale, masked = inputs
    out, lse = output
    ctx.save_for_backward(query, key, value, rel_h, rel_w, out, lse)
    ctx.args = (block_size, halo_size, scale, masked)
    ctx.mark_non_differentiable(lse)


def _grad(ctx, grad_out, grad_lse):
    query, key, value, rel_h, rel_w, out, lse = ctx.saved_tensors
    grads = torch.ops.zoo.halo_bwd(grad_out, query, key, value, rel_h, rel_w, out, lse, *ctx.args)
    return (*grads, None, None, None, None)


_fwd_op.register_autograd(_grad, setup_context=_setup_context)


def halo_attention_2d(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, rel_h: torch.Tensor,
                      rel_w: torch.Tensor, block_size: int, halo_size: int, scale: float, masked: bool) -> torch.Tensor:
    """Fused halo attention: query (B, heads, Hq, Wq, d_qk), key (B, heads, H, W, d_qk), value
    (B, heads, H, W, d_v), rel_h / rel_w (B, heads, n_blocks, bq*bq, win) -> (B, heads, Hq, Wq, d_v)."""
    # contiguous inputs, so that the op's outputs and gradients (always contiguous) match them in layout
    query, key, value, rel_h, rel_w = (t.contiguous() for t in (query, key, value, rel_h, rel_w))
    return torch.ops.zoo.halo_fwd(query, key, value, rel_h, rel_w, block_size, halo_size, float(scale), masked)[0]
