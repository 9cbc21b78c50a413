"""Index geometry of the windowed operators, shared by their plain-PyTorch references and their kernels.

A leaf module: it imports nothing from zoo, so the operators (zoo.layers.neighborhood, zoo.layers.aggregated_attn)
and their backends (zoo.layers.kernels.*) can all depend on it without depending on each other.

* Neighbourhood attention (NATTEN <= 0.17 semantics, see zoo.layers.neighborhood): per axis of length L, odd kernel
  k, radius r = k // 2 and dilation d, position i lies in group g = i % d at in-group index i' = i // d; its window
  starts at s = clamp(i' - r, 0, L_g - k) with L_g = ceil((L - g) / d), window slot t is key g + d * (s + t), and
  its relative position bias index is (key - i) / d + k - 1, in [0, 2k - 2].
* The zero-padded k x k window of aggregated attention: slot t of pixel (i, j) is (i + t // k - r, j + t % k - r),
  valid when inside the map.

Each table is defined once, in array operations that numpy and torch share (`_axis_tables`, `_rpb_index`,
`_padded_window_valid`, given the module `xp` that computes them). Eager calls read it from a cache of read-only
numpy arrays, never of tensors: a tensor made while torch.export / torch.compile trace would be a fake tensor, and
caching it would poison every later eager call. While a graph is captured (torch.compile, torch.export, the ONNX
exporter, torch.jit.trace) the tensor functions compute the table in torch, in the graph: dynamo cannot trace numpy,
and with dynamic H and W the table is a function of the symbolic sizes.
"""
from functools import lru_cache
from types import ModuleType
from typing import Iterator, List, Tuple, Union

import numpy as np
import torch

__all__ = [
    'check_kernel_size', 'check_window_fits', 'neighborhood_axis_numpy', 'neighborhood_axis_tables',
    'neighborhood_indices', 'rpb_index_numpy', 'rpb_index', 'scatter_rpb', 'padded_window_valid_numpy',
    'window_valid_mask', 'capturing_graph', 'row_bands', 'join_bands',
]


def check_kernel_size(kernel_size: int) -> None:
    """Raise ValueError unless kernel_size is a positive odd int."""
    if isinstance(kernel_size, bool) or not isinstance(kernel_size, int) or kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f'kernel_size must be a positive odd int, got {kernel_size!r}')


def check_window_fits(height: int, width: int, kernel_size: int, dilation: int) -> None:
    """Raise ValueError unless an odd kernel_size window with this dilation fits an H x W map."""
    check_kernel_size(kernel_size)
    if isinstance(dilation, bool) or not isinstance(dilation, int) or dilation < 1:
        raise ValueError(f'dilation must be a positive int, got {dilation!r}')
    span = kernel_size * dilation
    if span > height or span > width:
        raise ValueError(
            f'neighborhood attention needs kernel_size * dilation <= H and W, got kernel_size {kernel_size} * '
            f'dilation {dilation} = {span} for a {height}x{width} map')


Length = Union[int, torch.SymInt, torch.Tensor]  # a plain int, or a size while a graph is captured


def capturing_graph() -> bool:
    """True while torch.compile / torch.export (and so the ONNX exporter) or torch.jit.trace records a graph."""
    return torch.compiler.is_compiling() or torch.jit.is_tracing()


