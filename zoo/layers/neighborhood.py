"""2-D neighborhood attention (NA) with dilation and relative position bias.

Semantics are those of NATTEN <= 0.17 (the kernels the official NAT/DiNAT checkpoints were trained
with), per axis of length L, odd kernel k, radius r = k // 2 and dilation d:

* a position i belongs to dilation group g = i % d and has in-group index i' = i // d; attention
  stays inside the group, whose length is L_g = ceil((L - g) / d);
* the window starts at s = clamp(i' - r, 0, L_g - k) (group coordinates): windows are shifted
  inward at the borders, never padded, so every query sees exactly k keys per axis;
* the key at window slot t is g + d * (s + t);
* the relative position bias rpb (heads, 2k-1, 2k-1) contributes rpb[h, (ki - i)/d + k - 1,
  (kj - j)/d + k - 1], added after q is scaled and before the softmax.

Layout everywhere: (B, heads, H, W, head_dim); attention weights (B, heads, H, W, k*k) with the
neighbour order t_row * k + t_col.

The reference path below is plain PyTorch. It loops over the k*k window slots and works on
whole-map gathers, so its temporaries are the size of one input tensor and nothing is O((HW)^2).
Custom autograd functions keep backward equally lean (they save inputs, never gathered slabs).
The blocked path (zoo.layers.kernels.na2d_blocked) computes the same in query tiles with a few large matrix
products; on CPU it is what backend='auto' runs.
The index tables live in zoo.layers.window_geometry, shared with the other backends (zoo.layers.kernels),
which the dispatch table picks per call.
"""
from typing import Optional

import torch
from torch.autograd.function import once_differentiable

from .kernels import dispatch
from .window_geometry import (check_window_fits, neighborhood_axis_tables, neighborhood_indices, rpb_index,
                              scatter_rpb)

__all__ = [
    'neighborhood_attention_2d', 'na2d_qk', 'na2d_av', 'na2d_rpb', 'neighborhood_indices', 'check_window_fits',
    'BACKENDS',
]

# backend= values of the fused operator (its halves take 'auto', 'torch', 'triton' and 'blocked').
BACKENDS = dispatch.backend_choices('na2d')


def _check_qk(query: torch.Tensor, key: torch.Tensor, kernel_size: int, dilation: int,
              rpb: Optional[torch.Tensor]) -> None:
    for name, t in (('query', query), ('key', key)):
        if not isinstance(t, torch.Tensor) or t.dim() != 5:
            raise ValueError(f'{name} must be a (B, heads, H, W, head_dim) tensor, got '
                             f'{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}')
        if not t.is_floating_point():
            raise ValueError(f'{name} must be floating point, got {t.dtype}')
    if query.shape != key.shape:
        raise ValueError(f'query and key shapes differ: {tuple(query.shape)} vs {tuple(key.shape)}')
    if query.dtype != key.dtype or query.device != key.device:
        raise ValueError(f'query and key must share dtype and device, got {query.dtype}/{query.device} and '
                         f'{key.dtype}/{key.device}')
    check_window_fits(query.shape[2], query.shape[3], kernel_size, dilation)
    if rpb is not None:
        expected = (query.shape[1], 2 * kernel_size - 1, 2 * kernel_size - 1)
        if tuple(rpb.shape) != expected:
            raise ValueError(f'rpb must have shape (heads, 2k-1, 2k-1) = {expected}, got {tuple(rpb.shape)}')
        if rpb.device != query.device:
            raise ValueError(f'rpb is on {rpb.device} but query is on {query.device}')


