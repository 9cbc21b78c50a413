"""Convolutional GLU (TransNeXt's channel mixer): a GLU whose gate branch sees a 3x3 depth-wise conv."""
from typing import Callable, Optional

import torch
import torch.nn as nn

__all__ = ['ConvGLU', 'DepthwiseConv3x3']


class DepthwiseConv3x3(nn.Module):
    """3x3 depth-wise conv (padding 1) on a channels-last map; the conv is named `dwconv` as in the official keys."""

    def __init__(self, dim: int, device=None, dtype=None):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 3, 1, 1, bias=True, groups=dim, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, W, C) -> (B, H, W, C)."""
        return self.dwconv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)


class ConvGLU(nn.Module):
    """out = fc2(act(dwconv(a)) * b) with [a, b] = fc1(x) split in this order along the channels.

    `hidden_features` is the nominal MLP width (e.g. int(dim * mlp_ratio)); the GLU keeps the parameter count
    of a plain MLP of that width by using int(2 * hidden_features / 3) channels per branch, as the paper does.

    Args:
        in_features: input channels C.
        hidden_features: nominal hidden width (default C).
        out_features: output channels (default C).
        act_layer: activation of the conv branch (exact GELU in TransNeXt).
        drop: dropout after the gating and after fc2.
    """

    def __init__(self, in_features: int, hidden_features: Optional[int] = None, out_features: Optional[int] = None,
                 act_layer: Callable = nn.GELU, drop: float = 0., device=None, dtype=None):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        out_features = out_features or in_features
        hidden = int(2 * (hidden_features or in_features) / 3)
        self.hidden_features = hidden
        self.fc1 = nn.Linear(in_features, hidden * 2, **dd)
        self.dwconv = DepthwiseConv3x3(hidden, **dd)
        self.act = act_layer()
        self.fc2 = nn.Linear(hidden, out_features, **dd)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, W, C) -> (B, H, W, out_features)."""
        x, gate = self.fc1(x).chunk(2, dim=-1)
        x = self.drop(self.act(self.dwconv(x)) * gate)
        return self.drop(self.fc2(x))