def _axis_tables(length: Length, kernel_size: int, dilation: int, xp: ModuleType = np, **where):
    """The neighbourhood of every position along one axis (module docstring): keys and bias indices, each
    (length, kernel_size) int64, as numpy arrays (xp = numpy) or tensors (xp = torch, where = {'device': ...})."""
    pos = xp.arange(length, **where)
    group = pos % dilation
    in_group = pos // dilation
    group_len = (length - group + dilation - 1) // dilation
    start = xp.minimum((in_group - kernel_size // 2).clip(min=0), group_len - kernel_size)
    keys = group[:, None] + dilation * (start[:, None] + xp.arange(kernel_size, **where))
    bias = (keys - pos[:, None]) // dilation + kernel_size - 1
    return keys, bias


def _read_only(*arrays: np.ndarray) -> Tuple[np.ndarray, ...]:
    for array in arrays:
        array.flags.writeable = False
    return arrays


@lru_cache(maxsize=256)
def neighborhood_axis_numpy(length: int, kernel_size: int, dilation: int) -> Tuple[np.ndarray, np.ndarray]:
    """Key and bias indices of every position along one axis, each (length, kernel_size) int64, read-only.

    Unchecked: the caller has validated the window (check_window_fits).
    """
    return _read_only(*_axis_tables(length, kernel_size, dilation))


def neighborhood_axis_tables(length: Length, kernel_size: int, dilation: int,
                             device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
    """`neighborhood_axis_numpy` as fresh int64 tensors on `device`, each (length, kernel_size)."""
    if capturing_graph():
        return _axis_tables(length, kernel_size, dilation, torch, device=device)
    keys, bias = neighborhood_axis_numpy(length, kernel_size, dilation)
    return (torch.tensor(keys, dtype=torch.int64, device=device),
            torch.tensor(bias, dtype=torch.int64, device=device))


def neighborhood_indices(length: int, kernel_size: int, dilation: int = 1,
                         device: torch.device = torch.device('cpu')) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-axis neighbourhood of every position.

    Returns:
        key_index (length, kernel_size): absolute key position of each window slot.
        bias_index (length, kernel_size): rpb index along this axis, in [0, 2 * kernel_size - 2].
    """
    check_window_fits(length, length, kernel_size, dilation)
    return neighborhood_axis_tables(length, kernel_size, dilation, torch.device(device))


def _rpb_index(height: Length, width: Length, kernel_size: int, dilation: int, xp: ModuleType = np, **where):
    _, row_bias = _axis_tables(height, kernel_size, dilation, xp, **where)
    _, col_bias = _axis_tables(width, kernel_size, dilation, xp, **where)
    return row_bias[:, None, :, None] * (2 * kernel_size - 1) + col_bias[None, :, None, :]


@lru_cache(maxsize=64)
def rpb_index_numpy(height: int, width: int, kernel_size: int, dilation: int) -> np.ndarray:
    """(H, W, k, k) int64, read-only: flat index row * (2k-1) + col into a (2k-1, 2k-1) rpb table of every query's
    window slots (t_row, t_col). Unchecked, like `neighborhood_axis_numpy`."""
    return _read_only(_rpb_index(height, width, kernel_size, dilation))[0]


def rpb_index(height: Length, width: Length, kernel_size: int, dilation: int, device: torch.device) -> torch.Tensor:
    """`rpb_index_numpy` as a fresh int64 tensor (H, W, k, k) on `device`."""
    if capturing_graph():
        return _rpb_index(height, width, kernel_size, dilation, torch, device=device)
    return torch.tensor(rpb_index_numpy(height, width, kernel_size, dilation), device=device)


def scatter_rpb(grad: torch.Tensor, kernel_size: int, dilation: int) -> torch.Tensor:
    """Gradient of an rpb table gathered at `rpb_index`, summed over the batch, in grad's dtype.

    grad: (B, heads, H, W, k, k) or (B, heads, H, W, k*k), neighbour order t_row * k + t_col
    -> (heads, 2k-1, 2k-1).
    """
    heads, height, width = grad.shape[1:4]
    span = 2 * kernel_size - 1
    index = rpb_index(height, width, kernel_size, dilation, grad.device).reshape(-1)
    out = grad.new_zeros(heads, span * span)
    out.index_add_(1, index, grad.sum(0).reshape(heads, -1))
    return out.view(heads, span, span)


def _padded_window_valid(height: Length, width: Length, kernel_size: int, xp: ModuleType = np, **where):
    offsets = xp.arange(kernel_size, **where) - kernel_size // 2
    rows = xp.arange(height, **where)[:, None] + offsets
    cols = xp.arange(width, **where)[:, None] + offsets
    row_ok = (rows >= 0) & (rows < height)
    col_ok = (cols >= 0) & (cols < width)
    return (row_ok[:, None, :, None] & col_ok[None, :, None, :]).reshape(height, width, kernel_size * kernel_size)


@lru_cache(maxsize=128)
def padded_window_valid_numpy(height: int, width: int, kernel_size: int) -> np.ndarray:
    """(H, W, k*k) bool, read-only: slot t of pixel (i, j) of a zero-padded k x k window lies inside the map."""
    return _read_only(_padded_window_valid(height, width, kernel_size))[0]


def window_valid_mask(height: Length, width: Length, kernel_size: int = 3,
                      device: torch.device = torch.device('cpu')) -> torch.Tensor:
    """(H, W, k*k) bool mask of the zero-padded window slots that lie inside an H x W map."""
    check_kernel_size(kernel_size)
    if capturing_graph():
        return _padded_window_valid(height, width, kernel_size, torch, device=device)
    return torch.tensor(padded_window_valid_numpy(height, width, kernel_size), device=device)


def row_bands(rows: Length, per_row: Length, budget: int, unit: Length = 1) -> Iterator[Tuple[slice, slice]]:
    """Bands of whole rows (of a map, or of blocks) holding about `budget` elements at `per_row` each, for operators
    that bound their temporaries on large inputs: (row slice, slice of the flattened axis holding `unit` entries
    per row). One band, (slice(None), slice(None)), when everything fits or while a graph is captured (a band count
    of symbolic sizes has no value)."""
    if capturing_graph() or budget // max(1, per_row) >= rows:
        yield slice(None), slice(None)
        return
    count = max(1, budget // max(1, per_row))
    for start in range(0, rows, count):
        stop = min(start + count, rows)
        yield slice(start, stop), slice(start * unit, stop * unit)


def join_bands(pieces: List[torch.Tensor], dim: int) -> torch.Tensor:
    """The per-band pieces joined along dim (no copy for a single one)."""
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim)
