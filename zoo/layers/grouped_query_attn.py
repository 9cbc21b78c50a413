"""Grouped-query attention with static or key-driven query allocation (MHSA, GQA, KDGQA, DGQA, PGQA).

Paper: Beyond Uniform Query Distribution: Key-Driven Grouped Query Attention (Khan et al., 2024),
https://arxiv.org/abs/2408.08454; official code github.com/zohaib-khan5040/key-driven-gqa (MIT).

H query heads share G key/value heads (H divisible by G). An *allocation* a (G ints summing to H) says how
many consecutive query heads use each K/V head: the first a_0 heads use K/V head 0, the next a_1 head 1, and
so on. Schemes (the official names):

* ``mhsa``: G = H, one K/V head per query head.
* ``gqa``: a_g = H / G for every g (contiguous groups, the ``repeat_interleave`` convention).
* ``kdgqa``: recomputed every forward from key-head norms n_g = ||k_g||_F: min-max scaled, a = round(n / sum n * H),
  then repaired (while sum > H decrement the argmax, while sum < H increment the argmin).
* ``dgqa_ema`` / ``dgqa_diff``: from key norms tracked during training in a buffer ``cache`` [G], updated every
  ``window_size`` training steps; ema: a ~ 0.9 * n + 0.1 * cache, diff: a ~ |cache - n|.
* ``pgqa``: static GQA; each group's output minus uniform noise rescaled to the output's per-head mean and std.

``mode='official'`` reproduces the official modules, defects included: KDGQA norms summed over the batch (one
allocation for the whole batch), DGQA eval allocation from the current batch and the cache, which it then
overwrites, DGQA random repair, PGQA noise in eval from the CPU generator. ``mode='default'`` fixes them:

* KDGQA allocates per sample: a sample's output never depends on the rest of the batch;
* equal key norms (min-max 0/0, an endless repair loop in the official code) give the uniform allocation;
* every K/V head keeps at least ``min_queries_per_kv_head`` (default 1) query heads; 0 allows empty groups;
* DGQA repairs deterministically and, in eval, uses its persisted allocation ``splits`` (a buffer, so a saved
  model restores it) without reading or changing state: eval is deterministic and batch independent;
* PGQA noise is added in training only, drawn with torch's generator on the output's device.
"""
import contextlib
from typing import Dict, Iterator, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ['GroupedQueryAttention', 'grouped_query_attention', 'kv_head_index', 'key_norms', 'kdgqa_allocation',
           'dgqa_allocation', 'dgqa_ratio', 'pgqa_perturb', 'repair_allocation', 'uniform_allocation',
           'mean_pool_kv_heads', 'convert_mha_to_gqa', 'replay_on_recompute', 'ATTENTION_SCHEMES']

ATTENTION_SCHEMES = ('mhsa', 'gqa', 'kdgqa', 'dgqa_ema', 'dgqa_diff', 'pgqa')
MODES = ('default', 'official')
# Relative spread of key norms below which they count as equal (the min-max scaling is then undefined).
_EQUAL_NORMS_RTOL = 1e-6


