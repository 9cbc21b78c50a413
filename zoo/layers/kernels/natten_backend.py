"""backend='natten': fused 2-D neighborhood attention through NATTEN (>= 0.20), an optional dependency.

NATTEN >= 0.20 shares our semantics without a relative position bias (border-shifted windows,
dilation groups) but wants heads-last tensors, so this module only permutes and forwards. Which
NATTEN kernel runs is NATTEN's choice; without its compiled library (a CPU-only install) that is
'flex-fna', which has no backward on CPU and needs a power-of-two head_dim in [8, 512].
"""
import torch

__all__ = ['neighborhood_attention_2d']

_INSTALL_HINT = ('pip install --no-build-isolation --no-deps "natten>=0.20" (on a machine without a GPU this '
                 'installs the pure-Python package, forward only)')


def _import_natten():
    try:
        import natten
    except ImportError as err:
        raise ImportError(f"backend='natten' needs the optional package natten: {_INSTALL_HINT}") from err
    return natten


def neighborhood_attention_2d(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, kernel_size: int,
                              dilation: int, scale: float) -> torch.Tensor:
    """softmax(scale * q.k) @ v over each query's dilated, border-shifted k x k window, run by natten.na2d.

    Inputs are validated by the caller, zoo.layers.neighborhood.neighborhood_attention_2d, and the dispatch table
    sends no call with a relative position bias here (NATTEN >= 0.20 dropped it).

    Args:
        query, key, value: (B, heads, H, W, head_dim).
        kernel_size: odd window size k.
        dilation: dilation d >= 1.
        scale: multiplies q.k.

    Returns:
        (B, heads, H, W, head_dim), a permuted view of NATTEN's heads-last output (callers that go
        back to channels-last then get a contiguous tensor without a copy).
    """
    natten = _import_natten()
    # (B, heads, H, W, D) -> NATTEN's (B, H, W, heads, D); NATTEN makes its inputs contiguous itself.
    heads_last = [t.permute(0, 2, 3, 1, 4) for t in (query, key, value)]
    out = natten.na2d(*heads_last, kernel_size=kernel_size, dilation=dilation, scale=float(scale))
    return out.permute(0, 3, 1, 2, 4)
