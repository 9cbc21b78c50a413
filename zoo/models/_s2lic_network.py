"""S2LIC learned image codec: SwinV2 transforms and the ACGC entropy model, on CompressAI (the network; its
timm registration is zoo/models/s2lic.py, which imports this module when a model is created).

Paper: S2LIC: Learned Image Compression with the SwinV2 Block, Adaptive Channel-wise and Global-inter Attention
Context (Wang et al., arXiv 2403.14471). Official code: https://github.com/wyq2021/S2LIC (no licence, no weights;
read for facts only, nothing copied). Facts and hyper-parameters: docs/s2lic.md (cited as §n).

Pipeline (§1): x -> g_a (EnhBlock, 4 stride-2 convs with RS2TB stages) -> y (M ch, H/16) -> h_a -> z (N ch, H/64),
coded by a factorised EntropyBottleneck; h_s(z_hat) gives 2M "hyper params" (first M: hyper-scales, last M:
hyper-means). y is split into `num_slices` equal slices coded in order; each slice as a checkerboard pair,
anchor half first. Every half gets (mean, scale) of a single Gaussian from its own g_ep head (1x1 convs) and,
once quantised, a latent residual prediction (LRP, Minnen & Singh 2020: 0.5 tanh of three 3x3 convs).

Context of slice i (i > 0 for AC/AG; only decoded data is ever used):
* AC (`ChannelContext`) on the earlier slices y_hat[<i]: a conv path and a depthwise-conv path, cross-modulated.
* AG (`GlobalInterContext`) on y_hat[<i]: deformable global attention whose queries come from the current
  slice. The anchor half queries with the slice's hyper-means (its best estimate before any of it is decoded);
  the non-anchor half queries with the slice as known after the anchor pass (decoded anchors, hyper-means at
  the non-anchor positions).
* Non-anchor spatial context: a 5x5 checkerboard-masked conv (He et al., CVPR 2021) on the decoded anchor half.
  This fixes the public code's flaw (§2), where the non-anchor half receives the same context as the anchor.
g_ep input: hyper params (2M) + AC (2s) + AG (s) [+ spatial (2s) for the non-anchor half]; slice 0 has no AC/AG.

Quantisation (§1): y_hat = round(y - mu) + mu with a straight-through gradient, in training and in eval, and
z_hat = round(z - median) + median the same way, so the eval-mode forward() reconstructs exactly what
decompress() does. Likelihoods follow CompressAI (uniform noise in training, rounding in eval). All y symbols
(all slices, both halves, in coding order) go into one BufferedRansEncoder per image: strings = [y, z].

CDF tables are kept current automatically (zoo.layers.entropy_tables, the mechanism every zoo codec uses): they
are stale when a table is empty or the EntropyBottleneck's parameters moved since they were built. `.eval()` /
`train(False)` and `state_dict()` rebuild stale tables (so saved state always holds current tables, and loading it
marks them current); compress() and decompress() code in eval mode (restoring each submodule's mode afterwards), so
they rebuild them too, and never use the BatchNorm batch statistics of training mode. The Gaussian tables depend
only on the scale table; a custom scale table passed to update() is replaced by the default one when the tables
are rebuilt automatically.

Assumptions where the paper and code are silent (§7):
1. AC/AG internals (§7.1). AC: conv path conv3x3 -> GELU -> conv3x3 -> GELU (2s ch); depthwise path DW3x3 ->
   1x1 (2s ch). AG: one head per earlier slice (head dim s; at s = 32 this is the code's `slice_ch*i//32 = i`),
   queries 1x1-projected, offsets from the queries by θ_offset = DW5x5 (stride `ag_sample_stride`) -> GELU ->
   1x1 (one (dx, dy) per head and reference point, zero-initialised so sampling starts on the reference grid as in
   Deformable DETR), reference points on the centres of an (H / stride) x (W / stride) grid, offsets bounded by
   tanh x `ag_offset_range` grid cells (DAT, Xia et al. CVPR 2022), bilinear `grid_sample` of each earlier slice
   for its head, 1x1 key/value projections, softmax attention of every position over all sampled points (no
   position bias), 5x5 conv to s ch; parallel DW3x3 -> 1x1 path. The S_Map/C_Map cross-modulation is read as
   MixFormer's bi-directional interaction (Chen et al., CVPR 2022): out = context * C_Map(local) +
   local * S_Map(context), hidden width max(4, channels // 8). C_Map's normalisation acts on a (B, C, 1, 1) tensor,
   which BatchNorm cannot normalise at batch size 1 in training, so C_Map uses a one-group GroupNorm there
   (S_Map keeps BatchNorm as drawn).
2. The anchor/non-anchor context above (the figures show that AG queries the current slice; the exact wiring
   of the fork is unknown). The anchor half is the (row + col) even positions. The LRP of each half corrects the
   positions of that half only; the non-anchor context sees the LRP-corrected anchors.
3. EnhModule = InvCompress EnhBlock (§7.2, zoo.layers.dense_enhance); h_a/h_s = MLIC's HyperAnalysis/
   HyperSynthesis (§7.3); g_s ends in a sub-pixel conv (the code) rather than the figure's 5x5 conv.
4. Widths for other M: g_ep hidden (M, 4M/5, 2M/5), LRP hidden (7M/10, 2M/5); at M = 320 these are the code's
   (320, 256, 128) and (224, 128). LRP input: hyper-means + earlier slices + the current slice as decoded so
   far (M + s * (i + 1) channels), as in the code's parameter count (§3).
5. Drop-path rises linearly from 0 to `drop_path_rate` over the SwinV2 layers of each transform (0.1, §1).
6. λ values, data and schedule are training matters (§4), not fixed here.
Portability: decoding needs the same entropy parameters bit for bit, so encoder and decoder must share platform
and numerics (CompressAI issues #279/#309); entropy networks are plain float32 convolutions/attention.
"""
from contextlib import contextmanager
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from compressai.ans import BufferedRansEncoder, RansDecoder
from compressai.entropy_models import EntropyBottleneck, GaussianConditional
from compressai.layers import CheckerboardMaskedConv2d, conv3x3, subpel_conv3x3
from compressai.models import CompressionModel
from compressai.models.utils import conv, deconv

