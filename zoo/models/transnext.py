"""TransNeXt: hierarchical vision transformer with aggregated (pixel-focused) attention and ConvGLU.

Paper: TransNeXt: Robust Foveal Visual Perception for Vision Transformers (Dai Shi, CVPR 2024),
https://arxiv.org/abs/2311.17132.
Official code and weights: https://github.com/DaiShiResearch/TransNeXt (Apache-2.0).

State-dict names are the official ones (`patch_embed{i}`, `block{i}.{j}`, `norm{i}`, `head`), so the official
`.pth` files load strictly. Unlike the official classification model, nothing here is fixed at build time:
window masks, length scales, pooled-grid sizes and position-bias tables are derived from each input's size,
so a model runs at any H and W divisible by 32 (a 224 checkpoint evaluates at 384 without rebuilding);
`pretrain_size` (default `img_size`) sets the CPB coordinate normalisation, as in the official code.

MoH-ViT (MoH: Multi-Head Attention as Mixture-of-Head Attention, Jin et al. 2024, https://arxiv.org/abs/2410.11842;
official code and weights https://github.com/SkyworkAI/MoH, Apache-2.0; docs/moh.md) is TransNeXt with
mixture-of-heads gating in its attention layers: the per-stage `shared_head` / `routed_head` arguments (the official
names) switch it on, and the `moh_transnext_*` factories are the official variants.
"""
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from timm.layers import DropPath, SelectAdaptivePool2d, calculate_drop_path_rates, to_2tuple, trunc_normal_
from timm.models import checkpoint_seq, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices

from zoo.layers.aggregated_attn import AggregatedAttention, ScaledCosineAttention
from zoo.layers.convglu import ConvGLU
from zoo.models._checkpoint import unwrap_state_dict
from zoo.models._factory import check_image_batch, create_model, imagenet_cfg

__all__ = ['TransNeXt']

# Every stage halves the map; the last one is at stride 32, so inputs must be multiples of it.
_STRIDE = 32


class OverlapPatchEmbed(nn.Module):
    """Overlapping patch embedding: k x k conv with stride s and padding k // 2, then LayerNorm (eps 1e-5)."""

    def __init__(self, in_chans: int, embed_dim: int, kernel_size: int, stride: int, device=None, dtype=None):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size, stride, kernel_size // 2, **dd)
        self.norm = nn.LayerNorm(embed_dim, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_chans, H, W) -> (B, H / stride, W / stride, C)."""
        return self.norm(self.proj(x).permute(0, 2, 3, 1))


class Block(nn.Module):
    """Pre-norm block: x += drop_path(attn(norm1(x))); x += drop_path(ConvGLU(norm2(x))) on a (B, H, W, C) map."""

    def __init__(self, dim: int, attn: nn.Module, mlp_ratio: float, proj_drop: float = 0., drop_path: float = 0.,
                 norm_layer: Callable = nn.LayerNorm, device=None, dtype=None):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.norm1 = norm_layer(dim, **dd)
        self.attn = attn
        self.norm2 = norm_layer(dim, **dd)
        self.mlp = ConvGLU(dim, int(dim * mlp_ratio), drop=proj_drop, **dd)
        self.drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, W, C) -> (B, H, W, C)."""
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


def _per_stage(values: Sequence, num_stages: int, name: str) -> List:
    values = list(values)
    if len(values) != num_stages:
        raise ValueError(f'{name} has {len(values)} entries but the model has {num_stages} stages')
    return values


def _pool(pool_type: str) -> SelectAdaptivePool2d:
    """Global pooling of an NCHW map; pool_type '' keeps the map (and does not flatten it)."""
    return SelectAdaptivePool2d(pool_type=pool_type, flatten=bool(pool_type))