def _check_av(attn: torch.Tensor, value: torch.Tensor, kernel_size: int, dilation: int) -> None:
    if not isinstance(value, torch.Tensor) or value.dim() != 5:
        raise ValueError('value must be a (B, heads, H, W, head_dim) tensor')
    if not isinstance(attn, torch.Tensor) or attn.dim() != 5:
        raise ValueError('attn must be a (B, heads, H, W, kernel_size**2) tensor')
    if not attn.is_floating_point() or attn.dtype != value.dtype or attn.device != value.device:
        raise ValueError(f'attn and value must be floating point with one dtype and device, got '
                         f'{attn.dtype}/{attn.device} and {value.dtype}/{value.device}')
    check_window_fits(value.shape[2], value.shape[3], kernel_size, dilation)
    expected = (*value.shape[:4], kernel_size * kernel_size)
    if tuple(attn.shape) != expected:
        raise ValueError(f'attn must have shape {expected} for value {tuple(value.shape)} and kernel_size '
                         f'{kernel_size}, got {tuple(attn.shape)}')


def _key_tables(x: torch.Tensor, kernel_size: int, dilation: int):
    """Key rows (H, k) and key columns (W, k) of every query's window, for x (B, heads, H, W, d)."""
    rows, _ = neighborhood_axis_tables(x.shape[2], kernel_size, dilation, x.device)
    cols, _ = neighborhood_axis_tables(x.shape[3], kernel_size, dilation, x.device)
    return rows, cols


