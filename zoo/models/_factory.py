"""What every family's model file shares: the pretrained-cfg defaults, the timm build call and the input check.

Private (leading underscore), so `zoo.models` does not take it for a family.
"""
from typing import Any, Callable, Dict, Sequence, Union

import torch
import torch.nn as nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg

__all__ = ['imagenet_cfg', 'create_model', 'check_image_batch']


def imagenet_cfg(**fields) -> Dict:
    """A pretrained cfg: ImageNet-1k classes and normalisation, 224x224 bicubic eval at crop 0.875, any input
    size, no weights (`url` empty); `fields` override or add (first_conv, classifier, license, paper_ids, ...)."""
    return {
        'url': '',
        'num_classes': 1000, 'input_size': (3, 224, 224), 'pool_size': (7, 7),
        'crop_pct': 0.875, 'interpolation': 'bicubic', 'fixed_input_size': False,
        'mean': IMAGENET_DEFAULT_MEAN, 'std': IMAGENET_DEFAULT_STD,
        **fields,
    }


def create_model(model_cls: type, variant: str, pretrained: bool, filter_fn: Callable,
                 default_out_indices: Union[int, Sequence[int]], **kwargs) -> nn.Module:
    """timm's build_model_with_cfg with the family's checkpoint filter; `features_only` uses the model's own
    forward_intermediates (feature_cls 'getter') with `out_indices` defaulting to `default_out_indices`."""
    out_indices = kwargs.pop('out_indices', default_out_indices)
    return build_model_with_cfg(
        model_cls, variant, pretrained,
        pretrained_filter_fn=filter_fn,
        feature_cfg=dict(out_indices=out_indices, feature_cls='getter'),
        **kwargs,
    )


def check_image_batch(x: Any, in_chans: int, family: str) -> None:
    """ValueError naming the problem unless x is a floating-point (B, in_chans, H, W) tensor.

    Models call it before their stem, so a wrong rank, channel count or dtype fails with one clear message
    instead of deep inside a convolution; size rules stay with each family.
    """
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f'{family} expects a (B, {in_chans}, H, W) image tensor, got {got}')
    if x.shape[1] != in_chans:
        raise ValueError(f'{family} was built for {in_chans} input channels, got {x.shape[1]} '
                         f'(input shape {tuple(x.shape)})')
    if not x.is_floating_point():
        raise ValueError(f'{family} expects a floating-point image tensor, got {x.dtype}')
