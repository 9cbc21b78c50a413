"""Neighborhood attention module with relative position bias (NATTEN <= 0.17 module semantics)."""
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import trunc_normal_

from .neighborhood import na2d_av, na2d_qk, neighborhood_attention_2d

__all__ = ['NeighborhoodAttention2d', 'pad_to_window', 'neighborhood_attention_macs']


def pad_to_window(x: torch.Tensor, window: int) -> torch.Tensor:
    """Zero-pad a channels-last map (B, H, W, C) bottom/right so that H and W are at least `window`."""
    pad_h = max(0, window - x.shape[1])
    pad_w = max(0, window - x.shape[2])
    if pad_h or pad_w:
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    return x


def neighborhood_attention_macs(batch: int, heads: int, height: int, width: int, head_dim: int,
                                kernel_size: int) -> int:
    """Multiply-accumulates of q.k plus attn @ v (what matmul FLOP counters miss in this op)."""
    return 2 * batch * heads * height * width * kernel_size * kernel_size * head_dim


class NeighborhoodAttention2d(nn.Module):
    """Multi-head 2-D neighborhood attention over a channels-last map.

    Keys: `qkv` Linear(dim, 3*dim), `rpb` (heads, 2k-1, 2k-1) when `rel_pos_bias`, `proj` Linear(dim, dim);
    the qkv output channels are ordered (q|k|v, head, head_dim), as in NATTEN's modules.

    Maps smaller than kernel_size * dilation are zero-padded bottom/right before the qkv projection and
    cropped afterwards, as NATTEN <= 0.15 did, so small inputs give the official models' outputs.

    Args:
        dim: channels C.
        num_heads: heads; C must be divisible by it.
        kernel_size: odd window size.
        dilation: dilation >= 1.
        qkv_bias: bias in the qkv projection.
        qk_scale: override of the head_dim ** -0.5 scale.
        attn_drop: dropout on the attention weights (training only).
        proj_drop: dropout after the output projection.
        rel_pos_bias: learn a relative position bias.
        backend: operator backend passed to `neighborhood_attention_2d`.
    """

    def __init__(self, dim: int, num_heads: int, kernel_size: int, dilation: int = 1, qkv_bias: bool = True,
                 qk_scale: Optional[float] = None, attn_drop: float = 0., proj_drop: float = 0.,
                 rel_pos_bias: bool = True, backend: str = 'auto', device=None, dtype=None):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        if dim % num_heads:
            raise ValueError(f'dim {dim} is not divisible by num_heads {num_heads}')
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f'kernel_size must be a positive odd int, got {kernel_size}')
        if dilation < 1:
            raise ValueError(f'dilation must be >= 1, got {dilation}')
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = qk_scale or self.head_dim ** -0.5
        self.kernel_size = kernel_size
        self.dilation = dilation
        self.backend = backend
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias, **dd)
        if rel_pos_bias:
            self.rpb = nn.Parameter(torch.empty(num_heads, 2 * kernel_size - 1, 2 * kernel_size - 1, **dd))
        else:
            self.register_parameter('rpb', None)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim, **dd)
        self.proj_drop = nn.Dropout(proj_drop)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.rpb is not None:
            trunc_normal_(self.rpb, std=.02, a=-2., b=2.)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, W, C) -> (B, H, W, C)."""
        if x.dim() != 4:
            raise ValueError(f'NeighborhoodAttention2d expects a (B, H, W, C) map, got shape {tuple(x.shape)}')
        height, width = x.shape[1:3]
        x = pad_to_window(x, self.kernel_size * self.dilation)
        batch, pad_h, pad_w, channels = x.shape
        qkv = self.qkv(x).reshape(batch, pad_h, pad_w, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(3, 0, 4, 1, 2, 5).unbind(0)
        if self.attn_drop.p > 0 and self.training:
            attn = na2d_qk(q * self.scale, k, self.kernel_size, self.dilation, self.rpb, self.backend)
            attn = self.attn_drop(attn.softmax(dim=-1).to(v.dtype))  # fp32 under CUDA autocast
            x = na2d_av(attn, v, self.kernel_size, self.dilation, self.backend)
        else:
            x = neighborhood_attention_2d(q, k, v, self.kernel_size, self.dilation, self.rpb, self.scale,
                                          self.backend)
        x = x.permute(0, 2, 3, 1, 4).reshape(batch, pad_h, pad_w, channels)[:, :height, :width]
        return self.proj_drop(self.proj(x))

    def macs_not_counted(self, x: torch.Tensor) -> int:
        """Operator MACs that matmul-based FLOP counters cannot see, for input x (B, H, W, C)."""
        window = self.kernel_size * self.dilation
        return neighborhood_attention_macs(x.shape[0], self.num_heads, max(x.shape[1], window),
                                           max(x.shape[2], window), self.head_dim, self.kernel_size)
