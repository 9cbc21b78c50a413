"""Mixture-of-head (MoH) gating: attention heads as experts, weighted per token.

Paper: MoH: Multi-Head Attention as Mixture-of-Head Attention (Jin, Zhu, Yuan, Yan, 2024),
https://arxiv.org/abs/2410.11842. Official code: https://github.com/SkyworkAI/MoH (MoH-ViT). Facts: docs/moh.md.

A layer with h heads has S shared heads (heads 0..S-1, every token uses them) and a pool of E = h - S routed heads
(heads S..h-1) from which every token picks its top k (`routed_head` = k, a count, not a number of heads). Each head's
attention output is multiplied, per query token, by a gate computed from the attention input x by bias-free routers
under the official names: `wg` (C -> E), `wg_0` (C -> 2) and `wg_1` (C -> S):

* routed gates (k > 0): p = softmax(wg x), zeroed outside its top k, renormalised to sum 1 and multiplied by k;
* shared gates: softmax(wg_1 x) * S when S > 1, the constant 1 when S = 1;
* both groups (S > 0, k > 0): scaled by (a_shared, a_routed) = 2 * softmax(wg_0 x);
* k = 0: every head is shared (S must equal h).

With uniform routers every active head gets weight 1, i.e. plain multi-head attention without the unselected heads.
The load-balancing loss of a routed layer is E * sum_e(mean_tokens(p_e) * fraction of tokens that chose e): k when
balanced, E when k = E; only the mean of p carries gradient.

`MixtureOfHeads` is a mixin for an attention `nn.Module`: `_init_mixture_of_heads` registers the routers on the
attention itself (so checkpoints keep the official `attn.wg.weight` names) and `head_gates` computes the gates and
keeps the layer's latest training-mode balancing loss on the module (`load_balancing_loss`): nothing global.
"""
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import torch.nn as nn
from timm.layers import trunc_normal_

__all__ = ['check_head_split', 'HeadGates', 'mixture_of_heads_gates', 'load_balancing_loss', 'MixtureOfHeads',
           'routed_token_index', 'gate_heads']


def check_head_split(num_heads: int, shared_head: int, routed_head: int) -> None:
    """ValueError naming the problem unless (h, S, k) is a split the gating defines.

    Defined: k > 0 with 0 <= S < h and k <= h - S; k = 0 with S = h (every head shared; with h = 1 the gate is the
    constant 1, plain attention). The official code also crashes on every other combination.
    """
    if shared_head < 0 or routed_head < 0:
        raise ValueError(f'shared_head and routed_head must be >= 0, got {shared_head} and {routed_head}')
    if shared_head > num_heads:
        raise ValueError(f'shared_head {shared_head} exceeds num_heads {num_heads}')
    pool = num_heads - shared_head
    if routed_head == 0 and pool:
        raise ValueError(f'routed_head 0 with shared_head {shared_head} < num_heads {num_heads} would never use '
                         f'heads {shared_head}..{num_heads - 1}: set shared_head = num_heads or routed_head > 0')
    if routed_head > pool:
        raise ValueError(f'routed_head {routed_head} (the top-k count) exceeds the routed pool num_heads - shared_head '
                         f'= {num_heads} - {shared_head} = {pool}')


@dataclass
class HeadGates:
    """The gating of one layer call.

    gates: (B, N, h) multiplier of each head's output per query token (0 for unselected routed heads).
    routed_mask: (B, N, E) bool, the routed heads each token selected, or None when nothing is routed.
    routed_probs: (B, N, E) softmax of the routed router, or None when nothing is routed.
    """
    gates: torch.Tensor
    routed_mask: Optional[torch.Tensor]
    routed_probs: Optional[torch.Tensor]


def _top_k_mask(probs: torch.Tensor, k: int) -> torch.Tensor:
    """(..., E) -> bool (..., E): True at each row's k largest entries."""
    index = probs.topk(k, dim=-1).indices
    # a tensor source, not the scalar True: torch.jit.trace has no alias rule for scatter_ with a bool scalar
    return torch.zeros_like(probs, dtype=torch.bool).scatter(-1, index, torch.ones_like(index, dtype=torch.bool))


def mixture_of_heads_gates(x: torch.Tensor, wg: Optional[nn.Linear], wg_0: Optional[nn.Linear],
                           wg_1: Optional[nn.Linear], shared_head: int, routed_head: int) -> HeadGates:
    """Per-token head gates of MoH (module docstring); x (B, N, C) is the attention input.

    wg, wg_0, wg_1: the routers a split has (None where it has none; `MixtureOfHeads` builds the right ones).
    """
    groups, mask, probs = [], None, None
    if shared_head > 1:
        groups.append(wg_1(x).softmax(dim=-1) * shared_head)
    elif shared_head == 1:
        groups.append(x.new_ones(*x.shape[:-1], 1))
    if routed_head:
        probs = wg(x).softmax(dim=-1)
        mask = _top_k_mask(probs, routed_head)
        kept = probs * mask
        # the official floor of the denominator: float epsilon
        total = kept.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(kept.dtype).eps)
        groups.append(kept / total * routed_head)
        if shared_head:
            shared_weight, routed_weight = (2 * wg_0(x).softmax(dim=-1)).split(1, dim=-1)
            groups = [groups[0] * shared_weight, groups[1] * routed_weight]
    return HeadGates(torch.cat(groups, dim=-1), mask, probs)


