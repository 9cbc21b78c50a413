"""Fused kernels for zoo.layers operators and the rule that picks a backend.

Every kernel here has a plain-PyTorch reference twin in zoo.layers; `backend="auto"` only picks a
kernel on CUDA once a real-GPU check of it is recorded in benchmarks/RESULTS.md (listed in
`GPU_VERIFIED`); elsewhere auto runs the reference, which is correct everywhere.
"""
import contextlib
import importlib.util
from typing import Sequence

import torch

__all__ = ['pick_backend', 'resolve_backend', 'GPU_VERIFIED', 'natten_available', 'reference_only']

# Kernels whose real-GPU parity and speed are recorded in benchmarks/RESULTS.md ("Triton kernels on GPU"):
# checked against the reference forward and backward in fp32/fp16/bf16 and faster than it on an H100.
# 'halo' is not listed: its HaloNet-H5 shape (14x14 blocks, 80-dim values) did not finish within 60 s there;
# the kernel now splits large query blocks (halo_triton.MAX_QUERY_ROWS), which awaits its GPU run.
GPU_VERIFIED = frozenset({'na2d', 'aggregated_window'})


def natten_available() -> bool:
    """True when natten with its compiled CUDA library is installed."""
    if importlib.util.find_spec('natten') is None:
        return False
    import natten
    return bool(getattr(natten, 'HAS_LIBNATTEN', False))


_reference_only = False


@contextlib.contextmanager
def reference_only():
    """Inside this block backend='auto' always runs the reference: counting an operator's MACs must see the
    operator, not the dense attention that runs it on small maps."""
    global _reference_only
    previous, _reference_only = _reference_only, True
    try:
        yield
    finally:
        _reference_only = previous


def pick_backend(tensor: torch.Tensor, has_rpb: bool, fused: bool) -> str:
    """Backend for backend='auto': 'triton', 'natten', 'dense' or 'torch' (the reference).

    tensor: the query, (B, heads, H, W, d).
    """
    if _reference_only:
        return 'torch'
    if tensor.device.type != 'cuda':
        from . import na2d_dense
        return 'dense' if fused and na2d_dense.fits(tensor) else 'torch'
    if 'na2d' in GPU_VERIFIED:
        return 'triton'
    if fused and not has_rpb and natten_available():
        return 'natten'
    return 'torch'


def resolve_backend(backend: str, allowed: Sequence[str], tensor: torch.Tensor, kernel: str) -> str:
    """`backend` checked against `allowed`, with 'auto' resolved: the Triton kernel named `kernel` on CUDA once its
    real-GPU check is recorded (`kernel` in GPU_VERIFIED), else 'torch' (the reference)."""
    if backend not in allowed:
        raise ValueError(f'backend must be one of {tuple(allowed)}, got {backend!r}')
    if backend != 'auto':
        return backend
    verified = tensor.device.type == 'cuda' and kernel in GPU_VERIFIED and not _reference_only
    return 'triton' if verified else 'torch'
