"""Aggregated attention (TransNeXt's pixel-focused attention) and its position-bias helpers.

Paper: TransNeXt: Robust Foveal Visual Perception for Vision Transformers (Dai Shi, CVPR 2024),
https://arxiv.org/abs/2311.17132.

Every query i of an H x W map attends, under ONE softmax, to
* its k x k sliding window (k = 3 in TransNeXt), zero-padded at the borders: out-of-map slots get
  logit -inf and a zero value, so a border pixel sees n_i < k*k keys (not NAT's shifted window);
* P pooled keys: the map average-pooled to a Hp x Wp grid (P = Hp * Wp).
Queries and keys are L2-normalised per head (cosine attention). The query gets a learned embedding,
a learned temperature softplus(tau) and the length scale ln(n_i + P). Local logits get a per-slot
bias; pooled logits a continuous position bias (CPB): an MLP of log-spaced relative coordinates.
After the softmax, the local weights get a query-dependent term q_hat . T + t (learnable tokens)
that is not normalised.

Layout of the window operators: (B, heads, H, W, d); window weights (B, heads, H, W, k*k), slot order
t_row * k + t_col (the order of `F.unfold`). The plain-PyTorch reference works on k*k shifted views of
a zero-padded map, so nothing is larger than k*k times one input and nothing is O((HW)^2); autograd
saves views, not gathered copies. A Triton kernel of the window part lives in
`zoo.layers.kernels.aggregated_triton`; the window geometry both use in `zoo.layers.window_geometry`.
"""
import math
from functools import lru_cache
from typing import Iterator, Optional, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import trunc_normal_

from .kernels import dispatch
from .window_geometry import check_kernel_size, padded_window_valid_numpy, window_valid_mask

__all__ = [
    'window_qk', 'window_av', 'window_valid_mask', 'window_length_scale', 'relative_coords_cpb',
    'continuous_position_bias', 'AggregatedAttention', 'ScaledCosineAttention', 'WINDOW_BACKENDS',
]

# backend= values of window_qk and window_av.
WINDOW_BACKENDS = dispatch.backend_choices('window_qk')


def window_length_scale(height: int, width: int, kernel_size: int, pool_len: int,
                        device: torch.device = torch.device('cpu')) -> torch.Tensor:
    """(H*W, 1) float32 ln(n_i + pool_len), n_i = in-map slots of pixel i's k x k window (9 / 6 / 4 for k = 3)."""
    check_kernel_size(kernel_size)
    counts = padded_window_valid_numpy(height, width, kernel_size).sum(-1).reshape(-1, 1)
    return torch.log(torch.tensor(counts + pool_len, dtype=torch.float32, device=device))


# ----------------------------------------------------------------------------------------------
# Window operators (reference).
# ----------------------------------------------------------------------------------------------

def _shifted_views(x: torch.Tensor, kernel_size: int) -> Iterator[torch.Tensor]:
    """The k*k neighbours of every pixel as views of the zero-padded map, in slot order.

    x: (B, heads, H, W, d) -> k*k views (B, heads, H, W, d); view t holds x[i + t//k - r, j + t%k - r] or 0.
    """
    radius = kernel_size // 2
    height, width = x.shape[2:4]
    padded = F.pad(x, (0, 0, radius, radius, radius, radius))
    for row in range(kernel_size):
        for col in range(kernel_size):
            yield padded[:, :, row:row + height, col:col + width]


def _check_window_inputs(first: torch.Tensor, first_name: str, second: torch.Tensor, second_name: str) -> None:
    for name, t in ((first_name, first), (second_name, second)):
        if not isinstance(t, torch.Tensor) or t.dim() != 5:
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f'{name} must be a 5-D (B, heads, H, W, ...) tensor, got {shape}')
        if not t.is_floating_point():
            raise ValueError(f'{name} must be floating point, got {t.dtype}')
    if first.shape[:4] != second.shape[:4]:
        raise ValueError(f'{first_name} and {second_name} differ in (B, heads, H, W): '
                         f'{tuple(first.shape)} vs {tuple(second.shape)}')
    if first.device != second.device:
        raise ValueError(f'{first_name} is on {first.device} but {second_name} on {second.device}')


