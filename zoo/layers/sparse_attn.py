"""Instance-dependent sparse attention: Sparsifiner's connectivity predictor and top-k sparse attention.

Sparsifiner (Wei et al., CVPR 2023, https://arxiv.org/abs/2303.13755) predicts, per image, which keys each query
attends to. A cheap low-rank attention (queries and keys reduced in width, keys projected onto K basis tokens)
gives coefficients over a sparse, learned basis; their product approximates the non-cls rows of the attention
matrix, and each non-cls query keeps the `budget` keys that score highest. The cls query stays dense.

Two executions of the same attention are provided:

* `masked_attention`: the official one, dense logits with the dropped pairs set to -inf (more work than dense);
* `topk_sparse_attention`: computes only the kept query-key pairs (gather of the kept keys and values), so the
  attention FLOPs fall with the keep ratio.

Layout: q, k, v (B, heads, N, head_dim) with token 0 the cls token; scores over keys (B, heads, N - 1, N).
"""
import math
from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import trunc_normal_

__all__ = ['ConnectivityPredictor', 'connectivity_topk', 'connectivity_mask', 'masked_attention',
           'topk_sparse_attention', 'dense_attention', 'attention_budget']


def attention_budget(keep_rate: float, num_tokens: int) -> int:
    """Keys kept per non-cls query: ceil(keep_rate * num_tokens) (official rule; 0.25 of 197 -> 50)."""
    if not 0. < keep_rate <= 1.:
        raise ValueError(f'attention keep rate must be in (0, 1], got {keep_rate}')
    return math.ceil(keep_rate * num_tokens)


class ConnectivityPredictor(nn.Module):
    """Low-rank approximate attention over a sparse basis (official `MaskPredictor`, state-dict names kept).

    Args:
        head_dim: width d of the per-head queries and keys it reads.
        num_heads: heads H; the cheap attention is scaled by H ** -0.5 (an official quirk, not d ** -0.5).
        num_tokens: N, the fixed token count (cls + patches) the token projections are built for.
        reduce_n_factor: K = N // reduce_n_factor basis tokens.
        reduce_c_factor: reduced width c = d // reduce_c_factor of the queries and keys.
        share_inout_proj: use one [N, K] projection for keys and basis (`proj_n`); else a separate `proj_back_n`.
        basis_threshold: at inference the basis is |proj_back_n| with entries <= threshold set to 0.
        coef_topk: at inference keep the top coef_topk basis coefficients per row; 0 keeps those above
            coef_threshold instead.
        coef_threshold: see coef_topk.
    """

    def __init__(self, head_dim: int, num_heads: int, num_tokens: int = 197, reduce_n_factor: int = 6,
                 reduce_c_factor: int = 2, share_inout_proj: bool = False, basis_threshold: float = 0.02,
                 coef_topk: int = 8, coef_threshold: float = 0.05, device=None, dtype=None):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.num_tokens = num_tokens
        self.num_basis = num_tokens // reduce_n_factor
        if self.num_basis < 1 or head_dim // reduce_c_factor < 1:
            raise ValueError(f'reduce factors leave no basis tokens or channels: N={num_tokens} // '
                             f'{reduce_n_factor}, d={head_dim} // {reduce_c_factor}')
        if coef_topk > self.num_basis:
            raise ValueError(f'coef_topk={coef_topk} exceeds the {self.num_basis} basis tokens')
        self.scale = num_heads ** -0.5
        self.basis_threshold = basis_threshold
        self.coef_topk = coef_topk
        self.coef_threshold = coef_threshold
        reduced = head_dim // reduce_c_factor
        self.proj_c_q = nn.Linear(head_dim, reduced, **dd)
        self.proj_c_k = nn.Linear(head_dim, reduced, **dd)
        self.proj_n = nn.Parameter(torch.empty(num_tokens, self.num_basis, **dd))
        self.proj_back_n = None if share_inout_proj else nn.Parameter(torch.empty(num_tokens, self.num_basis, **dd))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Official init: trunc-normal(0.02) everywhere, zero biases (also the start of a DeiT-initialised run)."""
        for weight in (self.proj_c_q.weight, self.proj_c_k.weight, self.proj_n, self.proj_back_n):
            if weight is not None:
                trunc_normal_(weight, std=.02)
        nn.init.zeros_(self.proj_c_q.bias)
        nn.init.zeros_(self.proj_c_k.bias)

    def basis(self, reconstruct: bool) -> torch.Tensor:
        """(K, N) basis: signed while fitting it to a teacher, else |.| with small entries dropped."""
        back = (self.proj_n if self.proj_back_n is None else self.proj_back_n).t()
        if reconstruct:
            return back
        back = back.abs()
        return back.masked_fill(back <= self.basis_threshold, 0.)

    def sparsify_coefficients(self, coef: torch.Tensor) -> torch.Tensor:
        """(..., K) -> (..., K) with only the top coef_topk (or those above coef_threshold) left non-zero."""
        if self.coef_topk:
            values, index = coef.topk(self.coef_topk, dim=-1, sorted=False)
            return torch.zeros_like(coef).scatter(-1, index, values)
        return coef.masked_fill(coef <= self.coef_threshold, 0.)

    def forward(self, q: torch.Tensor, k: torch.Tensor, token_mask: Optional[torch.Tensor] = None,
                reconstruct: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
        """Approximate attention of the non-cls queries.

        Args:
            q, k: (B, H, N, d) per-head queries and keys of the block (after its qkv projection).
            token_mask: optional (B, N - 1) bool, False for pruned patch tokens (their reduced q/k are zeroed).
            reconstruct: fitting phase: signed basis and dense coefficients (what the teacher loss trains).

        Returns:
            approx_attn (B, H, N - 1, N) and basis_coef (B, H, N - 1, K).
        """
        if q.shape[-2] != self.num_tokens:
            raise ValueError(f'the connectivity predictor is built for {self.num_tokens} tokens, got {q.shape[-2]}')
        q_r, k_r = self.proj_c_q(q), self.proj_c_k(k)
        if token_mask is not None:
            keep = torch.cat([token_mask.new_ones(token_mask.shape[0], 1), token_mask], 1)[:, None, :, None]
            q_r, k_r = q_r * keep, k_r * keep
        k_basis = k_r.transpose(-2, -1) @ self.proj_n  # (B, H, c, K): keys projected onto the basis tokens
        coef = ((q_r[..., 1:, :] @ k_basis) * self.scale).softmax(dim=-1)
        if not reconstruct:
            coef = self.sparsify_coefficients(coef)
        return coef @ self.basis(reconstruct), coef


def connectivity_topk(approx_attn: torch.Tensor, budget: int, token_mask: Optional[torch.Tensor] = None
                      ) -> torch.Tensor:
    """(B, H, N - 1, N) scores -> (B, H, N - 1, budget) int64 kept key indices per non-cls query.

    Keys of pruned tokens (token_mask False, (B, N - 1)) cannot be picked; the cls key competes like any other.
    The indices carry no gradient (the official mask is detached).
    """
    scores = approx_attn.detach()
    if token_mask is not None:
        pruned = torch.cat([token_mask.new_ones(token_mask.shape[0], 1), token_mask], 1)
        scores = scores.masked_fill(~pruned[:, None, None, :], float('-inf'))
    return scores.topk(budget, dim=-1, sorted=False).indices


def connectivity_mask(key_index: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """(B, H, N - 1, budget) kept indices -> (B, H, N, N) bool mask, the cls query row all True."""
    batch, heads, rows, _ = key_index.shape
    mask = torch.zeros(batch, heads, rows, num_tokens, dtype=torch.bool, device=key_index.device)
    # a tensor source, not the scalar True: torch.jit.trace has no alias rule for scatter_ with a bool scalar
    mask.scatter_(-1, key_index, torch.ones_like(key_index, dtype=torch.bool))
    return torch.cat([mask.new_ones(batch, heads, 1, num_tokens), mask], dim=2)


def masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float,
                     need_cls_attn: bool = False) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Dense attention with the dropped pairs at -inf (the official execution); fully masked rows give zeros.

    Runs PyTorch's scaled_dot_product_attention with a boolean mask (the same result as masked_fill + softmax, with
    N^2 work whatever the mask keeps).

    Args:
        q, k, v: (B, H, N, d); mask: (B, H, N, N) bool, True = attend; need_cls_attn: also return the cls row.

    Returns:
        output (B, H, N, d) and, when asked for, the cls query's attention probabilities (B, H, N).
    """
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale).nan_to_num()
    cls_attn = None
    if need_cls_attn:
        logits = (q[:, :, :1] @ k.transpose(-2, -1)) * scale
        cls_attn = logits.masked_fill(~mask[:, :, :1], float('-inf')).softmax(dim=-1).nan_to_num()[:, :, 0]
    return out, cls_attn


