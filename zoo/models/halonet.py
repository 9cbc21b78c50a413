"""HaloNet H0-H7: ResNet-style bottleneck networks with halo attention in all four stages.

Paper: Scaling Local Self-Attention for Parameter Efficient Visual Backbones (Vaswani, Ramachandran, Srinivas,
Parmar, Hechtman, Shlens; CVPR 2021), https://arxiv.org/abs/2103.12731.
No official code or weights exist. The H0-H7 hyper-parameters (b, h, rv, rb, l3, df, image size) come from two
agreeing transcriptions of the paper's table; under the reading below they reproduce every published parameter
count within 1%:

* stem: 7x7 stride-2 conv (64) + BN + ReLU, 3x3 stride-2 max pool;
* stages of base width w = 64, 128, 256, 512 with depths (3, 3, l3, 3) and 4, 8, 8, 8 heads;
* block: 1x1 conv in -> w; halo attention with q and k of width w and **v of width rv * w** (strided queries
  when the block downsamples); BN + ReLU; 1x1 conv rv * w -> rb * w + BN; projection shortcut (1x1 conv + BN,
  strided) where shape changes; add, ReLU;
* optional final 1x1 conv to df + BN + ReLU; global average pool; FC.

timm's ByobNet cannot widen the value alone (its `SelfAttnBlock` widens q, k and v together), hence this file.
Module names follow timm's ByobNet (`stem.conv1`, `stages.i.j.{conv1_1x1, self_attn, post_attn, conv3_1x1,
shortcut}`, `head.fc`), so timm's untrained `halonet_h1` state dict loads into `halonet_paper_h1` built with
num_heads=(8, 8, 8, 8) (timm uses 8 heads everywhere) and computes the same function.

timm owns `halonet_h1` and other `halonet*` names: ours are `halonet_paper_h0` ... `halonet_paper_h7`.
"""
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from timm.layers import BatchNormAct2d, ClassifierHead, ConvNormAct, DropPath, calculate_drop_path_rates
from timm.models import checkpoint_seq, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices

from zoo.layers.halo_attn import HaloAttention
from zoo.models._checkpoint import unwrap_state_dict
from zoo.models._factory import check_image_batch, create_model, imagenet_cfg

__all__ = ['HaloNet']


class HaloBottleneck(nn.Module):
    """1x1 conv -> halo attention (v widened by rv) -> BN/ReLU -> 1x1 conv -> BN, plus shortcut, ReLU.

    Args:
        in_chs: input channels.
        width: q/k width w (also the 1x1 reduction width).
        value_width: v width rv * w (the attention output).
        out_chs: block output rb * w.
        stride: 1, or 2 for strided queries.
        num_heads, block_size, halo_size, border: halo attention settings.
        drop_path: stochastic depth rate.
    """

    def __init__(self, in_chs: int, width: int, value_width: int, out_chs: int, stride: int, num_heads: int,
                 block_size: int, halo_size: int, border: str = 'zeros', drop_path: float = 0., device=None,
                 dtype=None):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        if width % num_heads:
            raise ValueError(f'stage width {width} is not divisible by num_heads {num_heads}')
        self.shortcut = None
        if in_chs != out_chs or stride != 1:
            self.shortcut = ConvNormAct(in_chs, out_chs, 1, stride=stride, apply_act=False, **dd)
        self.conv1_1x1 = ConvNormAct(in_chs, width, 1, **dd)
        self.self_attn = HaloAttention(width, dim_out=value_width, stride=stride, num_heads=num_heads,
                                       dim_head=width // num_heads, block_size=block_size, halo_size=halo_size,
                                       border=border, **dd)
        self.post_attn = BatchNormAct2d(value_width, **dd)
        self.conv3_1x1 = ConvNormAct(value_width, out_chs, 1, apply_act=False, **dd)
        self.drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_chs, H, W) -> (B, out_chs, H/stride, W/stride)."""
        shortcut = x if self.shortcut is None else self.shortcut(x)
        x = self.conv3_1x1(self.post_attn(self.self_attn(self.conv1_1x1(x))))
        return self.act(self.drop_path(x) + shortcut)


class Stem(nn.Module):
    """7x7 stride-2 conv + BN + ReLU, then a 3x3 stride-2 max pool: stride 4."""

    def __init__(self, in_chans: int, out_chs: int, device=None, dtype=None):
        super().__init__()
        self.conv1 = ConvNormAct(in_chans, out_chs, 7, stride=2, device=device, dtype=dtype)
        self.pool = nn.MaxPool2d(3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_chans, H, W) -> (B, out_chs, H/4, W/4) for H, W divisible by 4."""
        return self.pool(self.conv1(x))