def window_qk(query: torch.Tensor, key: torch.Tensor, bias: Optional[torch.Tensor] = None, kernel_size: int = 3,
              backend: str = 'auto') -> torch.Tensor:
    """Logits of every query against its zero-padded k x k window of keys.

    Args:
        query, key: (B, heads, H, W, d).
        bias: optional (heads, k*k) per-slot bias, added to the in-map slots.
        kernel_size: odd window size k.
        backend: 'auto' | 'torch' | 'triton'.

    Returns:
        (B, heads, H, W, k*k): query . key[neighbour] (+ bias); -inf where the slot lies outside the map.
    """
    check_kernel_size(kernel_size)
    _check_window_inputs(query, 'query', key, 'key')
    if query.shape != key.shape or query.dtype != key.dtype:
        raise ValueError(f'query and key must share shape and dtype, got {tuple(query.shape)}/{query.dtype} '
                         f'and {tuple(key.shape)}/{key.dtype}')
    slots = kernel_size * kernel_size
    if bias is not None and tuple(bias.shape) != (query.shape[1], slots):
        raise ValueError(f'bias must have shape (heads, k*k) = {(query.shape[1], slots)}, got {tuple(bias.shape)}')
    if dispatch.resolve('window_qk', backend, query) == 'triton':
        from .kernels import aggregated_triton
        return aggregated_triton.window_qk(query, key, bias, kernel_size)
    logits = torch.stack([torch.linalg.vecdot(query, neighbour) for neighbour in _shifted_views(key, kernel_size)],
                         dim=-1)
    if bias is not None:
        logits = logits + bias[:, None, None, :].to(logits.dtype)
    valid = window_valid_mask(query.shape[2], query.shape[3], kernel_size, query.device)
    return logits.masked_fill(~valid, float('-inf'))


def window_av(attn: torch.Tensor, value: torch.Tensor, kernel_size: int = 3, backend: str = 'auto') -> torch.Tensor:
    """Weighted sum of each query's zero-padded k x k window of values (out-of-map values count as 0).

    Args:
        attn: (B, heads, H, W, k*k) weights, slot order t_row * k + t_col.
        value: (B, heads, H, W, d).
        kernel_size: odd window size k.
        backend: 'auto' | 'torch' | 'triton'.

    Returns:
        (B, heads, H, W, d).
    """
    check_kernel_size(kernel_size)
    _check_window_inputs(attn, 'attn', value, 'value')
    if attn.shape[-1] != kernel_size * kernel_size or attn.dtype != value.dtype:
        raise ValueError(f'attn must be (B, heads, H, W, {kernel_size * kernel_size}) in value\'s dtype, got '
                         f'{tuple(attn.shape)}/{attn.dtype} for value {value.dtype}')
    if dispatch.resolve('window_av', backend, value) == 'triton':
        from .kernels import aggregated_triton
        return aggregated_triton.window_av(attn, value, kernel_size)
    out = torch.zeros_like(value)
    for slot, neighbour in enumerate(_shifted_views(value, kernel_size)):
        out = out.addcmul(attn[..., slot, None], neighbour)
    return out


# ----------------------------------------------------------------------------------------------
# Continuous position bias (log-spaced relative coordinates -> MLP).
# ----------------------------------------------------------------------------------------------

