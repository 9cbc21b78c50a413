"""OpenMMLab backbones: every zoo model in mmengine's root `MODELS` registry, for mmdet 3.x and mmseg 1.x.

Only mmengine is needed (no mmcv). mmdet's and mmseg's registries are children of the root one, so a config
finds these types after `custom_imports = dict(imports=['zoo.integrations.openmmlab'], allow_failed_imports=False)`:

    backbone=dict(type='ZooBackbone', model_name='dinat_tiny', out_indices=(0, 1, 2, 3))

`ZooBackbone` works with any timm model through `features_only`. The family types (`NAT`, `DiNAT`, `DiNAT_s`,
`transnext_*`, `overlock_*`) take the official downstream constructor arguments and add the extra output
norms the official backbones have under their official names, so official mmdet/mmseg checkpoints load via
`init_cfg=dict(type='Pretrained', checkpoint=..., prefix='backbone.')`.
"""
import sys
from typing import Dict, List, Optional, Sequence, Tuple

import timm
import torch
import torch.nn as nn
from mmengine.model import BaseModule
from mmengine.registry import MODELS
from timm.layers import LayerNorm2d

from zoo.layers.contmix import ConvLayerScale

__all__ = ['ZooBackbone']


def _check_out_indices(out_indices: Sequence[int]) -> Tuple[int, ...]:
    """Non-empty, strictly increasing, non-negative stage indices (the order the outputs come in)."""
    indices = tuple(out_indices)
    if not indices or any(not isinstance(i, int) or i < 0 for i in indices) or list(indices) != sorted(set(indices)):
        raise ValueError(f'out_indices must be increasing non-negative stage indices, got {out_indices!r}')
    return indices


def _frozen_modules(body: nn.Module, frozen_stages: int) -> List[str]:
    """Names (in `body`) of the largest modules made only of frozen parameters, for OpenMMLab's frozen_stages:
    -1 freezes nothing, 0 the stem, k the stem and stages 0..k-1.

    A stage is every module registered up to the end of the module that gives that stage's output
    (`feature_info`), so what a stage depends on (its downsampler, OverLoCK's overview net before its focus stage)
    freezes with it; the stem is what comes before the first stage's module. Models register their modules in the
    order they run, which is what makes registration order a stage boundary.
    """
    stages = len(body.feature_info)
    if isinstance(frozen_stages, bool) or not isinstance(frozen_stages, int) or not -1 <= frozen_stages <= stages:
        raise ValueError(f'frozen_stages must be an int in [-1, {stages}], got {frozen_stages!r}')
    if frozen_stages < 0:
        return []
    inner = 'model.' if hasattr(body, 'model') else ''
    # timm's hook-less FeatureListNet flattens 'stages.0' into the child name 'stages_0'
    stage_modules = [inner + (m if inner else m.replace('.', '_')) for m in body.feature_info.module_name()]
    order = {name: i for i, (name, _) in enumerate(body.named_modules())}
    stage = stage_modules[max(frozen_stages - 1, 0)]
    if frozen_stages == 0:
        cut = order[stage]  # modules before the first stage's module
    else:
        cut = 1 + max(i for name, i in order.items() if name == stage or name.startswith(stage + '.'))
    frozen = {name for name, _ in body.named_parameters() if order[name.rpartition('.')[0]] < cut}

    def all_frozen(module: nn.Module, name: str) -> bool:
        names = [n for n, _ in module.named_parameters(prefix=name)]
        return bool(names) and all(n in frozen for n in names)
    largest = []
    for name, module in body.named_modules():
        if name and all_frozen(module, name) and not any(name.startswith(top + '.') for top in largest):
            largest.append(name)
    return largest


