"""The one dispatch table: every operator's backends, and the rule that resolves backend='auto'.

Each operator of zoo.layers calls `resolve(operator, backend, tensor, ...)` before it computes anything, and
runs the backend it gets back. `OPERATORS` lists, per operator, its backends in the order 'auto' prefers them;
the last is always the reference 'torch' (plain PyTorch, correct everywhere). A `Backend` says when it cannot run
a call at all (device, dtype, an operator feature it does not compute) and when 'auto' picks it:

* 'triton' (zoo.layers.kernels.*_triton): on CUDA, when Triton is installed and its kernel's real-GPU check is
  recorded in benchmarks/RESULTS.md (the kernel's name in `GPU_VERIFIED`; `gpu_kernels` changes the set for a
  block, e.g. to time a model with and without its kernels); explicitly also in Triton's CPU interpreter;
* 'natten' (fused neighbourhood attention only): on CUDA, without rpb (NATTEN >= 0.20 has none), when natten
  with its compiled library is installed and no verified Triton kernel can run the call (triton not installed, or
  'na2d' left out by `gpu_kernels`);
* 'dense' (fused neighbourhood attention only): off CUDA, for maps small enough that one dense attention beats
  the reference (zoo.layers.kernels.na2d_dense.fits, a measured crossover), in a training step or where 'blocked'
  does not run (in eval on CPU float32 the blocked forward is faster there);
* 'blocked' (neighbourhood attention and its halves, zoo.layers.kernels.na2d_blocked: query tiles against their key
  block as batched matrix products): on CPU in float32, where it beat the reference on every measured shape
  (benchmarks/RESULTS.md, "Blocked na2d, chunked"); it runs on any device, but CUDA and half precision await
  measurements;
* 'torch': otherwise, and always inside `reference_only()`.

Adding a backend (say a routed path of a MoH operator): implement it, add a `Backend(name, cannot_run, auto)` to
its operator at its place in the preference order (`auto` holds the measured crossover as a predicate of the
`Call`), and give the operator a branch that runs it (as 'blocked' has in zoo.layers.neighborhood). Adding an
operator: one `Operator(name, backends)` entry ending in `REFERENCE`, and a `resolve` call in the operator. A rule
that needs more than device, dtype, shape and rpb gets a new `Call` field with a default, passed by its operator.
"""
import contextlib
import importlib.util
import os
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, Iterator, Optional, Tuple

import torch

from .na2d_dense import fits as dense_fits

__all__ = [
    'GPU_VERIFIED', 'KERNEL_DTYPES', 'Call', 'Backend', 'Operator', 'OPERATORS', 'REFERENCE', 'backend_choices',
    'resolve', 'select', 'reference_only', 'gpu_kernels', 'natten_available', 'triton_available',
]

# Kernels whose real-GPU parity and speed are recorded in benchmarks/RESULTS.md ("Triton kernels on GPU"):
# checked against the reference forward and backward in fp32/fp16/bf16 and faster than it on an H100.
# 'halo' is not listed: its HaloNet-H5 shape (14x14 blocks, 80-dim values) did not finish within 60 s there;
# the kernel now splits large query blocks (halo_triton.MAX_QUERY_ROWS), which awaits its GPU run.
GPU_VERIFIED = frozenset({'na2d', 'aggregated_window'})
# What the Triton kernels compute in (fp32 accumulation; tl.dot has no float64 path here).
KERNEL_DTYPES = frozenset({torch.float32, torch.float16, torch.bfloat16})
REFERENCE = 'torch'

_TRITON_INSTALLED = importlib.util.find_spec('triton') is not None
_reference_only = False
_gpu_kernels = GPU_VERIFIED


def triton_available() -> bool:
    """True when the triton package is installed (checked once, at import)."""
    return _TRITON_INSTALLED


def natten_available() -> bool:
    """True when natten with its compiled CUDA library is installed."""
    if importlib.util.find_spec('natten') is None:
        return False
    import natten
    return bool(getattr(natten, 'HAS_LIBNATTEN', False))


