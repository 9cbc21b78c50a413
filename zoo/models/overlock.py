"""OverLoCK: an Overview-first-Look-Closely-next ConvNet with context-mixing dynamic kernels.

Paper: OverLoCK (Meng Lou, Yizhou Yu, CVPR 2025), https://arxiv.org/abs/2502.20087
Official code and weights: https://github.com/LMMMEng/OverLoCK (Apache-2.0).

Three sub-networks:
* Base-Net: conv stem and RepConv blocks (large dilated re-parameterisable depthwise kernels) at strides 4-16;
* Overview-Net: one more RepConv stage at stride 32 whose output is the context (with an auxiliary head);
* Focus-Net: ContMix blocks at strides 16 and 32 that carry the projected context as extra channels and
  mix it back in at every block.

State-dict names are the official ones (including nn.Sequential indices) in both the training form and the
re-parameterised form (`deploy=True`, or `model.reparam()`), so both official files load strictly.
`forward` returns the main logits only (timm contract); `forward_with_aux` also returns the auxiliary head's
logits for the official training loss (main + 0.4 * aux). The auxiliary head is built by default so official
checkpoints load strictly, but it is frozen (requires_grad False) until `set_aux_head_trainable(True)`: a plain
`forward` never reaches it, and a trainable parameter without gradient breaks DDP (without
find_unused_parameters) and is shrunk by weight decay for nothing.
"""
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint
from timm.layers import DropPath, LayerNorm2d, SelectAdaptivePool2d, calculate_drop_path_rates, trunc_normal_
from timm.models import generate_default_cfgs, register_model
from timm.models._features import feature_take_indices

from zoo.layers.contmix import (GRN, ContMix, ConvLayerScale, DilatedReparamBlock, ResDWConv, SqueezeExcite2d,
                                fold_dilated_reparam)
from zoo.models._checkpoint import unwrap_state_dict
from zoo.models._factory import check_image_batch, create_model, imagenet_cfg

__all__ = ['OverLoCK']


def _norm(dim: int, **dd) -> nn.Module:
    """Channels-first LayerNorm with the official eps."""
    return LayerNorm2d(dim, eps=1e-6, **dd)


def _conv_bn(in_dim: int, out_dim: int, stride: int, **dd) -> nn.Sequential:
    """Bias-free 3x3 conv + BatchNorm (`.0`, `.1`): the downsamplers."""
    return nn.Sequential(nn.Conv2d(in_dim, out_dim, 3, stride, 1, bias=False, **dd), nn.BatchNorm2d(out_dim, **dd))


def _stem(in_chans: int, dim: int, **dd) -> nn.Sequential:
    """Four 3x3 convs (strides 2, 1, 2, 1; widths C/2, C/2, C, C) with BN, GELU between: stride 4."""
    half = dim // 2
    return nn.Sequential(
        nn.Conv2d(in_chans, half, 3, 2, 1, bias=False, **dd), nn.BatchNorm2d(half, **dd), nn.GELU(),
        nn.Conv2d(half, half, 3, 1, 1, bias=False, **dd), nn.BatchNorm2d(half, **dd), nn.GELU(),
        nn.Conv2d(half, dim, 3, 2, 1, bias=False, **dd), nn.BatchNorm2d(dim, **dd), nn.GELU(),
        nn.Conv2d(dim, dim, 3, 1, 1, bias=False, **dd), nn.BatchNorm2d(dim, **dd),
    )


def _layer_scale(dim: int, init_value: Optional[float], **dd) -> nn.Module:
    return nn.Identity() if init_value is None else ConvLayerScale(dim, init_value, **dd)


def _residual(identity: torch.Tensor, branch: torch.Tensor, scale: nn.Module, res_scale: bool) -> torch.Tensor:
    """res_scale (official default): the layer scale multiplies the identity, not the branch."""
    return scale(identity) + branch if res_scale else identity + scale(branch)


