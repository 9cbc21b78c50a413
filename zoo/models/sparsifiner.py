"""Sparsifiner: instance-dependent sparse attention on DeiT-S and LV-ViT-S.

Paper: Sparsifiner: Learning Sparse Instance-Dependent Attention for Efficient Vision Transformers (Wei, Duke,
Jiang, Aarabi, Taylor, Shkurti; CVPR 2023), https://arxiv.org/abs/2303.13755.
Official code: https://github.com/lim142857/Sparsifiner (MIT) @ 9a11e26. No trained Sparsifiner weights are
released; training starts from DeiT-S / LV-ViT-S checkpoints (the teachers), see `checkpoint_filter_fn`.

Every block's attention owns a connectivity predictor (`zoo.layers.ConnectivityPredictor`) that picks, per image
and per non-cls query, the `ceil(keep * 197)` keys it attends to; the cls query stays dense. State-dict names are
the official ones (timm ViT names + `blocks.i.attn.mask_predictor.*`, LV-ViT `patch_embed.conv1..3/bn1..3`,
`aux_head`), so a timm / official DeiT-S or LV-ViT-S checkpoint loads as-is apart from the predictor.

Execution (`attn_impl`): 'masked' is the official dense-then-mask attention; 'sparse' computes only the kept
pairs; 'auto' (default) picks by the rule in `resolve_attn_impl`. When every key is kept (keep 1.0,
no token pruning) the mask is all ones and plain dense attention runs. Both give the same outputs.

Training (`set_attention_reconstruction`): in the official phase 1 the backbone runs dense attention in training
mode while the predictor (signed basis, dense coefficients) is fitted to a teacher's attention; its approximations
are kept in `approx_attn` for `teacher_attention_loss`. Phase 2 trains the backbone with the mask on. The mask is
detached (official), so only the phase-1 loss reaches the predictors: they are frozen (requires_grad False) unless
attention reconstruction is on, so that a plain training step leaves no trainable parameter without gradient
(which DDP without find_unused_parameters rejects).

Token pruning (official, EViT-like): blocks flagged in `token_pruning_loc_indicator` keep the top
`ceil(token_keep_rate * 196)` patch tokens by mean-over-heads cls attention; pruned tokens are zeroed, not
dropped. Deviation: the official predictor overwrites its budget in place with min(budget, kept tokens) on the
first pruned call; here the same minimum is computed per call from the keep rates (same outputs, no state).

The predictor's token projections are [197, K]: inputs must be 224 x 224 at patch 16 (a ValueError otherwise).
LV-ViT: token labelling / MixToken training are not implemented (`mix_token` is accepted for the official
constructor call and has no effect); the output is always the official eval logits, cls head + 0.5 x the
per-class max of the aux head over patch tokens.
"""
import logging
import math
from functools import partial
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint
from timm.layers import DropPath, Mlp, PatchEmbed, calculate_drop_path_rates, to_2tuple, trunc_normal_
from timm.models import generate_default_cfgs, register_model
from timm.models._features import feature_take_indices

from zoo.layers.sparse_attn import (ConnectivityPredictor, attention_budget, connectivity_mask, connectivity_topk,
                                    dense_attention, masked_attention, topk_sparse_attention)
from zoo.models._checkpoint import unwrap_state_dict
from zoo.models._factory import check_image_batch, create_model, imagenet_cfg

__all__ = ['Sparsifiner', 'SparsifinerAttention', 'SparsifinerBlock']

_logger = logging.getLogger(__name__)

ATTN_IMPLS = ('auto', 'masked', 'sparse')
# 'auto' runs the gather-based sparse attention at keep fractions <= SPARSE_MAX_KEEP[device type], the masked
# dense attention otherwise. Measured (benchmarks/sparsifiner_cpu.py, RESULTS.md): on CPU the sparse gather is
# slower than masked dense attention at every keep ratio down to 0.25 (197 tokens), so no device has an entry
# yet and 'auto' means 'masked'; add an entry once a device measures the sparse path faster.
SPARSE_MAX_KEEP: Dict[str, float] = {}