@contextlib.contextmanager
def reference_only() -> Iterator[None]:
    """Inside this block backend='auto' always runs the reference: counting an operator's MACs must see the
    operator, not the dense attention that runs it on small maps."""
    global _reference_only
    previous, _reference_only = _reference_only, True
    try:
        yield
    finally:
        _reference_only = previous


@contextlib.contextmanager
def gpu_kernels(names: Iterable[str]) -> Iterator[None]:
    """Inside this block backend='auto' may run on CUDA exactly the Triton kernels named (instead of
    `GPU_VERIFIED`): `()` runs a model on its reference (or natten) paths, `('halo',)` tries an unverified kernel."""
    global _gpu_kernels
    previous, _gpu_kernels = _gpu_kernels, frozenset(names)
    try:
        yield
    finally:
        _gpu_kernels = previous


@dataclass(frozen=True)
class Call:
    """What a rule sees of one operator call: the leading tensor's device, dtype and shape, whether a relative
    position bias takes part, and whether autograd will need the call's backward (a training step, not eval)."""
    device: torch.device
    dtype: torch.dtype
    shape: Tuple[int, ...]
    has_rpb: bool = False
    needs_grad: bool = False

    @classmethod
    def of(cls, tensor: torch.Tensor, has_rpb: bool = False) -> 'Call':
        return cls(tensor.device, tensor.dtype, tuple(tensor.shape), has_rpb,
                   tensor.requires_grad and torch.is_grad_enabled())


@dataclass(frozen=True)
class Backend:
    """One way to run an operator.

    cannot_run(call): why this backend cannot run the call at all, or None (checked for explicit choices too).
    auto(call): whether backend='auto' picks it, asked only where it can run.
    """
    name: str
    cannot_run: Callable[[Call], Optional[str]]
    auto: Callable[[Call], bool]


@dataclass(frozen=True)
class Operator:
    """An operator's backends in the order backend='auto' prefers them, ending with the reference."""
    name: str
    backends: Tuple[Backend, ...]

    def backend(self, name: str) -> Backend:
        for candidate in self.backends:
            if candidate.name == name:
                return candidate
        raise KeyError(name)

    @property
    def choices(self) -> Tuple[str, ...]:
        """What `backend=` accepts: 'auto', the reference, then the others in preference order."""
        return ('auto', REFERENCE) + tuple(b.name for b in self.backends if b.name != REFERENCE)


def _runs_anywhere(call: Call) -> Optional[str]:
    return None


def _always(call: Call) -> bool:
    return True


def _triton_cannot_run(call: Call) -> Optional[str]:
    if call.dtype not in KERNEL_DTYPES:
        return f'the Triton kernels take float32, float16 or bfloat16 tensors, got {call.dtype}'
    if call.device.type in ('cuda', 'meta'):
        return None
    if call.device.type == 'cpu' and os.environ.get('TRITON_INTERPRET') == '1':
        return None
    return (f'the Triton kernels run on CUDA tensors (on CPU only in the Triton interpreter, TRITON_INTERPRET=1 set '
            f'before triton is imported), got a {call.device.type} tensor')


def _triton(kernel: str) -> Backend:
    """The Triton backend of an operator whose kernel is recorded under `kernel` in GPU_VERIFIED."""
    def auto(call: Call) -> bool:
        return call.device.type == 'cuda' and kernel in _gpu_kernels and triton_available()
    return Backend('triton', _triton_cannot_run, auto)


def _natten_cannot_run(call: Call) -> Optional[str]:
    if call.has_rpb:
        return ('NATTEN >= 0.20 has no relative position bias, so it cannot take rpb; use backend=\'torch\' or '
                '\'triton\' for models with rpb')
    return None


def _natten_auto(call: Call) -> bool:
    return call.device.type == 'cuda' and call.dtype in KERNEL_DTYPES and natten_available()


def _blocked_auto(call: Call) -> bool:
    return call.device.type == 'cpu' and call.dtype == torch.float32


