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

Index tables (window validity and neighbours, CPB offsets) are built as window_geometry builds its own: eager calls
read cached numpy tables where one exists, and while a graph is captured (torch.compile, torch.export, the ONNX
exporter, torch.jit.trace) they are computed in torch from the possibly symbolic H and W, so one exported program
serves any size.

Both attentions take MoH-ViT's mixture-of-heads gating as an option (`shared_head` / `routed_head`,
zoo.layers.mixture_of_heads, docs/moh.md): each head's output is scaled per query token before `proj`. The routed
execution gathers, per routed head, the queries that selected it (with their window keys and values), attends
for those only and scatters the results back.
"""
import math
from functools import lru_cache
from types import ModuleType
from typing import Iterator, NamedTuple, Optional, Tuple, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import trunc_normal_

from .kernels import dispatch
from .mixture_of_heads import MixtureOfHeads, gate_heads, routed_token_index
from .window_geometry import (Length, capturing_graph, check_kernel_size, join_bands, row_bands,
                              window_valid_mask)

__all__ = [
    'window_qk', 'window_av', 'window_valid_mask', 'window_length_scale', 'relative_coords_cpb',
    'continuous_position_bias', 'position_bias', 'PositionBias', 'QUERY_BAND_LOGITS', 'CPB_ROWS',
    'AggregatedAttention', 'ScaledCosineAttention', 'WINDOW_BACKENDS', 'MOH_BACKENDS',
]

# backend= values of window_qk and window_av.
WINDOW_BACKENDS = dispatch.backend_choices('window_qk')
# moh_backend= values of the attentions with mixture-of-heads gating: 'torch' gates every computed head, 'routed'
# computes each routed head only for the tokens that selected it.
MOH_BACKENDS = dispatch.backend_choices('moh_heads')


def window_length_scale(height: Length, width: Length, kernel_size: int, pool_len: Length,
                        device: torch.device = torch.device('cpu')) -> torch.Tensor:
    """(H*W, 1) float32 ln(n_i + pool_len), n_i = in-map slots of pixel i's k x k window (9 / 6 / 4 for k = 3)."""
    counts = window_valid_mask(height, width, kernel_size, device).sum(-1).reshape(-1, 1)
    return torch.log((counts + pool_len).to(torch.float32))


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