@MODELS.register_module()
class ZooBackbone(BaseModule):
    """Any timm-registered model as an OpenMMLab backbone: images -> tuple of NCHW maps, one per `out_indices`.

    Args:
        model_name: a timm model name (every zoo model, and timm's own).
        out_indices: 0-based stages to return (strides 4, 8, 16, 32 for (0, 1, 2, 3) on hierarchical models).
        pretrained: path of a classification checkpoint (official layout), loaded through the model's
            `checkpoint_filter_fn` with strict key matching; use `init_cfg` with `prefix='backbone.'` for a
            full mmdet/mmseg checkpoint instead.
        norm_eval: keep BatchNorm layers in eval mode while training (OpenMMLab's convention).
        frozen_stages: -1 trains everything; 0 freezes the stem; k the stem and stages 0..k-1 (no gradients,
            kept in eval mode).
        init_cfg: mmengine init config.
        **model_kwargs: constructor arguments of the model (drop_path_rate, official architecture names, ...).
    """

    def __init__(self, model_name: str, out_indices: Sequence[int] = (0, 1, 2, 3), pretrained: Optional[str] = None,
                 norm_eval: bool = False, init_cfg: Optional[dict] = None, frozen_stages: int = -1, **model_kwargs):
        if pretrained is not None and init_cfg is not None:
            raise ValueError('give either pretrained (a classification checkpoint) or init_cfg, not both')
        super().__init__(init_cfg)
        self.out_indices = _check_out_indices(out_indices)
        self.in_chans = model_kwargs.get('in_chans', 3)
        weights = {} if pretrained is None else dict(pretrained=True, pretrained_cfg_overlay=dict(file=pretrained))
        self.body = timm.create_model(model_name, features_only=True, out_indices=self.out_indices,
                                      **weights, **model_kwargs)
        self.out_channels: List[int] = self.body.feature_info.channels()
        self.strides: List[int] = self.body.feature_info.reduction()
        self.norm_eval = norm_eval
        # Some timm models (Swin, MambaOut) give NHWC features; OpenMMLab necks expect NCHW.
        self._channels_last = getattr(self.body, 'output_fmt', 'NCHW') == 'NHWC'
        # timm's getter wrapper keeps the model under `.model`: official keys live below that prefix here.
        self._body_prefix = 'body.model.' if hasattr(self.body, 'model') else 'body.'
        self._register_load_state_dict_pre_hook(self._from_official_layout)
        self._frozen = [self.body.get_submodule(name) for name in _frozen_modules(self.body, frozen_stages)]
        for module in self._frozen:
            module.requires_grad_(False)
        self.train(self.training)
        if pretrained is not None:
            self._is_init = True  # weights are loaded: mmengine's init_weights must not overwrite them

    def _inner_model(self) -> nn.Module:
        return self.body.model if hasattr(self.body, 'model') else self.body

    def _from_official_layout(self, state_dict: Dict[str, torch.Tensor], prefix: str, *args) -> None:
        """load_state_dict pre-hook: keys in the official downstream layout (the backbone's own names, as in a
        detector checkpoint after stripping `backbone.`) are converted by the model's `checkpoint_filter_fn`
        and moved under the body; keys this module already has pass unchanged."""
        own = set(self.state_dict(keep_vars=True))
        official = {k[len(prefix):]: state_dict.pop(k) for k in list(state_dict)
                    if k.startswith(prefix) and k[len(prefix):] not in own}
        if not official:
            return
        inner = self._inner_model()
        filter_fn = getattr(sys.modules[type(inner).__module__], 'checkpoint_filter_fn', None)
        if filter_fn is not None:
            official = filter_fn(official, inner)
        state_dict.update({f'{prefix}{self._body_prefix}{k}': v for k, v in official.items()})

    def _check_input(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor) or x.ndim != 4 or x.shape[1] != self.in_chans \
                or not x.is_floating_point():
            got = f'{x.dtype} tensor of shape {tuple(x.shape)}' if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f'backbone input must be a float (B, {self.in_chans}, H, W) image batch, got {got}')

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        """(B, in_chans, H, W) -> tuple of (B, out_channels[i], H / strides[i], W / strides[i])."""
        self._check_input(x)
        feats = self.body(x)
        if self._channels_last:
            feats = [f.permute(0, 3, 1, 2) for f in feats]
        return tuple(feats)

    def train(self, mode: bool = True) -> 'ZooBackbone':
        """Train mode, except frozen stages, and BatchNorm layers when `norm_eval` is set, stay in eval mode."""
        super().train(mode)
        for module in self._frozen if mode else ():
            module.eval()
        if mode and self.norm_eval:
            for module in self.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()
        return self


