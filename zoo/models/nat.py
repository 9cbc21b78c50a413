"""Neighborhood Attention Transformers: NAT, DiNAT, DiNAT_s, isotropic NAT/DiNAT and the ViT+RPB baseline.

Papers:
    Neighborhood Attention Transformer (Hassani et al., CVPR 2023), https://arxiv.org/abs/2204.07143
    Dilated Neighborhood Attention Transformer (Hassani & Shi, 2022), https://arxiv.org/abs/2209.15001
Official code and weights: https://github.com/SHI-Labs/Neighborhood-Attention-Transformer (MIT licence).

State-dict names are the official ones (`levels.*` for NAT/DiNAT, `layers.*` for DiNAT_s and the isotropic
models, `attn.rpb`, `gamma1/2`), so official checkpoints load strictly. The neighborhood attention operator
with the exact old-NATTEN semantics (border-shifted windows, dilation groups, relative position bias) lives
in `zoo.layers`.
"""
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath, Mlp, SelectAdaptivePool2d, calculate_drop_path_rates, to_2tuple, trunc_normal_
from timm.models import checkpoint_seq, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices

from zoo.layers.neighborhood_attn import NeighborhoodAttention2d
from zoo.models._checkpoint import unwrap_state_dict
from zoo.models._factory import check_image_batch, create_model, imagenet_cfg

__all__ = ['NAT', 'DiNATs', 'NATIsotropic']


class GlobalAttentionRPB(nn.Module):
    """Full self-attention with a relative position bias over a fixed L x L map (the ViT+RPB baseline).

    The bias for query (qy, qx) and key (ky, kx) is rpb[h, ky - qy + L - 1, kx - qx + L - 1]; the persistent
    int64 buffer `relative_position_index` (N, N) holds the flat index into rpb[h], as in the official files.
    """

    def __init__(self, dim: int, num_heads: int, input_size: int, qkv_bias: bool = True,
                 qk_scale: Optional[float] = None, attn_drop: float = 0., proj_drop: float = 0., device=None,
                 dtype=None):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = qk_scale or self.head_dim ** -0.5
        self.input_size = input_size
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias, **dd)
        self.rpb = nn.Parameter(torch.empty(num_heads, 2 * input_size - 1, 2 * input_size - 1, **dd))
        self.register_buffer('relative_position_index', self._relative_index(input_size, device))
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim, **dd)
        self.proj_drop = nn.Dropout(proj_drop)
        trunc_normal_(self.rpb, std=.02)

    @staticmethod
    def _relative_index(size: int, device=None) -> torch.Tensor:
        """(N, N) int64 flat rpb index of (key - query) offsets, N = size * size."""
        ys, xs = torch.meshgrid(torch.arange(size, device='cpu'), torch.arange(size, device='cpu'), indexing='ij')
        ys, xs = ys.flatten(), xs.flatten()
        dy = ys[None, :] - ys[:, None] + size - 1
        dx = xs[None, :] - xs[:, None] + size - 1
        return (dy * (2 * size - 1) + dx).to(device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, L, L, C) -> (B, L, L, C)."""
        batch, height, width, channels = x.shape
        if height != self.input_size or width != self.input_size:
            raise ValueError(f'ViT+RPB attention is built for a {self.input_size}x{self.input_size} token map '
                             f'(set img_size accordingly), got {height}x{width}')
        qkv = self.qkv(x).reshape(batch, height * width, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        num_tokens = height * width
        bias = self.rpb.flatten(1)[:, self.relative_position_index.view(-1)].view(1, self.num_heads, num_tokens,
                                                                                  num_tokens)
        # explicit matmuls: 196 tokens make this cheap, and FLOP counters see them (they miss CPU SDPA)
        attn = (q * self.scale) @ k.transpose(-2, -1) + bias.to(q.dtype)
        x = self.attn_drop(attn.softmax(dim=-1)) @ v
        x = x.transpose(1, 2).reshape(batch, height, width, channels)
        return self.proj_drop(self.proj(x))


class NATLayer(nn.Module):
    """Pre-norm transformer block on a channels-last map.

    x = x + [gamma1 *] attn(norm1(x)); x = x + [gamma2 *] mlp(norm2(x)). Layer scale (`gamma1`, `gamma2`)
    exists only when `layer_scale` is a number, as in the official classes.
    """

    def __init__(self, dim: int, attn: nn.Module, mlp_ratio: float = 4., proj_drop: float = 0.,
                 drop_path: float = 0., layer_scale: Optional[float] = None, norm_layer: Callable = nn.LayerNorm,
                 act_layer: Callable = nn.GELU, device=None, dtype=None):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.norm1 = norm_layer(dim, **dd)
        self.attn = attn
        self.drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.norm2 = norm_layer(dim, **dd)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=act_layer, drop=proj_drop, **dd)
        if layer_scale is not None:
            self.gamma1 = nn.Parameter(torch.full((dim,), float(layer_scale), **dd))
            self.gamma2 = nn.Parameter(torch.full((dim,), float(layer_scale), **dd))
        else:
            self.gamma1 = self.gamma2 = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, W, C) -> (B, H, W, C)."""
        if self.gamma1 is None:
            x = x + self.drop_path(self.attn(self.norm1(x)))
            return x + self.drop_path(self.mlp(self.norm2(x)))
        x = x + self.drop_path(self.gamma1 * self.attn(self.norm1(x)))
        return x + self.drop_path(self.gamma2 * self.mlp(self.norm2(x)))