def _twice_axis_offsets(query_len: Length, key_len: Length, xp: ModuleType = np, **where):
    """2 * (q - c_k) of every (query, key) pair along one axis, (query_len, key_len) int64 (numpy or torch, as
    window_geometry's tables).

    q are the positions 0..Lq-1, c_k the centre of `adaptive_avg_pool1d` bin k over them: bin k spans
    [floor(k Lq / Lk), ceil((k + 1) Lq / Lk)), so c_k = (start + stop - 1) / 2 and twice the offset is an integer.
    """
    bins = xp.arange(key_len, **where)
    starts = bins * query_len // key_len
    stops = -((-(bins + 1) * query_len) // key_len)
    return 2 * xp.arange(query_len, **where)[:, None] - (starts + stops - 1)


@lru_cache(maxsize=128)
def _distinct_axis_offsets_numpy(query_len: int, key_len: int) -> Tuple[np.ndarray, np.ndarray]:
    """The distinct twice-offsets along one axis, (U,) int64 ascending, and each (query, key) pair's index into them,
    (query_len, key_len) int64; both read-only."""
    values, index = np.unique(_twice_axis_offsets(query_len, key_len), return_inverse=True)
    index = index.reshape(query_len, key_len)
    values.flags.writeable = False
    index.flags.writeable = False
    return values, index


def _axis_offsets_in_graph(query_len: Length, key_len: Length,
                           device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
    """`_axis_offsets` while a graph is captured, without `unique` (its length depends on the data, and with dynamic
    sizes there is no number to run it on).

    Equal bins of b = Lq / Lk positions (every TransNeXt map whose size the pooling ratio divides, and full
    attention): the offsets 2q - (2k + 1) b + 1 are every second integer between their extremes, all taken, so the
    table is the eager one. Otherwise every integer in [-(2 Lq - 2), 2 Lq - 2], which holds all offsets (start >= 0,
    stop <= Lq): up to twice the distinct ones per axis, rows no pair reads each costing one MLP evaluation.
    """
    twice = _twice_axis_offsets(query_len, key_len, torch, device=device)
    if query_len % key_len == 0:
        bin_len = query_len // key_len
        lowest = 1 - (2 * key_len - 1) * bin_len
        return torch.arange(lowest, 2 * query_len - bin_len, 2, device=device), (twice - lowest) // 2
    reach = 2 * query_len - 2
    return torch.arange(-reach, reach + 1, device=device), twice + reach


def _axis_offsets(query_len: Length, key_len: Length, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
    """Twice-offsets along one axis, (U,) int64 ascending, and each (query, key) pair's index into them,
    (query_len, key_len) int64: the distinct offsets (cached) in eager calls, `_axis_offsets_in_graph` in captured
    graphs."""
    if capturing_graph():
        return _axis_offsets_in_graph(query_len, key_len, device)
    values, index = _distinct_axis_offsets_numpy(query_len, key_len)
    return torch.tensor(values, device=device), torch.tensor(index, device=device)


def _scaled_offsets(twice: torch.Tensor, pretrain_len: int) -> torch.Tensor:
    """Twice-offsets (U,) int64 -> float32 (query - key) / (pretrain_len - 1) * 8; the halving is exact."""
    return twice.to(torch.float32) / 2 / (pretrain_len - 1) * 8


# Logits (B x heads x queries x keys) per band of query rows in the pooled and full attentions: about 16 MiB in
# float32, so at 1024 x 1024 neither the (B, h, N, P) logits nor the (h, N, P) bias of a stage exists at once
# (benchmarks/RESULTS.md, "Peak memory at 1024 x 1024"). At 224 x 224 every stage fits in one band up to batch 8.
QUERY_BAND_LOGITS = 1 << 22
# Offsets per chunk of the CPB's MLP (16 MiB of float32 hidden activations); a 224 x 224 input needs one chunk.
CPB_ROWS = 1 << 13


class PositionBias(NamedTuple):
    """A continuous position bias evaluated once per distinct offset, gathered for any band of query rows.

    per_offset (heads, U): the MLP at every table row; rows (Hq, Hk) and cols (Wq, Wk): per-axis indices, pair
    (query (i, j), key (a, b)) reading table row rows[i, a] * distinct_cols + cols[j, b]. Gathering a band of query
    rows at a time keeps the (heads, N, P) bias of a large map from ever existing at once.
    """
    per_offset: torch.Tensor
    rows: torch.Tensor
    cols: torch.Tensor
    distinct_cols: Length

    def index(self, band: slice) -> torch.Tensor:
        """(rows in band * Wq, Hk * Wk) int64 table index of the band's queries against every key."""
        return _pair_index(self.rows[band], self.cols, self.distinct_cols)

    def gather(self, band: slice = slice(None), heads: slice = slice(None)) -> torch.Tensor:
        """(h', rows in band * Wq, Hk * Wk) bias of `heads` for the band's queries."""
        return self.per_offset[heads][:, self.index(band)]


def _pair_index(rows: torch.Tensor, cols: torch.Tensor, distinct_cols: Length) -> torch.Tensor:
    """Per-axis CPB indices (hq, Hk) and (Wq, Wk) -> (hq*Wq, Hk*Wk) index of every (query, key) pair into the table,
    whose minor axis holds the distinct_cols column offsets."""
    index = rows[:, None, :, None] * distinct_cols + cols[None, :, None, :]
    return index.reshape(rows.shape[0] * cols.shape[0], rows.shape[1] * cols.shape[1])


def _cpb_axes(query_size: Tuple[Length, Length], key_size: Tuple[Length, Length], pretrain_size: Tuple[int, int],
              device: torch.device) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, Length]:
    """The CPB's coordinate table (U, 2), its per-axis gather indices (Hq, Hk) and (Wq, Wk) and the number of distinct
    column offsets, the table's minor axis (`PositionBias`)."""
    if min(pretrain_size) < 2:
        raise ValueError(f'the CPB needs a pretrain stage size of at least 2, got {tuple(pretrain_size)}')
    (row_twice, row_index), (col_twice, col_index) = (_axis_offsets(query, key, device)
                                                      for query, key in zip(query_size, key_size))
    rows, cols = _scaled_offsets(row_twice, pretrain_size[0]), _scaled_offsets(col_twice, pretrain_size[1])
    table = torch.stack(torch.meshgrid(rows, cols, indexing='ij'), dim=-1).reshape(-1, 2)
    table = torch.sign(table) * torch.log2(table.abs() + 1.0) / math.log2(8)
    return table, row_index, col_index, cols.shape[0]


def relative_coords_cpb(query_size: Tuple[Length, Length], key_size: Tuple[Length, Length],
                        pretrain_size: Tuple[int, int], device: torch.device = torch.device('cpu')
                        ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Coordinates and gather index of the continuous position bias between a map and its pooled grid.

    Query coordinates are the integer pixel grid of the (Hq, Wq) map, key coordinates the bin centres of
    its adaptive average pooling to (Hk, Wk) (the map itself when the sizes agree). Offsets are
    (query - key) / (pretrain - 1) * 8 per axis in float32, then mapped to sign(x) * log2(|x| + 1) / log2(8).

    Returns:
        table (U, 2) float32 (dy, dx) offset pairs, and index (Hq*Wq, Hk*Wk) int64 into it. Eager calls list every
        distinct pair once; captured graphs may list a superset (`_axis_offsets_in_graph`), with the same value at
        every index.
    """
    table, rows, cols, distinct_cols = _cpb_axes(query_size, key_size, pretrain_size, device)
    return table, _pair_index(rows, cols, distinct_cols)


def position_bias(fc1: nn.Linear, fc2: nn.Linear, query_size: Tuple[int, int], key_size: Tuple[int, int],
                  pretrain_size: Tuple[int, int]) -> PositionBias:
    """The CPB between a (Hq, Wq) map and a (Hk, Wk) key grid: fc2(relu(fc1(coords))) once per distinct offset."""
    table, rows, cols, distinct_cols = _cpb_axes(query_size, key_size, pretrain_size, fc1.weight.device)
    table = table.to(fc1.weight.dtype)
    # The MLP's hidden layer is 512 wide: on a 256 x 256 map against a 32 x 32 grid (1024 x 1024 input) the table
    # has 262,144 rows, whose hidden activations alone would take 512 MiB, so it runs on chunks of rows (in one piece
    # while a graph is captured: a loop over a symbolic row count would fix the input size).
    def mlp(coords: torch.Tensor) -> torch.Tensor:
        return fc2(F.relu(fc1(coords)))
    if capturing_graph():
        per_offset = mlp(table)
    else:
        per_offset = join_bands([mlp(table[start:start + CPB_ROWS]) for start in range(0, len(table), CPB_ROWS)], 0)
    return PositionBias(per_offset.t(), rows, cols, distinct_cols)


def continuous_position_bias(fc1: nn.Linear, fc2: nn.Linear, query_size: Tuple[int, int],
                             key_size: Tuple[int, int], pretrain_size: Tuple[int, int]) -> torch.Tensor:
    """(heads, Hq*Wq, Hk*Wk) bias: fc2(relu(fc1(coords))) evaluated once per distinct offset, then gathered."""
    return position_bias(fc1, fc2, query_size, key_size, pretrain_size).gather()


# ----------------------------------------------------------------------------------------------
# Routed (mixture-of-heads) execution helpers.
# ----------------------------------------------------------------------------------------------

def _window_neighbours(height: Length, width: Length, kernel_size: int,
                       device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
    """Flat neighbour index (H*W, k*k) int64 of every pixel's zero-padded window, out-of-map slots pointing at H*W (a
    zero row the caller appends), and its validity (H*W, k*k) bool.

    Built in torch on every call, eager or captured: a handful of small ops, as cheap as copying a cached table.
    """
    offsets = torch.arange(kernel_size, device=device) - kernel_size // 2
    rows = torch.arange(height, device=device)[:, None] + offsets
    cols = torch.arange(width, device=device)[:, None] + offsets
    flat = (rows[:, None, :, None] * width + cols[None, :, None, :]).reshape(height * width, -1)
    valid = window_valid_mask(height, width, kernel_size, device).reshape(height * width, -1)
    return torch.where(valid, flat, height * width), valid


def _gather_tokens(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x (B, h, N, X) at token positions index (B, h, M) -> (B, h, M, X)."""
    return x.gather(2, index[..., None].expand(-1, -1, -1, x.shape[-1]))


def _gather_rows(table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Per-head rows table (h, N, X) at token positions index (B, h, M) -> (B, h, M, X)."""
    return _gather_tokens(table.expand(index.shape[0], -1, -1, -1), index)


def _gather_windows(x: torch.Tensor, neighbours: torch.Tensor) -> torch.Tensor:
    """Window neighbours of x (B, h, N, d) for neighbours (B, h, M, k*k) in [0, N] (N = zero) -> (B, h, M, k*k, d)."""
    padded = F.pad(x, (0, 0, 0, 1))
    batch, heads, tokens, slots = neighbours.shape
    return _gather_tokens(padded, neighbours.reshape(batch, heads, tokens * slots)).unflatten(2, (tokens, slots))


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


class _CosineAttentionBase(nn.Module, MixtureOfHeads):
    """Shared parts of the TransNeXt attentions: per-head query embedding, temperature and CPB MLP, and the optional
    mixture-of-heads gating (`shared_head` None = plain TransNeXt) with its two executions: 'torch' computes every
    head and scales it by its gate (the official way), 'routed' computes each routed head only for the tokens that
    selected it (`_attend_routed` of the subclass) and the shared heads densely."""

    def _init_shared(self, dim: int, num_heads: int, pretrain_size: Tuple[int, int], attn_drop: float,
                     proj_drop: float, shared_head: Optional[int], routed_head: int, moh_backend: str,
                     dd: dict) -> None:
        if dim % num_heads:
            raise ValueError(f'dim {dim} is not divisible by num_heads {num_heads}')
        if moh_backend not in MOH_BACKENDS:
            raise ValueError(f'moh_backend must be one of {MOH_BACKENDS}, got {moh_backend!r}')
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.pretrain_size = tuple(pretrain_size)
        self.moh_backend = moh_backend
        self.temperature = nn.Parameter(torch.empty(num_heads, 1, 1, **dd))
        self.query_embedding = nn.Parameter(torch.empty(num_heads, 1, self.head_dim, **dd))
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim, **dd)
        self.proj_drop = nn.Dropout(proj_drop)
        self.cpb_fc1 = nn.Linear(2, 512, bias=True, **dd)
        self.cpb_fc2 = nn.Linear(512, num_heads, bias=True, **dd)
        self._init_mixture_of_heads(dim, num_heads, shared_head, routed_head, dd)

    def _reset_shared(self) -> None:
        nn.init.constant_(self.temperature, _init_temperature())
        trunc_normal_(self.query_embedding, std=.02)
        self._reset_routers()

    def _scaled_query(self, q_norm: torch.Tensor, length_scale: Union[torch.Tensor, float],
                      heads: slice = slice(None)) -> torch.Tensor:
        """(q_norm + query_embedding) * softplus(temperature) * length_scale of `heads`; q_norm (B, heads, N, d)."""
        return (q_norm + self.query_embedding[heads]) * F.softplus(self.temperature[heads]) * length_scale

    def _mixed_heads(self, x: torch.Tensor, parts) -> torch.Tensor:
        """Head outputs (B, h, N, d) of the projected `parts`, gated per token when mixture-of-heads is on."""
        if not self.mixture_of_heads:
            return self._attend(parts, slice(None))
        gating = self.head_gates(x.flatten(1, 2))
        if gating.routed_mask is None or dispatch.resolve('moh_heads', self.moh_backend, x) != 'routed':
            return gate_heads(self._attend(parts, slice(None)), gating.gates)
        shared = self.shared_head
        index, valid = routed_token_index(gating.routed_mask)
        routed = slice(shared, self.num_heads)
        picked = self._attend_routed(parts, routed, index)                    # (B, E, M, d)
        gates = _gather_tokens(gating.gates[..., shared:].transpose(1, 2)[..., None], index)
        picked = picked * (gates * valid[..., None]).to(picked.dtype)
        batch, tokens = gating.gates.shape[:2]
        out = picked.new_zeros(batch, self.num_heads - shared, tokens, self.head_dim)
        out = out.scatter(2, index[..., None].expand_as(picked), picked)
        if shared:
            out = torch.cat([gate_heads(self._attend(parts, slice(0, shared)), gating.gates[..., :shared]), out], 1)
        return out

    def macs_skipped_by_routing(self, x: torch.Tensor) -> int:
        """Attention MACs of input x (B, H, W, C) that the routed execution does not compute: one query's attention
        in one head for every (token, routed head) pair the token did not select. 0 without routed heads."""
        if not self.mixture_of_heads or not self.routed_head:
            return 0
        with torch.no_grad():
            unselected = int((~self.head_gates(x.flatten(1, 2)).routed_mask).sum())
        return unselected * self._macs_per_query_head(x.shape[1], x.shape[2])

    def _finish(self, out: torch.Tensor, shape) -> torch.Tensor:
        """Head outputs (B, h, N, d) -> proj(concat heads) (B, H, W, C)."""
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(shape)))


def _check_map(x: torch.Tensor, dim: int, who: str) -> None:
    if x.dim() != 4 or x.shape[-1] != dim:
        raise ValueError(f'{who} expects a (B, H, W, {dim}) map, got shape {tuple(x.shape)}')


class _AggregatedParts(NamedTuple):
    """Per-head projections of one aggregated-attention call (h heads, N = H * W tokens, P pooled keys)."""
    q_norm: torch.Tensor        # (B, h, N, d) L2-normalised queries
    k_local: torch.Tensor       # (B, h, H, W, d) L2-normalised keys of the window
    v_local: torch.Tensor       # (B, h, H, W, d)
    k_pool: torch.Tensor        # (B, h, P, d) L2-normalised pooled keys
    v_pool: torch.Tensor        # (B, h, P, d)
    length_scale: torch.Tensor  # (N, 1) ln(n_i + P)
    pool_bias: PositionBias     # CPB of the queries against the pooled keys, gathered per band: (h, N, P)


class AggregatedAttention(_CosineAttentionBase):
    """TransNeXt aggregated attention: zero-padded k x k window + pooled keys under one softmax.

    Official state-dict names: `q`, `kv` (shared by the window and the pooled keys), `proj`, `sr` (1x1 conv)
    and `norm` (LayerNorm, eps 1e-5) of the pooled branch, `temperature` (heads, 1, 1), `query_embedding`
    (heads, 1, d), `relative_pos_bias_local` (heads, k*k), `learnable_tokens` (heads, d, k*k),
    `learnable_bias` (heads, 1, k*k), `cpb_fc1` / `cpb_fc2`; with mixture-of-heads also the routers `wg`, `wg_0`,
    `wg_1` (MoH-ViT's names, zoo.layers.mixture_of_heads).

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
        shared_head, routed_head: mixture-of-heads split (S shared heads, top-k of the h - S others); None = off.
        moh_backend: mixture-of-heads execution ('auto' | 'torch' | 'routed'; dispatch operator 'moh_heads').
    """

    def __init__(self, dim: int, num_heads: int, pretrain_size: Tuple[int, int], window_size: int = 3,
                 sr_ratio: int = 1, qkv_bias: bool = True, attn_drop: float = 0., proj_drop: float = 0.,
                 backend: str = 'auto', shared_head: Optional[int] = None, routed_head: int = 0,
                 moh_backend: str = 'auto', device=None, dtype=None):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        check_kernel_size(window_size)
        self._init_shared(dim, num_heads, pretrain_size, attn_drop, proj_drop, shared_head, routed_head, moh_backend,
                          dd)
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

    def _project(self, x: torch.Tensor) -> _AggregatedParts:
        """(B, H, W, C) -> the per-head queries, keys, values and biases of every head."""
        batch, height, width, channels = x.shape
        heads = self.num_heads
        pool_size = self.pool_size(height, width)
        pool_len = pool_size[0] * pool_size[1]
        q_norm = _l2_heads(self.q(x), heads).flatten(2, 3)
        k_local, v_local = self.kv(x).chunk(2, dim=-1)
        k_local = _l2_heads(k_local, heads)
        v_local = v_local.reshape(batch, height, width, heads, -1).permute(0, 3, 1, 2, 4)
        k_pool, v_pool = self.kv(self._pooled_tokens(x, pool_size)).chunk(2, dim=-1)
        k_pool = F.normalize(k_pool.reshape(batch, pool_len, heads, -1).transpose(1, 2), dim=-1)
        v_pool = v_pool.reshape(batch, pool_len, heads, -1).transpose(1, 2)
        length_scale = window_length_scale(height, width, self.window_size, pool_len, x.device).to(x.dtype)
        pool_bias = position_bias(self.cpb_fc1, self.cpb_fc2, (height, width), pool_size, self.pretrain_size)
        return _AggregatedParts(q_norm, k_local, v_local, k_pool, v_pool, length_scale, pool_bias)

    def _attend(self, parts: _AggregatedParts, heads: slice) -> torch.Tensor:
        """Outputs (B, h', N, d) of the heads in `heads` for every query (the reference, window operators), the
        pooled part band by band of query rows (`row_bands`)."""
        height, width = parts.k_local.shape[2:4]
        slots = self.window_size * self.window_size
        k_local, v_local = parts.k_local[:, heads], parts.v_local[:, heads]
        k_pool, v_pool = parts.k_pool[:, heads], parts.v_pool[:, heads]
        q_scaled = self._scaled_query(parts.q_norm[:, heads], parts.length_scale, heads)   # (B, h', N, d)
        # Under autocast the window ops run in the activations' dtype, as autocast runs the matmuls.
        logits_local = window_qk(q_scaled.unflatten(2, (height, width)).to(k_local.dtype), k_local,
                                 self.relative_pos_bias_local[heads], self.window_size, self.backend).flatten(2, 3)
        # Learnable tokens: added after the softmax, un-normalised, driven by the plain normalised query.
        token_weights = parts.q_norm[:, heads] @ self.learnable_tokens[heads] + self.learnable_bias[heads]
        local, pooled = [], []
        batch, count, pooled_keys = k_pool.shape[:3]
        for rows, tokens in row_bands(height, batch * count * width * pooled_keys, QUERY_BAND_LOGITS, width):
            q_band = q_scaled[:, :, tokens]
            logits_pool = q_band @ k_pool.transpose(-2, -1) + parts.pool_bias.gather(rows, heads).to(q_band.dtype)
            attn = torch.cat([logits_local[:, :, tokens].to(logits_pool.dtype), logits_pool], dim=-1).softmax(dim=-1)
            attn_local, attn_pool = self.attn_drop(attn).split([slots, attn.shape[-1] - slots], dim=-1)
            local.append(attn_local + token_weights[:, :, tokens])
            pooled.append(attn_pool @ v_pool)
        attn_local = join_bands(local, 2).unflatten(2, (height, width)).to(v_local.dtype)
        return window_av(attn_local, v_local, self.window_size, self.backend).flatten(2, 3) + join_bands(pooled, 2)

    def _attend_routed(self, parts: _AggregatedParts, heads: slice, index: torch.Tensor) -> torch.Tensor:
        """Outputs (B, h', M, d) of the heads in `heads` for the queries index (B, h', M) only: the window keys and
        values of those queries are gathered, so nothing is computed for the other tokens."""
        height, width = parts.k_local.shape[2:4]
        slots = self.window_size * self.window_size
        neighbours, in_map = _window_neighbours(height, width, self.window_size, index.device)
        q_norm = _gather_tokens(parts.q_norm[:, heads], index)                              # (B, h', M, d)
        q_scaled = self._scaled_query(q_norm, parts.length_scale[index], heads)
        k_window = _gather_windows(parts.k_local[:, heads].flatten(2, 3), neighbours[index])  # (B, h', M, k*k, d)
        v_window = _gather_windows(parts.v_local[:, heads].flatten(2, 3), neighbours[index])
        logits_local = (q_scaled.unsqueeze(-2) * k_window).sum(-1) + self.relative_pos_bias_local[heads, None, :]
        logits_local = logits_local.masked_fill(~in_map[index], float('-inf'))
        logits_pool = q_scaled @ parts.k_pool[:, heads].transpose(-2, -1) \
            + _gather_rows(parts.pool_bias.gather(heads=heads), index).to(q_scaled.dtype)
        attn = self.attn_drop(torch.cat([logits_local, logits_pool], dim=-1).softmax(dim=-1))
        attn_local, attn_pool = attn.split([slots, attn.shape[-1] - slots], dim=-1)
        attn_local = attn_local + q_norm @ self.learnable_tokens[heads] + self.learnable_bias[heads]
        return (attn_local.unsqueeze(-1) * v_window).sum(-2) + attn_pool @ parts.v_pool[:, heads]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, W, C) -> (B, H, W, C)."""
        _check_map(x, self.dim, 'AggregatedAttention')
        return self._finish(self._mixed_heads(x, self._project(x)), x.shape)

    def macs_not_counted(self, x: torch.Tensor) -> int:
        """Window q.k and attn.v MACs of input x (B, H, W, C): FLOP counters see no matmul there."""
        batch, height, width, channels = x.shape
        return 2 * batch * height * width * self.window_size ** 2 * channels

    def _macs_per_query_head(self, height: int, width: int) -> int:
        """One query's attention in one head: window q.k and attn.v, learnable tokens, pooled q.k and attn.v."""
        pool_height, pool_width = self.pool_size(height, width)
        return self.head_dim * (3 * self.window_size ** 2 + 2 * pool_height * pool_width)


def _log_length(num_keys: Length) -> Union[float, torch.Tensor]:
    """ln(num_keys): a float in eager calls. While a graph is captured a 0-dim float64 CPU tensor, which multiplies
    like the float (a CPU scalar, cast to the op's compute dtype); math.log of a symbolic size would fix the size."""
    if capturing_graph():
        return torch.full((), num_keys, dtype=torch.float64).log()
    return math.log(num_keys)


class _FullParts(NamedTuple):
    """Per-head projections of one full-attention call (h heads, N tokens)."""
    q_norm: torch.Tensor   # (B, h, N, d) L2-normalised queries
    k_norm: torch.Tensor   # (B, h, N, d) L2-normalised keys
    v: torch.Tensor        # (B, h, N, d)
    bias: PositionBias     # CPB of every (query, key) pair, gathered per band: (h, N, N)


class ScaledCosineAttention(_CosineAttentionBase):
    """TransNeXt full attention (the last stage): length-scaled cosine attention with a CPB.

    logits = ((norm(q) + query_embedding) * softplus(temperature) * ln(N)) . norm(k) + CPB, N = H * W of
    the current input (the official classification model fixes N at build time; this equals it there).
    Official state-dict names: `qkv`, `proj`, `temperature`, `query_embedding`, `cpb_fc1`, `cpb_fc2`, and with
    mixture-of-heads (`shared_head`, `routed_head`, `moh_backend` as in AggregatedAttention) `wg`, `wg_0`, `wg_1`.
    """

    def __init__(self, dim: int, num_heads: int, pretrain_size: Tuple[int, int], qkv_bias: bool = True,
                 attn_drop: float = 0., proj_drop: float = 0., shared_head: Optional[int] = None,
                 routed_head: int = 0, moh_backend: str = 'auto', device=None, dtype=None):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self._init_shared(dim, num_heads, pretrain_size, attn_drop, proj_drop, shared_head, routed_head, moh_backend,
                          dd)
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias, **dd)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        self._reset_shared()

    def _macs_per_query_head(self, height: int, width: int) -> int:
        """One query's attention in one head: q.k and attn.v over the H * W keys."""
        return 2 * self.head_dim * height * width

    def _project(self, x: torch.Tensor) -> _FullParts:
        batch, height, width, channels = x.shape
        num_tokens = height * width
        qkv = self.qkv(x).reshape(batch, num_tokens, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        bias = position_bias(self.cpb_fc1, self.cpb_fc2, (height, width), (height, width), self.pretrain_size)
        return _FullParts(F.normalize(q, dim=-1), F.normalize(k, dim=-1), v, bias)

    def _attention(self, parts: _FullParts, q_norm: torch.Tensor, bias: torch.Tensor, heads: slice) -> torch.Tensor:
        """softmax(scaled q . k + bias) . v for queries q_norm (B, h', M, d) of `heads` with bias (B or 1, h', M, N)."""
        q_scaled = self._scaled_query(q_norm, _log_length(parts.k_norm.shape[2]), heads)
        attn = (q_scaled @ parts.k_norm[:, heads].transpose(-2, -1) + bias).softmax(dim=-1)
        return self.attn_drop(attn) @ parts.v[:, heads]

    def _attend(self, parts: _FullParts, heads: slice) -> torch.Tensor:
        """Outputs (B, h', N, d) of the heads in `heads` for every query, band by band of query rows."""
        batch, count, tokens = parts.k_norm[:, heads].shape[:3]
        height = parts.bias.rows.shape[0]
        width = tokens // height
        return join_bands([self._attention(parts, parts.q_norm[:, heads, band],
                                           parts.bias.gather(rows, heads).to(parts.q_norm.dtype), heads)
                           for rows, band in row_bands(height, batch * count * width * tokens, QUERY_BAND_LOGITS,
                                                       width)], 2)

    def _attend_routed(self, parts: _FullParts, heads: slice, index: torch.Tensor) -> torch.Tensor:
        """Outputs (B, h', M, d) of the heads in `heads` for the queries index (B, h', M) only."""
        q_norm = _gather_tokens(parts.q_norm[:, heads], index)
        return self._attention(parts, q_norm, _gather_rows(parts.bias.gather(heads=heads), index).to(q_norm.dtype),
                               heads)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, W, C) -> (B, H, W, C)."""
        _check_map(x, self.dim, 'ScaledCosineAttention')
        return self._finish(self._mixed_heads(x, self._project(x)), x.shape)
