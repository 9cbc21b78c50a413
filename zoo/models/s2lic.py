"""S2LIC learned image codec: its timm registration (cfgs and the s2lic, s2lic_small, s2lic_tiny entrypoints).

Paper: S2LIC: Learned Image Compression with the SwinV2 Block, Adaptive Channel-wise and Global-inter Attention
Context (Wang et al., arXiv 2403.14471). Official code: https://github.com/wyq2021/S2LIC. Facts: docs/s2lic.md.

The network (S2LIC, its ACGC entropy model, structure and assumptions) is zoo/models/_s2lic_network.py. It is built
on CompressAI, so it is imported when a model is created rather than here: `import zoo` registers the codec without
importing CompressAI (zoo.layers.compressai_import says what that saves).
"""
import inspect
from dataclasses import dataclass
from typing import FrozenSet, Type

import torch.nn as nn
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._pretrained import PretrainedCfg

from zoo.layers.compressai_import import quiet_compressai_import

__all__ = ['CodecPretrainedCfg', 'network_class']


@dataclass
class CodecPretrainedCfg(PretrainedCfg):
    """timm's pretrained cfg with the task a model serves, so codecs are told apart from classifiers."""
    task: str = 'compression'


def network_class() -> Type[nn.Module]:
    """The S2LIC network class (zoo.models._s2lic_network.S2LIC), imported with CompressAI on first use."""
    with quiet_compressai_import():
        from zoo.models._s2lic_network import S2LIC
    return S2LIC


def _config_keys() -> FrozenSet[str]:
    return frozenset(inspect.signature(network_class().__init__).parameters) - {'self'}


def _cfg(**kwargs) -> CodecPretrainedCfg:
    return CodecPretrainedCfg(**{
        'url': '',
        'input_size': (3, 256, 256),  # training patch size of the lineage (§4), not a limit: any multiple of 64
        'mean': (0., 0., 0.), 'std': (1., 1., 1.),  # RGB in [0, 1], no normalisation
        'crop_pct': 1.0,
        'num_classes': 0,
        'first_conv': 'g_a.1',
        'license': 'unknown',
        'origin_url': 'https://github.com/wyq2021/S2LIC',
        'paper_ids': 'arXiv:2403.14471',
        'paper_name': 'S2LIC: Learned Image Compression with the SwinV2 Block, Adaptive Channel-wise and '
                      'Global-inter Attention Context',
        **kwargs,
    })


_NO_WEIGHTS = ('No official weights exist (the official repo has no weights and no LICENSE); train with '
               'zoo train (task: compression) and load with zoo.tasks.compression.load_codec.')

default_cfgs = generate_default_cfgs({
    's2lic.untrained': _cfg(notes=('Paper size (N=192, M=320, 10 slices).', _NO_WEIGHTS)),
    's2lic_small.untrained': _cfg(notes=('Reduced config of this zoo (N=96, M=160, 5 slices), not from the paper.',
                                         _NO_WEIGHTS)),
    's2lic_tiny.untrained': _cfg(notes=('Tiny config of this zoo for CPU training and tests, not from the paper.',
                                        _NO_WEIGHTS)),
})

def _create(variant: str, pretrained: bool, pretrained_cfg, pretrained_cfg_overlay, cache_dir,
            **kwargs) -> nn.Module:
    if pretrained:
        raise ValueError(f'{variant}: {_NO_WEIGHTS}')
    config_keys = _config_keys()
    unknown = sorted(set(kwargs) - config_keys)
    if unknown:
        raise ValueError(f'{variant}: unknown config key(s) {unknown}; allowed: {sorted(config_keys)}')
    # timm would pass the cfg's class count / channels as constructor defaults; a codec takes neither
    return build_model_with_cfg(network_class(), variant, False, pretrained_cfg=pretrained_cfg,
                                pretrained_cfg_overlay=pretrained_cfg_overlay, cache_dir=cache_dir,
                                kwargs_filter=('num_classes', 'global_pool', 'in_chans'), **kwargs)


_PAPER = dict(N=192, M=320, num_slices=10, window_size=8, enc_depths=(1, 2, 3), enc_heads=(4, 8, 16),
              dec_depths=(3, 2, 1), dec_heads=(16, 8, 4))
_SMALL = dict(N=96, M=160, num_slices=5, window_size=8, enc_depths=(1, 2, 2), enc_heads=(2, 4, 8),
              dec_depths=(2, 2, 1), dec_heads=(8, 4, 2))
_TINY = dict(N=48, M=64, num_slices=4, window_size=4, enc_depths=(1, 1, 1), enc_heads=(2, 2, 4),
             dec_depths=(1, 1, 1), dec_heads=(4, 2, 2), drop_path_rate=0., enhance_channels=8, enhance_growth=4)


@register_model
def s2lic(pretrained: bool = False, pretrained_cfg=None, pretrained_cfg_overlay=None, cache_dir=None,
          **kwargs) -> nn.Module:
    """Paper size: N=192, M=320, 10 slices, window 8, depths (1,2,3)/(3,2,1), heads (4,8,16)/(16,8,4)."""
    return _create('s2lic', pretrained, pretrained_cfg, pretrained_cfg_overlay, cache_dir, **{**_PAPER, **kwargs})


@register_model
def s2lic_small(pretrained: bool = False, pretrained_cfg=None, pretrained_cfg_overlay=None, cache_dir=None,
                **kwargs) -> nn.Module:
    """N=96, M=160, 5 slices of 32: the paper's slice width at half the channels."""
    return _create('s2lic_small', pretrained, pretrained_cfg, pretrained_cfg_overlay, cache_dir,
                   **{**_SMALL, **kwargs})


@register_model
def s2lic_tiny(pretrained: bool = False, pretrained_cfg=None, pretrained_cfg_overlay=None, cache_dir=None,
               **kwargs) -> nn.Module:
    """N=48, M=64, 4 slices of 16, window 4, one SwinV2 layer per stage: trains on a CPU in minutes."""
    return _create('s2lic_tiny', pretrained, pretrained_cfg, pretrained_cfg_overlay, cache_dir,
                   **{**_TINY, **kwargs})