def _pairwise_dots(x: torch.Tensor, y: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """out[..., i, j, a, c] = <x[..., i, j, :], y[..., rows[i, a], cols[j, c], :]>.

    x, y: (B, heads, H, W, d) -> (B, heads, H, W, k, k).
    """
    k = rows.shape[1]
    out = x.new_empty(*x.shape[:-1], k, k)
    for a in range(k):
        y_rows = y.index_select(2, rows[:, a])
        for c in range(k):
            out[..., a, c] = torch.linalg.vecdot(y_rows.index_select(3, cols[:, c]), x)
    return out


def _weighted_sum(w: torch.Tensor, y: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """out[..., i, j, :] = sum_{a,c} w[..., i, j, a, c] * y[..., rows[i, a], cols[j, c], :].

    w: (B, heads, H, W, k, k), y: (B, heads, H, W, d) -> (B, heads, H, W, d).
    """
    k = rows.shape[1]
    # Half-precision inputs accumulate in float32: k*k additions would otherwise lose digits.
    acc_dtype = torch.float32 if y.dtype in (torch.float16, torch.bfloat16) else y.dtype
    out = torch.zeros(*w.shape[:-2], y.shape[-1], dtype=acc_dtype, device=y.device)
    for a in range(k):
        y_rows = y.index_select(2, rows[:, a])
        for c in range(k):
            out.addcmul_(w[..., a, c, None], y_rows.index_select(3, cols[:, c]))
    return out.to(y.dtype)


def _scatter_outer(w: torch.Tensor, x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """Transpose of `_weighted_sum` in y: out[..., m, n, :] = sum over (i, j, a, c) with
    (rows[i, a], cols[j, c]) = (m, n) of w[..., i, j, a, c] * x[..., i, j, :].

    w: (B, heads, H, W, k, k), x: (B, heads, H, W, d) -> (B, heads, H, W, d).
    """
    k = rows.shape[1]
    out = torch.zeros_like(x)
    for a in range(k):
        acc = torch.zeros_like(x)
        for c in range(k):
            acc.index_add_(3, cols[:, c], w[..., a, c, None] * x)
        out.index_add_(2, rows[:, a], acc)
    return out


def _bias_gather(rpb: torch.Tensor, height: int, width: int, kernel_size: int, dilation: int) -> torch.Tensor:
    """rpb (heads, 2k-1, 2k-1) -> bias (heads, H, W, k, k) for every query and window slot (transpose:
    window_geometry.scatter_rpb)."""
    return rpb.flatten(1)[:, rpb_index(height, width, kernel_size, dilation, rpb.device)]


def na2d_rpb(rpb: torch.Tensor, height: int, width: int, kernel_size: int, dilation: int = 1) -> torch.Tensor:
    """The relative position bias of every query's window slots, as na2d_qk adds it (differentiable in rpb).

    For weights made by something other than q.k (OverLoCK's ContMix dynamic kernels) that still use NATTEN's
    bias table. rpb (heads, 2k-1, 2k-1) -> (heads, H, W, k*k), neighbour order t_row * k + t_col.
    """
    check_window_fits(height, width, kernel_size, dilation)
    if rpb.dim() != 3 or tuple(rpb.shape[1:]) != (2 * kernel_size - 1, 2 * kernel_size - 1):
        raise ValueError(f'rpb must have shape (heads, 2k-1, 2k-1) with k = {kernel_size}, got {tuple(rpb.shape)}')
    return _bias_gather(rpb, height, width, kernel_size, dilation).flatten(-2)


class _NeighborhoodQK(torch.autograd.Function):
    @staticmethod
    def forward(ctx, query, key, rpb, kernel_size, dilation):
        rows, cols = _key_tables(query, kernel_size, dilation)
        logits = _pairwise_dots(query, key, rows, cols)
        if rpb is not None:
            logits += _bias_gather(rpb, query.shape[2], query.shape[3], kernel_size, dilation).to(logits.dtype)
        ctx.save_for_backward(query, key)
        ctx.kernel_size, ctx.dilation, ctx.has_rpb = kernel_size, dilation, rpb is not None
        return logits.flatten(-2)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_logits):
        query, key = ctx.saved_tensors
        k = ctx.kernel_size
        rows, cols = _key_tables(query, k, ctx.dilation)
        grad = grad_logits.unflatten(-1, (k, k))
        grad_query = _weighted_sum(grad, key, rows, cols) if ctx.needs_input_grad[0] else None
        grad_key = _scatter_outer(grad, query, rows, cols) if ctx.needs_input_grad[1] else None
        grad_rpb = None
        if ctx.has_rpb and ctx.needs_input_grad[2]:
            grad_rpb = scatter_rpb(grad, k, ctx.dilation)
        return grad_query, grad_key, grad_rpb, None, None


class _NeighborhoodAV(torch.autograd.Function):
    @staticmethod
    def forward(ctx, attn, value, kernel_size, dilation):
        rows, cols = _key_tables(value, kernel_size, dilation)
        ctx.save_for_backward(attn, value)
        ctx.kernel_size, ctx.dilation = kernel_size, dilation
        return _weighted_sum(attn.unflatten(-1, (kernel_size, kernel_size)), value, rows, cols)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        attn, value = ctx.saved_tensors
        k = ctx.kernel_size
        rows, cols = _key_tables(value, k, ctx.dilation)
        grad_out = grad_out.contiguous()
        grad_attn = _pairwise_dots(grad_out, value, rows, cols).flatten(-2) if ctx.needs_input_grad[0] else None
        grad_value = None
        if ctx.needs_input_grad[1]:
            grad_value = _scatter_outer(attn.unflatten(-1, (k, k)), grad_out, rows, cols)
        return grad_attn, grad_value, None, None


def na2d_qk(query: torch.Tensor, key: torch.Tensor, kernel_size: int, dilation: int = 1,
            rpb: Optional[torch.Tensor] = None, backend: str = 'auto') -> torch.Tensor:
    """Neighbourhood logits: query . key over each query's window, plus the relative position bias.

    No scale is applied here (scale the query first, as NATTEN's old modules did).

    Args:
        query, key: (B, heads, H, W, head_dim).
        kernel_size: odd window size k; k * dilation must not exceed H or W.
        dilation: dilation d >= 1.
        rpb: optional (heads, 2k-1, 2k-1) relative position bias.
        backend: 'auto' (zoo.layers.kernels.dispatch) | 'torch' | 'triton' | 'blocked'.

    Returns:
        (B, heads, H, W, k*k) logits, neighbour order t_row * k + t_col.
    """
    _check_qk(query, key, kernel_size, dilation, rpb)
    backend = dispatch.resolve('na2d_qk', backend, query, has_rpb=rpb is not None)
    if backend == 'triton':
        from .kernels import na2d_triton
        return na2d_triton.na2d_qk(query, key, kernel_size, dilation, rpb)
    if backend == 'blocked':
        from .kernels import na2d_blocked
        return na2d_blocked.na2d_qk(query, key, kernel_size, dilation, rpb)
    return _NeighborhoodQK.apply(query.contiguous(), key.contiguous(), rpb, kernel_size, dilation)


def na2d_av(attn: torch.Tensor, value: torch.Tensor, kernel_size: int, dilation: int = 1,
            backend: str = 'auto') -> torch.Tensor:
    """Weighted sum of each query's neighbourhood values.

    Args:
        attn: (B, heads, H, W, k*k) weights, neighbour order t_row * k + t_col.
        value: (B, heads, H, W, head_dim).
        kernel_size, dilation: as in `na2d_qk`.
        backend: 'auto' (zoo.layers.kernels.dispatch) | 'torch' | 'triton' | 'blocked'.

    Returns:
        (B, heads, H, W, head_dim).
    """
    _check_av(attn, value, kernel_size, dilation)
    backend = dispatch.resolve('na2d_av', backend, value)
    if backend == 'triton':
        from .kernels import na2d_triton
        return na2d_triton.na2d_av(attn, value, kernel_size, dilation)
    if backend == 'blocked':
        from .kernels import na2d_blocked
        return na2d_blocked.na2d_av(attn, value, kernel_size, dilation)
    return _NeighborhoodAV.apply(attn.contiguous(), value.contiguous(), kernel_size, dilation)


def neighborhood_attention_2d(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, kernel_size: int,
                              dilation: int = 1, rpb: Optional[torch.Tensor] = None, scale: Optional[float] = None,
                              backend: str = 'auto') -> torch.Tensor:
    """softmax(scale * q.k + rpb) @ v over each query's dilated, border-shifted k x k window.

    Args:
        query, key, value: (B, heads, H, W, head_dim).
        kernel_size: odd window size k; k * dilation must not exceed H or W.
        dilation: dilation d >= 1.
        rpb: optional (heads, 2k-1, 2k-1) relative position bias, added after scaling.
        scale: multiplies q.k only; default head_dim ** -0.5.
        backend: 'auto' (zoo.layers.kernels.dispatch: the Triton kernel on CUDA where verified, natten on CUDA
            without rpb where no verified kernel runs, on CPU the blocked path (zoo.layers.kernels.na2d_blocked)
            or dense attention where measured faster, else the reference) | 'torch' | 'triton' | 'natten' |
            'dense' | 'blocked'.

    Returns:
        (B, heads, H, W, head_dim).
    """
    _check_qk(query, key, kernel_size, dilation, rpb)
    if value.shape[:4] != query.shape[:4]:
        raise ValueError(f'value must match query in (B, heads, H, W): {tuple(value.shape)} vs {tuple(query.shape)}')
    if value.dtype != query.dtype or value.device != query.device:
        raise ValueError('query, key and value must share dtype and device')
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    backend = dispatch.resolve('na2d', backend, query, has_rpb=rpb is not None)
    if backend == 'triton':
        from .kernels import na2d_triton
        return na2d_triton.neighborhood_attention_2d(query, key, value, kernel_size, dilation, rpb, scale)
    if backend == 'natten':
        from .kernels import natten_backend
        return natten_backend.neighborhood_attention_2d(query, key, value, kernel_size, dilation, scale)
    if backend == 'dense':
        from .kernels import na2d_dense
        return na2d_dense.neighborhood_attention_2d(query, key, value, kernel_size, dilation, rpb, scale)
    if backend == 'blocked':
        from .kernels import na2d_blocked
        return na2d_blocked.neighborhood_attention_2d(query, key, value, kernel_size, dilation, rpb, scale)
    logits = _NeighborhoodQK.apply((query * scale).contiguous(), key.contiguous(), rpb, kernel_size, dilation)
    # CUDA autocast returns the softmax in fp32: the weights go back to the values' dtype, as attn @ v would
    return _NeighborhoodAV.apply(logits.softmax(dim=-1).to(value.dtype), value.contiguous(), kernel_size, dilation)
