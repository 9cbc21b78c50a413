"""Key-driven grouped-query attention ViTs: MHSA, GQA, KDGQA, DGQA (ema / diff) and PGQA ViT-S/B/L.

Paper: Beyond Uniform Query Distribution: Key-Driven Grouped Query Attention (Khan, Khaquan, Tafveez,
Samiwala, Raza, 2024), https://arxiv.org/abs/2408.08454.
Official code: https://github.com/zohaib-khan5040/key-driven-gqa (MIT). It ships no trained weights: its models
start from timm's ImageNet ViTs, converted to GQA at load time (K/V heads mean-pooled in contiguous groups).

The models are timm `VisionTransformer`s whose blocks use `zoo.layers.GroupedQueryAttention`; state-dict names
are the official ones (`blocks.i.attn.{q,k,v,proj}`, DGQA `blocks.i.attn.cache`), so official files load
strictly, and `checkpoint_filter_fn` also converts a timm MHA ViT checkpoint (fused `attn.qkv`) to the model's
number of K/V heads. Names carry the official scheme string (`vit_small_patch16_224_kdgqa`): timm owns the
plain `vit_*_patch16_224` names the official factories use.

`mode='official'` reproduces the official modules exactly (batch-coupled KDGQA, stateful DGQA eval, PGQA noise
in eval); the default mode fixes those defects (see `zoo.layers.grouped_query_attn`).
"""
from functools import partial
from typing import Callable, Dict, List, Optional, Tuple, Union

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint
from timm.layers import DropPath, LayerNorm, Mlp, resample_abs_pos_embed
from timm.models import generate_default_cfgs, register_model
from timm.models.vision_transformer import VisionTransformer

from zoo.layers.grouped_query_attn import (ATTENTION_SCHEMES, GroupedQueryAttention, convert_mha_to_gqa,
                                          replay_on_recompute)
from zoo.models._checkpoint import unwrap_state_dict
from zoo.models._factory import check_image_batch, create_model, imagenet_cfg

__all__ = ['GQAVisionTransformer', 'GQABlock']