class SparsifinerAttention(nn.Module):
    """Multi-head self-attention whose non-cls queries attend to the keys their connectivity predictor keeps.

    Args:
        dim, num_heads, qkv_bias, attn_drop, proj_drop: as timm's Attention (keys `qkv`, `proj`).
        num_tokens: fixed token count N (cls + patches) of the predictor.
        attn_keep_rate: fraction of the N keys each non-cls query keeps.
        token_keep_rate, prune_tokens: this block keeps ceil(rate * (N - 1)) patch tokens when prune_tokens.
        scale_before_matmul: (q * scale) @ k^T (LV-ViT) instead of (q @ k^T) * scale (DeiT); rounding only.
        predictor_kwargs: `ConnectivityPredictor` options (reduce factors, thresholds, coefficient top-k).
    """

    def __init__(self, dim: int, num_heads: int, num_tokens: int = 197, attn_keep_rate: float = 0.25,
                 token_keep_rate: float = 1., prune_tokens: bool = False, qkv_bias: bool = True,
                 attn_drop: float = 0., proj_drop: float = 0., device=None, dtype=None, **predictor_kwargs):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        if dim % num_heads:
            raise ValueError(f'dim {dim} is not divisible by num_heads {num_heads}')
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.num_tokens = num_tokens
        self.attn_budget = attention_budget(attn_keep_rate, num_tokens)
        self.prune_tokens = prune_tokens
        self.token_budget = math.ceil(token_keep_rate * (num_tokens - 1))
        self.attn_impl = 'auto'
        self.attn_recon = False
        self.kept_tokens: Optional[int] = None  # patch tokens kept by the mask this block receives
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias, **dd)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim, **dd)
        self.proj_drop = nn.Dropout(proj_drop)
        self.mask_predictor = ConnectivityPredictor(self.head_dim, num_heads, num_tokens, **predictor_kwargs, **dd)

    @property
    def reconstructing(self) -> bool:
        """Phase-1 training: dense attention, predictor fitted with its signed basis."""
        return self.training and self.attn_recon

    @property
    def budget(self) -> int:
        """Keys per non-cls query, capped by the patch tokens still kept (the official min with the kept count)."""
        return self.attn_budget if self.kept_tokens is None else min(self.attn_budget, self.kept_tokens)

    def uses_dense_attention(self) -> bool:
        """Whether this block runs plain dense attention (every key kept, or the teacher-fitting phase)."""
        return self.reconstructing or self.budget >= self.num_tokens

    def macs_not_counted(self, x: torch.Tensor) -> int:
        """MACs of the fused dense / masked attention (QK^T + AV over all N^2 pairs), which torch's FLOP counter
        does not see on CPU; the sparse path's products are counted directly."""
        sparse = not self.uses_dense_attention() and resolve_attn_impl(
            self.attn_impl, self.budget / self.num_tokens, x.device) == 'sparse'
        return 0 if sparse else 2 * x.shape[0] * self.num_heads * x.shape[1] ** 2 * self.head_dim

    def forward(self, x: torch.Tensor, token_mask: Optional[torch.Tensor] = None
                ) -> Tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
        """(B, N, C) tokens -> (B, N, C), the token mask after this block (B, N - 1) and, while reconstructing,
        the predictor's approximate attention (B, H, N - 1, N).

        token_mask: (B, N - 1) bool, False for patch tokens pruned by an earlier block (their q, k, v are zeroed);
        it keeps `kept_tokens` patch tokens per image (set by the model from the keep rates).
        """
        batch, num_tokens, channels = x.shape
        q, k, v = self.qkv(x).reshape(batch, num_tokens, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        if token_mask is not None:
            keep = torch.cat([token_mask.new_ones(batch, 1), token_mask], 1)[:, None, :, None]
            q, k, v = q * keep, k * keep, v * keep
        need_cls_attn = self.prune_tokens and not self.reconstructing
        approx_attn = None
        if self.reconstructing:
            approx_attn, _ = self.mask_predictor(q, k, token_mask, reconstruct=True)
            out, _ = dense_attention(q, k, v, self.scale)
        else:
            out, cls_attn = self._sparse_attention(q, k, v, token_mask, need_cls_attn)
        if need_cls_attn:
            token_mask = self._prune(cls_attn, token_mask)
        out = self.proj_drop(self.proj(out.transpose(1, 2).reshape(batch, num_tokens, channels)))
        return out, token_mask, approx_attn

    def _sparse_attention(self, q, k, v, token_mask, need_cls_attn: bool):
        """(B, H, N, d) each -> output (B, H, N, d), cls attention (B, H, N) or None."""
        if self.uses_dense_attention():
            return dense_attention(q, k, v, self.scale, need_cls_attn)
        budget = self.budget
        approx_attn, _ = self.mask_predictor(q, k, token_mask)
        key_index = connectivity_topk(approx_attn, budget, token_mask)
        if resolve_attn_impl(self.attn_impl, budget / self.num_tokens, q.device) == 'sparse':
            return topk_sparse_attention(q, k, v, key_index, self.scale)
        return masked_attention(q, k, v, connectivity_mask(key_index, self.num_tokens), self.scale, need_cls_attn)

    def _prune(self, cls_attn: torch.Tensor, token_mask: Optional[torch.Tensor]) -> torch.Tensor:
        """Keep the token_budget patch tokens with the highest mean-over-heads cls attention: (B, N - 1) bool."""
        score = cls_attn[:, :, 1:].mean(dim=1)
        if token_mask is not None:
            score = score.masked_fill(~token_mask, float('-inf'))
        index = score.topk(self.token_budget, dim=-1, sorted=False).indices
        # a tensor source, not the scalar True, which torch.jit.trace cannot record (see connectivity_mask)
        return torch.zeros_like(score, dtype=torch.bool).scatter(-1, index, torch.ones_like(index, dtype=torch.bool))


def resolve_attn_impl(attn_impl: str, keep_fraction: float, device: torch.device) -> str:
    """'masked' or 'sparse' for `attn_impl`; 'auto' picks 'sparse' at keep fractions <= SPARSE_MAX_KEEP[device]."""
    if attn_impl != 'auto':
        return attn_impl
    return 'sparse' if keep_fraction <= SPARSE_MAX_KEEP.get(device.type, 0.) else 'masked'


class SparsifinerBlock(nn.Module):
    """Pre-norm block: x + attn(norm1(x)) / skip_lam, x + mlp(norm2(x)) / skip_lam; pruned tokens zeroed after."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4., skip_lam: float = 1., proj_drop: float = 0.,
                 drop_path: float = 0., norm_layer: Callable = nn.LayerNorm, device=None, dtype=None,
                 **attn_kwargs):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.skip_lam = skip_lam
        self.norm1 = norm_layer(dim, **dd)
        self.attn = SparsifinerAttention(dim, num_heads, proj_drop=proj_drop, **attn_kwargs, **dd)
        self.drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.norm2 = norm_layer(dim, **dd)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU, drop=proj_drop, **dd)

    def forward(self, x: torch.Tensor, token_mask: Optional[torch.Tensor] = None
                ) -> Tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
        """(B, N, C) -> (B, N, C), token mask (B, N - 1) or None, approximate attention or None."""
        out, token_mask, approx_attn = self.attn(self.norm1(x), token_mask)
        x = x + self.drop_path(out) / self.skip_lam
        x = x + self.drop_path(self.mlp(self.norm2(x))) / self.skip_lam
        if token_mask is not None:
            keep = torch.cat([token_mask.new_ones(x.shape[0], 1), token_mask], 1)
            x = x * keep[..., None]
        return x, token_mask, approx_attn


class ConvStem(nn.Module):
    """LV-ViT '4_2' patch embedding: 7x7/2 conv, two 3x3 convs (each BN + ReLU, 64 ch), then a p/2 patch conv."""

    def __init__(self, img_size: int = 224, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 384,
                 stem_chs: int = 64, device=None, dtype=None):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.img_size = to_2tuple(img_size)
        self.patch_size = to_2tuple(patch_size)
        self.grid_size = tuple(s // p for s, p in zip(self.img_size, self.patch_size))
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.conv1 = nn.Conv2d(in_chans, stem_chs, 7, stride=2, padding=3, bias=False, **dd)
        self.bn1 = nn.BatchNorm2d(stem_chs, **dd)
        self.conv2 = nn.Conv2d(stem_chs, stem_chs, 3, padding=1, bias=False, **dd)
        self.bn2 = nn.BatchNorm2d(stem_chs, **dd)
        self.conv3 = nn.Conv2d(stem_chs, stem_chs, 3, padding=1, bias=False, **dd)
        self.bn3 = nn.BatchNorm2d(stem_chs, **dd)
        self.proj = nn.Conv2d(stem_chs, embed_dim, patch_size // 2, stride=patch_size // 2, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_chans, H, W) -> (B, H/p * W/p, embed_dim)."""
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        x = F.relu(self.bn3(self.conv3(x)))
        return self.proj(x).flatten(2).transpose(1, 2)


class Sparsifiner(nn.Module):
    """ViT (cls token, learned position embedding, final norm, cls-token head) with Sparsifiner attention.

    Args:
        img_size, patch_size, in_chans, num_classes, embed_dim, depth, num_heads, mlp_ratio, qkv_bias: official.
        attn_keep_rate_list: per block fraction of keys each non-cls query keeps (official name); a float
            `attn_keep_rate` applies to every block.
        token_keep_rate_list, token_pruning_loc_indicator: per block token keep rate and whether the block prunes.
        reduce_n_factor, reduce_c_factor, share_inout_proj, basis_threshold, coef_topk, coef_threshold: predictor.
        p_emb: None (DeiT patch conv) or '4_2' (LV-ViT convolutional stem).
        skip_lam: residual branches divided by skip_lam (LV-ViT 2.0).
        return_dense: LV-ViT auxiliary head over patch tokens (`aux_head`), added as 0.5 x its per-class max.
        mix_token: accepted for the official LV-ViT call; MixToken is not implemented (no effect).
        norm_eps: LayerNorm eps (DeiT 1e-6; LV-ViT uses nn.LayerNorm's 1e-5).
        attn_impl: 'auto', 'masked' or 'sparse' (see the module docstring).
        global_pool: 'token' (cls, official), 'avg' (patch-token mean) or '' (no pooling).
        drop_rate, proj_drop_rate, attn_drop_rate, drop_path_rate: dropout and stochastic depth.
    """

    def __init__(
            self,
            img_size: int = 224,
            patch_size: int = 16,
            in_chans: int = 3,
            num_classes: int = 1000,
            embed_dim: int = 384,
            depth: int = 12,
            num_heads: int = 6,
            mlp_ratio: float = 4.,
            qkv_bias: bool = True,
            attn_keep_rate: float = 0.25,
            attn_keep_rate_list: Optional[Sequence[float]] = None,
            token_keep_rate_list: Optional[Sequence[float]] = None,
            token_pruning_loc_indicator: Optional[Sequence[bool]] = None,
            reduce_n_factor: int = 6,
            reduce_c_factor: int = 2,
            share_inout_proj: bool = False,
            basis_threshold: float = 0.02,
            coef_topk: int = 8,
            coef_threshold: float = 0.05,
            p_emb: Optional[str] = None,
            skip_lam: float = 1.,
            return_dense: bool = False,
            mix_token: bool = False,
            norm_eps: float = 1e-6,
            attn_impl: str = 'auto',
            global_pool: str = 'token',
            drop_rate: float = 0.,
            proj_drop_rate: float = 0.,
            attn_drop_rate: float = 0.,
            drop_path_rate: float = 0.,
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        if p_emb not in (None, '4_2'):
            raise ValueError(f"p_emb must be None (DeiT patch conv) or '4_2' (LV-ViT stem), got {p_emb!r}")
        if global_pool not in ('token', 'avg', ''):
            raise ValueError(f"global_pool must be 'token', 'avg' or '', got {global_pool!r}")
        attn_keep = _per_block(attn_keep_rate_list, attn_keep_rate, depth, 'attn_keep_rate_list')
        token_keep = _per_block(token_keep_rate_list, 1., depth, 'token_keep_rate_list')
        prune = _per_block(token_pruning_loc_indicator, False, depth, 'token_pruning_loc_indicator')
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.num_features = self.head_hidden_size = self.embed_dim = embed_dim
        self.num_prefix_tokens = 1
        self.in_chans = in_chans
        self.mix_token = mix_token
        self.grad_checkpointing = False
        self.approx_attn: List[torch.Tensor] = []
        if p_emb == '4_2':
            self.patch_embed = ConvStem(img_size, patch_size, in_chans, embed_dim, **dd)
        else:
            self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim, **dd)
        num_tokens = self.patch_embed.num_patches + 1
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim, **dd))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_tokens, embed_dim, **dd))
        self.pos_drop = nn.Dropout(drop_rate)
        norm_layer = partial(nn.LayerNorm, eps=norm_eps)
        drop_path = calculate_drop_path_rates(drop_path_rate, depth)
        self.blocks = nn.ModuleList([
            SparsifinerBlock(
                embed_dim, num_heads, mlp_ratio=mlp_ratio, skip_lam=skip_lam, proj_drop=proj_drop_rate,
                drop_path=drop_path[i], norm_layer=norm_layer, num_tokens=num_tokens, attn_keep_rate=attn_keep[i],
                token_keep_rate=token_keep[i], prune_tokens=bool(prune[i]), qkv_bias=qkv_bias,
                attn_drop=attn_drop_rate, reduce_n_factor=reduce_n_factor, reduce_c_factor=reduce_c_factor,
                share_inout_proj=share_inout_proj, basis_threshold=basis_threshold, coef_topk=coef_topk,
                coef_threshold=coef_threshold, **dd)
            for i in range(depth)])
        for block, kept in zip(self.blocks, _kept_tokens(token_keep, prune, num_tokens - 1)):
            block.attn.kept_tokens = kept
        self.norm = norm_layer(embed_dim, **dd)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes, **dd) if num_classes > 0 else nn.Identity()
        self.aux_head = None
        if return_dense:
            self.aux_head = nn.Linear(embed_dim, num_classes, **dd) if num_classes > 0 else nn.Identity()
        reduction = patch_size
        self.feature_info = [dict(num_chs=embed_dim, reduction=reduction, module=f'blocks.{i}') for i in range(depth)]
        self.set_attn_impl(attn_impl)
        self.set_attention_reconstruction(False)
        trunc_normal_(self.pos_embed, std=.02)
        trunc_normal_(self.cls_token, std=.02)
        self.apply(_init_weights)

    def set_attn_impl(self, attn_impl: str) -> None:
        """Choose 'auto', 'masked' (official, dense then masked) or 'sparse' (kept pairs only) for every block."""
        if attn_impl not in ATTN_IMPLS:
            raise ValueError(f'attn_impl must be one of {", ".join(ATTN_IMPLS)}, got {attn_impl!r}')
        for block in self.blocks:
            block.attn.attn_impl = attn_impl

    def set_attention_reconstruction(self, enabled: bool = True) -> None:
        """Phase 1 of the paper: in training mode attention stays dense and the predictors' approximations are
        recorded (signed basis) for `teacher_attention_loss`; eval mode always applies the mask. The predictors
        train (requires_grad) exactly while this is on: no other loss reaches them."""
        for block in self.blocks:
            block.attn.attn_recon = enabled
            block.attn.mask_predictor.requires_grad_(enabled)

    def teacher_attention_loss(self, teacher_attention: Sequence[torch.Tensor]) -> torch.Tensor:
        """Official attention-reconstruction loss of the last forward: per block, MSE with reduction 'sum' between
        the predictor's approx_attn (B, H, N - 1, N) and the teacher's softmax attention without its cls row
        (B, H, N, N), averaged over blocks. Needs `set_attention_reconstruction(True)` and training mode."""
        if not self.approx_attn:
            raise RuntimeError('no predictor output recorded: call set_attention_reconstruction(True) and run a '
                               'training-mode forward first')
        if len(teacher_attention) != len(self.approx_attn):
            raise ValueError(f'teacher gave {len(teacher_attention)} attention maps for {len(self.approx_attn)} '
                             f'blocks')
        losses = [F.mse_loss(approx, teacher[:, :, 1:].detach(), reduction='sum')
                  for approx, teacher in zip(self.approx_attn, teacher_attention)]
        return torch.stack(losses).mean()

    def predictor_parameter_names(self) -> List[str]:
        """Names of the connectivity predictors' parameters (what phase 1 trains)."""
        return [name for name, _ in self.named_parameters() if '.mask_predictor.' in name]

    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        return {'pos_embed', 'cls_token'}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict:
        return dict(stem=r'^cls_token|^pos_embed|^patch_embed',
                    blocks=[(r'^blocks\.(\d+)', None), (r'^norm', (99999,))])

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        if global_pool is not None:
            if global_pool not in ('token', 'avg', ''):
                raise ValueError(f"global_pool must be 'token', 'avg' or '', got {global_pool!r}")
            self.global_pool = global_pool
        self.num_classes = num_classes
        device = self.pos_embed.device
        self.head = nn.Linear(self.embed_dim, num_classes, device=device) if num_classes > 0 else nn.Identity()
        if self.aux_head is not None:
            self.aux_head = nn.Linear(self.embed_dim, num_classes, device=device) if num_classes > 0 \
                else nn.Identity()

    def _check_input(self, x: torch.Tensor) -> None:
        """ValueError naming the problem unless x is a float (B, in_chans, 224, 224)-style image batch."""
        check_image_batch(x, self.in_chans, 'sparsifiner')
        expected = tuple(self.patch_embed.img_size)
        if tuple(x.shape[-2:]) != expected:
            raise ValueError(
                f'sparsifiner needs {expected[0]}x{expected[1]} inputs: its connectivity predictor is fixed to '
                f'{self.pos_embed.shape[1]} tokens ({expected[0]}x{expected[1]} at patch '
                f'{self.patch_embed.patch_size[0]} + cls), got {x.shape[-2]}x{x.shape[-1]}')

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_chans, H, W) -> (B, N, C) with cls token and position embedding."""
        self._check_input(x)
        x = self.patch_embed(x)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        return self.pos_drop(x + self.pos_embed)

    def _run_blocks(self, x: torch.Tensor, blocks: Sequence[nn.Module], take: Sequence[int] = ()):
        """Run `blocks` passing the token mask along; returns the final tokens and the tokens after each `take`."""
        token_mask, taken = None, []
        self.approx_attn = []
        for i, block in enumerate(blocks):
            if self.grad_checkpointing and torch.is_grad_enabled() and not torch.jit.is_scripting():
                x, token_mask, approx = torch.utils.checkpoint.checkpoint(block, x, token_mask, use_reentrant=False)
            else:
                x, token_mask, approx = block(x, token_mask)
            if approx is not None:
                self.approx_attn.append(approx)
            if i in take:
                taken.append(x)
        return x, taken

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_chans, 224, 224) -> (B, 197, C) tokens (cls first), final norm applied."""
        x, _ = self._run_blocks(self._embed(x), self.blocks)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """(B, N, C) tokens -> logits (B, num_classes) (LV-ViT: + 0.5 x aux head's per-class max over patches), or
        the pooled (B, C) with pre_logits."""
        if self.global_pool == 'token':
            pooled = x[:, 0]
        elif self.global_pool == 'avg':
            pooled = x[:, self.num_prefix_tokens:].mean(dim=1)
        else:
            pooled = x
        pooled = self.head_drop(pooled)
        if pre_logits:
            return pooled
        logits = self.head(pooled)
        if self.aux_head is not None and self.global_pool:
            logits = logits + 0.5 * self.aux_head(x[:, self.num_prefix_tokens:]).max(dim=1).values
        return logits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Patch tokens after the requested blocks as (B, C, 14, 14) ('NCHW') or (B, 14, 14, C) ('NHWC') maps,
        plus (unless intermediates_only) the final normed tokens (B, 197, C) as forward_features gives them."""
        if output_fmt not in ('NCHW', 'NHWC'):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NHWC', got {output_fmt!r}")
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        blocks = self.blocks[:max_index + 1] if stop_early else self.blocks
        x, taken = self._run_blocks(self._embed(x), blocks, take_indices)
        grid = self.patch_embed.grid_size
        intermediates = []
        for feat in taken:
            feat = (self.norm(feat) if norm else feat)[:, self.num_prefix_tokens:]
            feat = feat.reshape(feat.shape[0], grid[0], grid[1], -1)
            intermediates.append(feat.permute(0, 3, 1, 2) if output_fmt == 'NCHW' else feat)
        if intermediates_only:
            return intermediates
        return self.norm(x), intermediates

    def prune_intermediate_layers(self, indices: Union[int, List[int]] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> List[int]:
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        self.blocks = self.blocks[:max_index + 1]
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0, '')
        return take_indices


def _per_block(values: Optional[Sequence], default, depth: int, name: str) -> List:
    """Per-block list: `default` repeated when values is None, else values, which must have `depth` entries."""
    if values is None:
        return [default] * depth
    values = list(values)
    if len(values) != depth:
        raise ValueError(f'{name} has {len(values)} entries for depth {depth}')
    return values


def _kept_tokens(token_keep: Sequence[float], prune: Sequence[bool], num_patches: int) -> List[Optional[int]]:
    """Patch tokens kept by the mask each block receives (None before the first pruning block)."""
    kept, current = [], None
    for rate, prunes in zip(token_keep, prune):
        kept.append(current)
        if prunes:
            current = math.ceil(rate * num_patches)
    return kept


def _init_weights(module: nn.Module) -> None:
    """Official init: Linear trunc-normal(0.02) with zero bias, LayerNorm 1/0 (predictor: its own reset)."""
    if isinstance(module, nn.Linear):
        trunc_normal_(module.weight, std=.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def checkpoint_filter_fn(state_dict: Dict[str, torch.Tensor], model: Sparsifiner) -> Dict[str, torch.Tensor]:
    """Official Sparsifiner, timm / official DeiT or LV-ViT (TokenLabeling) checkpoint -> this model's state dict.

    Unwraps a wrapped checkpoint (`unwrap_state_dict`). A backbone checkpoint without the connectivity predictors
    (DeiT-S, LV-ViT-S: the start of the paper's phase 1) gets the model's freshly initialised `mask_predictor.*`
    tensors; the added keys are logged. A 1000-class DeiT `head_dist` / `dist_token` (distilled DeiT) is refused:
    it is another architecture.
    """
    state_dict = unwrap_state_dict(state_dict)
    if 'dist_token' in state_dict:
        raise ValueError('a distilled DeiT checkpoint (dist_token, head_dist) does not fit Sparsifiner; use the '
                         'plain deit_small_patch16_224 weights')
    own = model.state_dict()
    if 'patch_embed.proj.weight' in state_dict and state_dict['patch_embed.proj.weight'].dim() == 2:
        state_dict['patch_embed.proj.weight'] = state_dict['patch_embed.proj.weight'].reshape(
            own['patch_embed.proj.weight'].shape)
    added = sorted(k for k in own if '.mask_predictor.' in k and k not in state_dict)
    if added:
        _logger.warning('checkpoint has no connectivity predictor: initialised %d tensors (%s, ...)',
                        len(added), ', '.join(added[:6]))
        state_dict.update({k: own[k] for k in added})
    return state_dict


def _create(variant: str, pretrained: bool = False, **kwargs) -> Sparsifiner:
    default_out = min(3, kwargs.get('depth', 12))
    return create_model(Sparsifiner, variant, pretrained, checkpoint_filter_fn, default_out, **kwargs)


_NO_WEIGHTS = ('No trained Sparsifiner checkpoints are released (official README, evaluation section commented '
               'out). Train with recipes/classification/sparsifiner from the backbone weights.')


def _cfg(**kwargs) -> Dict:
    return imagenet_cfg(**{
        'pool_size': None,
        'fixed_input_size': True,
        'first_conv': 'patch_embed.proj',
        'classifier': 'head',
        'license': 'mit',
        'origin_url': 'https://github.com/lim142857/Sparsifiner',
        'paper_ids': 'arXiv:2303.13755',
        'paper_name': 'Sparsifiner: Learning Sparse Instance-Dependent Attention for Efficient Vision Transformers',
        **kwargs,
    })


default_cfgs = generate_default_cfgs({
    # DeiT-S ImageNet-1k weights (Apache-2.0), the official teacher and starting point: the backbone loads
    # unchanged and the predictors start freshly initialised (phase 1 of the paper).
    'sparsifiner_deit_small.deit_in1k_init': _cfg(
        hf_hub_id='timm/deit_small_patch16_224.fb_in1k',
        url='https://dl.fbaipublicfiles.com/deit/deit_small_patch16_224-cd65a155.pth', license='apache-2.0',
        notes=(_NO_WEIGHTS, 'These are the DeiT-S weights with untrained predictors (keep ratio 1.0 gives DeiT-S '
                            'exactly; sparse ratios need the two training phases).')),
    'sparsifiner_lvvit_small.untrained': _cfg(
        first_conv='patch_embed.conv1', crop_pct=0.9,
        notes=(_NO_WEIGHTS, 'Start from the LV-ViT-S checkpoint of zihangJiang/TokenLabeling through '
                            "pretrained_cfg_overlay=dict(file=...): predictors are initialised on load.")),
})


@register_model
def sparsifiner_deit_small(pretrained: bool = False, **kwargs) -> Sparsifiner:
    """DeiT-S (embed 384, depth 12, 6 heads) with connectivity predictors, keep 0.25 (official default)."""
    model_args = dict(patch_size=16, embed_dim=384, depth=12, num_heads=6, mlp_ratio=4., qkv_bias=True)
    return _create('sparsifiner_deit_small', pretrained, **dict(model_args, **kwargs))


@register_model
def sparsifiner_lvvit_small(pretrained: bool = False, **kwargs) -> Sparsifiner:
    """LV-ViT-S (conv stem, embed 384, depth 16, 6 heads, mlp 3, skip_lam 2, aux head) with predictors."""
    model_args = dict(patch_size=16, embed_dim=384, depth=16, num_heads=6, mlp_ratio=3., qkv_bias=False,
                      p_emb='4_2', skip_lam=2., return_dense=True, mix_token=True, norm_eps=1e-5)
    return _create('sparsifiner_lvvit_small', pretrained, **dict(model_args, **kwargs))
