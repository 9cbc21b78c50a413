"""Convolutional GLU (TransNeXt's channel mixer): a GLU whose gate branch sees a 3x3 depth-wise conv."""
from typing import Callable, Optional

import torch
import torch.nn as nn

from .window_geometry import row_bands

__all__ = ['ConvGLU', 'DepthwiseConv3x3', 'BAND_ELEMENTS']

# Hidden activations per band of rows when no gradient is needed (16 MiB in float32). An image whose hidden map is
# larger runs alone, in bands of rows: at 1024 x 1024 the first stage of TransNeXt-T/S holds 65,536 positions x 768
# fc1 channels (192 MiB) otherwise, the largest tensor of the model (benchmarks/RESULTS.md, "Peak memory at 1024 x
# 1024"). Smaller images (224 x 224: 2.4 M) run as before, whatever the batch. With gradients every band's
# activations are kept for the backward anyway, so training runs in one piece.
BAND_ELEMENTS = 1 << 22


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
        """(B, H, W, C) -> (B, H, W, out_features); without gradients, image by image in bands of rows on maps
        whose hidden activations exceed BAND_ELEMENTS per image."""
        height, per_row = x.shape[1], x.shape[2] * 2 * self.hidden_features
        bands = [rows for rows, _ in row_bands(height, per_row, BAND_ELEMENTS)]
        if len(bands) == 1 or (torch.is_grad_enabled() and (x.requires_grad or self.fc1.weight.requires_grad)):
            return self._mix(x)
        pieces = []
        for image in x.split(1):
            for rows in bands:
                # one row of halo on each side inside the map: the 3x3 conv of the kept rows sees its true neighbours
                first, last = max(0, rows.start - 1), min(height, rows.stop + 1)
                pieces.append(self._mix(image[:, first:last])[:, rows.start - first:rows.stop - first])
        return torch.cat(pieces, dim=1).view(x.shape[0], height, *pieces[0].shape[2:])

    def _mix(self, x: torch.Tensor) -> torch.Tensor:
        x, gate = self.fc1(x).chunk(2, dim=-1)
        x = self.drop(self.act(self.dwconv(x)) * gate)
        return self.drop(self.fc2(x))
