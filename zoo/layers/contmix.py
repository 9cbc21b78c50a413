"""ContMix: context-mixing dynamic kernels (OverLoCK, Lou & Yu, CVPR 2025, arXiv 2502.20087) and its parts.

ContMix turns each pixel's affinities to a few pooled context centres into per-pixel dynamic kernels and
aggregates the value map with them over a NATTEN neighbourhood (window clamped inside the map, never
zero-padded). The aggregation is `zoo.layers.na2d_av`, the value half of neighborhood attention, so the
dynamic kernels run on the same backends: reference, Triton kernel and blocked path
(backend='auto'|'torch'|'triton'|'blocked').

Parts, with the official state-dict names (so official checkpoints load strictly):
* `GRN`: ConvNeXt-V2 global response normalisation (`gamma`, `beta`).
* `SqueezeExcite2d`: GAP -> 1x1 -> GELU -> 1x1 -> sigmoid gate (`proj.1`, `proj.3`).
* `ResDWConv`: x + depthwise 3x3(x).
* `ConvLayerScale`: per-channel affine map stored as a depthwise 1x1 conv (`weight` (C,1,1,1), `bias` (C)).
* `DilatedReparamBlock`: UniRepLKNet's large depthwise kernel with parallel dilated small kernels, each with
  its BatchNorm; `reparam()` folds them into one depthwise conv with bias (the deploy form).
* `ContMix`: the token mixer of OverLoCK's Focus-Net blocks.
"""
import math
from typing import Dict, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .neighborhood import na2d_av, na2d_rpb

__all__ = ['GRN', 'SqueezeExcite2d', 'ResDWConv', 'ConvLayerScale', 'DilatedReparamBlock', 'ContMix',
           'contmix_aggregate', 'fold_dilated_reparam', 'DILATED_BRANCHES']

# Parallel (kernel, dilation) branches of the DilatedReparamBlock for each large kernel (UniRepLKNet / OverLoCK).
DILATED_BRANCHES: Dict[int, Tuple[Tuple[int, int], ...]] = {
    17: ((5, 1), (7, 1), (9, 2), (3, 4), (3, 5), (3, 7)),
    15: ((5, 1), (7, 1), (7, 2), (3, 3), (3, 5), (3, 7)),
    13: ((5, 1), (7, 1), (7, 2), (3, 3), (3, 4), (3, 5)),
    11: ((5, 1), (7, 1), (5, 2), (3, 3), (3, 4), (3, 5)),
    9: ((5, 1), (7, 1), (5, 2), (3, 3), (3, 4)),
    7: ((5, 1), (3, 1), (3, 2), (3, 3)),
    5: ((3, 1), (3, 2)),
}