def topk_sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_index: torch.Tensor,
                          scale: float, chunk_size: int = 64) -> Tuple[torch.Tensor, torch.Tensor]:
    """Attention over only the kept pairs: dense cls query row, `budget` gathered keys for every other query.

    Equals `masked_attention(q, k, v, connectivity_mask(key_index, N), scale, True)`, with 2 * (N - 1) * budget * d
    instead of 2 * N^2 * d multiply-adds per head. Queries are processed in chunks of `chunk_size` rows so the
    gathered keys and values take (B, H, chunk_size, budget, d) memory.

    Args:
        q, k, v: (B, H, N, d); key_index: (B, H, N - 1, budget) int64 (from `connectivity_topk`).

    Returns:
        output (B, H, N, d) and the cls query's attention probabilities (B, H, N).
    """
    batch, heads, num_tokens, dim = q.shape
    cls_attn = ((q[:, :, :1] @ k.transpose(-2, -1)) * scale).softmax(dim=-1)  # (B, H, 1, N)
    outputs = [cls_attn @ v]
    for start in range(1, num_tokens, chunk_size):
        index = key_index[:, :, start - 1:start - 1 + chunk_size]
        rows, budget = index.shape[-2:]
        flat = index.reshape(batch, heads, rows * budget, 1).expand(-1, -1, -1, dim)
        k_sel = k.gather(2, flat).view(batch, heads, rows, budget, dim)
        v_sel = v.gather(2, flat).view(batch, heads, rows, budget, dim)
        q_rows = q[:, :, start:start + rows].unsqueeze(-2)  # (B, H, rows, 1, d)
        attn = ((q_rows @ k_sel.transpose(-2, -1)) * scale).softmax(dim=-1)  # (B, H, rows, 1, budget)
        outputs.append((attn @ v_sel).squeeze(-2))
    return torch.cat(outputs, dim=2), cls_attn[:, :, 0]


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, need_cls_attn: bool = False
                    ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Plain attention (keep ratio 1, or the teacher-fitting phase): output (B, H, N, d), optional cls row (B, H, N).

    Runs PyTorch's fused scaled_dot_product_attention; the cls row is recomputed only when asked for.
    """
    out = F.scaled_dot_product_attention(q, k, v, scale=scale)
    cls_attn = ((q[:, :, :1] @ k.transpose(-2, -1)) * scale).softmax(dim=-1)[:, :, 0] if need_cls_attn else None
    return out, cls_attn
