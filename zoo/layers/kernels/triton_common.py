"""Launch helpers shared by the Triton kernels (na2d_triton, halo_triton, aggregated_triton)."""
import contextlib

import torch
import triton

__all__ = ['block_dim', 'dot_precision', 'on_device']


def block_dim(dim: int) -> int:
    """A size padded to a power of two, at least 16 (tl.dot's smallest operand side)."""
    return max(16, triton.next_power_of_2(dim))


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot input precision: exact fp32 products for fp32 (the reference is fp32, not tf32)."""
    return 'ieee' if dtype == torch.float32 else 'tf32'


def on_device(x: torch.Tensor) -> contextlib.AbstractContextManager:
    """Context that makes x's GPU current: Triton launches on the current device, not the tensor's."""
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()
