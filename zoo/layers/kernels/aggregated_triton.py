"""Triton backend of the zero-padded sliding-window part of aggregated attention (semantics:
zoo.layers.aggregated_attn.window_qk / window_av).

Three kernels over maps of layout (B, heads, H, W, d), window slot order t_row * k + t_col, slot t of
pixel (i, j) = neighbour (i + t // k - r, j + t % k - r), r = k // 2, "valid" when inside the map:

* window_dot:     out[p, t] = a[p] . b[nb(p, t)] (+ bias[head, t]); invalid slots -> -inf or 0;
* window_sum:     out[p] = sum over valid t of w[p, t] * b[nb(p, t)];
* window_scatter: out[p] = sum over t with p - off(t) in the map of w[p - off(t), t] * x[p - off(t)]
                  (the transpose of window_sum in b: a gather, so no atomics).

window_qk is window_dot with -inf fill, window_av is window_sum; every gradient is again one of the three
(plus a masked sum for the bias), so each op is a `torch.library.custom_op` in the `zoo` namespace with a
fake kernel and autograd, and torch.compile / torch.export see single ops. A program owns BLOCK_M pixels
of one (batch, head) and the whole head dimension; accumulation is fp32. With k*k = 9 tiny dot products
per pixel the op is memory bound, so there is no tl.dot tiling: each neighbour row is read once per slot.
"""
from typing import Optional

import torch
import triton
import triton.language as tl

from ..window_geometry import window_valid_mask
from .triton_common import on_device

__all__ = ['window_qk', 'window_av']


@triton.jit
def _pixels(H, W, BLOCK_M: tl.constexpr):
    """This program's (batch*head, pixel index, row, col, live) ; pixels past H*W are clamped and not live."""
    bh = tl.program_id(1)
    pix = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    live = pix < H * W
    pix = tl.minimum(pix, H * W - 1)
    return bh, pix, pix // W, pix % W, live