class GRN(nn.Module):
    """Global response normalisation: (gamma * N(x) + 1) * x + beta on (B, C, H, W).

    N(x) = per-channel L2 norm over the map divided by its mean over channels (+ 1e-6).
    """

    def __init__(self, dim: int, eps: float = 1e-6, device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.gamma = nn.Parameter(torch.zeros(1, dim, 1, 1, device=device, dtype=dtype))
        self.beta = nn.Parameter(torch.zeros(1, dim, 1, 1, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        norm = torch.linalg.vector_norm(x, dim=(2, 3), keepdim=True)
        norm = norm / (norm.mean(dim=1, keepdim=True) + self.eps)
        return torch.addcmul(self.beta, self.gamma, x * norm) + x


class SqueezeExcite2d(nn.Module):
    """x * sigmoid(1x1(GELU(1x1(GAP(x))))) with hidden width max(16, C // 8). (B, C, H, W) -> same."""

    def __init__(self, dim: int, device=None, dtype=None):
        super().__init__()
        hidden = max(16, dim // 8)
        dd = dict(device=device, dtype=dtype)
        self.proj = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Conv2d(dim, hidden, 1, **dd),
            nn.GELU(),
            nn.Conv2d(hidden, dim, 1, **dd),
            nn.Sigmoid(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.proj(x)


class ResDWConv(nn.Conv2d):
    """x + depthwise 3x3 conv(x) (with bias). (B, C, H, W) -> same."""

    def __init__(self, dim: int, kernel_size: int = 3, device=None, dtype=None):
        super().__init__(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + super().forward(x)


class ConvLayerScale(nn.Module):
    """Per-channel x * weight + bias, stored as a depthwise 1x1 conv (official OverLoCK LayerScale keys)."""

    def __init__(self, dim: int, init_value: float = 1.0, device=None, dtype=None):
        super().__init__()
        self.init_value = init_value
        self.weight = nn.Parameter(torch.full((dim, 1, 1, 1), float(init_value), device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(dim, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight, self.bias, groups=x.shape[1])


def _fuse_bn(kernel: torch.Tensor, bn_state: Dict[str, torch.Tensor], eps: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """Fold an eval-mode BatchNorm into the preceding bias-free conv: -> (kernel, bias)."""
    std = (bn_state['running_var'] + eps).sqrt()
    scale = bn_state['weight'] / std
    return kernel * scale.reshape(-1, 1, 1, 1), bn_state['bias'] - bn_state['running_mean'] * scale


def _dilated_to_dense(kernel: torch.Tensor, dilation: int, size: int) -> torch.Tensor:
    """(C, 1, k, k) dilated kernel -> the equivalent dense (C, 1, size, size) kernel, centred."""
    span = dilation * (kernel.shape[-1] - 1) + 1
    dense = kernel.new_zeros(*kernel.shape[:2], span, span)
    dense[..., ::dilation, ::dilation] = kernel
    pad = (size - span) // 2
    return F.pad(dense, (pad, pad, pad, pad))


def fold_dilated_reparam(state: Dict[str, torch.Tensor], kernel_size: int,
                         bn_eps: float = 1e-5) -> Dict[str, torch.Tensor]:
    """Train-form DilatedReparamBlock state (keys relative to the block) -> deploy form {lk_origin.weight, .bias}.

    Each branch's BatchNorm is folded into its conv; dilated kernels are zero-inserted and centre-padded to
    kernel_size x kernel_size; the results are summed.
    """
    def bn(prefix):
        return {name: state[f'{prefix}.{name}'] for name in ('weight', 'bias', 'running_mean', 'running_var')}

    weight, bias = _fuse_bn(state['lk_origin.weight'], bn('origin_bn'), bn_eps)
    for k, r in DILATED_BRANCHES[kernel_size]:
        branch_w, branch_b = _fuse_bn(state[f'dil_conv_k{k}_{r}.weight'], bn(f'dil_bn_k{k}_{r}'), bn_eps)
        weight = weight + _dilated_to_dense(branch_w, r, kernel_size)
        bias = bias + branch_b
    return {'lk_origin.weight': weight, 'lk_origin.bias': bias}


class DilatedReparamBlock(nn.Module):
    """UniRepLKNet's dilated re-parameterisable depthwise large-kernel conv. (B, C, H, W) -> same.

    Train form: BN(lk_origin(x)) + sum over branches of BN_r(dilated conv_r(x)), all depthwise and bias-free.
    Deploy form (`deploy=True` or after `reparam()`): one depthwise conv `lk_origin` with bias.
    """

    def __init__(self, dim: int, kernel_size: int, deploy: bool = False, device=None, dtype=None):
        super().__init__()
        if kernel_size not in DILATED_BRANCHES:
            raise ValueError(f'DilatedReparamBlock kernel_size must be one of {sorted(DILATED_BRANCHES)}, '
                             f'got {kernel_size}')
        dd = dict(device=device, dtype=dtype)
        self.dim, self.kernel_size, self.deploy = dim, kernel_size, deploy
        self.lk_origin = nn.Conv2d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim, bias=deploy, **dd)
        if not deploy:
            self.origin_bn = nn.BatchNorm2d(dim, **dd)
            for k, r in DILATED_BRANCHES[kernel_size]:
                padding = r * (k - 1) // 2
                self.add_module(f'dil_conv_k{k}_{r}', nn.Conv2d(dim, dim, k, padding=padding, dilation=r, groups=dim,
                                                                bias=False, **dd))
                self.add_module(f'dil_bn_k{k}_{r}', nn.BatchNorm2d(dim, **dd))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.deploy:
            return self.lk_origin(x)
        out = self.origin_bn(self.lk_origin(x))
        for k, r in DILATED_BRANCHES[self.kernel_size]:
            out = out + getattr(self, f'dil_bn_k{k}_{r}')(getattr(self, f'dil_conv_k{k}_{r}')(x))
        return out

    @torch.no_grad()
    def reparam(self) -> None:
        """Fold every branch and BatchNorm into `lk_origin` (uses the running statistics, i.e. eval semantics)."""
        if self.deploy:
            return
        folded = fold_dilated_reparam(self.state_dict(), self.kernel_size, self.origin_bn.eps)
        conv = nn.Conv2d(self.dim, self.dim, self.kernel_size, padding=self.kernel_size // 2, groups=self.dim,
                         bias=True, device=folded['lk_origin.weight'].device, dtype=folded['lk_origin.weight'].dtype)
        conv.weight.copy_(folded['lk_origin.weight'])
        conv.bias.copy_(folded['lk_origin.bias'])
        for name in [n for n, _ in self.named_children() if n != 'lk_origin']:
            delattr(self, name)
        self.lk_origin = conv
        self.deploy = True


def contmix_aggregate(value: torch.Tensor, attn_small: torch.Tensor, attn_large: torch.Tensor,
                      backend: str = 'auto') -> torch.Tensor:
    """Dynamic-kernel aggregation of ContMix over clamped neighbourhoods (na2d_av on each half).

    Args:
        value: (B, C, H, W); channels are read as (2, G, C / (2G)): the first half is aggregated with the
            small kernels, the second half with the large ones.
        attn_small: (B, G, H, W, s*s) and attn_large: (B, G, H, W, k*k) kernel weights, slot t_row * k + t_col.
        backend: na2d_av backend ('auto' | 'torch' | 'triton' | 'blocked').

    Returns:
        (B, C, H, W), same channel order as value.
    """
    batch, channels, height, width = value.shape
    groups = attn_small.shape[1]
    if channels % (2 * groups):
        raise ValueError(f'value channels {channels} must be divisible by 2 * groups = {2 * groups}')
    small, large = math.isqrt(attn_small.shape[-1]), math.isqrt(attn_large.shape[-1])
    # (B, 2, G, c, H, W) -> two (B, G, H, W, c) value maps, the layout of na2d_av
    halves = value.view(batch, 2, groups, channels // (2 * groups), height, width).permute(1, 0, 2, 4, 5, 3)
    out_small = na2d_av(attn_small.to(value.dtype), halves[0].contiguous(), small, backend=backend)
    out_large = na2d_av(attn_large.to(value.dtype), halves[1].contiguous(), large, backend=backend)
    out = torch.stack((out_small, out_large), dim=1)  # (B, 2, G, H, W, c)
    return out.permute(0, 1, 2, 5, 3, 4).reshape(batch, channels, height, width)


class ContMix(nn.Module):
    """Context-mixing dynamic convolution (the token mixer of OverLoCK's Focus-Net). (B, C+Ch, H, W) -> same.

    Input f = LayerNorm(cat[x, h]): C feature channels, then Ch context channels.
      v = fusion(f) (C);  gate = SiLU(BN(1x1 v));  lepe = BN(DilatedReparam_k(v))
      Q = BN(1x1 f[:C]) * (C / G) ** -0.5 (C/2 ch);  K = BN(1x1 AvgPool_7x7(f[C:])) (C/2 ch, 49 region centres)
      A_g = Q_g^T K_g (per group g of G, per pixel: 49 affinities)
      kernels = softmax(weight_proj(A) + rpb) -> s*s (small) and k*k (large) slots per group and pixel
      y = proj(gate * SE(BN(1x1 aggregate(v, kernels)) + lepe))
    Maps whose short side is below k are bilinearly resized so that it equals k for the dynamic part, and the
    aggregated map is average-pooled back (the official behaviour; gate and lepe stay at the input size).

    Args:
        dim: C; ctx_dim: Ch; kernel_size: large kernel k; smk_size: small kernel s; num_heads: G / 2.
        deploy: build the DilatedReparamBlock in its folded form.
        backend: na2d_av backend for the aggregation.
    """
    num_centres = 7

    def __init__(self, dim: int, ctx_dim: int, kernel_size: int, smk_size: int = 5, num_heads: int = 2,
                 deploy: bool = False, backend: str = 'auto', device=None, dtype=None):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.dim, self.ctx_dim, self.kernel_size, self.smk_size = dim, ctx_dim, kernel_size, smk_size
        self.groups = 2 * num_heads
        if dim % (2 * self.groups):
            raise ValueError(f'ContMix dim {dim} must be divisible by 4 * num_heads = {2 * self.groups}')
        self.scale = (dim / self.groups) ** -0.5
        self.backend = backend
        centres = self.num_centres ** 2
        self.rpb1 = nn.Parameter(torch.zeros(self.groups, 2 * smk_size - 1, 2 * smk_size - 1, **dd))
        self.rpb2 = nn.Parameter(torch.zeros(self.groups, 2 * kernel_size - 1, 2 * kernel_size - 1, **dd))
        fused = dim + ctx_dim
        self.fusion = nn.Sequential(
            nn.Conv2d(fused, fused, 3, padding=1, groups=fused, **dd),
            nn.BatchNorm2d(fused, **dd),
            nn.GELU(),
            nn.Conv2d(fused, dim, 1, **dd),
            GRN(dim, **dd),
        )
        self.weight_query = nn.Sequential(nn.Conv2d(dim, dim // 2, 1, bias=False, **dd), nn.BatchNorm2d(dim // 2, **dd))
        self.weight_key = nn.Sequential(
            nn.AdaptiveAvgPool2d(self.num_centres),
            nn.Conv2d(ctx_dim, dim // 2, 1, bias=False, **dd),
            nn.BatchNorm2d(dim // 2, **dd),
        )
        self.weight_proj = nn.Conv2d(centres, smk_size ** 2 + kernel_size ** 2, 1, **dd)
        self.dyconv_proj = nn.Sequential(nn.Conv2d(dim, dim, 1, bias=False, **dd), nn.BatchNorm2d(dim, **dd))
        self.lepe = nn.Sequential(DilatedReparamBlock(dim, kernel_size, deploy=deploy, **dd), nn.BatchNorm2d(dim, **dd))
        self.se_layer = SqueezeExcite2d(dim, **dd)
        self.gate = nn.Sequential(nn.Conv2d(dim, dim, 1, bias=False, **dd), nn.BatchNorm2d(dim, **dd), nn.SiLU())
        self.proj = nn.Sequential(nn.BatchNorm2d(dim, **dd), nn.Conv2d(dim, fused, 1, **dd))

    def _work_size(self, height: int, width: int) -> Optional[Tuple[int, int]]:
        """Size the dynamic part runs at when the map's short side is below k (official rule), else None."""
        k = self.kernel_size
        if min(height, width) >= k:
            return None
        if height <= width:
            return k, int(k / height * width)
        return int(k / width * height), k

    def dynamic_kernels(self, feats: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Normed cat[x, h] (B, C+Ch, H, W) -> small (B, G, H, W, s*s) and large (B, G, H, W, k*k) kernels."""
        batch, _, height, width = feats.shape
        query, context = feats.split([self.dim, self.ctx_dim], dim=1)
        q = (self.weight_query(query) * self.scale).view(batch, self.groups, -1, height * width)
        k = self.weight_key(context).view(batch, self.groups, -1, self.num_centres ** 2)
        affinity = torch.einsum('bgcn,bgcl->bgnl', q, k)  # (B, G, HW, 49): never (HW)^2
        proj = self.weight_proj
        logits = F.linear(affinity, proj.weight.flatten(1), proj.bias).view(batch, self.groups, height, width, -1)
        small, large = logits.split([self.smk_size ** 2, self.kernel_size ** 2], dim=-1)
        small = small + na2d_rpb(self.rpb1, height, width, self.smk_size).to(small.dtype)
        large = large + na2d_rpb(self.rpb2, height, width, self.kernel_size).to(large.dtype)
        return small.softmax(dim=-1), large.softmax(dim=-1)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        height, width = feats.shape[-2:]
        value = self.fusion(feats)
        gate = self.gate(value)
        lepe = self.lepe(value)
        work = self._work_size(height, width)
        if work is not None:
            value = F.interpolate(value, size=work, mode='bilinear', align_corners=False)
            feats = F.interpolate(feats, size=work, mode='bilinear', align_corners=False)
        attn_small, attn_large = self.dynamic_kernels(feats)
        out = contmix_aggregate(value, attn_small, attn_large, self.backend)
        if work is not None:
            out = F.adaptive_avg_pool2d(out, (height, width))
        out = self.se_layer(self.dyconv_proj(out) + lepe)
        return self.proj(gate * out)

    def macs_not_counted(self, feats: torch.Tensor) -> int:
        """Aggregation MACs (na2d_av runs outside matmul FLOP counters) for input (B, C+Ch, H, W)."""
        height, width = feats.shape[-2:]
        height, width = self._work_size(height, width) or (height, width)
        return feats.shape[0] * (self.dim // 2) * height * width * (self.smk_size ** 2 + self.kernel_size ** 2)