class GQABlock(nn.Module):
    """Pre-norm ViT block with grouped-query attention: x + attn(norm1(x)), then x + mlp(norm2(x)).

    Built by timm's VisionTransformer through `block_fn`, so it receives timm's block arguments; the ones the
    official model does not have (qk norm, layer scale, extra norms) must stay at their defaults.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4., qkv_bias: bool = True,
                 proj_drop: float = 0., attn_drop: float = 0., drop_path: float = 0.,
                 norm_layer: Callable = LayerNorm, act_layer: Callable = nn.GELU, mlp_layer: Callable = Mlp,
                 attention: Callable = GroupedQueryAttention, device=None, dtype=None, **timm_block_args):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        unsupported = sorted(k for k, v in timm_block_args.items() if k not in ('depth', 'attn_layer', 'proj_bias')
                             and v)
        if unsupported or not timm_block_args.get('proj_bias', True):
            raise ValueError(f'GQA ViT blocks do not support {unsupported or ["proj_bias=False"]}')
        self.norm1 = norm_layer(dim, **dd)
        self.attn = attention(dim, num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=proj_drop, **dd)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.norm2 = norm_layer(dim, **dd)
        self.mlp = mlp_layer(in_features=dim, hidden_features=int(dim * mlp_ratio), act_layer=act_layer,
                             drop=proj_drop, **dd)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0. else nn.Identity()

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False
                ) -> torch.Tensor:
        """(B, N, C) -> (B, N, C)."""
        if attn_mask is not None or is_causal:
            raise ValueError('GQA ViT blocks take no attention mask')
        x = x + self.drop_path1(self.attn(self.norm1(x)))
        return x + self.drop_path2(self.mlp(self.norm2(x)))


class GQAVisionTransformer(VisionTransformer):
    """ViT (cls token, learned position embedding, pre-norm blocks, final LayerNorm, cls pooling) with GQA.

    Args:
        img_size, patch_size, in_chans, num_classes, embed_dim, depth, num_heads, mlp_ratio, qkv_bias: as the
            official VisionTransformer (and timm's).
        num_kv_heads: K/V heads G per layer (a divisor of num_heads; ignored by 'mhsa').
        att_scheme: 'mhsa', 'gqa', 'kdgqa', 'dgqa_ema', 'dgqa_diff' or 'pgqa' (official names).
        window_size: DGQA training steps between allocation updates.
        mode: 'default' (defects fixed) or 'official' (the official modules exactly).
        min_queries_per_kv_head: default mode: fewest query heads per K/V head (0 allows empty groups).
        attn_backend: 'torch' (reference) or 'sdpa'.
        dynamic_img_size: accept any input whose sides are multiples of the patch size, resampling the position
            embedding (the official model accepts img_size only; at img_size both agree exactly).
        global_pool, drop_rate, pos_drop_rate, proj_drop_rate, attn_drop_rate, drop_path_rate: timm's.
    """

    def __init__(self, img_size: Union[int, Tuple[int, int]] = 224, patch_size: int = 16, in_chans: int = 3,
                 num_classes: int = 10, global_pool: str = 'token', embed_dim: int = 768, depth: int = 12,
                 num_heads: int = 12, mlp_ratio: float = 4., qkv_bias: bool = True, num_kv_heads: int = 3,
                 att_scheme: str = 'gqa', window_size: int = 10, mode: str = 'default',
                 min_queries_per_kv_head: int = 1, attn_backend: str = 'torch', dynamic_img_size: bool = True,
                 drop_rate: float = 0., pos_drop_rate: float = 0., proj_drop_rate: float = 0.,
                 attn_drop_rate: float = 0., drop_path_rate: float = 0., device=None, dtype=None):
        if att_scheme not in ATTENTION_SCHEMES:
            raise ValueError(f'att_scheme must be one of {", ".join(ATTENTION_SCHEMES)}, got {att_scheme!r}')
        attention = partial(GroupedQueryAttention, num_kv_heads=num_kv_heads, scheme=att_scheme, mode=mode,
                            window_size=window_size, min_queries_per_kv_head=min_queries_per_kv_head,
                            backend=attn_backend)
        super().__init__(
            img_size=img_size, patch_size=patch_size, in_chans=in_chans, num_classes=num_classes,
            global_pool=global_pool, embed_dim=embed_dim, depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio,
            qkv_bias=qkv_bias, fc_norm=False, dynamic_img_size=dynamic_img_size, drop_rate=drop_rate,
            pos_drop_rate=pos_drop_rate, proj_drop_rate=proj_drop_rate, attn_drop_rate=attn_drop_rate,
            drop_path_rate=drop_path_rate, block_fn=partial(GQABlock, attention=attention), device=device,
            dtype=dtype)
        self.att_scheme = att_scheme
        self.mode = mode

    def _check_input(self, x: torch.Tensor) -> None:
        """Raise ValueError naming the problem when x is not a (B, in_chans, H, W) float image batch that fits."""
        check_image_batch(x, self.in_chans, 'GQA ViT')
        patch = self.patch_embed.patch_size
        height, width = x.shape[-2:]
        if self.dynamic_img_size:
            if height % patch[0] or width % patch[1] or height < patch[0] or width < patch[1]:
                raise ValueError(f'GQA ViT needs H and W to be positive multiples of the patch size '
                                 f'{patch[0]}x{patch[1]}, got {height}x{width}')
        elif (height, width) != tuple(self.patch_embed.img_size):
            raise ValueError(f'this GQA ViT was built for {self.patch_embed.img_size[0]}x'
                             f'{self.patch_embed.img_size[1]} inputs (dynamic_img_size=False), got {height}x{width}')

    def forward_features(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                         is_causal: bool = False) -> torch.Tensor:
        """(B, in_chans, H, W) -> (B, 1 + H*W/p^2, C) tokens (cls first), final norm applied."""
        self._check_input(x)
        if not (self.grad_checkpointing and attn_mask is None and not is_causal):
            return super().forward_features(x, attn_mask=attn_mask, is_causal=is_causal)
        x = self.norm_pre(self.patch_drop(self._pos_embed(self.patch_embed(x))))
        for block in self.blocks:
            # DGQA layers keep training state: the recomputation in backward replays their allocation
            x = checkpoint(block, x, use_reentrant=False, context_fn=replay_on_recompute)
        return self.norm(x)

    def forward_intermediates(self, x: torch.Tensor, indices: Optional[Union[int, List[int]]] = None,
                              return_prefix_tokens: bool = False, norm: bool = False, stop_early: bool = False,
                              output_fmt: str = 'NCHW', intermediates_only: bool = False, **kwargs):
        """Block outputs as (B, C, H/p, W/p) maps ('NCHW') or (B, H/p, W/p, C) ('NHWC'), plus the final tokens.

        The zoo's feature formats are NCHW and NHWC (timm's ViT 'NLC' is the token layout of forward_features).
        """
        if output_fmt not in ('NCHW', 'NHWC'):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NHWC', got {output_fmt!r}")
        self._check_input(x)
        out = super().forward_intermediates(
            x, indices, return_prefix_tokens=return_prefix_tokens, norm=norm, stop_early=stop_early,
            output_fmt='NCHW', intermediates_only=intermediates_only, **kwargs)
        if output_fmt == 'NCHW':
            return out
        to_nhwc = (lambda y: (y[0].permute(0, 2, 3, 1), y[1])) if return_prefix_tokens else (
            lambda y: y.permute(0, 2, 3, 1))
        if intermediates_only:
            return [to_nhwc(y) for y in out]
        return out[0], [to_nhwc(y) for y in out[1]]


def _attention_modules(model: nn.Module) -> Dict[str, GroupedQueryAttention]:
    return {name: module for name, module in model.named_modules() if isinstance(module, GroupedQueryAttention)}


def checkpoint_filter_fn(state_dict: Dict[str, torch.Tensor], model: GQAVisionTransformer) -> Dict[str, torch.Tensor]:
    """Official KDGQA-repo checkpoint, or any timm MHA ViT checkpoint, -> this model's state dict.

    * unwraps a wrapped checkpoint (`unwrap_state_dict`);
    * fused `attn.qkv` (timm / MHA ViTs) is split and its K/V heads mean-pooled to the model's num_kv_heads (the
      official uptraining conversion, `convert_mha_to_gqa`);
    * a position embedding of another grid is resampled (bicubic) to the model's;
    * a classifier for another number of classes (timm's 1000-class ViTs into the official 10-class models) is
      replaced by the model's freshly initialised head, as the official uptraining starts with a new head;
    * DGQA buffers missing from the file: `cache` starts at zeros (as the official module does) and `splits`
      (the zoo's persisted allocation) is derived from the cache (`allocation_from_cache`).
    """
    state_dict = unwrap_state_dict(state_dict)
    attention = _attention_modules(model)
    if any(key.endswith('attn.qkv.weight') for key in state_dict) and attention:
        first = next(iter(attention.values()))
        state_dict = convert_mha_to_gqa(state_dict, first.num_heads, first.num_kv_heads)
    own = model.state_dict()
    pos_embed = state_dict.get('pos_embed')
    if pos_embed is not None and 'pos_embed' in own and pos_embed.shape != own['pos_embed'].shape:
        state_dict['pos_embed'] = resample_abs_pos_embed(
            pos_embed, new_size=model.patch_embed.grid_size, num_prefix_tokens=model.num_prefix_tokens)
    for key in ('head.weight', 'head.bias'):
        if key in state_dict and key in own and state_dict[key].shape != own[key].shape:
            state_dict[key] = own[key]
    for name, module in attention.items():
        if not hasattr(module, 'cache'):
            continue
        cache = state_dict.setdefault(f'{name}.cache', torch.zeros_like(own[f'{name}.cache']))
        if f'{name}.splits' not in state_dict:
            meta = cache.is_meta or own[f'{name}.splits'].is_meta
            state_dict[f'{name}.splits'] = own[f'{name}.splits'] if meta else module.allocation_from_cache(cache)
    return state_dict


def _create(variant: str, pretrained: bool = False, **kwargs) -> GQAVisionTransformer:
    # timm's ViT default (the last 3 blocks), fewer when the model is shallower
    default_out = min(3, kwargs.get('depth', 12))
    return create_model(GQAVisionTransformer, variant, pretrained, checkpoint_filter_fn, default_out, **kwargs)


def _cfg(timm_tag: str, **kwargs) -> Dict:
    """The timm ImageNet weights the official code starts from (converted on load, the 1000-class head replaced).

    num_classes is the official models' 10: checkpoint_filter_fn re-initialises a head of another size.
    """
    return imagenet_cfg(**{
        'hf_hub_id': f'timm/{timm_tag}',
        'url': f'https://huggingface.co/timm/{timm_tag}/resolve/main/model.safetensors',
        'num_classes': 10,
        'pool_size': None,
        # the paper's transforms: Resize((224, 224)) without crop (torchvision default bilinear), mean/std 0.5
        'crop_pct': 1.0,
        'crop_mode': 'squash',
        'interpolation': 'bilinear',
        'mean': (0.5, 0.5, 0.5),
        'std': (0.5, 0.5, 0.5),
        'first_conv': 'patch_embed.proj',
        'classifier': 'head',
        'license': 'apache-2.0',
        'origin_url': 'https://github.com/zohaib-khan5040/key-driven-gqa',
        'paper_ids': 'arXiv:2408.08454',
        'paper_name': 'Beyond Uniform Query Distribution: Key-Driven Grouped Query Attention',
        'notes': ('timm ImageNet-21k -> 1k ViT weights (Apache-2.0), K/V heads mean-pooled to num_kv_heads on load; '
                  'the paper up-trains them (no official trained checkpoints)',),
        **kwargs,
    })


# timm 1.0.x resolves the official `timm.create_model('vit_*_patch16_224', pretrained=True)` to these tags.
_SOURCE_TAGS = {
    'small': ('augreg_in21k_ft_in1k', 'vit_small_patch16_224.augreg_in21k_ft_in1k'),
    'base': ('augreg2_in21k_ft_in1k', 'vit_base_patch16_224.augreg2_in21k_ft_in1k'),
    'large': ('augreg_in21k_ft_in1k', 'vit_large_patch16_224.augreg_in21k_ft_in1k'),
}

default_cfgs = generate_default_cfgs({
    f'vit_{size}_patch16_224_{scheme}.{tag}': _cfg(timm_tag)
    for size, (tag, timm_tag) in _SOURCE_TAGS.items() for scheme in ATTENTION_SCHEMES
})

# Official factory defaults (model.py): 10 classes, 3 / 3 / 4 K/V heads, DGQA window 10.
_SMALL = dict(embed_dim=384, depth=12, num_heads=6, num_kv_heads=3, num_classes=10)
_BASE = dict(embed_dim=768, depth=12, num_heads=12, num_kv_heads=3, num_classes=10)
_LARGE = dict(embed_dim=1024, depth=24, num_heads=16, num_kv_heads=4, num_classes=10)


def _vit(size_args: Dict, variant: str, scheme: str, pretrained: bool, kwargs: Dict) -> GQAVisionTransformer:
    return _create(variant, pretrained, **{**size_args, 'att_scheme': scheme, **kwargs})


@register_model
def vit_small_patch16_224_mhsa(pretrained: bool = False, **kwargs) -> GQAVisionTransformer:
    return _vit(_SMALL, 'vit_small_patch16_224_mhsa', 'mhsa', pretrained, kwargs)


@register_model
def vit_small_patch16_224_gqa(pretrained: bool = False, **kwargs) -> GQAVisionTransformer:
    return _vit(_SMALL, 'vit_small_patch16_224_gqa', 'gqa', pretrained, kwargs)


@register_model
def vit_small_patch16_224_kdgqa(pretrained: bool = False, **kwargs) -> GQAVisionTransformer:
    return _vit(_SMALL, 'vit_small_patch16_224_kdgqa', 'kdgqa', pretrained, kwargs)


@register_model
def vit_small_patch16_224_dgqa_ema(pretrained: bool = False, **kwargs) -> GQAVisionTransformer:
    return _vit(_SMALL, 'vit_small_patch16_224_dgqa_ema', 'dgqa_ema', pretrained, kwargs)


@register_model
def vit_small_patch16_224_dgqa_diff(pretrained: bool = False, **kwargs) -> GQAVisionTransformer:
    return _vit(_SMALL, 'vit_small_patch16_224_dgqa_diff', 'dgqa_diff', pretrained, kwargs)


@register_model
def vit_small_patch16_224_pgqa(pretrained: bool = False, **kwargs) -> GQAVisionTransformer:
    return _vit(_SMALL, 'vit_small_patch16_224_pgqa', 'pgqa', pretrained, kwargs)


@register_model
def vit_base_patch16_224_mhsa(pretrained: bool = False, **kwargs) -> GQAVisionTransformer:
    return _vit(_BASE, 'vit_base_patch16_224_mhsa', 'mhsa', pretrained, kwargs)


@register_model
def vit_base_patch16_224_gqa(pretrained: bool = False, **kwargs) -> GQAVisionTransformer:
    return _vit(_BASE, 'vit_base_patch16_224_gqa', 'gqa', pretrained, kwargs)


@register_model
def vit_base_patch16_224_kdgqa(pretrained: bool = False, **kwargs) -> GQAVisionTransformer:
    return _vit(_BASE, 'vit_base_patch16_224_kdgqa', 'kdgqa', pretrained, kwargs)


@register_model
def vit_base_patch16_224_dgqa_ema(pretrained: bool = False, **kwargs) -> GQAVisionTransformer:
    return _vit(_BASE, 'vit_base_patch16_224_dgqa_ema', 'dgqa_ema', pretrained, kwargs)


@register_model
def vit_base_patch16_224_dgqa_diff(pretrained: bool = False, **kwargs) -> GQAVisionTransformer:
    return _vit(_BASE, 'vit_base_patch16_224_dgqa_diff', 'dgqa_diff', pretrained, kwargs)


@register_model
def vit_base_patch16_224_pgqa(pretrained: bool = False, **kwargs) -> GQAVisionTransformer:
    return _vit(_BASE, 'vit_base_patch16_224_pgqa', 'pgqa', pretrained, kwargs)


@register_model
def vit_large_patch16_224_mhsa(pretrained: bool = False, **kwargs) -> GQAVisionTransformer:
    return _vit(_LARGE, 'vit_large_patch16_224_mhsa', 'mhsa', pretrained, kwargs)


@register_model
def vit_large_patch16_224_gqa(pretrained: bool = False, **kwargs) -> GQAVisionTransformer:
    return _vit(_LARGE, 'vit_large_patch16_224_gqa', 'gqa', pretrained, kwargs)


@register_model
def vit_large_patch16_224_kdgqa(pretrained: bool = False, **kwargs) -> GQAVisionTransformer:
    return _vit(_LARGE, 'vit_large_patch16_224_kdgqa', 'kdgqa', pretrained, kwargs)


@register_model
def vit_large_patch16_224_dgqa_ema(pretrained: bool = False, **kwargs) -> GQAVisionTransformer:
    return _vit(_LARGE, 'vit_large_patch16_224_dgqa_ema', 'dgqa_ema', pretrained, kwargs)


@register_model
def vit_large_patch16_224_dgqa_diff(pretrained: bool = False, **kwargs) -> GQAVisionTransformer:
    return _vit(_LARGE, 'vit_large_patch16_224_dgqa_diff', 'dgqa_diff', pretrained, kwargs)


@register_model
def vit_large_patch16_224_pgqa(pretrained: bool = False, **kwargs) -> GQAVisionTransformer:
    return _vit(_LARGE, 'vit_large_patch16_224_pgqa', 'pgqa', pretrained, kwargs)
