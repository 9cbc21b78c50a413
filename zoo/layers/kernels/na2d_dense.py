"""Neighbourhood attention as one dense attention with a neighbourhood bias, for small maps on CPU.

Exactly the reference's semantics (same index tables): every key outside a query's window gets -inf, every key
inside gets its relative position bias, and `scaled_dot_product_attention` does the rest in a few large BLAS
calls. It costs O((HW)^2) memory, so the dispatch table's 'auto' uses it only while the attention matrix stays
small (`fits`); there it is several times faster than the reference's k*k small gathers, forward and backward,
which is what makes training small NATs on a CPU practical (figures in benchmarks/RESULTS.md).
"""
from functools import lru_cache
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..window_geometry import capturing_graph, neighborhood_axis_tables, rpb_index

__all__ = ['neighborhood_attention_2d', 'fits', 'MAX_TOKENS', 'MAX_ATTENTION_ELEMENTS']

# Largest map (H * W tokens) and attention matrix (B * heads * (H * W)^2 elements) the dense path takes on.
# Measured on 2 CPU cores (k 7, benchmarks/RESULTS.md): dense / reference forward time is 0.29 at 196 tokens,
# 0.96 at 400, 1.32 at 576 (forward + backward: 0.15, 0.45, 0.61); so up to 400 tokens neither is slower.
MAX_TOKENS = 400
MAX_ATTENTION_ELEMENTS = 1 << 25


def fits(shape: Sequence[int]) -> bool:
    """True when the dense attention of a query of this shape (B, heads, H, W, d) is small enough to be the faster
    path."""
    batch, heads, height, width, _ = shape
    tokens = height * width
    return tokens <= MAX_TOKENS and batch * heads * tokens * tokens <= MAX_ATTENTION_ELEMENTS


def _dense_bias_table(height, width, kernel_size: int, dilation: int, device: torch.device) -> torch.Tensor:
    """(H*W, H*W) int64: flat rpb index (row * (2k-1) + col) of each (query, key) pair inside the query's window,
    and (2k-1)^2, one past the table, for every pair outside it. H and W may be sizes of a captured graph."""
    rows, _ = neighborhood_axis_tables(height, kernel_size, dilation, device)
    cols, _ = neighborhood_axis_tables(width, kernel_size, dilation, device)
    keys = (rows[:, None, :, None] * width + cols[None, :, None, :]).reshape(height * width, -1)
    bias = rpb_index(height, width, kernel_size, dilation, device).reshape(height * width, -1)
    outside = torch.full((height * width, height * width), (2 * kernel_size - 1) ** 2, dtype=torch.int64,
                         device=device)
    return outside.scatter(1, keys, bias)


@lru_cache(maxsize=32)
def _dense_bias_index(height: int, width: int, kernel_size: int, dilation: int) -> np.ndarray:
    """`_dense_bias_table` as a read-only numpy array, the eager calls' cache (see zoo.layers.window_geometry)."""
    index = _dense_bias_table(height, width, kernel_size, dilation, torch.device('cpu')).numpy()
    index.flags.writeable = False
    return index


def _attention_bias(rpb: Optional[torch.Tensor], heads: int, height: int, width: int, kernel_size: int,
                    dilation: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(heads or 1, H*W, H*W) additive bias: rpb inside each window, -inf outside (differentiable in rpb)."""
    if capturing_graph():
        index = _dense_bias_table(height, width, kernel_size, dilation, device)
    else:
        index = torch.tensor(_dense_bias_index(height, width, kernel_size, dilation), device=device)
    if rpb is None:
        table = torch.zeros(1, (2 * kernel_size - 1) ** 2, dtype=dtype, device=device)
    else:
        table = rpb.flatten(1).to(dtype)
    outside = table.new_full((table.shape[0], 1), float('-inf'))
    return torch.cat([table, outside], dim=1)[:, index]


def neighborhood_attention_2d(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, kernel_size: int,
                              dilation: int, rpb: Optional[torch.Tensor], scale: float) -> torch.Tensor:
    """softmax(scale * q.k + rpb) @ v over each query's window, computed densely.

    query, key, value: (B, heads, H, W, d), already checked by the caller; rpb: (heads, 2k-1, 2k-1) or None.
    Returns (B, heads, H, W, d).
    """
    batch, heads, height, width, _ = query.shape
    bias = _attention_bias(rpb, heads, height, width, kernel_size, dilation, query.dtype, query.device)
    out = F.scaled_dot_product_attention(query.flatten(2, 3), key.flatten(2, 3), value.flatten(2, 3),
                                         attn_mask=bias, scale=scale)
    return out.unflatten(2, (height, width))