class HaloNet(nn.Module):
    """HaloNet (paper H-series).

    Args:
        block_size: query block b of every stage.
        halo_size: halo h (window b + 2h).
        rv: value-width multiplier (v has rv * w channels, q and k w).
        rb: block-output multiplier (blocks output rb * w channels).
        depths: blocks per stage; the paper varies only stage 3 (l3).
        final_chs: width df of the final 1x1 conv, or None for none.
        widths: stage base widths w.
        num_heads: heads per stage.
        stem_chs: stem width.
        border: halo border rule, 'zeros' (timm's and the paper's zero-padded halo) or 'mask'.
        num_classes, in_chans, global_pool, drop_rate, drop_path_rate: timm conventions.
    """

    def __init__(
            self,
            block_size: int = 8,
            halo_size: int = 3,
            rv: float = 1.0,
            rb: float = 1.0,
            depths: Sequence[int] = (3, 3, 10, 3),
            final_chs: Optional[int] = None,
            widths: Sequence[int] = (64, 128, 256, 512),
            num_heads: Sequence[int] = (4, 8, 8, 8),
            stem_chs: int = 64,
            border: str = 'zeros',
            num_classes: int = 1000,
            in_chans: int = 3,
            global_pool: str = 'avg',
            drop_rate: float = 0.,
            drop_path_rate: float = 0.,
            zero_init_last: bool = True,
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        if not len(depths) == len(widths) == len(num_heads) == 4:
            raise ValueError(f'depths, widths and num_heads need 4 stages, got {tuple(depths)}, {tuple(widths)}, '
                             f'{tuple(num_heads)}')
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.block_size = block_size
        self.drop_rate = drop_rate
        self.grad_checkpointing = False
        self.stem = Stem(in_chans, stem_chs, **dd)
        dpr = iter(calculate_drop_path_rates(drop_path_rate, list(depths)))  # linear over all blocks
        stages, self.feature_info = [], []
        in_chs = stem_chs
        for i, (depth, width, heads) in enumerate(zip(depths, widths, num_heads)):
            value_width, out_chs = _scaled(width, rv, 'rv'), _scaled(width, rb, 'rb')
            blocks = []
            for j in range(depth):
                blocks.append(HaloBottleneck(
                    in_chs, width, value_width, out_chs, stride=2 if i > 0 and j == 0 else 1, num_heads=heads,
                    block_size=block_size, halo_size=halo_size, border=border, drop_path=next(dpr), **dd))
                in_chs = out_chs
            stages.append(nn.Sequential(*blocks))
            self.feature_info.append(dict(num_chs=out_chs, reduction=4 * 2 ** i, module=f'stages.{i}'))
        self.stages = nn.Sequential(*stages)
        self.final_conv = ConvNormAct(in_chs, final_chs, 1, **dd) if final_chs else nn.Identity()
        self.num_features = self.head_hidden_size = final_chs or in_chs
        self.head = ClassifierHead(self.num_features, num_classes, pool_type=global_pool, drop_rate=drop_rate,
                                   **dd)
        self._init_weights(zero_init_last)

    def _init_weights(self, zero_init_last: bool) -> None:
        """ResNet init: convs He-normal (fan out), BN 1/0, the last BN of each block 0 (blocks start as identity
        maps on their shortcut); halo attention keeps timm's init; Linear trunc-normal via timm's head default."""
        for name, module in self.named_modules():
            if isinstance(module, nn.Conv2d) and '.self_attn.' not in f'.{name}.':
                nn.init.kaiming_normal_(module.weight, mode='fan_out', nonlinearity='relu')
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        if zero_init_last:
            for module in self.modules():
                if isinstance(module, HaloBottleneck):
                    nn.init.zeros_(module.conv3_1x1.bn.weight)

    def check_input(self, x: torch.Tensor) -> None:
        """Raise ValueError unless x is a floating-point (B, in_chans, H, W) with H, W divisible by 32.

        Every stage map is then whole (stride 32); a map that the blocked attention cannot tile exactly (sizes not
        divisible by 32 * block_size) is zero-padded inside each attention layer and cropped back
        (zoo.layers.halo_attn.HaloAttention), so detection and segmentation sizes work too.
        """
        check_image_batch(x, self.in_chans, 'HaloNet')
        if x.shape[2] % 32 or x.shape[3] % 32:
            raise ValueError(f'halonet needs H and W divisible by 32, got {x.shape[2]}x{x.shape[3]}')

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict:
        return dict(
            stem=r'^stem',
            blocks=r'^stages\.(\d+)' if coarse else [
                (r'^stages\.(\d+)\.(\d+)', None),
                (r'^final_conv', (99999,)),
            ],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        """The relative position tables (position embeddings are usually not decayed)."""
        return {name for name, _ in self.named_parameters() if name.endswith(('height_rel', 'width_rel'))}

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        self.num_classes = num_classes
        self.head.reset(num_classes, pool_type=global_pool)

    def _run_stage(self, stage: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint_seq(stage, x)
        return stage(x)

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Stage outputs (before the final conv), strides 4, 8, 16, 32.

        Args:
            x: (B, in_chans, H, W) images.
            indices: stages to return (int = last n, list = absolute or negative indices, None = all).
            norm: unused (HaloNet has no final norm; kept for the timm signature).
            stop_early: skip the stages after the last requested one.
            output_fmt: 'NCHW' or 'NHWC'.
            intermediates_only: return only the list.
        """
        if output_fmt not in ('NCHW', 'NHWC'):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NHWC', got {output_fmt!r}")
        self.check_input(x)
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        stages = self.stages[:max_index + 1] if stop_early else self.stages
        intermediates = []
        x = self.stem(x)
        for i, stage in enumerate(stages):
            x = self._run_stage(stage, x)
            if i in take_indices:
                intermediates.append(x if output_fmt == 'NCHW' else x.permute(0, 2, 3, 1))
        if intermediates_only:
            return intermediates
        return self.final_conv(x), intermediates

    def prune_intermediate_layers(self, indices: Union[int, List[int]] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> List[int]:
        """Drop the stages after the last requested one, and the final conv, which only feeds the head (the
        features are the stage outputs); returns absolute indices."""
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        self.stages = self.stages[:max_index + 1]
        if max_index < 3 or prune_head:
            self.final_conv = nn.Identity()
        if prune_head:
            self.reset_classifier(0, '')
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_chans, H, W) -> (B, num_features, H/32, W/32); H, W divisible by 32."""
        self.check_input(x)
        x = self.stem(x)
        for stage in self.stages:
            x = self._run_stage(stage, x)
        return self.final_conv(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """(B, num_features, h, w) -> logits (B, num_classes), or pooled features with pre_logits."""
        return self.head(x, pre_logits=pre_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _scaled(width: int, ratio: float, name: str) -> int:
    """width * ratio, which must be a whole number of channels."""
    channels = width * ratio
    if channels != int(channels) or channels < 1:
        raise ValueError(f'{name} = {ratio} gives {channels} channels for stage width {width}; need a whole number')
    return int(channels)


def checkpoint_filter_fn(state_dict: Dict[str, torch.Tensor], model: nn.Module) -> Dict[str, torch.Tensor]:
    """A HaloNet state dict (this model's, or timm's ByobNet HaloNet layout, which uses the same names) ->
    this model's state dict.

    Accepts a raw state dict or a wrapped one (`unwrap_state_dict`). No official checkpoint exists, so there is
    no other layout to convert.
    """
    return unwrap_state_dict(state_dict)


def _create(variant: str, pretrained: bool = False, **kwargs) -> HaloNet:
    return create_model(HaloNet, variant, pretrained, checkpoint_filter_fn, (0, 1, 2, 3), **kwargs)


_NO_WEIGHTS = ('No official HaloNet code or weights exist (paper-only; timm has only an untrained halonet_h1). '
               'Train with recipes/classification/halonet.')


def _cfg(img_size: int, block_size: int, **kwargs) -> Dict:
    # eval crop and interpolation: timm's HaloNet defaults (the paper's were not retrieved).
    # min_input_size: the smallest size at which the attention tiles every stage without padding (stage 4 map =
    # block_size); timm's model tests take it instead of shrinking the input to a size of their own.
    tiled = 32 * block_size
    return imagenet_cfg(**{
        'input_size': (3, img_size, img_size),
        'min_input_size': (3, tiled, tiled),
        'pool_size': (img_size // 32, img_size // 32),
        'crop_pct': 0.95,
        'first_conv': 'stem.conv1.conv',
        'classifier': 'head.fc',
        'license': 'apache-2.0',
        'paper_ids': 'arXiv:2103.12731',
        'paper_name': 'Scaling Local Self-Attention for Parameter Efficient Visual Backbones',
        'origin_url': 'https://arxiv.org/abs/2103.12731',
        'notes': (_NO_WEIGHTS,),
        **kwargs,
    })


# (b, h, rv, rb, l3, df, image size) per model, from the paper's table (see the module docstring).
_PAPER = {
    'h0': (8, 3, 1.0, 0.5, 7, None, 256),
    'h1': (8, 3, 1.0, 1.0, 10, None, 256),
    'h2': (8, 3, 1.0, 1.25, 11, None, 256),
    'h3': (10, 3, 1.0, 1.5, 12, 1024, 320),
    'h4': (12, 2, 1.0, 3.0, 12, 1280, 384),
    'h5': (14, 2, 2.5, 2.0, 23, 1536, 448),
    'h6': (8, 4, 3.0, 2.75, 24, 1536, 512),
    'h7': (10, 3, 4.0, 3.5, 26, 2048, 600),
}
# H7's 600 px cannot be tiled: 600 / 32 is not a multiple of b = 10 (the attention tiles inputs that are multiples
# of 32 * b = 320 without padding). Its default cfg uses 640, the smallest size >= 600 that it tiles.
_CFG_IMG_SIZE = {name: spec[6] for name, spec in _PAPER.items()}
_CFG_IMG_SIZE['h7'] = 640

default_cfgs = generate_default_cfgs({
    f'halonet_paper_{name}.untrained': _cfg(
        size, _PAPER[name][0],
        **({'notes': (_NO_WEIGHTS, 'Paper resolution 600 is not divisible by 32 * b = 320; 640 is used.')}
           if name == 'h7' else {}))
    for name, size in _CFG_IMG_SIZE.items()
})


def _paper_args(name: str) -> Dict:
    block_size, halo_size, rv, rb, l3, df, _ = _PAPER[name]
    return dict(block_size=block_size, halo_size=halo_size, rv=rv, rb=rb, depths=(3, 3, l3, 3), final_chs=df)


@register_model
def halonet_paper_h0(pretrained: bool = False, **kwargs) -> HaloNet:
    return _create('halonet_paper_h0', pretrained, **dict(_paper_args('h0'), **kwargs))


@register_model
def halonet_paper_h1(pretrained: bool = False, **kwargs) -> HaloNet:
    return _create('halonet_paper_h1', pretrained, **dict(_paper_args('h1'), **kwargs))


@register_model
def halonet_paper_h2(pretrained: bool = False, **kwargs) -> HaloNet:
    return _create('halonet_paper_h2', pretrained, **dict(_paper_args('h2'), **kwargs))


@register_model
def halonet_paper_h3(pretrained: bool = False, **kwargs) -> HaloNet:
    return _create('halonet_paper_h3', pretrained, **dict(_paper_args('h3'), **kwargs))


@register_model
def halonet_paper_h4(pretrained: bool = False, **kwargs) -> HaloNet:
    return _create('halonet_paper_h4', pretrained, **dict(_paper_args('h4'), **kwargs))


@register_model
def halonet_paper_h5(pretrained: bool = False, **kwargs) -> HaloNet:
    return _create('halonet_paper_h5', pretrained, **dict(_paper_args('h5'), **kwargs))


@register_model
def halonet_paper_h6(pretrained: bool = False, **kwargs) -> HaloNet:
    return _create('halonet_paper_h6', pretrained, **dict(_paper_args('h6'), **kwargs))


@register_model
def halonet_paper_h7(pretrained: bool = False, **kwargs) -> HaloNet:
    return _create('halonet_paper_h7', pretrained, **dict(_paper_args('h7'), **kwargs))
