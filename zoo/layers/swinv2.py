"""SwinV2 transformer layers on NCHW maps of any size, and the residual SwinV2 stage (RS2TB) built from them.

Paper: Swin Transformer V2: Scaling Up Capacity and Resolution (Liu et al., CVPR 2022),
https://arxiv.org/abs/2111.09883. SwinV2 differs from Swin v1 by residual post-norm
(x + norm(attn(x))), scaled cosine attention with a learnable per-head logit scale, and a log-spaced
continuous position bias (a small MLP of log-spaced relative coordinates). All three live in timm 1.0.31's
`SwinTransformerV2Block`, which is reused here (weights and state-dict names are timm's).

Why `PaddedSwinV2Block` pads before calling timm's block: timm's block (with `always_partition=True,
dynamic_mask=True`) also pads a map whose size is not a window multiple, but it pads AFTER the cyclic shift and
builds the shift mask on the padded size, so on such maps the wrapped-around rows/columns are mislabelled: for a
5-row map, window 4, shift 2, the output at row 0 depends on rows 2-4 (across the wrap) and not on its neighbour,
row 1. The official Swin code zero-pads BEFORE shifting, which keeps the mask right; padding each block's input
here to a window multiple does the same and makes timm's internal pad a no-op. Zero padding tokens take part in
attention as keys (as in the official code) and are cropped after every block.

The RS2TB (residual SwinV2 transformer block of S2LIC, after TIC's RSTB, Lu et al. 2021): the map is
reshaped to tokens, run through `depth` SwinV2 layers alternating plain and shifted (by window // 2) windows,
reshaped back, and added to the input. The token "embedding"/"un-embedding" are reshapes (TIC's PatchEmbed /
PatchUnEmbed with no norm), so the block keeps its channel count.
"""
from typing import Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models.swin_transformer_v2 import SwinTransformerV2Block

__all__ = ['PaddedSwinV2Block', 'ResidualSwinV2Block']


class PaddedSwinV2Block(SwinTransformerV2Block):
    """timm's SwinV2 block on (B, H, W, C) maps of any size: zero-pad to a window multiple, run, crop back.

    Args:
        dim: channels C.
        num_heads: attention heads (C must be divisible by it).
        window_size: square window side.
        shifted: shift the windows by window_size // 2 (the second layer of each Swin pair).
        mlp_ratio, qkv_bias, drop_path: as in timm's block.
    """

    def __init__(self, dim: int, num_heads: int, window_size: int = 8, shifted: bool = False,
                 mlp_ratio: float = 4., qkv_bias: bool = True, drop_path: float = 0.):
        if dim % num_heads:
            raise ValueError(f'SwinV2 block: dim {dim} is not divisible by num_heads {num_heads}')
        # input_resolution only seeds timm's static buffers; with dynamic_mask the mask follows each input
        super().__init__(dim, input_resolution=window_size, num_heads=num_heads, window_size=window_size,
                         shift_size=window_size // 2 if shifted else 0, always_partition=True, dynamic_mask=True,
                         mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, drop_path=drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, H, W, C) -> (B, H, W, C)."""
        height, width = x.shape[1:3]
        pad_h = -height % self.window_size[0]
        pad_w = -width % self.window_size[1]
        if pad_h or pad_w:
            x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
        return super().forward(x)[:, :height, :width]


class ResidualSwinV2Block(nn.Module):
    """RS2TB: `depth` SwinV2 layers (plain, shifted, plain, ...) with a skip around all of them.

    Args:
        dim: channels C (kept).
        depth: number of SwinV2 layers.
        num_heads: attention heads of every layer.
        window_size: square window side.
        mlp_ratio: MLP hidden width / C.
        qkv_bias: bias on the qkv projection (timm adds it to q and v only, as SwinV2 does).
        drop_path: stochastic-depth rate, one float for all layers or one per layer.
    """

    def __init__(self, dim: int, depth: int, num_heads: int, window_size: int = 8, mlp_ratio: float = 4.,
                 qkv_bias: bool = True, drop_path: Union[float, Sequence[float]] = 0.):
        super().__init__()
        if depth < 1:
            raise ValueError(f'ResidualSwinV2Block needs depth >= 1, got {depth}')
        rates = [float(drop_path)] * depth if isinstance(drop_path, (int, float)) else [float(r) for r in drop_path]
        if len(rates) != depth:
            raise ValueError(f'ResidualSwinV2Block: {len(rates)} drop_path rates for depth {depth}')
        self.blocks = nn.Sequential(*(
            PaddedSwinV2Block(dim, num_heads, window_size, shifted=index % 2 == 1, mlp_ratio=mlp_ratio,
                              qkv_bias=qkv_bias, drop_path=rate)
            for index, rate in enumerate(rates)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C, H, W) -> (B, C, H, W), any H and W."""
        tokens = x.permute(0, 2, 3, 1)
        return x + self.blocks(tokens).permute(0, 3, 1, 2)
