"""Dense feature-enhancement block of InvCompress (Xie et al., ACM MM 2021, https://arxiv.org/abs/2108.03690),
used by S2LIC before its analysis transform and after its synthesis transform ("EnhModule(64)").

EnhBlock(x) = x + 0.2 * [dense block C -> 64, 1x1 -> 3x3 -> 1x1 convs at 64, dense block 64 -> C](x).
The dense block is ESRGAN's five-conv residual dense block (Wang et al. 2018): 3x3 convs with growth 32, each
seeing the concatenation of the input and all earlier outputs, LeakyReLU(0.2) after the first four; since its
input and output widths differ, it returns the fifth conv's output without ESRGAN's inner skip.
Assumption (docs/s2lic.md §7.2): S2LIC's unpublished fork uses this public InvCompress block unchanged; the
1x1 -> 3x3 -> 1x1 stack has no activations between its convs, as in InvCompress.
"""
import torch
import torch.nn as nn

__all__ = ['DenseBlock', 'EnhancementBlock']


class DenseBlock(nn.Module):
    """Five 3x3 convs with dense connections: (B, in_channels, H, W) -> (B, out_channels, H, W).

    Args:
        in_channels: input channels.
        out_channels: output channels.
        growth: channels added by each of the first four convs.
    """

    def __init__(self, in_channels: int, out_channels: int, growth: int = 32):
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(in_channels + index * growth, growth, 3, padding=1) for index in range(4))
        self.fuse = nn.Conv2d(in_channels + 4 * growth, out_channels, 3, padding=1)
        self.act = nn.LeakyReLU(0.2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = [x]
        for conv in self.convs:
            features.append(self.act(conv(torch.cat(features, dim=1))))
        return self.fuse(torch.cat(features, dim=1))


class EnhancementBlock(nn.Module):
    """InvCompress EnhBlock: (B, C, H, W) -> (B, C, H, W), x + 0.2 * f(x).

    Args:
        channels: image channels C (3 for RGB).
        hidden: width inside the block (64 in InvCompress and S2LIC).
        growth: dense-block growth (32).
    """

    residual_scale = 0.2

    def __init__(self, channels: int = 3, hidden: int = 64, growth: int = 32):
        super().__init__()
        self.layers = nn.Sequential(
            DenseBlock(channels, hidden, growth),
            nn.Conv2d(hidden, hidden, 1),
            nn.Conv2d(hidden, hidden, 3, padding=1),
            nn.Conv2d(hidden, hidden, 1),
            DenseBlock(hidden, channels, growth),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.residual_scale * self.layers(x)