from zoo.layers.dense_enhance import EnhancementBlock
from zoo.layers.entropy_tables import refresh_tables, tables_stale, track_loaded_tables
from zoo.layers.swinv2 import ResidualSwinV2Block

__all__ = ['S2LIC', 'ChannelContext', 'GlobalInterContext', 'CrossModulation', 'LatentResidualPrediction',
           'CheckerboardContextConv', 'quantize_around', 'checkerboard_anchor_mask']

# (slice index, half mask (1, 1, h, w) bool, means (B, s, h, w), scales (B, s, h, w)) -> y_hat on that half, 0 elsewhere
HalfQuantizer = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class _RoundAround(torch.autograd.Function):
    """round(x - center) + center, computed exactly like CompressAI's coder; straight-through gradient to x."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, center: torch.Tensor) -> torch.Tensor:
        return torch.round(x - center) + center

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        # d/dx of the identity surrogate; d/dcenter cancels (-1 from the shift, +1 from adding it back)
        return grad, None


def quantize_around(x: torch.Tensor, center: torch.Tensor) -> torch.Tensor:
    """x, center broadcastable -> round(x - center) + center, gradient passed straight through to x.

    The value is bit-identical to the decoder's symbol + center, which makes eval forward() == decompress().
    """
    return _RoundAround.apply(x, center)


def checkerboard_anchor_mask(height: int, width: int, device: torch.device) -> torch.Tensor:
    """(1, 1, H, W) bool, True on the anchor half: positions with (row + col) even."""
    rows = torch.arange(height, device=device)[:, None]
    cols = torch.arange(width, device=device)[None, :]
    return ((rows + cols) % 2 == 0)[None, None]


class CheckerboardContextConv(CheckerboardMaskedConv2d):
    """compressai's checkerboard-masked conv (same mask, state-dict keys and output) with the mask applied in the
    graph: compressai's forward assigns the masked weights to `weight.data`, which torch.compile and torch.export
    cannot capture. (B, C_in, H, W) -> (B, C_out, H, W)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.weight * self.mask, self.bias)