class RepConvBlock(nn.Module):
    """Base-/Overview-Net block. (B, C, H, W) -> same.

    x = x + DW3x3(x);  x = ls(x) + proj(x), proj = LN -> DilatedReparam_k -> BN -> SE -> 1x1 (C -> rC) -> GELU
    -> ResDW3x3 -> GRN -> 1x1 (rC -> C) -> DropPath.
    """

    def __init__(self, dim: int, kernel_size: int, mlp_ratio: float = 4., ls_init_value: Optional[float] = None,
                 res_scale: bool = True, drop_path: float = 0., deploy: bool = False, device=None, dtype=None):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        hidden = int(dim * mlp_ratio)
        self.res_scale = res_scale
        self.dwconv = nn.Conv2d(dim, dim, 3, padding=1, groups=dim, **dd)
        self.proj = nn.Sequential(
            _norm(dim, **dd),
            DilatedReparamBlock(dim, kernel_size, deploy=deploy, **dd),
            nn.BatchNorm2d(dim, **dd),
            SqueezeExcite2d(dim, **dd),
            nn.Conv2d(dim, hidden, 1, **dd),
            nn.GELU(),
            ResDWConv(hidden, **dd),
            GRN(hidden, **dd),
            nn.Conv2d(hidden, dim, 1, **dd),
            DropPath(drop_path) if drop_path > 0 else nn.Identity(),
        )
        self.ls = _layer_scale(dim, ls_init_value, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.dwconv(x)
        return _residual(x, self.proj(x), self.ls, self.res_scale)


class DynamicConvBlock(ContMix):
    """Focus-Net block around ContMix; x (B, C, H, W) and context h (B, Ch, H, W) in and out.

    Not the first block of a stage: h = x_scale(h) + h_scale(h_r) with the stage's guide context h_r.
    f = cat[x, h];  f = f + DW3x3(f);  f = ls1(f) + DropPath(ContMix(LN(f)));  f = f + DW3x3(f);
    f = ls2(f) + DropPath(MLP(LN(f))), MLP = 1x1 (C+Ch -> rC) -> GELU -> ResDW3x3 -> GRN -> 1x1 (rC -> C+Ch).
    The ContMix parameters sit directly on the block (official key names), hence the subclass.
    """

    def __init__(self, dim: int, ctx_dim: int, kernel_size: int, smk_size: int = 5, num_heads: int = 2,
                 mlp_ratio: float = 3., ls_init_value: Optional[float] = 1., res_scale: bool = True,
                 drop_path: float = 0., is_first: bool = False, deploy: bool = False, backend: str = 'auto',
                 device=None, dtype=None):
        super().__init__(dim, ctx_dim, kernel_size, smk_size, num_heads, deploy=deploy, backend=backend,
                         device=device, dtype=dtype)
        dd = dict(device=device, dtype=dtype)
        fused = dim + ctx_dim
        hidden = int(dim * mlp_ratio)
        self.res_scale = res_scale
        self.is_first = is_first
        if not is_first:
            self.x_scale = ConvLayerScale(ctx_dim, 1., **dd)
            self.h_scale = ConvLayerScale(ctx_dim, 1., **dd)
        self.dwconv1 = nn.Conv2d(fused, fused, 3, padding=1, groups=fused, **dd)
        self.norm1 = _norm(fused, **dd)
        self.dwconv2 = nn.Conv2d(fused, fused, 3, padding=1, groups=fused, **dd)
        self.norm2 = _norm(fused, **dd)
        self.mlp = nn.Sequential(
            nn.Conv2d(fused, hidden, 1, **dd),
            nn.GELU(),
            ResDWConv(hidden, **dd),
            GRN(hidden, **dd),
            nn.Conv2d(hidden, fused, 1, **dd),
        )
        self.ls1 = _layer_scale(fused, ls_init_value, **dd)
        self.ls2 = _layer_scale(fused, ls_init_value, **dd)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, h: torch.Tensor, h_r: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        if not self.is_first:
            h = self.x_scale(h) + self.h_scale(h_r)
        f = torch.cat([x, h], dim=1)
        f = f + self.dwconv1(f)
        f = _residual(f, self.drop_path(super().forward(self.norm1(f))), self.ls1, self.res_scale)
        f = f + self.dwconv2(f)
        f = _residual(f, self.drop_path(self.mlp(self.norm2(f))), self.ls2, self.res_scale)
        return f[:, :self.dim], f[:, self.dim:]


class CTXDownsample(nn.Module):
    """Stride-2 conv + BN on the features (C -> C') and, separately, on the context (Ch -> Ch)."""

    def __init__(self, dim: int, ctx_dim: int, out_dim: int, device=None, dtype=None):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.x_proj = _conv_bn(dim, out_dim, 2, **dd)
        self.h_proj = _conv_bn(ctx_dim, ctx_dim, 2, **dd)

    def forward(self, x: torch.Tensor, h: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        return self.x_proj(x), self.h_proj(h)


# Modules that only the levels from this index on need (for prune_intermediate_layers).
_LEVEL_MODULES = (
    ('patch_embed1', 'blocks1'),
    ('patch_embed2', 'blocks2'),
    ('patch_embed3', 'blocks3', 'patch_embed4', 'blocks4', 'high_level_proj', 'sub_blocks3', 'aux_head'),
    ('patch_embedx', 'sub_blocks4'),
)


class OverLoCK(nn.Module):
    """OverLoCK classifier / backbone.

    Args (official names):
        depth: RepConv blocks of Base-Net stages 1-3 and of the Overview-Net stage 4.
        sub_depth: ContMix blocks of the Focus-Net at strides 16 and 32.
        embed_dim: widths C0..C3; the context has C3 // 4 channels.
        kernel_size: DilatedReparam kernels of stages 1-4; entries 3 and 4 are also the Focus-Net large kernels.
        mlp_ratio, sub_mlp_ratio: MLP widths of the RepConv and ContMix blocks.
        sub_num_heads: ContMix heads per Focus stage (2 * heads kernel groups).
        ls_init_value: per-stage layer-scale init (None = no layer scale); entries 3-4 also set the Focus-Net's.
        res_scale: layer scale on the identity (official) instead of the residual branch.
        smk_size: ContMix small kernel.
        projection: width of the head's 1x1 projection (the pre-logits width).
        use_ds: build the auxiliary (deep supervision) head on the Overview-Net output (frozen until
            `set_aux_head_trainable(True)`).
        deploy: re-parameterised form (every DilatedReparamBlock folded into one depthwise conv with bias).
        num_classes, in_chans, global_pool, drop_rate, drop_path_rate: timm conventions.
        backend: ContMix aggregation backend ('auto' | 'torch' | 'triton').
    """

    def __init__(
            self,
            depth: Sequence[int] = (2, 2, 3, 2),
            sub_depth: Sequence[int] = (6, 2),
            embed_dim: Sequence[int] = (56, 112, 256, 336),
            kernel_size: Sequence[int] = (17, 15, 13, 7),
            mlp_ratio: Sequence[float] = (4, 4, 4, 4),
            sub_num_heads: Sequence[int] = (4, 6),
            sub_mlp_ratio: Sequence[float] = (3, 3),
            ls_init_value: Sequence[Optional[float]] = (None, None, 1, 1),
            res_scale: bool = True,
            smk_size: int = 5,
            projection: int = 1024,
            use_ds: bool = True,
            deploy: bool = False,
            num_classes: int = 1000,
            in_chans: int = 3,
            global_pool: str = 'avg',
            drop_rate: float = 0.,
            drop_path_rate: float = 0.,
            backend: str = 'auto',
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        for name, value, length in (('depth', depth, 4), ('sub_depth', sub_depth, 2), ('embed_dim', embed_dim, 4),
                                    ('kernel_size', kernel_size, 4), ('mlp_ratio', mlp_ratio, 4),
                                    ('sub_num_heads', sub_num_heads, 2), ('sub_mlp_ratio', sub_mlp_ratio, 2),
                                    ('ls_init_value', ls_init_value, 4)):
            if len(value) != length:
                raise ValueError(f'{name} needs {length} entries, got {tuple(value)}')
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.deploy = deploy
        self.grad_checkpointing = False
        self.output_fmt = 'NCHW'
        self.num_levels = 4
        ctx_dim = embed_dim[3] // 4
        fusion_dim = embed_dim[3] + ctx_dim
        self.num_features = self.head_hidden_size = projection
        dpr = iter(calculate_drop_path_rates(drop_path_rate, sum(depth) + sum(sub_depth)))

        self.patch_embed1 = _stem(in_chans, embed_dim[0], **dd)
        for i in range(4):
            if i > 0:
                self.add_module(f'patch_embed{i + 1}', _conv_bn(embed_dim[i - 1], embed_dim[i], 2, **dd))
            self.add_module(f'blocks{i + 1}', nn.Sequential(*[
                RepConvBlock(embed_dim[i], kernel_size[i], mlp_ratio[i], ls_init_value[i], res_scale, next(dpr),
                             deploy, **dd)
                for _ in range(depth[i])]))
        self.high_level_proj = nn.Conv2d(embed_dim[3], ctx_dim, 1, **dd)
        for j, stage in enumerate((3, 4)):
            blocks = [
                DynamicConvBlock(embed_dim[stage - 1], ctx_dim, kernel_size[stage - 1], smk_size, sub_num_heads[j],
                                 sub_mlp_ratio[j], ls_init_value[stage - 1], res_scale, next(dpr),
                                 is_first=stage == 3 and b == 0, deploy=deploy, backend=backend, **dd)
                for b in range(sub_depth[j])]
            self.add_module(f'sub_blocks{stage}', nn.ModuleList(blocks))
            if stage == 3:
                self.patch_embedx = CTXDownsample(embed_dim[2], ctx_dim, embed_dim[3], **dd)

        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Sequential(
            nn.Conv2d(fusion_dim, projection, 1, bias=False, **dd),
            nn.BatchNorm2d(projection, **dd),
            nn.SiLU(),
            _pool(global_pool),
            _classifier(projection, num_classes, **dd),
        )
        if use_ds:
            self.aux_head = nn.Sequential(nn.BatchNorm2d(embed_dim[3], **dd), nn.AdaptiveAvgPool2d(1),
                                          _classifier(embed_dim[3], num_classes, **dd))
            # only a loss through forward_with_aux reaches it: it trains when that loss asks for it
            self.aux_head.requires_grad_(False)
        self.feature_info = [
            dict(num_chs=embed_dim[0], reduction=4, module='blocks1'),
            dict(num_chs=embed_dim[1], reduction=8, module='blocks2'),
            dict(num_chs=embed_dim[2] + ctx_dim, reduction=16, module='sub_blocks3'),
            dict(num_chs=fusion_dim, reduction=32, module='sub_blocks4'),
        ]
        self.apply(_init_weights)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict:
        return dict(
            stem=r'^patch_embed1\.',
            blocks=[
                (r'^blocks(\d+)' if coarse else r'^blocks(\d+)\.(\d+)', None),
                (r'^patch_embed([234])\.', (0,)),
                (r'^(?:high_level_proj|sub_blocks3)\.', (5,)),
                (r'^(?:patch_embedx|sub_blocks4)\.', (6,)),
            ],
        )

    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        """Nothing is exempt: the official recipe decays rpb, layer scales and GRN (timm's default grouping
        still skips 1-D parameters and biases)."""
        return set()

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head[4]

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """New main (and auxiliary) classifier; global_pool '' keeps the map."""
        self.num_classes = num_classes
        if global_pool is not None:
            self.head[3] = _pool(global_pool)
        self.head[4] = _classifier(self.num_features, num_classes)
        if hasattr(self, 'aux_head'):
            self.aux_head[2] = _classifier(self.aux_head[0].num_features, num_classes)
            self.aux_head[2].requires_grad_(self.aux_head[0].weight.requires_grad)

    @torch.jit.ignore
    def set_aux_head_trainable(self, enable: bool = True) -> None:
        """Train the auxiliary head (requires_grad) for a loss through `forward_with_aux`, or freeze it again.

        Call it before building the optimizer and wrapping the model in DDP, which only see trainable parameters.
        """
        if not hasattr(self, 'aux_head'):
            raise ValueError('this OverLoCK has no auxiliary head (built with use_ds=False)')
        self.aux_head.requires_grad_(enable)

    @torch.no_grad()
    def reparam(self) -> 'OverLoCK':
        """Fold every DilatedReparamBlock in place (the official `reparam()`); the model becomes the deploy form."""
        for module in self.modules():
            if isinstance(module, DilatedReparamBlock):
                module.reparam()
        self.deploy = True
        return self

    def _check_input(self, x: torch.Tensor) -> None:
        check_image_batch(x, self.in_chans, 'OverLoCK')
        if x.shape[2] < 1 or x.shape[3] < 1:
            raise ValueError(f'OverLoCK needs H and W >= 1, got {x.shape[2]}x{x.shape[3]}')

    def _run(self, block: nn.Module, *args):
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return torch.utils.checkpoint.checkpoint(block, *args, use_reentrant=False)
        return block(*args)

    def _forward_levels(self, x: torch.Tensor, last: int = 3) -> Tuple[List[torch.Tensor], Optional[torch.Tensor]]:
        """Images (B, in_chans, H, W) -> level outputs up to `last` (strides 4, 8, 16, 32; the last two are
        cat[x, context]) and the Overview-Net output (B, C3, H/32, W/32), None when last < 2."""
        self._check_input(x)
        feats = []
        x = self.patch_embed1(x)
        for i in range(min(last, 1) + 1):
            if i > 0:
                x = self.patch_embed2(x)
            x = self._run(getattr(self, f'blocks{i + 1}'), x)
            feats.append(x)
        if last < 2:
            return feats, None
        x = self._run(self.blocks3, self.patch_embed3(x))
        ctx = self._run(self.blocks4, self.patch_embed4(x))
        ctx_ori = self.high_level_proj(ctx)
        ctx_up = F.interpolate(ctx_ori, size=x.shape[-2:], mode='bilinear', align_corners=False)
        h = ctx_up
        for block in self.sub_blocks3:
            x, h = self._run(block, x, h, ctx_up)
        feats.append(torch.cat([x, h], dim=1))
        if last < 3:
            return feats, ctx
        x, h = self.patch_embedx(x, h)
        for block in self.sub_blocks4:
            x, h = self._run(block, x, h, ctx_ori)
        feats.append(torch.cat([x, h], dim=1))
        return feats, ctx

    def _project(self, x: torch.Tensor) -> torch.Tensor:
        """Head projection: (B, C3 + C3//4, h, w) -> (B, projection, h, w)."""
        return self.head[2](self.head[1](self.head[0](x)))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_chans, H, W) -> (B, projection, ceil(H/32), ceil(W/32)): the fused map after the head's
        1x1 projection, BN and SiLU (what the pooling sees)."""
        feats, _ = self._forward_levels(x)
        return self._project(feats[-1])

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """(B, projection, h, w) -> logits (B, num_classes), or pooled features (B, projection) with pre_logits."""
        pool, classifier = self.head[3], self.head[4]
        x = pool(x)
        flat = not pool.is_identity()
        if pre_logits:
            return x.flatten(1) if flat else x
        x = classifier(self.head_drop(x))
        return x.flatten(1) if flat else x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_with_aux(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Main logits and the auxiliary head's logits (B, num_classes) from one pass, for the training loss
        main + aux_weight * aux (official weight 0.4). The head's own parameters learn from it only after
        `set_aux_head_trainable(True)`; the backbone always does."""
        if not hasattr(self, 'aux_head'):
            raise ValueError('this OverLoCK has no auxiliary head (built with use_ds=False)')
        feats, ctx = self._forward_levels(x)
        return self.forward_head(self._project(feats[-1])), self.aux_head(ctx).flatten(1)

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Level outputs at strides 4, 8, 16, 32 (the official detection/segmentation backbone's, before its
        `extra_norm`): blocks1, blocks2, cat[x, context] after sub_blocks3 and after sub_blocks4.

        Args:
            x: (B, in_chans, H, W) images.
            indices: levels to return (int = last n, list = absolute or negative indices, None = all).
            norm: unused (the levels have no final norm); kept for the timm signature.
            stop_early: skip the levels after the last requested one.
            output_fmt: 'NCHW' or 'NHWC'.
            intermediates_only: return only the list.
        """
        if output_fmt not in ('NCHW', 'NHWC'):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NHWC', got {output_fmt!r}")
        take_indices, max_index = feature_take_indices(self.num_levels, indices)
        last = max_index if stop_early or intermediates_only else self.num_levels - 1
        feats, _ = self._forward_levels(x, last)
        intermediates = [feats[i] if output_fmt == 'NCHW' else feats[i].permute(0, 2, 3, 1) for i in take_indices]
        if intermediates_only:
            return intermediates
        return self._project(feats[-1]), intermediates

    def prune_intermediate_layers(self, indices: Union[int, List[int]] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> List[int]:
        """Drop the modules only later levels need; returns the absolute indices kept."""
        take_indices, max_index = feature_take_indices(self.num_levels, indices)
        for level in range(max_index + 1, self.num_levels):
            for name in _LEVEL_MODULES[level]:
                if hasattr(self, name):
                    delattr(self, name)
        self.num_levels = max_index + 1
        if prune_head:
            # the head's 1x1 projection, its BN and the auxiliary classifier only serve the logits
            self.head[0], self.head[1], self.head[2] = nn.Identity(), nn.Identity(), nn.Identity()
            if hasattr(self, 'aux_head'):
                del self.aux_head
            self.reset_classifier(0, '')
        return take_indices


def _pool(pool_type: str) -> SelectAdaptivePool2d:
    """Global pooling that keeps the (B, C, 1, 1) shape, so the 1x1 classifier conv applies; '' keeps the map."""
    return SelectAdaptivePool2d(pool_type=pool_type, flatten=False)


def _classifier(dim: int, num_classes: int, **dd) -> nn.Module:
    return nn.Conv2d(dim, num_classes, 1, **dd) if num_classes > 0 else nn.Identity()


def _init_weights(module: nn.Module) -> None:
    """Official init: convs and linears trunc-normal(0.02) with zero bias (norms keep 1 / 0)."""
    if isinstance(module, (nn.Conv2d, nn.Linear)):
        trunc_normal_(module.weight, std=.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def _fold_train_form(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Replace every train-form DilatedReparamBlock in a state dict by its folded deploy form."""
    prefixes = [k[:-len('.origin_bn.weight')] for k in state if k.endswith('.origin_bn.weight')]
    out = dict(state)
    for prefix in prefixes:
        block = {k[len(prefix) + 1:]: out.pop(k) for k in list(out) if k.startswith(prefix + '.')}
        folded = fold_dilated_reparam(block, block['lk_origin.weight'].shape[-1])
        out.update({f'{prefix}.{k}': v for k, v in folded.items()})
    return out


def checkpoint_filter_fn(state_dict: Dict[str, torch.Tensor], model: nn.Module) -> Dict[str, torch.Tensor]:
    """Official OverLoCK checkpoint (train or re-parameterised form) -> this model's state dict.

    Accepts a raw state dict or a wrapped one (`unwrap_state_dict`).
    A train-form checkpoint loads into a `deploy=True` model by folding its DilatedReparamBlocks on the way; a
    deploy-form checkpoint cannot be unfolded, so loading it into a train-form model is an error. An auxiliary
    classifier of another class count is dropped (like the main one, timm then re-initialises it).
    """
    state = unwrap_state_dict(state_dict)
    deploy_ckpt = any(k.endswith('.lk_origin.bias') for k in state)
    train_ckpt = any(k.endswith('.origin_bn.weight') for k in state)
    if deploy_ckpt and not getattr(model, 'deploy', False):
        raise ValueError('this is a re-parameterised (deploy) OverLoCK checkpoint: it cannot be unfolded into the '
                         'training form; build the model with deploy=True to load it')
    if train_ckpt and getattr(model, 'deploy', False):
        state = _fold_train_form(state)
    aux = getattr(model, 'aux_head', None)
    if aux is not None and 'aux_head.2.weight' in state and (
            not isinstance(aux[2], nn.Conv2d) or aux[2].weight.shape != state['aux_head.2.weight'].shape):
        state = {k: v for k, v in state.items() if not k.startswith('aux_head.2.')}
    return state


def _create(variant: str, pretrained: bool = False, **kwargs) -> OverLoCK:
    return create_model(OverLoCK, variant, pretrained, checkpoint_filter_fn, (0, 1, 2, 3), **kwargs)


_URL = 'https://github.com/LMMMEng/OverLoCK/releases/download/v1/'


def _cfg(url: str = '', **kwargs) -> Dict:
    return imagenet_cfg(**{
        'url': url,
        'crop_pct': 0.95,
        'first_conv': 'patch_embed1.0',
        'classifier': 'head.4',
        'license': 'apache-2.0',
        'origin_url': 'https://github.com/LMMMEng/OverLoCK',
        'paper_ids': 'arXiv:2502.20087',
        'paper_name': 'OverLoCK: An Overview-first-Look-Closely-next ConvNet with Context-Mixing Dynamic Kernels',
        **kwargs,
    })


# The train-form files; the *_reparam.pth files load as well into a model built with deploy=True.
default_cfgs = generate_default_cfgs({
    'overlock_xt.in1k': _cfg(_URL + 'overlock_xt_in1k_224.pth', crop_pct=0.925),
    'overlock_t.in1k': _cfg(_URL + 'overlock_t_in1k_224.pth', crop_pct=0.95),
    'overlock_s.in1k': _cfg(_URL + 'overlock_s_in1k_224.pth', crop_pct=0.95),
    'overlock_b.in1k': _cfg(_URL + 'overlock_b_in1k_224.pth', crop_pct=0.975),
})


@register_model
def overlock_xt(pretrained: bool = False, **kwargs) -> OverLoCK:
    args = dict(depth=[2, 2, 3, 2], sub_depth=[6, 2], embed_dim=[56, 112, 256, 336], sub_num_heads=[4, 6])
    return _create('overlock_xt', pretrained, **{**args, **kwargs})


@register_model
def overlock_t(pretrained: bool = False, **kwargs) -> OverLoCK:
    args = dict(depth=[4, 4, 6, 2], sub_depth=[12, 2], embed_dim=[64, 128, 256, 512], sub_num_heads=[4, 8])
    return _create('overlock_t', pretrained, **{**args, **kwargs})


@register_model
def overlock_s(pretrained: bool = False, **kwargs) -> OverLoCK:
    args = dict(depth=[6, 6, 8, 3], sub_depth=[16, 3], embed_dim=[64, 128, 320, 512], sub_num_heads=[8, 16])
    return _create('overlock_s', pretrained, **{**args, **kwargs})


@register_model
def overlock_b(pretrained: bool = False, **kwargs) -> OverLoCK:
    args = dict(depth=[8, 8, 10, 4], sub_depth=[20, 4], embed_dim=[80, 160, 384, 576], sub_num_heads=[6, 9])
    return _create('overlock_b', pretrained, **{**args, **kwargs})