class TransNeXt(nn.Module):
    """TransNeXt classifier / backbone (official constructor argument names).

    Args:
        img_size: training resolution; the default of `pretrain_size`. Any multiple of 32 runs.
        pretrain_size: resolution whose stage sizes normalise the CPB coordinates (the official
            `pretrain_size`; 224 for the 384 fine-tuned weights). Default: img_size.
        window_size: per stage, the odd local window of aggregated attention, or None for full attention.
        patch_size: stride of the first patch embedding (kernel 2 * patch_size - 1).
        in_chans, num_classes, global_pool, drop_rate: timm input / head conventions (drop_rate = head dropout).
        embed_dims, num_heads, mlp_ratios, depths, sr_ratios: per-stage widths, heads, ConvGLU ratios,
            block counts and pooling ratios of aggregated attention.
        qkv_bias: bias of the q / kv / qkv projections.
        proj_drop_rate, attn_drop_rate, drop_path_rate: in-block dropouts, stochastic depth (linear over blocks).
        norm_layer: block and stage norm (LayerNorm eps 1e-6; patch-embed and pooled norms keep eps 1e-5).
        backend: window-operator backend of aggregated attention ('auto' | 'torch' | 'triton').
        shared_head, routed_head: per stage, MoH's shared-head count S and top-k count k of routed heads among the
            other h - S (official names; zoo.layers.mixture_of_heads). None (the default) = plain TransNeXt;
            `routed_head` defaults to 0 per stage, which needs S = h (every head shared, gated per token).
        moh_backend: mixture-of-heads execution ('auto' | 'torch' = gate every head | 'routed' = compute routed
            heads only for the tokens that selected them).
    """

    def __init__(
            self,
            img_size: Union[int, Tuple[int, int]] = 224,
            pretrain_size: Optional[Union[int, Tuple[int, int]]] = None,
            window_size: Sequence[Optional[int]] = (3, 3, 3, None),
            patch_size: int = 4,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = 'avg',
            embed_dims: Sequence[int] = (48, 96, 192, 384),
            num_heads: Sequence[int] = (2, 4, 8, 16),
            mlp_ratios: Sequence[float] = (8, 8, 4, 4),
            qkv_bias: bool = True,
            drop_rate: float = 0.,
            proj_drop_rate: float = 0.,
            attn_drop_rate: float = 0.,
            drop_path_rate: float = 0.,
            depths: Sequence[int] = (2, 2, 15, 2),
            sr_ratios: Sequence[int] = (8, 4, 2, 1),
            norm_layer: Optional[Callable] = None,
            backend: str = 'auto',
            shared_head: Optional[Sequence[int]] = None,
            routed_head: Optional[Sequence[int]] = None,
            moh_backend: str = 'auto',
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        num_stages = len(depths)
        embed_dims = _per_stage(embed_dims, num_stages, 'embed_dims')
        num_heads = _per_stage(num_heads, num_stages, 'num_heads')
        mlp_ratios = _per_stage(mlp_ratios, num_stages, 'mlp_ratios')
        sr_ratios = _per_stage(sr_ratios, num_stages, 'sr_ratios')
        window_size = _per_stage(window_size, num_stages, 'window_size')
        shared_head, routed_head = _head_splits(shared_head, routed_head, num_stages)
        norm_layer = norm_layer or (lambda dim, **kw: nn.LayerNorm(dim, eps=1e-6, **kw))
        pretrain_size = to_2tuple(pretrain_size or img_size)
        self.num_stages = num_stages
        self.in_chans = in_chans
        self.num_classes = num_classes
        self.num_features = self.head_hidden_size = embed_dims[-1]
        self.embed_dims = embed_dims
        self.output_fmt = 'NCHW'
        self.grad_checkpointing = False
        self.feature_info = []

        drop_path_rates = calculate_drop_path_rates(drop_path_rate, sum(depths))
        for i in range(num_stages):
            stride = patch_size * 2 ** i
            stage_pretrain = (pretrain_size[0] // stride, pretrain_size[1] // stride)
            if i == 0:
                embed = OverlapPatchEmbed(in_chans, embed_dims[0], 2 * patch_size - 1, patch_size, **dd)
            else:
                embed = OverlapPatchEmbed(embed_dims[i - 1], embed_dims[i], 3, 2, **dd)
            blocks = []
            moh = dict(shared_head=shared_head[i], routed_head=routed_head[i], moh_backend=moh_backend)
            for j in range(depths[i]):
                if window_size[i] is None:
                    attn = ScaledCosineAttention(embed_dims[i], num_heads[i], stage_pretrain, qkv_bias,
                                                 attn_drop_rate, proj_drop_rate, **moh, **dd)
                else:
                    attn = AggregatedAttention(embed_dims[i], num_heads[i], stage_pretrain, window_size[i],
                                               sr_ratios[i], qkv_bias, attn_drop_rate, proj_drop_rate, backend,
                                               **moh, **dd)
                blocks.append(Block(embed_dims[i], attn, mlp_ratios[i], proj_drop_rate,
                                    drop_path_rates[sum(depths[:i]) + j], norm_layer, **dd))
            setattr(self, f'patch_embed{i + 1}', embed)
            setattr(self, f'block{i + 1}', nn.Sequential(*blocks))
            setattr(self, f'norm{i + 1}', norm_layer(embed_dims[i], **dd))
            self.feature_info.append(dict(num_chs=embed_dims[i], reduction=stride, module=f'norm{i + 1}'))

        self.global_pool = _pool(global_pool)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dims[-1], num_classes, **dd) if num_classes > 0 else nn.Identity()
        self.apply(_init_weights)

    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        keywords = ('query_embedding', 'relative_pos_bias_local', 'cpb', 'temperature')
        return {name for name, _ in self.named_parameters() if any(word in name for word in keywords)}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict:
        return dict(
            stem=r'^patch_embed1\.',
            blocks=r'^(?:patch_embed|block|norm)(\d+)' if coarse else [
                (r'^block(\d+)\.(\d+)', None),
                (r'^patch_embed(\d+)', (0,)),
                (r'^norm(\d+)', (99999,)),
            ],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        self.num_classes = num_classes
        if global_pool is not None:
            self.global_pool = _pool(global_pool)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def _check_input(self, x: torch.Tensor) -> None:
        check_image_batch(x, self.in_chans, 'transnext')
        height, width = x.shape[-2:]
        if height % _STRIDE or width % _STRIDE or height == 0 or width == 0:
            raise ValueError(f'transnext needs H and W divisible by {_STRIDE}, got {height}x{width}')

    def _stage(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """Stage i (0-based): NCHW input -> normalised (B, H_i, W_i, C_i) map."""
        x = getattr(self, f'patch_embed{i + 1}')(x)
        blocks = getattr(self, f'block{i + 1}')
        if self.grad_checkpointing and not torch.jit.is_scripting():
            x = checkpoint_seq(blocks, x)
        else:
            x = blocks(x)
        return getattr(self, f'norm{i + 1}')(x)

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Stage outputs after their stage norm (the official detection/segmentation features), strides 4-32.

        Args:
            x: (B, in_chans, H, W) images, H and W divisible by 32.
            indices: stages to return (int = last n, list = absolute or negative indices, None = all).
            norm: unused; every stage output is already normalised by its stage norm.
            stop_early: skip the stages after the last requested one.
            output_fmt: 'NCHW' or 'NHWC'.
            intermediates_only: return only the list.
        """
        if output_fmt not in ('NCHW', 'NHWC'):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NHWC', got {output_fmt!r}")
        self._check_input(x)
        take_indices, max_index = feature_take_indices(self.num_stages, indices)
        last = max_index if stop_early else self.num_stages - 1
        intermediates = []
        for i in range(last + 1):
            x = self._stage(i, x)
            if i in take_indices:
                intermediates.append(x.permute(0, 3, 1, 2) if output_fmt == 'NCHW' else x)
            x = x.permute(0, 3, 1, 2)
        if intermediates_only:
            return intermediates
        return x, intermediates

    def prune_intermediate_layers(self, indices: Union[int, List[int]] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> List[int]:
        """Drop the stages after the last requested one; returns absolute indices.

        Stage norms are part of each stage's features, so `prune_norm` has nothing to remove.
        """
        take_indices, max_index = feature_take_indices(self.num_stages, indices)
        for i in range(max_index + 1, self.num_stages):
            for prefix in ('patch_embed', 'block', 'norm'):
                delattr(self, f'{prefix}{i + 1}')
        self.num_stages = max_index + 1
        self.feature_info = self.feature_info[:self.num_stages]
        if prune_head:
            self.reset_classifier(0, '')
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_chans, H, W) -> (B, C_last, H/32, W/32), after the last stage norm."""
        self._check_input(x)
        for i in range(self.num_stages):
            x = self._stage(i, x).permute(0, 3, 1, 2)
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """(B, C, h, w) -> logits (B, num_classes), or the pooled features (B, C) with pre_logits."""
        x = self.head_drop(self.global_pool(x))
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def load_balancing_losses(self) -> Dict[str, torch.Tensor]:
        """{layer ('block3.0', ...): scalar} of the routed layers' MoH balancing losses from the latest
        training-mode forward (each attention keeps its own; eval-mode forwards record none)."""
        return {name[:-len('.attn')]: module.load_balancing_loss for name, module in self.named_modules()
                if name.endswith('.attn') and getattr(module, 'load_balancing_loss', None) is not None}

    def forward_with_aux(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Logits (B, num_classes) and the auxiliary loss (a scalar) of one training forward: the MoH
        load-balancing loss averaged over the routed layers (0 when none routes), the term a recipe adds as
        `loss.aux_weight` times it (official 0.01). Training mode only: the official loss does not exist in eval."""
        if not any(getattr(m, 'mixture_of_heads', False) for m in self.modules()):
            raise ValueError('this TransNeXt has no mixture-of-heads layers (shared_head unset), so no auxiliary '
                             'loss; use forward')
        if not self.training:
            raise ValueError('the MoH load-balancing loss is computed in training mode only; call model.train()')
        logits = self(x)
        losses = list(self.load_balancing_losses().values())
        aux = torch.stack(losses).mean() if losses else logits.new_zeros(())
        return logits, aux


def _head_splits(shared_head: Optional[Sequence[int]], routed_head: Optional[Sequence[int]],
                 num_stages: int) -> Tuple[List[Optional[int]], List[int]]:
    """Per-stage (shared_head, routed_head): Nones and zeros when MoH is off; routed_head 0 where unset."""
    if shared_head is None:
        if routed_head is not None and any(routed_head):
            raise ValueError(f'routed_head {list(routed_head)} needs shared_head (the shared heads per stage)')
        return [None] * num_stages, [0] * num_stages
    shared_head = _per_stage(shared_head, num_stages, 'shared_head')
    routed_head = _per_stage(routed_head if routed_head is not None else [0] * num_stages, num_stages,
                             'routed_head')
    return shared_head, routed_head


def _init_weights(module: nn.Module) -> None:
    """Official init: Linear trunc-normal(0.02) with zero bias; conv normal(0, sqrt(2 / fan_out)); LN 1 / 0."""
    if isinstance(module, nn.Linear):
        trunc_normal_(module.weight, std=.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Conv2d):
        fan_out = module.kernel_size[0] * module.kernel_size[1] * module.out_channels // module.groups
        nn.init.normal_(module.weight, 0., (2. / fan_out) ** 0.5)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def checkpoint_filter_fn(state_dict: Dict[str, torch.Tensor], model: nn.Module) -> Dict[str, torch.Tensor]:
    """Official TransNeXt checkpoint -> this model's state dict.

    The official files are plain state dicts with the names used here; wrapped forms are unwrapped
    (`unwrap_state_dict`). Official non-persistent buffers (`relative_pos_index*`,
    `relative_coords_table*`, `seq_length_scale`, `padding_mask`) are derived per input size here and dropped
    if a file carries them.
    """
    buffers = ('relative_pos_index', 'relative_coords_table', 'seq_length_scale', 'padding_mask')
    return {k: v for k, v in unwrap_state_dict(state_dict).items() if not k.split('.')[-1].startswith(buffers)}


def _create(variant: str, pretrained: bool = False, **kwargs) -> TransNeXt:
    return create_model(TransNeXt, variant, pretrained, checkpoint_filter_fn, (0, 1, 2, 3), **kwargs)


def _cfg(url: str = '', **kwargs) -> Dict:
    # The official default_cfg (timm's generic ViT cfg: mean/std 0.5, crop 0.9) is not what training and
    # evaluation used: ImageNet mean/std, bicubic resize 256 + centre crop 224.
    return imagenet_cfg(**{
        'url': url,
        'first_conv': 'patch_embed1.proj',
        'classifier': 'head',
        'license': 'apache-2.0',
        'origin_url': 'https://github.com/DaiShiResearch/TransNeXt',
        'paper_ids': 'arXiv:2311.17132',
        'paper_name': 'TransNeXt: Robust Foveal Visual Perception for Vision Transformers',
        **kwargs,
    })


def _hub(repo: str, filename: str, **kwargs) -> Dict:
    """Weights published on the Hugging Face hub as `repo`/`filename` (hub id and the same file as a url)."""
    return dict(url=f'https://huggingface.co/{repo}/resolve/main/{filename}', hf_hub_id=repo,
                hf_hub_filename=filename, **kwargs)


def _transnext(repo: str, filename: str, **kwargs) -> Dict:
    return _cfg(**_hub(f'DaiShiResearch/{repo}', filename, **kwargs))


def _moh(repo: str, filename: str) -> Dict:
    # Evaluated like TransNeXt (docs/moh.md §3: resize 256 bicubic, centre crop 224, ImageNet mean/std); the hub
    # files are full training checkpoints whose weights sit under 'model' (unwrapped by timm and the filter).
    return _cfg(**_hub(f'Chat-UniVi/{repo}', filename), origin_url='https://github.com/SkyworkAI/MoH',
                paper_ids='arXiv:2410.11842', paper_name='MoH: Multi-Head Attention as Mixture-of-Head Attention')


# 384 fine-tuned weights: evaluated by warping to 384 (no crop); trained with pretrain_size 224, the default.
_384 = dict(input_size=(3, 384, 384), pool_size=(12, 12), crop_pct=1.0)

default_cfgs = generate_default_cfgs({
    'transnext_micro.in1k': _transnext('transnext-micro-224-1k', 'transnext_micro_224_1k.pth'),
    'transnext_tiny.in1k': _transnext('transnext-tiny-224-1k', 'transnext_tiny_224_1k.pth'),
    'transnext_small.in1k': _transnext('transnext-small-224-1k', 'transnext_small_224_1k.pth'),
    'transnext_small.in1k_384': _transnext('transnext-small-384-1k-ft-1k', 'transnext_small_384_1k_ft_1k.pth',
                                           **_384),
    'transnext_base.in1k': _transnext('transnext-base-224-1k', 'transnext_base_224_1k.pth'),
    'transnext_base.in1k_384': _transnext('transnext-base-384-1k-ft-1k', 'transnext_base_384_1k_ft_1k.pth', **_384),
    'transnext_micro_AAAA.in1k': _transnext('transnext-micro-AAAA-256-1k', 'transnext_micro_AAAA_256_1k.pth',
                                            input_size=(3, 256, 256), pool_size=(8, 8)),
    'moh_transnext_small_80.in1k': _moh('MoH-ViT-S-80', 'moh_transnext_small_80.pth'),
    # the file name of S-75 is assumed by analogy with the other three (docs/moh.md §4)
    'moh_transnext_small_75.in1k': _moh('MoH-ViT-S-75', 'moh_transnext_small_75.pth'),
    'moh_transnext_base_75.in1k': _moh('MoH-ViT-B-75', 'moh_transnext_base_75.pth'),
    'moh_transnext_base_50.in1k': _moh('MoH-ViT-B-50', 'moh_transnext_base_50.pth'),
})

_MICRO = dict(embed_dims=(48, 96, 192, 384), num_heads=(2, 4, 8, 16), depths=(2, 2, 15, 2))
_TINY = dict(embed_dims=(72, 144, 288, 576), num_heads=(3, 6, 12, 24), depths=(2, 2, 15, 2))
_SMALL = dict(embed_dims=(72, 144, 288, 576), num_heads=(3, 6, 12, 24), depths=(5, 5, 22, 5))
_BASE = dict(embed_dims=(96, 192, 384, 768), num_heads=(4, 8, 16, 32), depths=(5, 5, 23, 5))


@register_model
def transnext_micro(pretrained: bool = False, **kwargs) -> TransNeXt:
    return _create('transnext_micro', pretrained, **dict(dict(_MICRO, drop_path_rate=0.15), **kwargs))


@register_model
def transnext_tiny(pretrained: bool = False, **kwargs) -> TransNeXt:
    return _create('transnext_tiny', pretrained, **dict(dict(_TINY, drop_path_rate=0.25), **kwargs))


@register_model
def transnext_small(pretrained: bool = False, **kwargs) -> TransNeXt:
    return _create('transnext_small', pretrained, **dict(dict(_SMALL), **kwargs))


@register_model
def transnext_base(pretrained: bool = False, **kwargs) -> TransNeXt:
    return _create('transnext_base', pretrained, **dict(dict(_BASE), **kwargs))


@register_model
def transnext_micro_AAAA(pretrained: bool = False, **kwargs) -> TransNeXt:
    # aggregated attention in every stage, pooled grid 4x4 everywhere at 256 (paper App. D.6)
    args = dict(_MICRO, drop_path_rate=0.15, img_size=256, window_size=(3, 3, 3, 3), sr_ratios=(16, 8, 4, 2))
    return _create('transnext_micro_AAAA', pretrained, **dict(args, **kwargs))


# MoH-ViT variants (docs/moh.md §1): per-stage shared heads S and top-k routed heads k; stages with k = 0 share every
# head (S = h) and only re-weight them per token. Drop path stays 0 as in the official factories; the training
# configs' 0.45 (S) / 0.6 (B) are in the recipes.
_MOH = {
    'moh_transnext_small_80': dict(_SMALL, shared_head=(3, 6, 3, 8), routed_head=(0, 0, 6, 12)),
    'moh_transnext_small_75': dict(_SMALL, shared_head=(3, 6, 3, 4), routed_head=(0, 0, 6, 12)),
    'moh_transnext_base_75': dict(_BASE, shared_head=(4, 8, 4, 5), routed_head=(0, 0, 8, 16)),
    'moh_transnext_base_50': dict(_BASE, shared_head=(2, 2, 2, 4), routed_head=(2, 4, 6, 8)),
}


@register_model
def moh_transnext_small_80(pretrained: bool = False, **kwargs) -> TransNeXt:
    return _create('moh_transnext_small_80', pretrained, **dict(_MOH['moh_transnext_small_80'], **kwargs))


@register_model
def moh_transnext_small_75(pretrained: bool = False, **kwargs) -> TransNeXt:
    return _create('moh_transnext_small_75', pretrained, **dict(_MOH['moh_transnext_small_75'], **kwargs))


@register_model
def moh_transnext_base_75(pretrained: bool = False, **kwargs) -> TransNeXt:
    return _create('moh_transnext_base_75', pretrained, **dict(_MOH['moh_transnext_base_75'], **kwargs))


@register_model
def moh_transnext_base_50(pretrained: bool = False, **kwargs) -> TransNeXt:
    return _create('moh_transnext_base_50', pretrained, **dict(_MOH['moh_transnext_base_50'], **kwargs))