class _IndexedNormBackbone(ZooBackbone):
    """Official NAT / DiNAT / DiNAT_s downstream backbone: `norm{i}` (LayerNorm, eps 1e-5) on each output.

    Takes the official constructor arguments (embed_dim, depths, num_heads, kernel_size, dilations, ...).
    """
    zoo_name = ''

    def __init__(self, out_indices: Sequence[int] = (0, 1, 2, 3), pretrained: Optional[str] = None,
                 norm_eval: bool = False, init_cfg: Optional[dict] = None, **arch_kwargs):
        super().__init__(self.zoo_name, out_indices, pretrained, norm_eval, init_cfg, **arch_kwargs)
        for index, channels in zip(self.out_indices, self.out_channels):
            self.add_module(f'norm{index}', LayerNorm2d(channels, eps=1e-5))

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        """(B, in_chans, H, W) -> tuple of normalised (B, C_i, H / s_i, W / s_i)."""
        feats = super().forward(x)
        return tuple(getattr(self, f'norm{i}')(f) for i, f in zip(self.out_indices, feats))


@MODELS.register_module(name='NAT')
class NATBackbone(_IndexedNormBackbone):
    """Official `NAT` downstream type (mmdet 2.19 / mmseg 0.20.2 configs)."""
    zoo_name = 'nat_tiny'


@MODELS.register_module(name='DiNAT')
class DiNATBackbone(_IndexedNormBackbone):
    """Official `DiNAT` downstream type: NAT arguments plus `dilations`."""
    zoo_name = 'dinat_tiny'


@MODELS.register_module(name='DiNAT_s')
class DiNATsBackbone(_IndexedNormBackbone):
    """Official `DiNAT_s` downstream type: NAT arguments plus `dilations`."""
    zoo_name = 'dinat_s_tiny'


class _FixedVariantBackbone(ZooBackbone):
    """Official one-class-per-variant backbones (TransNeXt, OverLoCK): all four stages, the variant's
    hyper-parameters, constructor overrides such as drop_path_rate."""
    zoo_name = ''

    def __init__(self, pretrained: Optional[str] = None, norm_eval: bool = False, init_cfg: Optional[dict] = None,
                 **model_kwargs):
        super().__init__(self.zoo_name, (0, 1, 2, 3), pretrained, norm_eval, init_cfg, **model_kwargs)


class _OverLoCKBackbone(_FixedVariantBackbone):
    """Official OverLoCK downstream backbone: no classification heads, `extra_norm[0..3]` (LayerNorm2d, eps 1e-6)
    on the four outputs. With `context_proj` (the mmdet version) the last output also gets
    `h_proj(extra_norm[4](context))`: the Overview-Net context (C4, stride 32) through a 1x1 conv to the
    output's width and a LayerScale initialised to 1e-5; the mmseg version has neither."""

    def __init__(self, pretrained: Optional[str] = None, context_proj: bool = False, norm_eval: bool = False,
                 init_cfg: Optional[dict] = None, **model_kwargs):
        super().__init__(pretrained, norm_eval, init_cfg, **model_kwargs)
        inner = self._inner_model()  # features_only already pruned the classification heads, as the official one
        norms = [LayerNorm2d(c, eps=1e-6) for c in self.out_channels]
        self.context_proj = context_proj
        if context_proj:
            ctx_dim, fused = inner.high_level_proj.in_channels, self.out_channels[3]
            norms.append(LayerNorm2d(ctx_dim, eps=1e-6))
            self.h_proj = nn.Sequential(nn.Conv2d(ctx_dim, fused, 1), ConvLayerScale(fused, 1e-5))
            inner.blocks4.register_forward_hook(self._keep_context)
        self.extra_norm = nn.ModuleList(norms)
        self._context: Optional[torch.Tensor] = None

    def _keep_context(self, module: nn.Module, args, output: torch.Tensor) -> None:
        self._context = output

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        """(B, in_chans, H, W) -> (C0 at /4, C1 at /8, C2 + C4/4 at /16, C4 + C4/4 at /32), normalised."""
        feats = [norm(f) for norm, f in zip(self.extra_norm, super().forward(x))]
        if self.context_proj:
            context, self._context = self._context, None
            feats[3] = feats[3] + self.h_proj(self.extra_norm[4](context))
        return tuple(feats)


def _register_variants(base: type, zoo_names: Sequence[str]) -> None:
    """One registry type per official variant, named like the model (`transnext_tiny`, `overlock_t`, ...)."""
    for name in zoo_names:
        MODELS.register_module(name=name, module=type(name, (base,), {'zoo_name': name, '__doc__': base.__doc__}))


_register_variants(_FixedVariantBackbone, ['transnext_micro', 'transnext_tiny', 'transnext_small', 'transnext_base'])
_register_variants(_OverLoCKBackbone, ['overlock_xt', 'overlock_t', 'overlock_s', 'overlock_b'])