@triton.jit
def _neighbour(row, col, H, W, slot, KERNEL: tl.constexpr, SIGN: tl.constexpr):
    """Pixel at row/col + SIGN * offset(slot), clamped into the map, and whether it really lies inside."""
    r = row + SIGN * (slot // KERNEL - KERNEL // 2)
    c = col + SIGN * (slot % KERNEL - KERNEL // 2)
    inside = (r >= 0) & (r < H) & (c >= 0) & (c < W)
    r = tl.minimum(tl.maximum(r, 0), H - 1)
    c = tl.minimum(tl.maximum(c, 0), W - 1)
    return r * W + c, inside


@triton.jit
def _rows(base, pix, mask, DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """fp32 (BLOCK_M, BLOCK_D) rows `pix` of a (pixels, DIM) matrix; masked rows and padded columns read 0."""
    d = tl.arange(0, BLOCK_D)
    ptrs = base + pix[:, None].to(tl.int64) * DIM + d[None, :]
    return tl.load(ptrs, mask=mask[:, None] & (d[None, :] < DIM), other=0.0).to(tl.float32)


@triton.jit
def _window_dot_kernel(a_ptr, b_ptr, bias_ptr, out_ptr, H, W, heads, DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                       BLOCK_M: tl.constexpr, KERNEL: tl.constexpr, HAS_BIAS: tl.constexpr,
                       NEG_INF_FILL: tl.constexpr):
    bh, pix, row, col, live = _pixels(H, W, BLOCK_M)
    slice_rows = bh.to(tl.int64) * H * W
    a = _rows(a_ptr + slice_rows * DIM, pix, live, DIM, BLOCK_D)
    out_rows = out_ptr + (slice_rows + pix) * (KERNEL * KERNEL)
    for slot in tl.static_range(KERNEL * KERNEL):
        nb, inside = _neighbour(row, col, H, W, slot, KERNEL, 1)
        b = _rows(b_ptr + slice_rows * DIM, nb, live & inside, DIM, BLOCK_D)
        dot = tl.sum(a * b, axis=1)
        if HAS_BIAS:
            dot += tl.load(bias_ptr + (bh % heads) * (KERNEL * KERNEL) + slot).to(tl.float32)
        if NEG_INF_FILL:
            dot = tl.where(inside, dot, float('-inf'))
        else:
            dot = tl.where(inside, dot, 0.0)
        tl.store(out_rows + slot, dot.to(out_ptr.dtype.element_ty), mask=live)


@triton.jit
def _window_sum_kernel(w_ptr, b_ptr, out_ptr, H, W, DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                       BLOCK_M: tl.constexpr, KERNEL: tl.constexpr, TRANSPOSE: tl.constexpr):
    """window_sum, or with TRANSPOSE window_scatter: weights and rows then come from the source pixel p - off."""
    bh, pix, row, col, live = _pixels(H, W, BLOCK_M)
    slice_rows = bh.to(tl.int64) * H * W
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for slot in tl.static_range(KERNEL * KERNEL):
        if TRANSPOSE:
            nb, inside = _neighbour(row, col, H, W, slot, KERNEL, -1)
            weight_rows = w_ptr + (slice_rows + nb) * (KERNEL * KERNEL)
        else:
            nb, inside = _neighbour(row, col, H, W, slot, KERNEL, 1)
            weight_rows = w_ptr + (slice_rows + pix) * (KERNEL * KERNEL)
        mask = live & inside
        weights = tl.load(weight_rows + slot, mask=mask, other=0.0)
        acc += weights.to(tl.float32)[:, None] * _rows(b_ptr + slice_rows * DIM, nb, mask, DIM, BLOCK_D)
    d = tl.arange(0, BLOCK_D)
    tl.store(out_ptr + (slice_rows + pix)[:, None] * DIM + d[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=live[:, None] & (d[None, :] < DIM))


def _block_m(x: torch.Tensor) -> int:
    """Pixels per program: 64 on a GPU; in the CPU interpreter cost is per operation, so large blocks win."""
    return 64 if x.is_cuda else 1024


def _grid(x: torch.Tensor):
    batch, heads, height, width = x.shape[:4]
    return triton.cdiv(height * width, _block_m(x)), batch * heads


def _dot(a: torch.Tensor, b: torch.Tensor, bias: Optional[torch.Tensor], kernel_size: int,
         neg_inf_fill: bool) -> torch.Tensor:
    a, b = a.contiguous(), b.contiguous()
    batch, heads, height, width, dim = a.shape
    out = a.new_empty(batch, heads, height, width, kernel_size * kernel_size)
    with on_device(a):
        _window_dot_kernel[_grid(a)](
            a, b, a if bias is None else bias.contiguous(), out, height, width, heads, DIM=dim,
            BLOCK_D=triton.next_power_of_2(dim), BLOCK_M=_block_m(a), KERNEL=kernel_size, HAS_BIAS=bias is not None,
            NEG_INF_FILL=neg_inf_fill)
    return out


def _sum(weights: torch.Tensor, rows: torch.Tensor, kernel_size: int, transpose: bool) -> torch.Tensor:
    weights, rows = weights.contiguous(), rows.contiguous()
    height, width, dim = rows.shape[2:]
    out = torch.empty_like(rows)
    with on_device(rows):
        _window_sum_kernel[_grid(rows)](
            weights, rows, out, height, width, DIM=dim, BLOCK_D=triton.next_power_of_2(dim),
            BLOCK_M=_block_m(rows), KERNEL=kernel_size, TRANSPOSE=transpose)
    return out


# ----------------------------------------------------------------------------------------------
# torch.library custom ops.
# ----------------------------------------------------------------------------------------------

@torch.library.custom_op('zoo::window_dot', mutates_args=())
def _dot_op(a: torch.Tensor, b: torch.Tensor, bias: Optional[torch.Tensor], kernel_size: int,
            neg_inf_fill: bool) -> torch.Tensor:
    """(B, heads, H, W, k*k): a[p] . b[nb(p, t)] (+ bias (heads, k*k)); invalid slots -inf or 0."""
    return _dot(a, b, bias, kernel_size, neg_inf_fill)


@_dot_op.register_fake
def _(a, b, bias, kernel_size, neg_inf_fill):
    return a.new_empty(*a.shape[:4], kernel_size * kernel_size)


def _dot_setup_context(ctx, inputs, output):
    a, b, bias, kernel_size, _ = inputs
    ctx.save_for_backward(a, b)
    ctx.kernel_size = kernel_size
    ctx.bias_dtype = None if bias is None else bias.dtype


def _dot_grad(ctx, grad):
    a, b = ctx.saved_tensors
    k = ctx.kernel_size
    grad = grad.contiguous()
    grad_a = torch.ops.zoo.window_sum(grad, b, k) if ctx.needs_input_grad[0] else None
    grad_b = torch.ops.zoo.window_scatter(grad, a, k) if ctx.needs_input_grad[1] else None
    grad_bias = None
    if ctx.bias_dtype is not None and ctx.needs_input_grad[2]:
        valid = window_valid_mask(a.shape[2], a.shape[3], k, a.device)
        grad_bias = grad.float().masked_fill(~valid, 0.).sum((0, 2, 3)).to(ctx.bias_dtype)
    return grad_a, grad_b, grad_bias, None, None


_dot_op.register_autograd(_dot_grad, setup_context=_dot_setup_context)


@torch.library.custom_op('zoo::window_sum', mutates_args=())
def _sum_op(weights: torch.Tensor, rows: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """(B, heads, H, W, d): sum over valid slots t of weights[p, t] * rows[nb(p, t)]."""
    return _sum(weights, rows, kernel_size, transpose=False)


@_sum_op.register_fake
def _(weights, rows, kernel_size):
    return torch.empty_like(rows)


def _pair_setup_context(ctx, inputs, output):
    """Shared by window_sum and window_scatter: both take (weights, rows, kernel_size)."""
    weights, rows, kernel_size = inputs
    ctx.save_for_backward(weights, rows)
    ctx.kernel_size = kernel_size


def _sum_grad(ctx, grad):
    weights, rows = ctx.saved_tensors
    k = ctx.kernel_size
    grad = grad.contiguous()
    grad_weights = torch.ops.zoo.window_dot(grad, rows, None, k, False) if ctx.needs_input_grad[0] else None
    grad_rows = torch.ops.zoo.window_scatter(weights, grad, k) if ctx.needs_input_grad[1] else None
    return grad_weights, grad_rows, None


_sum_op.register_autograd(_sum_grad, setup_context=_pair_setup_context)


@torch.library.custom_op('zoo::window_scatter', mutates_args=())
def _scatter_op(weights: torch.Tensor, rows: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """(B, heads, H, W, d): transpose of window_sum in its rows,
    out[p] = sum_t weights[p - off(t), t] * rows[p - off(t)]."""
    return _sum(weights, rows, kernel_size, transpose=True)


@_scatter_op.register_fake
def _(weights, rows, kernel_size):
    return torch.empty_like(rows)


def _scatter_grad(ctx, grad):
    weights, rows = ctx.saved_tensors
    k = ctx.kernel_size
    grad = grad.contiguous()
    grad_weights = torch.ops.zoo.window_dot(rows, grad, None, k, False) if ctx.needs_input_grad[0] else None
    grad_rows = torch.ops.zoo.window_sum(weights, grad, k) if ctx.needs_input_grad[1] else None
    return grad_weights, grad_rows, None


_scatter_op.register_autograd(_scatter_grad, setup_context=_pair_setup_context)


# ----------------------------------------------------------------------------------------------
# Public functions (called by zoo.layers.aggregated_attn after validation).
# ----------------------------------------------------------------------------------------------

def window_qk(query: torch.Tensor, key: torch.Tensor, bias: Optional[torch.Tensor], kernel_size: int) -> torch.Tensor:
    """query, key (B, heads, H, W, d), bias (heads, k*k) or None -> (B, heads, H, W, k*k), -inf off the map."""
    return torch.ops.zoo.window_dot(query, key, bias, kernel_size, True)


def window_av(attn: torch.Tensor, value: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """attn (B, heads, H, W, k*k), value (B, heads, H, W, d) -> (B, heads, H, W, d), off-map values 0."""
    return torch.ops.zoo.window_sum(attn, value, kernel_size)