def _pooled_axis(length: int, pooled: int) -> np.ndarray:
    """Centres of `adaptive_avg_pool1d` bins over the positions 0..length-1, float32 (pooled,)."""
    starts = (np.arange(pooled) * length) // pooled
    stops = -((-(np.arange(pooled) + 1) * length) // pooled)
    return np.array([np.arange(a, b, dtype=np.float32).mean(dtype=np.float32) for a, b in zip(starts, stops)],
                    dtype=np.float32)


@lru_cache(maxsize=128)
def _axis_deltas(query_len: int, key_len: int, pretrain_len: int) -> Tuple[np.ndarray, np.ndarray]:
    """Unique scaled offsets along one axis and each (query, key) pair's index into them.

    delta = (q - k) / (pretrain_len - 1) * 8 in float32, q the integer positions, k the pooled bin centres.
    Returns (values (U,) float32, index (query_len, key_len) int64).
    """
    queries = np.arange(query_len, dtype=np.float32)
    keys = _pooled_axis(query_len, key_len)
    delta = (queries[:, None] - keys[None, :]) / np.float32(pretrain_len - 1) * np.float32(8)
    values, index = np.unique(delta.astype(np.float32), return_inverse=True)
    values.flags.writeable = False
    index = index.reshape(query_len, key_len)
    index.flags.writeable = False
    return values, index


def relative_coords_cpb(query_size: Tuple[int, int], key_size: Tuple[int, int],
                        pretrain_size: Tuple[int, int], device: torch.device = torch.device('cpu')
                        ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Coordinates and gather index of the continuous position bias between a map and its pooled grid.

    Query coordinates are the integer pixel grid of the (Hq, Wq) map, key coordinates the bin centres of
    its adaptive average pooling to (Hk, Wk) (the map itself when the sizes agree). Offsets are
    (query - key) / (pretrain - 1) * 8 per axis, then mapped to sign(x) * log2(|x| + 1) / log2(8).

    Returns:
        table (U, 2) float32 (dy, dx) of every distinct offset pair, and index (Hq*Wq, Hk*Wk) int64 into it.
    """
    if min(pretrain_size) < 2:
        raise ValueError(f'the CPB needs a pretrain stage size of at least 2, got {tuple(pretrain_size)}')
    rows, row_index = _axis_deltas(query_size[0], key_size[0], pretrain_size[0])
    cols, col_index = _axis_deltas(query_size[1], key_size[1], pretrain_size[1])
    table = np.stack([np.repeat(rows, len(cols)), np.tile(cols, len(rows))], axis=-1)
    index = row_index[:, None, :, None] * len(cols) + col_index[None, :, None, :]
    index = index.reshape(query_size[0] * query_size[1], key_size[0] * key_size[1])
    table = torch.tensor(table, device=device)
    table = torch.sign(table) * torch.log2(table.abs() + 1.0) / math.log2(8)
    return table, torch.tensor(index, device=device)


def continuous_position_bias(fc1: nn.Linear, fc2: nn.Linear, query_size: Tuple[int, int],
                             key_size: Tuple[int, int], pretrain_size: Tuple[int, int]) -> torch.Tensor:
    """(heads, Hq*Wq, Hk*Wk) bias: fc2(relu(fc1(coords))) evaluated once per distinct offset, then gathered."""
    table, index = relative_coords_cpb(query_size, key_size, pretrain_size, fc1.weight.device)
    per_offset = fc2(F.relu(fc1(table.to(fc1.weight.dtype))))
    return per_offset.t()[:, index]


# ----------------------------------------------------------------------------------------------
# Modules.
# ----------------------------------------------------------------------------------------------

def _l2_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, H, W, heads*d) -> L2-normalised (B, heads, H, W, d)."""
    batch, height, width, channels = x.shape
    x = x.reshape(batch, height, width, heads, channels // heads).permute(0, 3, 1, 2, 4)
    return F.normalize(x, dim=-1)


def _init_temperature() -> float:
    """softplus^-1(1 / 0.24): the official start, softplus(temperature) = 1 / 0.24."""
    return math.log(math.expm1(1 / 0.24))


class _CosineAttentionBase(nn.Module):
    """Shared parameters of the TransNeXt attentions: per-head query embedding, temperature and CPB MLP."""

    def _init_shared(self, dim: int, num_heads: int, pretrain_size: Tuple[int, int], attn_drop: float,
                     proj_drop: float, dd: dict) -> None:
        if dim % num_heads:
            raise ValueError(f'dim {dim} is not divisible by num_heads {num_heads}')
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.pretrain_size = tuple(pretrain_size)
        self.temperature = nn.Parameter(torch.empty(num_heads, 1, 1, **dd))
        self.query_embedding = nn.Parameter(torch.empty(num_heads, 1, self.head_dim, **dd))
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim, **dd)
        self.proj_drop = nn.Dropout(proj_drop)
        self.cpb_fc1 = nn.Linear(2, 512, bias=True, **dd)
        self.cpb_fc2 = nn.Linear(512, num_heads, bias=True, **dd)

    def _reset_shared(self) -> None:
        nn.init.constant_(self.temperature, _init_temperature())
        trunc_normal_(self.query_embedding, std=.02)

    def _scaled_query(self, q_norm: torch.Tensor, length_scale: torch.Tensor) -> torch.Tensor:
        """(q_norm + query_embedding) * softplus(temperature) * length_scale; q_norm (B, heads, N, d)."""
        return (q_norm + self.query_embedding) * F.softplus(self.temperature) * length_scale


def _check_map(x: torch.Tensor, dim: int, who: str) -> None:
    if x.dim() != 4 or x.shape[-1] != dim:
        raise ValueError(f'{who} expects a (B, H, W, {dim}) map, got shape {tuple(x.shape)}')


class AggregatedAttention(_CosineAttentionBase):
    """TransNeXt aggregated attention: zero-padded k x k window + pooled keys under one softmax.

    Official state-dict names: `q`, `kv` (shared by the window and the pooled keys), `proj`, `sr` (1x1 conv)
    and `norm` (LayerNorm, eps 1e-5) of the pooled branch, `temperature` (heads, 1, 1), `query_embedding`
    (heads, 1, d), `relative_pos_bias_local` (heads, k*k), `learnable_tokens` (heads, d, k*k),
    `learnable_bias` (heads, 1, k*k), `cpb_fc1` / `cpb_fc2`.

    Sizes are derived per call: the pooled grid is (H // sr_ratio, W // sr_ratio) (at least 1), and the CPB
    coordinates are normalised by `pretrain_size` (this stage's map size at the pre-training resolution), so
    one module serves any input size.

    Args:
        dim: channels C.
        num_heads: heads; head_dim = C / heads.
        pretrain_size: (H, W) of this stage's map at the pre-training resolution.
        window_size: odd local window k.
        sr_ratio: pooling ratio of the global branch.
        qkv_bias: bias of `q` and `kv`.
        attn_drop, proj_drop: dropout on the attention weights / after `proj`.
        backend: window-operator backend ('auto' | 'torch' | 'triton').
    """

    def __init__(self, dim: int, num_heads: int, pretrain_size: Tuple[int, int], window_size: int = 3,
                 sr_ratio: int = 1, qkv_bias: bool = True, attn_drop: float = 0., proj_drop: float = 0.,
                 backend: str = 'auto', device=None, dtype=None):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        check_kernel_size(window_size)
        self._init_shared(dim, num_heads, pretrain_size, attn_drop, proj_drop, dd)
        self.window_size = window_size
        self.sr_ratio = sr_ratio
        self.backend = backend
        slots = window_size * window_size
        self.q = nn.Linear(dim, dim, bias=qkv_bias, **dd)
        self.kv = nn.Linear(dim, dim * 2, bias=qkv_bias, **dd)
        self.sr = nn.Conv2d(dim, dim, kernel_size=1, stride=1, **dd)
        self.norm = nn.LayerNorm(dim, **dd)
        self.act = nn.GELU()
        self.relative_pos_bias_local = nn.Parameter(torch.empty(num_heads, slots, **dd))
        self.learnable_tokens = nn.Parameter(torch.empty(num_heads, self.head_dim, slots, **dd))
        self.learnable_bias = nn.Parameter(torch.empty(num_heads, 1, slots, **dd))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        self._reset_shared()
        trunc_normal_(self.relative_pos_bias_local, std=4e-4)
        trunc_normal_(self.learnable_tokens, std=.02)
        nn.init.zeros_(self.learnable_bias)

    def pool_size(self, height: int, width: int) -> Tuple[int, int]:
        """Pooled grid of an H x W map."""
        return max(1, height // self.sr_ratio), max(1, width // self.sr_ratio)

    def _pooled_tokens(self, x: torch.Tensor, pool_size: Tuple[int, int]) -> torch.Tensor:
        """(B, H, W, C) -> (B, P, C): LayerNorm(adaptive_avg_pool(GELU(sr(x)))), the official order."""
        pooled = F.adaptive_avg_pool2d(self.act(self.sr(x.permute(0, 3, 1, 2))), pool_size)
        return self.norm(pooled.flatten(2).transpose(1, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, W, C) -> (B, H, W, C)."""
        _check_map(x, self.dim, 'AggregatedAttention')
        batch, height, width, channels = x.shape
        heads, slots = self.num_heads, self.window_size * self.window_size
        pool_size = self.pool_size(height, width)
        pool_len = pool_size[0] * pool_size[1]

        q_norm = _l2_heads(self.q(x), heads)                                    # (B, h, H, W, d)
        k_local, v_local = self.kv(x).chunk(2, dim=-1)
        k_local = _l2_heads(k_local, heads)
        v_local = v_local.reshape(batch, height, width, heads, -1).permute(0, 3, 1, 2, 4)
        length_scale = window_length_scale(height, width, self.window_size, pool_len, x.device)
        q_scaled = self._scaled_query(q_norm.flatten(2, 3), length_scale.to(x.dtype))  # (B, h, N, d)

        k_pool, v_pool = self.kv(self._pooled_tokens(x, pool_size)).chunk(2, dim=-1)
        k_pool = F.normalize(k_pool.reshape(batch, pool_len, heads, -1).transpose(1, 2), dim=-1)
        v_pool = v_pool.reshape(batch, pool_len, heads, -1).transpose(1, 2)      # (B, h, P, d)

        # Under autocast the window ops run in the activations' dtype, as autocast runs the matmuls.
        logits_local = window_qk(q_scaled.unflatten(2, (height, width)).to(k_local.dtype), k_local,
                                 self.relative_pos_bias_local, self.window_size, self.backend).flatten(2, 3)
        pool_bias = continuous_position_bias(self.cpb_fc1, self.cpb_fc2, (height, width), pool_size,
                                             self.pretrain_size)
        logits_pool = q_scaled @ k_pool.transpose(-2, -1) + pool_bias.to(q_scaled.dtype)
        attn = torch.cat([logits_local.to(logits_pool.dtype), logits_pool], dim=-1).softmax(dim=-1)
        attn = self.attn_drop(attn)
        attn_local, attn_pool = attn.split([slots, pool_len], dim=-1)

        # Learnable tokens: added after the softmax, un-normalised, driven by the plain normalised query.
        token_weights = q_norm.flatten(2, 3) @ self.learnable_tokens + self.learnable_bias
        attn_local = (attn_local + token_weights).unflatten(2, (height, width)).to(v_local.dtype)
        out = window_av(attn_local, v_local, self.window_size, self.backend).flatten(2, 3) + attn_pool @ v_pool
        out = out.transpose(1, 2).reshape(batch, height, width, channels)
        return self.proj_drop(self.proj(out))

    def macs_not_counted(self, x: torch.Tensor) -> int:
        """Window q.k and attn.v MACs of input x (B, H, W, C): FLOP counters see no matmul there."""
        batch, height, width, channels = x.shape
        return 2 * batch * height * width * self.window_size ** 2 * channels


class ScaledCosineAttention(_CosineAttentionBase):
    """TransNeXt full attention (the last stage): length-scaled cosine attention with a CPB.

    logits = ((norm(q) + query_embedding) * softplus(temperature) * ln(N)) . norm(k) + CPB, N = H * W of
    the current input (the official classification model fixes N at build time; this equals it there).
    Official state-dict names: `qkv`, `proj`, `temperature`, `query_embedding`, `cpb_fc1`, `cpb_fc2`.
    """

    def __init__(self, dim: int, num_heads: int, pretrain_size: Tuple[int, int], qkv_bias: bool = True,
                 attn_drop: float = 0., proj_drop: float = 0., device=None, dtype=None):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self._init_shared(dim, num_heads, pretrain_size, attn_drop, proj_drop, dd)
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias, **dd)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        self._reset_shared()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, W, C) -> (B, H, W, C)."""
        _check_map(x, self.dim, 'ScaledCosineAttention')
        batch, height, width, channels = x.shape
        num_tokens = height * width
        qkv = self.qkv(x).reshape(batch, num_tokens, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q_scaled = self._scaled_query(F.normalize(q, dim=-1), math.log(num_tokens))
        bias = continuous_position_bias(self.cpb_fc1, self.cpb_fc2, (height, width), (height, width),
                                        self.pretrain_size)
        attn = (q_scaled @ F.normalize(k, dim=-1).transpose(-2, -1) + bias.to(q.dtype)).softmax(dim=-1)
        out = (self.attn_drop(attn) @ v).transpose(1, 2).reshape(batch, height, width, channels)
        return self.proj_drop(self.proj(out))