def _dense_auto(call: Call) -> bool:
    """Small maps off CUDA, except where the blocked path takes the call without a backward: in eval the chunked
    blocked forward beat dense at 14x14 and 7x7 (k 7), in a training step dense won at both (benchmarks/RESULTS.md,
    "Blocked na2d, chunked")."""
    if call.device.type == 'cuda' or not dense_fits(call.shape):
        return False
    return call.needs_grad or not _blocked_auto(call)


_BLOCKED = Backend('blocked', _runs_anywhere, _blocked_auto)
_TORCH = Backend(REFERENCE, _runs_anywhere, _always)

OPERATORS: Dict[str, Operator] = {op.name: op for op in (
    # zoo.layers.neighborhood: fused neighborhood_attention_2d, and its two halves
    Operator('na2d', (_triton('na2d'), Backend('natten', _natten_cannot_run, _natten_auto),
                      Backend('dense', _runs_anywhere, _dense_auto), _BLOCKED, _TORCH)),
    Operator('na2d_qk', (_triton('na2d'), _BLOCKED, _TORCH)),
    Operator('na2d_av', (_triton('na2d'), _BLOCKED, _TORCH)),
    # zoo.layers.halo_attn.halo_attention_2d
    Operator('halo', (_triton('halo'), _TORCH)),
    # zoo.layers.aggregated_attn: the zero-padded window halves of TransNeXt's aggregated attention
    Operator('window_qk', (_triton('aggregated_window'), _TORCH)),
    Operator('window_av', (_triton('aggregated_window'), _TORCH)),
)}


# zoo.layers.aggregated_attn (both TransNeXt attentions) with mixture-of-heads gating: 'routed' computes each routed
# head only for the tokens that selected it (gather, attend, scatter), 'torch' every head for every token, gated.
# 'auto' would take 'routed' only where benchmarks/moh_cpu.py measured it faster: on CPU both MoH-ViT models ran
# slower routed (benchmarks/RESULTS.md, "MoH") and no GPU run exists, so it never does yet.
def _moh_routed_auto(call: Call) -> bool:
    return False


OPERATORS['moh_heads'] = Operator('moh_heads', (Backend('routed', _runs_anywhere, _moh_routed_auto), _TORCH))


def _operator(name: str) -> Operator:
    if name not in OPERATORS:
        raise ValueError(f'unknown operator {name!r}; the dispatch table has {tuple(OPERATORS)}')
    return OPERATORS[name]


def backend_choices(operator: str) -> Tuple[str, ...]:
    """The `backend=` values `operator` accepts, 'auto' first."""
    return _operator(operator).choices


def select(operator: str, call: Call) -> str:
    """The backend backend='auto' runs for this call: the first in the operator's order that can run it and whose
    rule takes it; the reference inside `reference_only()`."""
    if _reference_only:
        return REFERENCE
    for backend in _operator(operator).backends:
        if backend.cannot_run(call) is None and backend.auto(call):
            return backend.name
    return REFERENCE


def _unknown_backend(op: Operator, backend: str) -> ValueError:
    """The error for a `backend=` value op does not have, naming the operators that do have it."""
    others = [name for name, other in OPERATORS.items() if backend in other.choices]
    hint = f" ({backend!r} only runs {', '.join(others)})" if others else ''
    return ValueError(f'backend must be one of {op.choices} for {op.name}, got {backend!r}{hint}')


def resolve(operator: str, backend: str, tensor: torch.Tensor, has_rpb: bool = False) -> str:
    """The backend that runs this call of `operator`: `backend` itself once checked, or what 'auto' picks.

    tensor: the operator's leading input (its device, dtype and shape are what the rules read);
    has_rpb: whether a relative position bias takes part.
    Raises ValueError for a backend the operator does not have, or one that cannot run this call.
    """
    op = _operator(operator)
    if backend not in op.choices:
        raise _unknown_backend(op, backend)
    call = Call.of(tensor, has_rpb)
    if backend == 'auto':
        return select(operator, call)
    reason = op.backend(backend).cannot_run(call)
    if reason is not None:
        raise ValueError(f'backend={backend!r} cannot run {operator} here: {reason}')
    return backend