class CrossModulation(nn.Module):
    """Bi-directional modulation of a context path and a depthwise-conv (local) path, summed.

    context, local: (B, C, H, W) -> context * C_Map(local) + local * S_Map(context), (B, C, H, W).
    """

    def __init__(self, channels: int, reduction: int = 8):
        super().__init__()
        # at least 4: C_Map normalises across its hidden channels, which is degenerate for one or two values
        hidden = max(4, channels // reduction)
        self.spatial_map = nn.Sequential(
            nn.Conv2d(channels, hidden, 1), nn.BatchNorm2d(hidden), nn.GELU(), nn.Conv2d(hidden, 1, 1), nn.Sigmoid())
        self.channel_map = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Conv2d(channels, hidden, 1), nn.GroupNorm(1, hidden), nn.GELU(),
            nn.Conv2d(hidden, channels, 1), nn.Sigmoid())

    def forward(self, context: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
        return context * self.channel_map(local) + local * self.spatial_map(context)


class ChannelContext(nn.Module):
    """AC: adaptive channel-wise context from the earlier slices.

    earlier: (B, in_channels, H, W) -> (B, out_channels, H, W).
    """

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.context = nn.Sequential(
            conv3x3(in_channels, out_channels), nn.GELU(), conv3x3(out_channels, out_channels), nn.GELU())
        self.local = nn.Sequential(
            nn.Conv2d(in_channels, in_channels, 3, padding=1, groups=in_channels),
            nn.Conv2d(in_channels, out_channels, 1))
        self.mix = CrossModulation(out_channels)

    def forward(self, earlier: torch.Tensor) -> torch.Tensor:
        return self.mix(self.context(earlier), self.local(earlier))


class GlobalInterContext(nn.Module):
    """AG: deformable global attention from the current slice to the earlier slices.

    Args:
        slice_channels: channels s of one slice (the query map and the output).
        num_earlier: earlier slices i (one attention head, head dim s, per earlier slice).
        sample_stride: reference points every `sample_stride` latent pixels in each direction.
        offset_range: largest offset, in reference-grid cells.
    """

    def __init__(self, slice_channels: int, num_earlier: int, sample_stride: int = 2, offset_range: float = 2.0,
                 offset_kernel: int = 5):
        super().__init__()
        dim = slice_channels * num_earlier
        self.num_heads = num_earlier
        self.offset_range = offset_range
        self.query = nn.Conv2d(slice_channels, dim, 1)
        self.offsets = nn.Sequential(
            nn.Conv2d(dim, dim, offset_kernel, stride=sample_stride, padding=offset_kernel // 2, groups=dim),
            nn.GELU(),
            nn.Conv2d(dim, 2 * num_earlier, 1, groups=num_earlier))
        nn.init.zeros_(self.offsets[-1].weight)
        nn.init.zeros_(self.offsets[-1].bias)
        self.key = nn.Conv2d(dim, dim, 1)
        self.value = nn.Conv2d(dim, dim, 1)
        self.project = nn.Conv2d(dim, slice_channels, 5, padding=2)
        self.local = nn.Sequential(nn.Conv2d(dim, dim, 3, padding=1, groups=dim), nn.Conv2d(dim, slice_channels, 1))
        self.mix = CrossModulation(slice_channels)

    def sample(self, earlier: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """earlier (B, heads * s, H, W), offsets (B, 2 * heads, h, w) raw -> (B, heads * s, h, w) sampled.

        Head g samples earlier slice g at its reference points moved by tanh(offset) * offset_range cells.
        """
        batch, dim, height, width = earlier.shape
        grid_h, grid_w = offsets.shape[-2:]
        ys = (torch.arange(grid_h, device=earlier.device, dtype=earlier.dtype) + 0.5) / grid_h * 2 - 1
        xs = (torch.arange(grid_w, device=earlier.device, dtype=earlier.dtype) + 0.5) / grid_w * 2 - 1
        reference = torch.stack(torch.meshgrid(xs, ys, indexing='xy'), dim=-1)  # (h, w, 2) as (x, y)
        cell = torch.tensor([2.0 / grid_w, 2.0 / grid_h], device=earlier.device, dtype=earlier.dtype)
        shift = offsets.reshape(batch * self.num_heads, 2, grid_h, grid_w).permute(0, 2, 3, 1)
        grid = reference + torch.tanh(shift) * self.offset_range * cell
        per_head = earlier.reshape(batch * self.num_heads, dim // self.num_heads, height, width)
        sampled = F.grid_sample(per_head, grid, mode='bilinear', padding_mode='zeros', align_corners=False)
        return sampled.reshape(batch, dim, grid_h, grid_w)

    def attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """query (B, D, H, W), key/value (B, D, h, w) -> (B, D, H, W): every position over all h*w points."""
        batch, dim, height, width = query.shape

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(batch, self.num_heads, dim // self.num_heads, -1).transpose(-1, -2)

        out = F.scaled_dot_product_attention(heads(query), heads(key), heads(value))
        return out.transpose(-1, -2).reshape(batch, dim, height, width)

    def forward(self, query_map: torch.Tensor, earlier: torch.Tensor) -> torch.Tensor:
        """query_map (B, s, H, W), earlier (B, i * s, H, W) -> (B, s, H, W)."""
        query = self.query(query_map)
        sampled = self.sample(earlier, self.offsets(query))
        attended = self.attend(query, self.key(sampled), self.value(sampled))
        return self.mix(self.project(attended), self.local(earlier))


class LatentResidualPrediction(nn.Module):
    """LRP: (B, in_channels, H, W) -> (B, out_channels, H, W) correction in (-0.5, 0.5)."""

    def __init__(self, in_channels: int, out_channels: int, widths: Sequence[int]):
        super().__init__()
        self.layers = _conv_stack([in_channels, *widths, out_channels], kernel_size=3)

    def forward(self, support: torch.Tensor) -> torch.Tensor:
        return 0.5 * torch.tanh(self.layers(support))


def _conv_stack(channels: Sequence[int], kernel_size: int) -> nn.Sequential:
    """Stride-1 convs through `channels` with GELU between them (not after the last)."""
    layers: List[nn.Module] = []
    for index, (cin, cout) in enumerate(zip(channels[:-1], channels[1:])):
        if index:
            layers.append(nn.GELU())
        layers.append(nn.Conv2d(cin, cout, kernel_size, padding=kernel_size // 2))
    return nn.Sequential(*layers)


def _hyper_analysis(N: int, M: int) -> nn.Sequential:
    """MLIC's h_a: (B, M, h, w) -> (B, N, h/4, w/4); five 3x3 convs, strides 1, 1, 2, 1, 2."""
    return nn.Sequential(
        conv3x3(M, N), nn.GELU(), conv3x3(N, N), nn.GELU(), conv3x3(N, N, stride=2), nn.GELU(),
        conv3x3(N, N), nn.GELU(), conv3x3(N, N, stride=2))


def _hyper_synthesis(N: int, M: int) -> nn.Sequential:
    """MLIC's h_s: (B, N, h/4, w/4) -> (B, 2M, h, w) hyper-scales then hyper-means."""
    wide = 3 * M // 2
    return nn.Sequential(
        conv3x3(N, M), nn.GELU(), subpel_conv3x3(M, M, 2), nn.GELU(), conv3x3(M, wide), nn.GELU(),
        subpel_conv3x3(wide, wide, 2), nn.GELU(), conv3x3(wide, 2 * M))


def _drop_path_rates(depths: Sequence[int], rate: float) -> List[List[float]]:
    """Per-stage lists of drop-path rates rising linearly from 0 to `rate` over all layers."""
    total = sum(depths)
    # plain Python, not torch.linspace: the model must also build on the meta device (parameter counting)
    rates = [rate * layer / max(total - 1, 1) for layer in range(total)]
    starts = [sum(depths[:stage]) for stage in range(len(depths))]
    return [rates[start:start + depth] for start, depth in zip(starts, depths)]


class S2LIC(CompressionModel):
    """S2LIC codec (module docstring: structure and assumptions).

    Args:
        N: channels of the transforms and of z.
        M: channels of y (split into `num_slices` slices).
        num_slices: slices of the ACGC entropy model (M must be divisible by it).
        window_size: SwinV2 window side.
        enc_depths / enc_heads: SwinV2 layers and heads of g_a's stages (3 stages for the 64 multiple).
        dec_depths / dec_heads: the same for g_s, in decoding order.
        mlp_ratio, qkv_bias, drop_path_rate: SwinV2 layer settings.
        enhance_channels / enhance_growth: width and dense growth of the two enhancement blocks.
        ag_sample_stride / ag_offset_range: AG reference-grid stride and offset bound (in grid cells).

    Inputs are (B, 3, H, W) in [0, 1] with H and W multiples of `pad_multiple`; callers pad and crop.
    """

    def __init__(self, N: int = 192, M: int = 320, num_slices: int = 10, window_size: int = 8,
                 enc_depths: Sequence[int] = (1, 2, 3), enc_heads: Sequence[int] = (4, 8, 16),
                 dec_depths: Sequence[int] = (3, 2, 1), dec_heads: Sequence[int] = (16, 8, 4),
                 mlp_ratio: float = 4., qkv_bias: bool = True, drop_path_rate: float = 0.1,
                 enhance_channels: int = 64, enhance_growth: int = 32,
                 ag_sample_stride: int = 2, ag_offset_range: float = 2.0):
        super().__init__()
        _check_config(N, M, num_slices, enc_depths, enc_heads, dec_depths, dec_heads)
        self.N, self.M, self.num_slices = N, M, num_slices
        self.slice_channels = M // num_slices
        # g_a halves the size len(enc_depths) + 1 times, h_a twice more
        self.pad_multiple = 2 ** (len(enc_depths) + 3)
        swin = dict(window_size=window_size, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias)
        self.g_a = self._analysis(N, M, enc_depths, enc_heads, _drop_path_rates(enc_depths, drop_path_rate), swin,
                                  EnhancementBlock(3, enhance_channels, enhance_growth))
        self.g_s = self._synthesis(N, M, dec_depths, dec_heads, _drop_path_rates(dec_depths, drop_path_rate), swin,
                                   EnhancementBlock(3, enhance_channels, enhance_growth))
        self.h_a = _hyper_analysis(N, M)
        self.h_s = _hyper_synthesis(N, M)
        self.entropy_bottleneck = EntropyBottleneck(N)
        self.gaussian_conditional = GaussianConditional(None)

        s = self.slice_channels
        ep_widths = (M, 4 * M // 5, 2 * M // 5)
        lrp_widths = (7 * M // 10, 2 * M // 5)
        earlier_context = [0] + [3 * s] * (num_slices - 1)  # AC (2s) + AG (s) from slice 1 on
        self.channel_context = nn.ModuleList(ChannelContext(s * i, 2 * s) for i in range(1, num_slices))
        self.global_context = nn.ModuleList(
            GlobalInterContext(s, i, ag_sample_stride, ag_offset_range) for i in range(1, num_slices))
        self.spatial_context = nn.ModuleList(
            CheckerboardContextConv(s, 2 * s, 5, padding=2) for _ in range(num_slices))
        self.anchor_parameters = nn.ModuleList(
            _conv_stack([2 * M + extra, *ep_widths, 2 * s], kernel_size=1) for extra in earlier_context)
        self.nonanchor_parameters = nn.ModuleList(
            _conv_stack([2 * M + extra + 2 * s, *ep_widths, 2 * s], kernel_size=1) for extra in earlier_context)
        self.anchor_residual = nn.ModuleList(
            LatentResidualPrediction(M + s * (i + 1), s, lrp_widths) for i in range(num_slices))
        self.nonanchor_residual = nn.ModuleList(
            LatentResidualPrediction(M + s * (i + 1), s, lrp_widths) for i in range(num_slices))
        track_loaded_tables(self)

    # ------------------------------------------------------------------ transforms

    @staticmethod
    def _analysis(N: int, M: int, depths: Sequence[int], heads: Sequence[int], rates: List[List[float]],
                  swin: Dict, enhance: nn.Module) -> nn.Sequential:
        """g_a: (B, 3, H, W) -> (B, M, H / 2^(stages+1), ...)."""
        layers = [enhance, conv(3, N, kernel_size=5, stride=2)]
        for stage, (depth, num_heads) in enumerate(zip(depths, heads)):
            last = stage == len(depths) - 1
            layers += [ResidualSwinV2Block(N, depth, num_heads, drop_path=rates[stage], **swin),
                       conv(N, M if last else N, kernel_size=3, stride=2)]
        return nn.Sequential(*layers)

    @staticmethod
    def _synthesis(N: int, M: int, depths: Sequence[int], heads: Sequence[int], rates: List[List[float]],
                   swin: Dict, enhance: nn.Module) -> nn.Sequential:
        """g_s: (B, M, h, w) -> (B, 3, h * 2^(stages+1), ...)."""
        layers: List[nn.Module] = [deconv(M, N, kernel_size=3, stride=2)]
        for stage, (depth, num_heads) in enumerate(zip(depths, heads)):
            last = stage == len(depths) - 1
            layers += [ResidualSwinV2Block(N, depth, num_heads, drop_path=rates[stage], **swin),
                       subpel_conv3x3(N, 3, 2) if last else deconv(N, N, kernel_size=3, stride=2)]
        layers.append(enhance)
        return nn.Sequential(*layers)

    # ------------------------------------------------------------------ ACGC entropy model

    def _global(self, index: int, query_map: torch.Tensor, earlier: Optional[torch.Tensor]) -> List[torch.Tensor]:
        """AG context of slice `index` as a list ([] for slice 0, which has no earlier slices)."""
        return [] if earlier is None else [self.global_context[index - 1](query_map, earlier)]

    def _code_slices(self, hyper: torch.Tensor, quantize: HalfQuantizer) -> torch.Tensor:
        """Runs every slice in coding order; `quantize` supplies each half's y_hat (from y, or from a stream).

        hyper: (B, 2M, h, w) -> y_hat (B, M, h, w). forward(), compress() and decompress() all go through here,
        so the three compute the same entropy parameters from the same decoded values.
        """
        s = self.slice_channels
        hyper_means = hyper[:, self.M:]
        anchor = checkerboard_anchor_mask(hyper.shape[-2], hyper.shape[-1], hyper.device)
        decoded: List[torch.Tensor] = []
        for index in range(self.num_slices):
            earlier = torch.cat(decoded, dim=1) if decoded else None
            slice_means = hyper_means[:, index * s:(index + 1) * s]
            shared = [hyper] + ([self.channel_context[index - 1](earlier)] if decoded else [])

            params = self.anchor_parameters[index](torch.cat(shared + self._global(index, slice_means, earlier), 1))
            anchor_half = quantize(index, anchor, *params.chunk(2, dim=1))
            correction = self.anchor_residual[index](torch.cat([hyper_means, *decoded, anchor_half], dim=1))
            anchor_half = anchor_half + torch.where(anchor, correction, 0.)

            known = torch.where(anchor, anchor_half, slice_means)
            context = shared + self._global(index, known, earlier) + [self.spatial_context[index](anchor_half)]
            params = self.nonanchor_parameters[index](torch.cat(context, dim=1))
            full = anchor_half + quantize(index, ~anchor, *params.chunk(2, dim=1))
            correction = self.nonanchor_residual[index](torch.cat([hyper_means, *decoded, full], dim=1))
            decoded.append(full + torch.where(anchor, 0., correction))
        return torch.cat(decoded, dim=1)

    def _check_image(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != 3:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f'S2LIC expects a (B, 3, H, W) RGB tensor, got {shape}')
        if not x.is_floating_point():
            raise ValueError(f'S2LIC expects a float image in [0, 1], got {x.dtype}')
        height, width = x.shape[-2:]
        if height == 0 or width == 0 or height % self.pad_multiple or width % self.pad_multiple:
            raise ValueError(f'S2LIC needs H and W to be positive multiples of pad_multiple={self.pad_multiple} '
                             f'(pad, then crop), got {height}x{width}')

    def _z_likelihoods(self, z: torch.Tensor) -> torch.Tensor:
        """(B, N, h, w) -> likelihoods of z under the entropy bottleneck, what EntropyBottleneck.forward returns.

        The same computation with the channels-first permutation in Python ints: compressai builds it as a tensor,
        and a permute by tensor values is data-dependent, which torch.compile and torch.export cannot follow.
        """
        bottleneck = self.entropy_bottleneck
        values = z.transpose(0, 1).reshape(z.shape[1], 1, -1)  # (N, 1, B*h*w), channel-major like compressai
        mode = 'noise' if self.training else 'dequantize'
        likelihood, _, _ = bottleneck._likelihood(bottleneck.quantize(values, mode, bottleneck._get_medians()))
        if bottleneck.use_likelihood_bound:
            likelihood = bottleneck.likelihood_lower_bound(likelihood)
        return likelihood.reshape(z.shape[1], z.shape[0], *z.shape[2:]).transpose(0, 1)

    def forward(self, x: torch.Tensor) -> Dict:
        """x (B, 3, H, W) in [0, 1] -> {'x_hat': (B, 3, H, W), 'likelihoods': {'y': (B, M, H/16, W/16),
        'z': (B, N, H/64, W/64)}}; in eval mode x_hat equals decompress(compress(x)) before clamping."""
        self._check_image(x)
        y = self.g_a(x)
        z = self.h_a(y)
        z_likelihoods = self._z_likelihoods(z)
        z_hat = quantize_around(z, self.entropy_bottleneck._get_medians())
        half_likelihoods: List[torch.Tensor] = []

        def quantize(index: int, half: torch.Tensor, means: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
            target = self._slice(y, index)
            _, likelihood = self.gaussian_conditional(target, scales, means)
            half_likelihoods.append(torch.where(half, likelihood, 0.))
            return torch.where(half, quantize_around(target, means), 0.)

        y_hat = self._code_slices(self.h_s(z_hat), quantize)
        # two halves per slice, in coding order; each is zero outside its half
        y_likelihoods = torch.cat([a + b for a, b in zip(half_likelihoods[0::2], half_likelihoods[1::2])], dim=1)
        return {'x_hat': self.g_s(y_hat), 'likelihoods': {'y': y_likelihoods, 'z': z_likelihoods}}

    def slice_parameters(self, y: torch.Tensor, hyper: torch.Tensor) -> List[Tuple[torch.Tensor, torch.Tensor]]:
        """y (B, M, h, w), hyper params (B, 2M, h, w) -> the Gaussian (means, scales), each (B, s, h, w), of
        every half in coding order: [slice 0 anchor, slice 0 non-anchor, slice 1 anchor, ...]. For inspecting
        what each half's context depends on; each half's values are used on its own positions only."""
        params: List[Tuple[torch.Tensor, torch.Tensor]] = []

        def quantize(index: int, half: torch.Tensor, means: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
            params.append((means, scales))
            return torch.where(half, quantize_around(self._slice(y, index), means), 0.)

        self._code_slices(hyper, quantize)
        return params

    def _slice(self, y: torch.Tensor, index: int) -> torch.Tensor:
        return y[:, index * self.slice_channels:(index + 1) * self.slice_channels]

    # ------------------------------------------------------------------ coding

    def _coder_tables(self) -> Tuple[list, list, list]:
        gc = self.gaussian_conditional
        return gc.quantized_cdf.tolist(), gc.cdf_length.reshape(-1).int().tolist(), gc.offset.reshape(-1).int().tolist()

    @contextmanager
    def _coding_mode(self) -> Iterator[None]:
        """Eval mode (which also refreshes stale CDF tables) and no autograd for the duration; every submodule's
        own mode is restored afterwards. Coding in training mode would use batch statistics in the entropy
        model's BatchNorm (and update them), so encoder and decoder would disagree with forward()."""
        modes = [(module, module.training) for module in self.modules()]
        self.eval()
        try:
            with torch.no_grad():
                yield
        finally:
            for module, training in modes:
                module.training = training

    def compress(self, x: torch.Tensor) -> Dict:
        """x (B, 3, H, W) in [0, 1] -> {'strings': [y_strings, z_strings] (one bytes per image each),
        'shape': z's (h, w)}. Codes with the eval-mode networks and current CDF tables, whatever the mode."""
        self._check_image(x)
        with self._coding_mode():
            return self._compress(x)

    def _compress(self, x: torch.Tensor) -> Dict:
        y = self.g_a(x)
        z = self.h_a(y)
        z_strings = self.entropy_bottleneck.compress(z)
        z_hat = self.entropy_bottleneck.decompress(z_strings, z.shape[-2:])
        batch = x.shape[0]
        symbols: List[List[int]] = [[] for _ in range(batch)]
        indexes: List[List[int]] = [[] for _ in range(batch)]

        def quantize(index: int, half: torch.Tensor, means: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
            target = self._slice(y, index)
            selected = half.expand_as(target)
            symbol_map = self.gaussian_conditional.quantize(target, 'symbols', means)
            index_map = self.gaussian_conditional.build_indexes(scales)
            for image in range(batch):
                symbols[image].extend(symbol_map[image][selected[image]].tolist())
                indexes[image].extend(index_map[image][selected[image]].tolist())
            return torch.where(half, quantize_around(target, means), 0.)

        self._code_slices(self.h_s(z_hat), quantize)
        tables = self._coder_tables()
        y_strings = []
        for image_symbols, image_indexes in zip(symbols, indexes):
            encoder = BufferedRansEncoder()
            encoder.encode_with_indexes(image_symbols, image_indexes, *tables)
            y_strings.append(encoder.flush())
        return {'strings': [y_strings, z_strings], 'shape': z.shape[-2:]}

    def decompress(self, strings: Sequence[Sequence[bytes]], shape: Sequence[int]) -> Dict:
        """strings [y_strings, z_strings], shape z's (h, w) -> {'x_hat': (B, 3, 64h, 64w) clamped to [0, 1]};
        eval-mode networks and current CDF tables, whatever the mode."""
        batch, shape = _check_strings(strings, shape)
        with self._coding_mode():
            return self._decompress(strings, batch, shape)

    def _decompress(self, strings: Sequence[Sequence[bytes]], batch: int, shape: Tuple[int, int]) -> Dict:
        z_hat = self.entropy_bottleneck.decompress(list(strings[1]), shape)
        decoders = []
        for stream in strings[0]:
            decoder = RansDecoder()
            decoder.set_stream(bytes(stream))
            decoders.append(decoder)
        tables = self._coder_tables()

        def quantize(index: int, half: torch.Tensor, means: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
            selected = half.expand_as(means)
            index_map = self.gaussian_conditional.build_indexes(scales)
            symbol_map = torch.zeros_like(means)
            for image in range(batch):
                values = decoders[image].decode_stream(index_map[image][selected[image]].tolist(), *tables)
                symbol_map[image][selected[image]] = torch.tensor(values, dtype=means.dtype, device=means.device)
            return torch.where(half, symbol_map + means, 0.)

        y_hat = self._code_slices(self.h_s(z_hat), quantize)
        return {'x_hat': self.g_s(y_hat).clamp_(0, 1)}

    # ------------------------------------------------------------------ CDF tables kept current

    def cdf_tables_stale(self) -> bool:
        """True when a CDF table is missing or the EntropyBottleneck changed since its tables were built."""
        return tables_stale(self)

    def train(self, mode: bool = True) -> 'S2LIC':
        super().train(mode)
        if not mode:
            refresh_tables(self)
        return self

    def state_dict(self, *args, **kwargs):
        refresh_tables(self)
        return super().state_dict(*args, **kwargs)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # codec files written before the tables' freshness moved to zoo.layers.entropy_tables carry the snapshot
        # buffer S2LIC kept then; the loaded tables are marked current by the tracking hook instead
        state_dict.pop(prefix + '_cdf_source_parameters', None)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # ------------------------------------------------------------------ reporting

    def parameter_counts(self) -> Dict[str, int]:
        """Parameters per part; the parts partition the model (their sum is the total)."""
        def count(modules) -> int:
            return sum(p.numel() for m in modules for p in m.parameters())

        transforms = (self.g_a, self.g_s)
        swin = count(m for t in transforms for m in t if isinstance(m, ResidualSwinV2Block))
        enhance = count(m for t in transforms for m in t if isinstance(m, EnhancementBlock))
        return {
            'swinv2_blocks': swin,
            'stride_convs': count(transforms) - swin - enhance,
            'h_a': count([self.h_a]),
            'h_s': count([self.h_s]),
            'entropy_parameters': count([self.anchor_parameters, self.nonanchor_parameters]),
            'residual_prediction': count([self.anchor_residual, self.nonanchor_residual]),
            'enhancement': enhance,
            'acgc_context': count([self.channel_context, self.global_context, self.spatial_context]),
            'entropy_bottleneck': count([self.entropy_bottleneck]),
        }


def _check_config(N: int, M: int, num_slices: int, enc_depths: Sequence[int], enc_heads: Sequence[int],
                  dec_depths: Sequence[int], dec_heads: Sequence[int]) -> None:
    if num_slices < 1 or M % num_slices:
        raise ValueError(f'S2LIC: M={M} must split into num_slices={num_slices} equal slices')
    if len(enc_depths) != len(enc_heads) or len(dec_depths) != len(dec_heads):
        raise ValueError('S2LIC: every stage needs a depth and a head count '
                         f'(enc {enc_depths}/{enc_heads}, dec {dec_depths}/{dec_heads})')
    if len(enc_depths) != len(dec_depths) or not enc_depths:
        raise ValueError(f'S2LIC: g_a and g_s need the same number of stages, got {enc_depths} and {dec_depths}')
    for heads in (*enc_heads, *dec_heads):
        if N % heads:
            raise ValueError(f'S2LIC: N={N} is not divisible by {heads} heads')


def _check_strings(strings, shape) -> Tuple[int, Tuple[int, int]]:
    """Validates decompress() arguments; returns (batch, (h, w))."""
    if not isinstance(strings, (list, tuple)) or len(strings) != 2:
        raise ValueError('S2LIC.decompress expects strings = [y_strings, z_strings]')
    y_strings, z_strings = strings
    for name, part in (('y', y_strings), ('z', z_strings)):
        if not isinstance(part, (list, tuple)) or not part or not all(isinstance(s, (bytes, bytearray)) for s in part):
            raise ValueError(f'S2LIC.decompress: {name}_strings must be a non-empty list of bytes')
    if len(y_strings) != len(z_strings):
        raise ValueError(f'S2LIC.decompress: {len(y_strings)} y strings but {len(z_strings)} z strings')
    shape = tuple(int(v) for v in shape)
    if len(shape) != 2 or min(shape) < 1:
        raise ValueError(f'S2LIC.decompress: shape must be the (h, w) of z, got {shape}')
    return len(y_strings), shape