class ConvTokenizer(nn.Module):
    """NAT stem: two 3x3 stride-2 convs (in -> C/2 -> C, no activation), channels-last LayerNorm. Stride 4."""

    def __init__(self, in_chans: int, embed_dim: int, norm_layer: Callable = nn.LayerNorm, device=None, dtype=None):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.proj = nn.Sequential(
            nn.Conv2d(in_chans, embed_dim // 2, 3, stride=2, padding=1, **dd),
            nn.Conv2d(embed_dim // 2, embed_dim, 3, stride=2, padding=1, **dd),
        )
        self.norm = norm_layer(embed_dim, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_chans, H, W) -> (B, ceil(H/4), ceil(W/4), C)."""
        return self.norm(self.proj(x).permute(0, 2, 3, 1))


class PatchEmbed(nn.Module):
    """Patchify stem: zero-pad bottom/right to a multiple of the patch, p x p stride-p conv, LayerNorm."""

    def __init__(self, in_chans: int, embed_dim: int, patch_size: int = 4, norm_layer: Callable = nn.LayerNorm,
                 device=None, dtype=None):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.patch_size = to_2tuple(patch_size)
        self.proj = nn.Conv2d(in_chans, embed_dim, self.patch_size, stride=self.patch_size, **dd)
        self.norm = norm_layer(embed_dim, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_chans, H, W) -> (B, ceil(H/p), ceil(W/p), C)."""
        pad_h = -x.shape[2] % self.patch_size[0]
        pad_w = -x.shape[3] % self.patch_size[1]
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h))
        return self.norm(self.proj(x).permute(0, 2, 3, 1))


class ConvDownsampler(nn.Module):
    """NAT downsampler: 3x3 stride-2 conv C -> 2C without bias, then LayerNorm(2C)."""

    def __init__(self, dim: int, norm_layer: Callable = nn.LayerNorm, device=None, dtype=None):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.reduction = nn.Conv2d(dim, 2 * dim, 3, stride=2, padding=1, bias=False, **dd)
        self.norm = norm_layer(2 * dim, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, W, C) -> (B, ceil(H/2), ceil(W/2), 2C)."""
        return self.norm(self.reduction(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1))


class PatchMerging(nn.Module):
    """Swin-style merging used by DiNAT_s: pad to even size, concat 2x2 neighbours, LayerNorm(4C), Linear 4C -> 2C."""

    def __init__(self, dim: int, norm_layer: Callable = nn.LayerNorm, device=None, dtype=None):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.norm = norm_layer(4 * dim, **dd)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, W, C) -> (B, ceil(H/2), ceil(W/2), 2C)."""
        x = F.pad(x, (0, 0, 0, x.shape[2] % 2, 0, x.shape[1] % 2))
        # channel order [x00, x10, x01, x11] (row offset varies fastest), as the official weights expect
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)
        return self.reduction(self.norm(x))