def uniform_allocation(num_kv_heads: int, num_heads: int, device=None) -> torch.Tensor:
    """(G,) int64: H // G query heads per K/V head, the remainder to the first heads.

    It is also where the official repair loop ends after ~2**31 steps when equal norms made the allocation NaN.
    """
    alloc = torch.full((num_kv_heads,), num_heads // num_kv_heads, dtype=torch.long, device=device)
    alloc[:num_heads % num_kv_heads] += 1
    return alloc


def repair_allocation(alloc: torch.Tensor, num_heads: int, min_queries: int = 0) -> torch.Tensor:
    """Make each row of (..., G) int64 `alloc` sum to `num_heads` with every entry >= `min_queries`.

    The official KDGQA repair: while a row sums to more than H decrement its first argmax, while less increment
    its first argmin. Then, while an entry is below `min_queries`, move one query from the first argmax to the
    first argmin. Deterministic. Rows come from rounding G values that sum to H, so they are off by at most G / 2
    and G passes suffice (G * min_queries for the floor); running the passes masked instead of testing the rows
    keeps the function free of host syncs and data-dependent control flow (torch.export traces it).
    """
    groups = alloc.shape[-1]
    if groups * min_queries > num_heads:
        raise ValueError(f'min_queries {min_queries} x {groups} K/V heads exceeds {num_heads} query heads')
    rows = alloc.reshape(-1, groups).clone()
    for _ in range(groups):
        excess = rows.sum(-1, keepdim=True) - num_heads
        rows = rows - F.one_hot(rows.argmax(-1), groups) * (excess > 0).long()
        rows = rows + F.one_hot(rows.argmin(-1), groups) * (excess < 0).long()
    for _ in range(groups * min_queries):
        short = (rows < min_queries).any(-1, keepdim=True).long()
        rows = rows - F.one_hot(rows.argmax(-1), groups) * short
        rows = rows + F.one_hot(rows.argmin(-1), groups) * short
    return rows.view_as(alloc)


def key_norms(k: torch.Tensor) -> torch.Tensor:
    """(B, G, N, d) keys -> (B, G) Frobenius norm of each sample's K head over tokens and channels (fp32)."""
    return torch.linalg.vector_norm(k.float(), dim=(-2, -1))


def kdgqa_allocation(norms: torch.Tensor, num_heads: int, min_queries: int = 0) -> torch.Tensor:
    """(..., G) key norms -> (..., G) int64 query heads per K/V head (the KDGQA rule, each row on its own).

    Min-max scaling, a = round(n / sum(n) * H) (half to even), repair_allocation. Rows whose norms are all
    equal (relative spread <= 1e-6) get the uniform allocation instead of the official NaN.
    """
    norms = norms.float()
    low, high = norms.amin(-1, keepdim=True), norms.amax(-1, keepdim=True)
    spread = high - low
    equal = spread <= _EQUAL_NORMS_RTOL * high.abs()
    scaled = (norms - low) / torch.where(equal, torch.ones_like(spread), spread)
    total = scaled.sum(-1, keepdim=True)
    alloc = torch.round(scaled / torch.where(equal, torch.ones_like(total), total) * num_heads).long()
    uniform = uniform_allocation(norms.shape[-1], num_heads, norms.device).expand_as(alloc)
    alloc = torch.where(equal, uniform, alloc)
    return repair_allocation(alloc, num_heads, min_queries)


_replaying = False


@contextlib.contextmanager
def _replay() -> Iterator[None]:
    global _replaying
    previous, _replaying = _replaying, True
    try:
        yield
    finally:
        _replaying = previous


def replay_on_recompute() -> Tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
    """`context_fn` of torch.utils.checkpoint (use_reentrant=False): the recomputation of a checkpointed block in
    the backward pass replays each DGQA layer's allocation of the forward it recomputes, instead of advancing the
    layer's training state (step counter, key-norm cache) a second time; the forward itself runs as usual."""
    return contextlib.nullcontext(), _replay()


def dgqa_ratio(norms: torch.Tensor, cache: torch.Tensor, kind: str, num_heads: int) -> torch.Tensor:
    """(G,) norms and cache -> (G,) unrepaired allocation round(r / sum(r) * H); r = 0 everywhere -> uniform.

    kind 'ema': r = 0.9 * norms + 0.1 * cache (the official beta 0.9 weights the current norms);
    kind 'diff': r = |cache - norms|.
    """
    ratio = 0.9 * norms + 0.1 * cache if kind == 'ema' else (cache - norms).abs()
    total = ratio.sum()
    alloc = torch.round(ratio / torch.where(total > 0, total, torch.ones_like(total)) * num_heads).long()
    return torch.where(total > 0, alloc, uniform_allocation(norms.shape[-1], num_heads, norms.device))


def dgqa_allocation(norms: torch.Tensor, cache: torch.Tensor, kind: str, num_heads: int,
                    min_queries: int = 0, random_repair: bool = False) -> torch.Tensor:
    """(G,) norms and cache -> (G,) int64 DGQA allocation.

    random_repair reproduces the official repair, which draws indices with torch.randint: decrement a random
    K/V head with a > 0 while the sum exceeds H, increment a random one while it falls short. Otherwise the
    deterministic repair_allocation is used.
    """
    alloc = dgqa_ratio(norms, cache, kind, num_heads)
    if not random_repair:
        return repair_allocation(alloc, num_heads, min_queries)
    while int(alloc.sum()) > num_heads:
        nonzero = (alloc > 0).nonzero().flatten()
        alloc[nonzero[torch.randint(len(nonzero), (1,))]] -= 1
    while int(alloc.sum()) < num_heads:
        alloc[torch.randint(alloc.shape[0], (1,))] += 1
    return alloc


def kv_head_index(alloc: torch.Tensor, num_heads: int) -> torch.Tensor:
    """(..., G) allocation -> (..., H) int64 K/V head used by each query head (consecutive chunks in order)."""
    bounds = alloc.cumsum(-1)
    heads = torch.arange(num_heads, device=alloc.device)
    # the number of chunk ends at or before each head, i.e. searchsorted(bounds, heads, right=True) as a comparison
    # and a sum, which ONNX has (it has no searchsorted)
    return (bounds[..., None, :] <= heads[:, None]).sum(-1)


def grouped_query_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_index: Optional[torch.Tensor] = None,
                            scale: Optional[float] = None, dropout_p: float = 0.) -> torch.Tensor:
    """Softmax attention of H query heads over G shared K/V heads (the reference; explicit matmuls).

    Args:
        q: (B, H, N, d) queries.
        k, v: (B, G, N, d) keys and values; H divisible by G when kv_index is None.
        kv_index: (B, H) or (H,) int64 K/V head of each query head; None = contiguous groups of H / G.
        scale: logit scale, default d ** -0.5 (applied to q before q @ k^T, as the official modules do).
        dropout_p: dropout on the attention weights.
    Returns:
        (B, H, N, d).
    """
    batch, heads, tokens, dim = q.shape
    kv_heads = k.shape[1]
    if kv_index is None:
        if heads % kv_heads:
            raise ValueError(f'{heads} query heads cannot be split into {kv_heads} equal K/V groups')
        k, v = k.repeat_interleave(heads // kv_heads, 1), v.repeat_interleave(heads // kv_heads, 1)
    else:
        index = kv_index.expand(batch, heads)[:, :, None, None].expand(batch, heads, tokens, dim)
        k, v = k.gather(1, index), v.gather(1, index)
    q = q * (dim ** -0.5 if scale is None else scale)
    attn = (q @ k.transpose(-2, -1)).softmax(dim=-1)
    if dropout_p > 0.:
        attn = F.dropout(attn, dropout_p)
    return attn @ v


def _standardise_rows(x: torch.Tensor) -> torch.Tensor:
    """Rows of (..., L) to zero mean, unit unbiased std (a row of std 0 is only centred)."""
    std = x.std(-1, keepdim=True)
    return (x - x.mean(-1, keepdim=True)) / torch.where(std == 0, torch.ones_like(std), std)


def pgqa_perturb(out: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """PGQA: subtract from each output row noise rescaled to that row's mean and std.

    Args:
        out: (B, H, N, d) attention output; each (sample, head) is one row of N * d values.
        noise: (G, H / G, N * d) raw uniform draws, one block per K/V group, as drawn.
    Returns:
        (B, H, N, d): out - (z * std(row) + mean(row)) with unbiased stds, where z is the noise with entry (i, i)
        of each group's block zeroed and then standardised per row (the official module; the same noise for
        every sample of the batch).
    """
    batch, heads, tokens, dim = out.shape
    groups, per_group, length = noise.shape
    if groups * per_group != heads or length != tokens * dim:
        raise ValueError(f'noise {tuple(noise.shape)} does not fit an output of {heads} heads x {tokens * dim}')
    diagonal = torch.arange(per_group, device=noise.device)
    noise = noise.clone()
    noise[:, diagonal, diagonal] = 0
    z = _standardise_rows(noise.to(out.dtype)).reshape(1, heads, length)
    rows = out.reshape(batch, heads, length)
    scaled = z * rows.std(-1, keepdim=True) + rows.mean(-1, keepdim=True)
    return (rows - scaled).view_as(out)


def mean_pool_kv_heads(weight: torch.Tensor, num_heads: int, num_kv_heads: int) -> torch.Tensor:
    """(H * d, ...) K or V projection weight/bias -> (G * d, ...): contiguous groups of H / G heads averaged."""
    if num_heads % num_kv_heads:
        raise ValueError(f'num_heads {num_heads} is not divisible by num_kv_heads {num_kv_heads}')
    if weight.shape[0] % num_heads:
        raise ValueError(f'a projection with {weight.shape[0]} outputs cannot hold {num_heads} heads')
    head_dim = weight.shape[0] // num_heads
    grouped = weight.reshape(num_kv_heads, num_heads // num_kv_heads, head_dim, *weight.shape[1:])
    return grouped.mean(1).reshape(num_kv_heads * head_dim, *weight.shape[1:])


def convert_mha_to_gqa(state_dict: Dict[str, torch.Tensor], num_heads: int, num_kv_heads: int,
                       reset_final_norm: bool = False) -> Dict[str, torch.Tensor]:
    """Multi-head ViT state dict (timm layout, fused `*.attn.qkv`) -> GQA layout with `num_kv_heads` K/V heads.

    The official uptraining conversion (Ainslie et al.): each fused qkv [3C, C] (and bias [3C]) is split into
    `attn.q` (kept) and `attn.k` / `attn.v`, whose H heads are mean-pooled in G contiguous groups of H / G
    -> [G * d, C]. Every other tensor is copied. num_kv_heads = num_heads gives the MHSA layout (q/k/v split).
    reset_final_norm reproduces the official loader, which leaves the final `norm.*` at its init (1, 0);
    timm ViTs need their trained final norm, so the default keeps it.

    Args:
        state_dict: the MHA checkpoint; already-split `attn.q/k/v` entries are copied unchanged.
        num_heads: H of the source model (a fused qkv does not record it).
        num_kv_heads: G, a divisor of H.
    Returns:
        a new state dict (the input is not modified).
    """
    if num_kv_heads < 1 or num_heads % num_kv_heads:
        raise ValueError(f'num_kv_heads must divide num_heads {num_heads}, got {num_kv_heads}')
    out = {}
    for key, value in state_dict.items():
        prefix, _, leaf = key.rpartition('.')
        if not prefix.endswith('attn.qkv'):
            out[key] = value
            continue
        if value.shape[0] % 3:
            raise ValueError(f'{key} has {value.shape[0]} rows, not a fused q/k/v projection')
        base = prefix[:-len('qkv')]
        q, k, v = value.chunk(3, dim=0)
        out[f'{base}q.{leaf}'] = q.clone()
        out[f'{base}k.{leaf}'] = mean_pool_kv_heads(k, num_heads, num_kv_heads)
        out[f'{base}v.{leaf}'] = mean_pool_kv_heads(v, num_heads, num_kv_heads)
    if reset_final_norm:
        for leaf, fill in (('weight', torch.ones_like), ('bias', torch.zeros_like)):
            if f'norm.{leaf}' in out:
                out[f'norm.{leaf}'] = fill(out[f'norm.{leaf}'])
    return out


class GroupedQueryAttention(nn.Module):
    """Self-attention of `num_heads` query heads over `num_kv_heads` shared K/V heads, scheme by official name.

    Keys (official): `q` Linear(C, C), `k` and `v` Linear(C, G * d), `proj` Linear(C, C); DGQA adds the buffer
    `cache` [G] (official) and `splits` [G] int64 (the zoo persists the allocation; see the module docstring).

    Args:
        dim: channels C.
        num_heads: H query heads (C divisible by H).
        num_kv_heads: G, a divisor of H; ignored (= H) for 'mhsa'.
        scheme: one of ATTENTION_SCHEMES.
        mode: 'default' (the fixed behaviour) or 'official' (the official modules exactly, defects included).
        qkv_bias: bias in q, k and v.
        window_size: DGQA: training steps between allocation updates.
        min_queries_per_kv_head: default mode, KDGQA/DGQA: the fewest query heads a K/V head gets (0 allows
            empty groups, as the official code does).
        attn_drop, proj_drop: dropout on the attention weights and after the projection.
        backend: 'torch' (explicit matmuls, the reference) or 'sdpa' (F.scaled_dot_product_attention).

    Attributes:
        training_step: DGQA step counter, incremented by every training forward; the allocation is updated when
            it is a multiple of window_size. The official training loop sets it to the batch index within the
            epoch; set it the same way to reproduce official training.
        last_allocation: the (B, G) or (G,) allocation of the last KDGQA/DGQA forward, for inspection.
    """

    def __init__(self, dim: int, num_heads: int, num_kv_heads: Optional[int] = None, scheme: str = 'gqa',
                 mode: str = 'default', qkv_bias: bool = True, window_size: int = 10,
                 min_queries_per_kv_head: int = 1, attn_drop: float = 0., proj_drop: float = 0.,
                 backend: str = 'torch', device=None, dtype=None):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        if scheme not in ATTENTION_SCHEMES:
            raise ValueError(f'scheme must be one of {", ".join(ATTENTION_SCHEMES)}, got {scheme!r}')
        if mode not in MODES:
            raise ValueError(f'mode must be one of {", ".join(MODES)}, got {mode!r}')
        if backend not in ('torch', 'sdpa'):
            raise ValueError(f"backend must be 'torch' or 'sdpa', got {backend!r}")
        if dim % num_heads:
            raise ValueError(f'dim {dim} is not divisible by num_heads {num_heads}')
        num_kv_heads = num_heads if scheme == 'mhsa' or num_kv_heads is None else num_kv_heads
        if num_kv_heads < 1 or num_heads % num_kv_heads:
            raise ValueError(f'num_kv_heads must divide num_heads {num_heads}, got {num_kv_heads}')
        if window_size < 1:
            raise ValueError(f'window_size must be >= 1, got {window_size}')
        if not 0 <= min_queries_per_kv_head * num_kv_heads <= num_heads:
            raise ValueError(f'min_queries_per_kv_head {min_queries_per_kv_head} x {num_kv_heads} K/V heads '
                             f'must be between 0 and num_heads {num_heads}')
        self.dim = dim
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = dim // num_heads
        self.scheme = scheme
        self.mode = mode
        self.window_size = window_size
        # the official code allows empty groups; so does the default mode when asked
        self.min_queries = 0 if mode == 'official' else min_queries_per_kv_head
        self.attn_drop = attn_drop
        self.backend = backend
        self.q = nn.Linear(dim, dim, bias=qkv_bias, **dd)
        self.k = nn.Linear(dim, num_kv_heads * self.head_dim, bias=qkv_bias, **dd)
        self.v = nn.Linear(dim, num_kv_heads * self.head_dim, bias=qkv_bias, **dd)
        self.proj = nn.Linear(dim, dim, **dd)
        self.proj_drop = nn.Dropout(proj_drop)
        if scheme.startswith('dgqa'):
            self.register_buffer('cache', torch.zeros(num_kv_heads, device=device, dtype=torch.float32))
            self.register_buffer('splits', uniform_allocation(num_kv_heads, num_heads, device))
        self.training_step = 0
        self.last_allocation: Optional[torch.Tensor] = None

    def extra_repr(self) -> str:
        return (f'scheme={self.scheme}, mode={self.mode}, num_heads={self.num_heads}, '
                f'num_kv_heads={self.num_kv_heads}')

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, C) -> (B, N, C)."""
        if x.dim() != 3 or x.shape[-1] != self.dim:
            raise ValueError(f'expected a (B, N, {self.dim}) token tensor, got {tuple(x.shape)}')
        batch, tokens, _ = x.shape
        q = self.q(x).view(batch, tokens, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k(x).view(batch, tokens, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v(x).view(batch, tokens, self.num_kv_heads, self.head_dim).transpose(1, 2)
        alloc = self._allocation(k)
        kv_index = None if alloc is None else kv_head_index(alloc, self.num_heads)
        out = self._attend(q, k, v, kv_index)
        if self.scheme == 'pgqa' and (self.training or self.mode == 'official'):
            out = pgqa_perturb(out, self._pgqa_noise(out))
        out = out.transpose(1, 2).reshape(batch, tokens, self.dim)
        return self.proj_drop(self.proj(out))

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                kv_index: Optional[torch.Tensor]) -> torch.Tensor:
        """(B, H, N, d) queries, (B, G, N, d) keys/values -> (B, H, N, d)."""
        dropout_p = self.attn_drop if self.training else 0.
        if self.backend == 'torch':
            return grouped_query_attention(q, k, v, kv_index, dropout_p=dropout_p)
        if kv_index is None:
            return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, enable_gqa=True)
        index = kv_index.expand(q.shape[0], self.num_heads)[:, :, None, None].expand(q.shape)
        return F.scaled_dot_product_attention(q, k.gather(1, index), v.gather(1, index), dropout_p=dropout_p)

    def _allocation(self, k: torch.Tensor) -> Optional[torch.Tensor]:
        """(G,) or (B, G) query heads per K/V head for this forward; None for the static schemes."""
        if self.scheme == 'kdgqa':
            norms = key_norms(k.detach())
            alloc = kdgqa_allocation(norms.sum(0) if self.mode == 'official' else norms, self.num_heads,
                                     self.min_queries)
        elif self.scheme.startswith('dgqa'):
            alloc = self._dgqa_allocation(k)
        else:
            return None
        if not (torch.compiler.is_compiling() or torch.compiler.is_exporting()):
            self.last_allocation = alloc  # an inspection aid: not a buffer, so traced graphs leave it out
        return alloc

    @torch.no_grad()
    def _dgqa_allocation(self, k: torch.Tensor) -> torch.Tensor:
        """DGQA: update (training; official eval) or read (default eval) the persisted allocation."""
        kind = self.scheme[len('dgqa_'):]
        official = self.mode == 'official'
        if not self.training and not official:
            return self.splits.clone()
        if self.training and _replaying:
            return self._training_allocation.clone()
        norms = key_norms(k).sum(0)
        if self.training:
            if self.training_step % self.window_size == 0:
                self.splits.copy_(dgqa_allocation(norms, self.cache, kind, self.num_heads, self.min_queries, official))
                # official update: not an EMA, the sum is divided by the window
                self.cache.copy_((self.cache + norms) / self.window_size)
            self.training_step += 1
            self._training_allocation = self.splits.clone()
        else:
            # official eval: allocation from this batch and the cache, which then holds this batch's norms
            self.splits.copy_(dgqa_allocation(norms, self.cache, kind, self.num_heads, 0, True))
            self.cache.copy_(norms)
        return self.splits.clone()

    def _pgqa_noise(self, out: torch.Tensor) -> torch.Tensor:
        """(G, H / G, N * d) uniform noise: official mode draws each group from the CPU generator, in order."""
        shape = (self.num_heads // self.num_kv_heads, out.shape[2] * self.head_dim)
        if self.mode == 'official':
            return torch.stack([torch.rand(shape) for _ in range(self.num_kv_heads)]).to(out.device)
        return torch.rand((self.num_kv_heads, *shape), device=out.device)

    def allocation_from_cache(self, cache: torch.Tensor) -> torch.Tensor:
        """DGQA: (G,) allocation for a checkpoint that has a `cache` but no `splits` (official files).

        It is the allocation official eval would give a batch whose key norms equal the cache (ema: proportional
        to the cache; diff: uniform), with the deterministic repair.
        """
        kind = self.scheme[len('dgqa_'):]
        cache = cache.float()
        return dgqa_allocation(cache, cache, kind, self.num_heads, self.min_queries).to(self.splits.device)