def load_balancing_loss(routed_probs: torch.Tensor, routed_mask: torch.Tensor) -> torch.Tensor:
    """Scalar E * sum_e(me_e * ce_e) over all tokens of the batch.

    routed_probs: (B, N, E) router softmax (me = its mean over tokens, carries the gradient);
    routed_mask: (B, N, E) bool top-k choice (ce = fraction of tokens choosing each head, no gradient).
    """
    num_routed = routed_probs.shape[-1]
    me = routed_probs.flatten(0, -2).mean(dim=0)
    ce = routed_mask.flatten(0, -2).to(routed_probs.dtype).mean(dim=0)
    return num_routed * (me * ce).sum()


def routed_token_index(routed_mask: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Which tokens each routed head serves, packed for batched gather/scatter.

    routed_mask: (B, N, E) bool.
    Returns index (B, E, M) int64 and valid (B, E, M) bool, M = the most tokens any (image, head) serves: row (b, e)
    lists the selected token positions first (ascending), then unselected ones as padding (valid False). The row is
    a permutation prefix, so scattering it back never writes a position twice.
    """
    by_head = routed_mask.transpose(1, 2)                                          # (B, E, N)
    counts = by_head.sum(dim=-1)
    most = int(counts.max()) if counts.numel() else 0
    index = torch.argsort((~by_head).to(torch.uint8), dim=-1, stable=True)[..., :most]
    valid = torch.arange(most, device=routed_mask.device) < counts[..., None]
    return index, valid


class _LatestLoss:
    """A layer's latest balancing loss. Copies of the layer start empty: the loss belongs to the pass that made it,
    and a tensor inside an autograd graph cannot be deep-copied (EMA or SWA copies of a model in training)."""
    __slots__ = ('value',)

    def __init__(self) -> None:
        self.value: Optional[torch.Tensor] = None

    def __deepcopy__(self, memo) -> '_LatestLoss':
        return _LatestLoss()


class MixtureOfHeads:
    """Mixin giving a multi-head attention nn.Module optional MoH gating (module docstring).

    Attributes set by `_init_mixture_of_heads`: `shared_head` (None = MoH off), `routed_head`, the routers `wg`,
    `wg_0`, `wg_1` (each only where the split uses it), and `load_balancing_loss` (the latest training-mode value
    of a routed layer, else None).
    """

    def _init_mixture_of_heads(self, dim: int, num_heads: int, shared_head: Optional[int], routed_head: int,
                               dd: dict) -> None:
        self.shared_head = shared_head
        self.routed_head = routed_head
        self._latest_loss = _LatestLoss()
        if shared_head is None:
            if routed_head:
                raise ValueError(f'routed_head {routed_head} needs shared_head (None turns mixture-of-heads off)')
            return
        check_head_split(num_heads, shared_head, routed_head)
        if routed_head:
            self.wg = nn.Linear(dim, num_heads - shared_head, bias=False, **dd)
            if shared_head:
                self.wg_0 = nn.Linear(dim, 2, bias=False, **dd)
        if shared_head > 1:
            self.wg_1 = nn.Linear(dim, shared_head, bias=False, **dd)

    @property
    def mixture_of_heads(self) -> bool:
        return self.shared_head is not None

    @property
    def load_balancing_loss(self) -> Optional[torch.Tensor]:
        """Scalar balancing loss of this layer's latest training-mode forward; None after an eval-mode one."""
        return self._latest_loss.value

    def _reset_routers(self) -> None:
        for name in ('wg', 'wg_0', 'wg_1'):
            if hasattr(self, name):
                trunc_normal_(getattr(self, name).weight, std=.02)

    def head_gates(self, x: torch.Tensor) -> HeadGates:
        """Gates of x (B, N, C); in training mode a routed layer also keeps its balancing loss on the module."""
        result = mixture_of_heads_gates(x, getattr(self, 'wg', None), getattr(self, 'wg_0', None),
                                        getattr(self, 'wg_1', None), self.shared_head, self.routed_head)
        routed = result.routed_mask is not None and self.training
        self._latest_loss.value = load_balancing_loss(result.routed_probs, result.routed_mask) if routed else None
        return result


def gate_heads(out: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
    """Scale head outputs out (B, h, N, d) by gates (B, N, h)."""
    return out * gates.transpose(1, 2).unsqueeze(-1).to(out.dtype)