class NATLevel(nn.Module):
    """One resolution level: `blocks` then an optional `downsample` (official NATBlock / BasicLayer)."""

    def __init__(self, blocks: List[nn.Module], downsample: Optional[nn.Module] = None):
        super().__init__()
        self.blocks = nn.Sequential(*blocks)
        self.downsample = downsample if downsample is not None else nn.Identity()
        self.grad_checkpointing = False

    def forward_blocks(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, W, C) -> (B, H, W, C), the level's feature map before downsampling."""
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint_seq(self.blocks, x)
        return self.blocks(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.downsample(self.forward_blocks(x))


def _per_layer(values: Optional[Sequence], depth: int, name: str, level: int) -> List:
    """Per-layer values of one level: None -> ones, else a list that must have `depth` entries."""
    if values is None:
        return [1] * depth
    values = list(values)
    if len(values) != depth:
        raise ValueError(f'{name}[{level}] has {len(values)} entries but level {level} has depth {depth}')
    return values


class _PooledClassifier(nn.Module):
    """What every model here shares: the input check in front of the stem (`patch_embed`), and the head: final
    LayerNorm (in `forward_features`), global pool, dropout, Linear.

    Keys `norm.*` and `head.*`, as in the official files.
    """

    def _init_head(self, in_chans: int, num_features: int, num_classes: int, global_pool: str, drop_rate: float,
                   norm_layer: Callable, dd: Dict) -> None:
        self.in_chans = in_chans
        self.num_classes = num_classes
        self.num_features = self.head_hidden_size = num_features
        self.output_fmt = 'NCHW'
        self.grad_checkpointing = False
        self.norm = norm_layer(num_features, **dd)
        self.global_pool = _pool(global_pool)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(num_features, num_classes, **dd) if num_classes > 0 else nn.Identity()

    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        return {name for name, _ in self.named_parameters() if name.endswith('rpb')}

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        self.num_classes = num_classes
        if global_pool is not None:
            self.global_pool = _pool(global_pool)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        """Checked (B, in_chans, H, W) images -> the stem's (B, h, w, C) map."""
        check_image_batch(x, self.in_chans, type(self).__name__)
        return self.patch_embed(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """(B, C, h, w) -> logits (B, num_classes), or pooled features (B, C) with pre_logits."""
        x = self.head_drop(self.global_pool(x))
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


class NAT(_PooledClassifier):
    """Hierarchical neighborhood attention transformer (NAT; DiNAT when `dilations` is given).

    Args:
        embed_dim: width C of level 0; level i has C * 2**i channels.
        depths: layers per level.
        num_heads: heads per level.
        kernel_size: odd neighbourhood size.
        dilations: per level, per layer dilation lists (DiNAT); None means dilation 1 everywhere (NAT).
        mlp_ratio: MLP hidden width / C.
        qkv_bias, qk_scale: attention projection bias and scale override.
        layer_scale: initial value of per-channel layer scale (`gamma1/2`), or None for no layer scale.
        num_classes, in_chans, global_pool, drop_rate: timm head / input conventions (drop_rate = head dropout).
        proj_drop_rate, attn_drop_rate, drop_path_rate: in-block dropouts and stochastic depth (linear rule).
        stem: 'conv' (two 3x3 stride-2 convs) or 'patch' (4x4 patchify).
        downsample: 'conv' (3x3 stride-2 conv + LN) or 'merge' (Swin patch merging).
    """
    stage_prefix = 'levels'

    def __init__(
            self,
            embed_dim: int = 64,
            depths: Sequence[int] = (3, 4, 6, 5),
            num_heads: Sequence[int] = (2, 4, 8, 16),
            kernel_size: int = 7,
            dilations: Optional[Sequence[Sequence[int]]] = None,
            mlp_ratio: float = 3.,
            qkv_bias: bool = True,
            qk_scale: Optional[float] = None,
            layer_scale: Optional[float] = None,
            num_classes: int = 1000,
            in_chans: int = 3,
            global_pool: str = 'avg',
            drop_rate: float = 0.,
            proj_drop_rate: float = 0.,
            attn_drop_rate: float = 0.,
            drop_path_rate: float = 0.2,
            stem: str = 'conv',
            downsample: str = 'conv',
            norm_layer: Callable = nn.LayerNorm,
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        if len(depths) != len(num_heads):
            raise ValueError(f'depths {tuple(depths)} and num_heads {tuple(num_heads)} differ in length')
        if dilations is not None and len(dilations) != len(depths):
            raise ValueError(f'dilations has {len(dilations)} levels but depths has {len(depths)}')
        if stem not in ('conv', 'patch') or downsample not in ('conv', 'merge'):
            raise ValueError(f"stem must be 'conv'|'patch' and downsample 'conv'|'merge', got {stem!r}, {downsample!r}")
        self.num_levels = len(depths)
        self._init_head(in_chans, int(embed_dim * 2 ** (self.num_levels - 1)), num_classes, global_pool, drop_rate,
                        norm_layer, dd)

        if stem == 'conv':
            self.patch_embed = ConvTokenizer(in_chans, embed_dim, norm_layer, **dd)
        else:
            self.patch_embed = PatchEmbed(in_chans, embed_dim, 4, norm_layer, **dd)
        downsample_layer = ConvDownsampler if downsample == 'conv' else PatchMerging

        drop_path_rates = calculate_drop_path_rates(drop_path_rate, sum(depths))
        levels = []
        self.feature_info = []
        for i, depth in enumerate(depths):
            dim = int(embed_dim * 2 ** i)
            level_dilations = _per_layer(None if dilations is None else dilations[i], depth, 'dilations', i)
            blocks = [
                NATLayer(
                    dim,
                    NeighborhoodAttention2d(dim, num_heads[i], kernel_size, level_dilations[j], qkv_bias, qk_scale,
                                            attn_drop_rate, proj_drop_rate, **dd),
                    mlp_ratio=mlp_ratio,
                    proj_drop=proj_drop_rate,
                    drop_path=drop_path_rates[sum(depths[:i]) + j],
                    layer_scale=layer_scale,
                    norm_layer=norm_layer,
                    **dd,
                )
                for j in range(depth)
            ]
            down = downsample_layer(dim, norm_layer, **dd) if i < self.num_levels - 1 else None
            levels.append(NATLevel(blocks, down))
            self.feature_info.append(dict(num_chs=dim, reduction=4 * 2 ** i, module=f'{self.stage_prefix}.{i}'))
        self.add_module(self.stage_prefix, nn.ModuleList(levels))
        self.apply(_init_weights)

    @property
    def stages(self) -> nn.ModuleList:
        return getattr(self, self.stage_prefix)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict:
        prefix = self.stage_prefix
        return dict(
            stem=r'^patch_embed',
            blocks=rf'^{prefix}\.(\d+)' if coarse else [
                (rf'^{prefix}\.(\d+)\.downsample', (0,)),
                (rf'^{prefix}\.(\d+)\.blocks\.(\d+)', None),
                (r'^norm', (99999,)),
            ],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable
        for level in self.stages:
            level.grad_checkpointing = enable

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Level outputs before each downsampler (the official `features.i`), strides 4, 8, 16, 32.

        Args:
            x: (B, in_chans, H, W) images.
            indices: levels to return (int = last n, list = absolute or negative indices, None = all).
            norm: apply the final norm to the last level's output.
            stop_early: skip the levels after the last requested one.
            output_fmt: 'NCHW' or 'NHWC'.
            intermediates_only: return only the list.
        """
        if output_fmt not in ('NCHW', 'NHWC'):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NHWC', got {output_fmt!r}")
        take_indices, max_index = feature_take_indices(self.num_levels, indices)
        levels = self.stages[:max_index + 1] if stop_early else self.stages
        intermediates = []
        x = self._embed(x)
        for i, level in enumerate(levels):
            x = level.forward_blocks(x)
            if i in take_indices:
                feat = self.norm(x) if norm and i == self.num_levels - 1 else x
                intermediates.append(feat.permute(0, 3, 1, 2) if output_fmt == 'NCHW' else feat)
            x = level.downsample(x)
        if intermediates_only:
            return intermediates
        return self.norm(x).permute(0, 3, 1, 2), intermediates

    def prune_intermediate_layers(self, indices: Union[int, List[int]] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> List[int]:
        """Drop the levels after the last requested one (and its downsampler); returns absolute indices."""
        take_indices, max_index = feature_take_indices(self.num_levels, indices)
        kept = self.stages[:max_index + 1]
        kept[-1].downsample = nn.Identity()
        self.add_module(self.stage_prefix, kept)
        self.num_levels = len(kept)
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0, '')
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_chans, H, W) -> (B, num_features, ceil(H/32), ceil(W/32)), final norm applied."""
        x = self._embed(x)
        for level in self.stages:
            x = level(x)
        return self.norm(x).permute(0, 3, 1, 2)


class DiNATs(NAT):
    """DiNAT_s: the Swin-like DiNAT variant (4x4 patchify stem, patch merging, mlp 4, no layer scale).

    Identical to `NAT` except for its defaults and its official key prefix `layers.*`.
    """
    stage_prefix = 'layers'

    def __init__(self, embed_dim: int = 96, depths: Sequence[int] = (2, 2, 6, 2),
                 num_heads: Sequence[int] = (3, 6, 12, 24), mlp_ratio: float = 4., stem: str = 'patch',
                 downsample: str = 'merge', **kwargs):
        super().__init__(embed_dim=embed_dim, depths=depths, num_heads=num_heads, mlp_ratio=mlp_ratio, stem=stem,
                         downsample=downsample, **kwargs)


class NATIsotropic(_PooledClassifier):
    """Isotropic (ViT-like, no downsampling) NAT / DiNAT, and the ViT+RPB baseline when kernel_size is None.

    Layer i uses dilation 1 when i is even and `dilation` when odd. NA variants accept any input size (the
    map is padded up to the window when smaller); the ViT+RPB baseline needs exactly `img_size`.
    """

    def __init__(
            self,
            img_size: Union[int, Tuple[int, int]] = 224,
            patch_size: int = 16,
            embed_dim: int = 384,
            depth: int = 12,
            num_heads: int = 12,
            mlp_ratio: float = 4.,
            qkv_bias: bool = True,
            qk_scale: Optional[float] = None,
            kernel_size: Optional[int] = 7,
            dilation: Optional[int] = 2,
            num_classes: int = 1000,
            in_chans: int = 3,
            global_pool: str = 'avg',
            drop_rate: float = 0.,
            proj_drop_rate: float = 0.,
            attn_drop_rate: float = 0.,
            drop_path_rate: float = 0.1,
            norm_layer: Callable = nn.LayerNorm,
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self._init_head(in_chans, embed_dim, num_classes, global_pool, drop_rate, norm_layer, dd)
        self.patch_embed = PatchEmbed(in_chans, embed_dim, patch_size, norm_layer, **dd)
        grid = tuple(size // patch_size for size in to_2tuple(img_size))
        if kernel_size is None and grid[0] != grid[1]:
            raise ValueError(f'the ViT+RPB baseline needs a square img_size, got {img_size}')
        drop_path_rates = calculate_drop_path_rates(drop_path_rate, depth)
        layers = []
        for i in range(depth):
            if kernel_size is None:
                attn = GlobalAttentionRPB(embed_dim, num_heads, grid[0], qkv_bias, qk_scale,
                                          attn_drop_rate, proj_drop_rate, **dd)
            else:
                attn = NeighborhoodAttention2d(embed_dim, num_heads, kernel_size, 1 if i % 2 == 0 else dilation,
                                               qkv_bias, qk_scale, attn_drop_rate, proj_drop_rate, **dd)
            layers.append(NATLayer(embed_dim, attn, mlp_ratio, proj_drop_rate, drop_path_rates[i],
                                   norm_layer=norm_layer, **dd))
        self.layers = nn.Sequential(*layers)
        self.feature_info = [dict(num_chs=embed_dim, reduction=patch_size, module=f'layers.{i}') for i in range(depth)]
        self.apply(_init_weights)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict:
        return dict(stem=r'^patch_embed', blocks=[(r'^layers\.(\d+)', None), (r'^norm', (99999,))])

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Outputs of the requested layers (stride = patch size); arguments as in `NAT.forward_intermediates`."""
        if output_fmt not in ('NCHW', 'NHWC'):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NHWC', got {output_fmt!r}")
        take_indices, max_index = feature_take_indices(len(self.layers), indices)
        layers = self.layers[:max_index + 1] if stop_early else self.layers
        intermediates = []
        x = self._embed(x)
        for i, layer in enumerate(layers):
            x = layer(x)
            if i in take_indices:
                feat = self.norm(x) if norm else x
                intermediates.append(feat.permute(0, 3, 1, 2) if output_fmt == 'NCHW' else feat)
        if intermediates_only:
            return intermediates
        return self.norm(x).permute(0, 3, 1, 2), intermediates

    def prune_intermediate_layers(self, indices: Union[int, List[int]] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> List[int]:
        take_indices, max_index = feature_take_indices(len(self.layers), indices)
        self.layers = self.layers[:max_index + 1]
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0, '')
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_chans, H, W) -> (B, embed_dim, ceil(H/p), ceil(W/p)), final norm applied."""
        x = self._embed(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            x = checkpoint_seq(self.layers, x)
        else:
            x = self.layers(x)
        return self.norm(x).permute(0, 3, 1, 2)


def _pool(pool_type: str) -> SelectAdaptivePool2d:
    """Global pooling of an NCHW map; pool_type '' keeps the map (and does not flatten it)."""
    return SelectAdaptivePool2d(pool_type=pool_type, flatten=bool(pool_type))


def _init_weights(module: nn.Module) -> None:
    """Official init: Linear trunc-normal(0.02) with zero bias, LayerNorm 1/0; convs keep PyTorch's default."""
    if isinstance(module, nn.Linear):
        trunc_normal_(module.weight, std=.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def _resize_rpb(rpb: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Bicubic resize of a (heads, 2k-1, 2k-1) bias table, as the official 11x11 DiNAT-L weights were made."""
    resized = F.interpolate(rpb[None].float(), size=tuple(shape[-2:]), mode='bicubic', align_corners=False)
    return resized[0].to(rpb.dtype)


def checkpoint_filter_fn(state_dict: Dict[str, torch.Tensor], model: nn.Module) -> Dict[str, torch.Tensor]:
    """Official NAT / DiNAT / DiNAT_s / isotropic checkpoint -> this model's state dict.

    Accepts a raw state dict (the official format) or a wrapped one (`unwrap_state_dict`). Relative position bias
    tables of another kernel size are resized bicubically; everything else must already match (strict loading
    then names any missing or unexpected key).
    """
    own = model.state_dict()
    out = {}
    for key, value in unwrap_state_dict(state_dict).items():
        target = own.get(key)
        if key.endswith('attn.rpb') and target is not None and target.shape != value.shape \
                and target.shape[0] == value.shape[0] and not value.is_meta:
            value = _resize_rpb(value, target.shape)
        out[key] = value
    return out


def _create(model_cls: type, variant: str, pretrained: bool = False, **kwargs) -> nn.Module:
    default_out = 3 if model_cls is NATIsotropic else (0, 1, 2, 3)
    return create_model(model_cls, variant, pretrained, checkpoint_filter_fn, default_out, **kwargs)


_NAT_PAPER = dict(paper_ids='arXiv:2204.07143', paper_name='Neighborhood Attention Transformer')
_DINAT_PAPER = dict(paper_ids='arXiv:2209.15001', paper_name='Dilated Neighborhood Attention Transformer')
_NAT_URL = 'https://shi-labs.com/projects/nat/checkpoints/CLS/'
_DINAT_URL = 'https://shilab.cs.uoregon.edu/projects/dinat/checkpoints/'


def _cfg(url: str = '', **kwargs) -> Dict:
    return imagenet_cfg(**{
        'url': url,
        'first_conv': 'patch_embed.proj.0',
        'classifier': 'head',
        'license': 'mit',
        'origin_url': 'https://github.com/SHI-Labs/Neighborhood-Attention-Transformer',
        **kwargs,
    })


def _dinat_cfg(url: str = '', **kwargs) -> Dict:
    return _cfg(url, **{**_DINAT_PAPER, **kwargs})


def _swinlike_cfg(url: str = '', **kwargs) -> Dict:
    return _dinat_cfg(url, **{'first_conv': 'patch_embed.proj', **kwargs})


def _isotropic_cfg(url: str = '', **kwargs) -> Dict:
    return _swinlike_cfg(url, **{'pool_size': (14, 14), **kwargs})


_384 = dict(input_size=(3, 384, 384), pool_size=(12, 12), crop_pct=1.0)

default_cfgs = generate_default_cfgs({
    'nat_mini.in1k': _cfg(_NAT_URL + 'nat_mini.pth', **_NAT_PAPER),
    'nat_tiny.in1k': _cfg(_NAT_URL + 'nat_tiny.pth', **_NAT_PAPER),
    'nat_small.in1k': _cfg(_NAT_URL + 'nat_small.pth', **_NAT_PAPER),
    'nat_base.in1k': _cfg(_NAT_URL + 'nat_base.pth', **_NAT_PAPER),

    'dinat_mini.in1k': _dinat_cfg(_DINAT_URL + 'imagenet1k/dinat_mini_in1k_224.pth'),
    'dinat_tiny.in1k': _dinat_cfg(_DINAT_URL + 'imagenet1k/dinat_tiny_in1k_224.pth'),
    'dinat_small.in1k': _dinat_cfg(_DINAT_URL + 'imagenet1k/dinat_small_in1k_224.pth'),
    'dinat_base.in1k': _dinat_cfg(_DINAT_URL + 'imagenet1k/dinat_base_in1k_224.pth'),
    'dinat_large.in22k_ft_in1k': _dinat_cfg(_DINAT_URL + 'imagenet1k/dinat_large_in22k_in1k_224.pth'),
    'dinat_large_384.in22k_ft_in1k': _dinat_cfg(_DINAT_URL + 'imagenet1k/dinat_large_in22k_in1k_384.pth', **_384),
    'dinat_large_384_11x11.in22k_ft_in1k': _dinat_cfg(
        _DINAT_URL + 'imagenet1k/dinat_large_in22k_in1k_384_11x11.pth', **_384),
    # The official 22K factories build a 1000-class head; the checkpoints need num_classes=21841 (see README).
    'dinat_large_21k.in22k': _dinat_cfg(_DINAT_URL + 'imagenet22k/dinat_large_in22k_224.pth'),
    'dinat_large_21k_11x11.in22k': _dinat_cfg(_DINAT_URL + 'imagenet22k/dinat_large_in22k_224_11x11interp.pth'),

    'dinat_s_tiny.in1k': _swinlike_cfg(_DINAT_URL + 'imagenet1k/dinat_s_tiny_in1k_224.pth'),
    'dinat_s_small.in1k': _swinlike_cfg(_DINAT_URL + 'imagenet1k/dinat_s_small_in1k_224.pth'),
    'dinat_s_base.in1k': _swinlike_cfg(_DINAT_URL + 'imagenet1k/dinat_s_base_in1k_224.pth'),
    'dinat_s_large.in22k_ft_in1k': _swinlike_cfg(_DINAT_URL + 'imagenet1k/dinat_s_large_in1k_224.pth'),
    'dinat_s_large_384.in22k_ft_in1k': _swinlike_cfg(_DINAT_URL + 'imagenet1k/dinat_s_large_in1k_384.pth', **_384),
    'dinat_s_large_21k.in22k': _swinlike_cfg(_DINAT_URL + 'imagenet22k/dinat_s_large_in22k_224.pth'),

    'nat_isotropic_small.in1k': _isotropic_cfg(_DINAT_URL + 'isotropic/nat_isotropic_small_in1k_224.pth'),
    'nat_isotropic_base.in1k': _isotropic_cfg(_DINAT_URL + 'isotropic/nat_isotropic_base_in1k_224.pth'),
    'dinat_isotropic_small.in1k': _isotropic_cfg(_DINAT_URL + 'isotropic/dinat_isotropic_small_in1k_224.pth'),
    'dinat_isotropic_base.in1k': _isotropic_cfg(_DINAT_URL + 'isotropic/dinat_isotropic_base_in1k_224.pth'),
    'vitrpb_small.in1k': _isotropic_cfg(_DINAT_URL + 'isotropic/vitrpb_small_in1k_224.pth', fixed_input_size=True),
    'vitrpb_base.in1k': _isotropic_cfg(_DINAT_URL + 'isotropic/vitrpb_base_in1k_224.pth', fixed_input_size=True),
})


def _alternate(first: int, second: int, length: int) -> List[int]:
    """[first, second, first, second, ...] of the given length."""
    return [first if i % 2 == 0 else second for i in range(length)]


def _dinat_dilations(depths: Sequence[int], stage1: int, stage2: int, stage3: int) -> List[List[int]]:
    """Official classification pattern: [1, d1, 1, ...], [1, d2, 1, d2, ...], alternating 1/d3, then all 1."""
    return [_alternate(1, stage1, depths[0]), _alternate(1, stage2, depths[1]), _alternate(1, stage3, depths[2]),
            [1] * depths[3]]


_MINI = dict(embed_dim=64, depths=(3, 4, 6, 5), num_heads=(2, 4, 8, 16), mlp_ratio=3.)
_TINY = dict(embed_dim=64, depths=(3, 4, 18, 5), num_heads=(2, 4, 8, 16), mlp_ratio=3.)
_SMALL = dict(embed_dim=96, depths=(3, 4, 18, 5), num_heads=(3, 6, 12, 24), mlp_ratio=2.)
_BASE = dict(embed_dim=128, depths=(3, 4, 18, 5), num_heads=(4, 8, 16, 32), mlp_ratio=2.)
_LARGE = dict(embed_dim=192, depths=(3, 4, 18, 5), num_heads=(6, 12, 24, 48), mlp_ratio=2.)
_DILATIONS_224 = _dinat_dilations(_TINY['depths'], 8, 4, 2)
_DILATIONS_384 = _dinat_dilations(_TINY['depths'], 13, 6, 3)


@register_model
def nat_mini(pretrained: bool = False, **kwargs) -> NAT:
    return _create(NAT, 'nat_mini', pretrained, **dict(dict(_MINI, drop_path_rate=0.2), **kwargs))


@register_model
def nat_tiny(pretrained: bool = False, **kwargs) -> NAT:
    return _create(NAT, 'nat_tiny', pretrained, **dict(dict(_TINY, drop_path_rate=0.2), **kwargs))


@register_model
def nat_small(pretrained: bool = False, **kwargs) -> NAT:
    return _create(NAT, 'nat_small', pretrained, **dict(dict(_SMALL, drop_path_rate=0.3, layer_scale=1e-5), **kwargs))


@register_model
def nat_base(pretrained: bool = False, **kwargs) -> NAT:
    return _create(NAT, 'nat_base', pretrained, **dict(dict(_BASE, drop_path_rate=0.5, layer_scale=1e-5), **kwargs))


@register_model
def dinat_mini(pretrained: bool = False, **kwargs) -> NAT:
    args = dict(_MINI, drop_path_rate=0.2, dilations=_dinat_dilations(_MINI['depths'], 8, 4, 2))
    return _create(NAT, 'dinat_mini', pretrained, **dict(args, **kwargs))


@register_model
def dinat_tiny(pretrained: bool = False, **kwargs) -> NAT:
    args = dict(_TINY, drop_path_rate=0.2, dilations=_DILATIONS_224)
    return _create(NAT, 'dinat_tiny', pretrained, **dict(args, **kwargs))


@register_model
def dinat_small(pretrained: bool = False, **kwargs) -> NAT:
    # no layer scale, unlike nat_small (official choice)
    args = dict(_SMALL, drop_path_rate=0.3, dilations=_DILATIONS_224)
    return _create(NAT, 'dinat_small', pretrained, **dict(args, **kwargs))


@register_model
def dinat_base(pretrained: bool = False, **kwargs) -> NAT:
    args = dict(_BASE, drop_path_rate=0.5, layer_scale=1e-5, dilations=_DILATIONS_224)
    return _create(NAT, 'dinat_base', pretrained, **dict(args, **kwargs))


@register_model
def dinat_large(pretrained: bool = False, **kwargs) -> NAT:
    args = dict(_LARGE, drop_path_rate=0.35, dilations=_DILATIONS_224)
    return _create(NAT, 'dinat_large', pretrained, **dict(args, **kwargs))


@register_model
def dinat_large_384(pretrained: bool = False, **kwargs) -> NAT:
    args = dict(_LARGE, drop_path_rate=0.35, dilations=_DILATIONS_384)
    return _create(NAT, 'dinat_large_384', pretrained, **dict(args, **kwargs))


@register_model
def dinat_large_384_11x11(pretrained: bool = False, **kwargs) -> NAT:
    args = dict(_LARGE, drop_path_rate=0.35, kernel_size=11, dilations=_DILATIONS_224)
    return _create(NAT, 'dinat_large_384_11x11', pretrained, **dict(args, **kwargs))


@register_model
def dinat_large_21k(pretrained: bool = False, **kwargs) -> NAT:
    args = dict(_LARGE, drop_path_rate=0.2, dilations=_DILATIONS_224)
    return _create(NAT, 'dinat_large_21k', pretrained, **dict(args, **kwargs))


@register_model
def dinat_large_21k_11x11(pretrained: bool = False, **kwargs) -> NAT:
    args = dict(_LARGE, drop_path_rate=0.2, kernel_size=11, dilations=_DILATIONS_224)
    return _create(NAT, 'dinat_large_21k_11x11', pretrained, **dict(args, **kwargs))


def _dinat_s_dilations(stage3_depth: int, stage1: int, stage2: int, stage3: int) -> List[List[int]]:
    return [[1, stage1], [1, stage2], _alternate(1, stage3, stage3_depth), [1, 1]]


@register_model
def dinat_s_tiny(pretrained: bool = False, **kwargs) -> DiNATs:
    args = dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), drop_path_rate=0.2,
                dilations=_dinat_s_dilations(6, 8, 4, 2))
    return _create(DiNATs, 'dinat_s_tiny', pretrained, **dict(args, **kwargs))


@register_model
def dinat_s_small(pretrained: bool = False, **kwargs) -> DiNATs:
    args = dict(embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24), drop_path_rate=0.3,
                dilations=_dinat_s_dilations(18, 8, 4, 2))
    return _create(DiNATs, 'dinat_s_small', pretrained, **dict(args, **kwargs))


@register_model
def dinat_s_base(pretrained: bool = False, **kwargs) -> DiNATs:
    args = dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32), drop_path_rate=0.5,
                dilations=_dinat_s_dilations(18, 8, 4, 2))
    return _create(DiNATs, 'dinat_s_base', pretrained, **dict(args, **kwargs))


@register_model
def dinat_s_large(pretrained: bool = False, **kwargs) -> DiNATs:
    args = dict(embed_dim=192, depths=(2, 2, 18, 2), num_heads=(6, 12, 24, 48), drop_path_rate=0.35,
                dilations=_dinat_s_dilations(18, 8, 4, 2))
    return _create(DiNATs, 'dinat_s_large', pretrained, **dict(args, **kwargs))


@register_model
def dinat_s_large_384(pretrained: bool = False, **kwargs) -> DiNATs:
    args = dict(embed_dim=192, depths=(2, 2, 18, 2), num_heads=(6, 12, 24, 48), drop_path_rate=0.35,
                dilations=_dinat_s_dilations(18, 13, 6, 3))
    return _create(DiNATs, 'dinat_s_large_384', pretrained, **dict(args, **kwargs))


@register_model
def dinat_s_large_21k(pretrained: bool = False, **kwargs) -> DiNATs:
    args = dict(embed_dim=192, depths=(2, 2, 18, 2), num_heads=(6, 12, 24, 48), drop_path_rate=0.2,
                dilations=_dinat_s_dilations(18, 8, 4, 2))
    return _create(DiNATs, 'dinat_s_large_21k', pretrained, **dict(args, **kwargs))


_ISO_SMALL = dict(embed_dim=384, depth=12, num_heads=12, drop_path_rate=0.1)
_ISO_BASE = dict(embed_dim=768, depth=12, num_heads=24, drop_path_rate=0.4)


@register_model
def nat_isotropic_small(pretrained: bool = False, **kwargs) -> NATIsotropic:
    return _create(NATIsotropic, 'nat_isotropic_small', pretrained, **dict(dict(_ISO_SMALL, dilation=1), **kwargs))


@register_model
def nat_isotropic_base(pretrained: bool = False, **kwargs) -> NATIsotropic:
    return _create(NATIsotropic, 'nat_isotropic_base', pretrained, **dict(dict(_ISO_BASE, dilation=1), **kwargs))


@register_model
def dinat_isotropic_small(pretrained: bool = False, **kwargs) -> NATIsotropic:
    return _create(NATIsotropic, 'dinat_isotropic_small', pretrained, **dict(dict(_ISO_SMALL, dilation=2), **kwargs))


@register_model
def dinat_isotropic_base(pretrained: bool = False, **kwargs) -> NATIsotropic:
    return _create(NATIsotropic, 'dinat_isotropic_base', pretrained, **dict(dict(_ISO_BASE, dilation=2), **kwargs))


@register_model
def vitrpb_small(pretrained: bool = False, **kwargs) -> NATIsotropic:
    args = dict(_ISO_SMALL, kernel_size=None, dilation=None)
    return _create(NATIsotropic, 'vitrpb_small', pretrained, **dict(args, **kwargs))


@register_model
def vitrpb_base(pretrained: bool = False, **kwargs) -> NATIsotropic:
    args = dict(_ISO_BASE, kernel_size=None, dilation=None)
    return _create(NATIsotropic, 'vitrpb_base', pretrained, **dict(args, **kwargs))
