"""Index geometry of the windowed operators, shared by their plain-PyTorch references and their kernels.

A leaf module: it imports nothing from zoo, so the operators (zoo.layers.neighborhood, zoo.layers.aggregated_attn)
and their backends (zoo.layers.kernels.*) can all depend on it without depending on each other.

* Neighbourhood attention (NATTEN <= 0.17 semantics, see zoo.layers.neighborhood): per axis of length L, odd kernel
  k, radius r = k // 2 and dilation d, position i lies in group g = i % d at in-group index i' = i // d; its window
  starts at s = clamp(i' - r, 0, L_g - k) with L_g = ceil((L - g) / d), window slot t is key g + d * (s + t), and
  its relative position bias index is (key - i) / d + k - 1, in [0, 2k - 2].
* The zero-padded k x k window of aggregated attention: slot t of pixel (i, j) is (i + t // k - r, j + t % k - r),
  valid when inside the map.

Tables are cached as read-only numpy arrays, never as tensors: a tensor made while torch.export / torch.compile
trace would be a fake tensor, and caching it would poison every later eager call.
"""
from functools import lru_cache
from typing import Tuple

import numpy as np
import torch

__all__ = [
    'check_kernel_size', 'check_window_fits', 'neighborhood_axis_numpy', 'neighborhood_axis_tables',
    'neighborhood_indices', 'rpb_index_numpy', 'rpb_index', 'scatter_rpb', 'padded_window_valid_numpy',
    'window_valid_mask',
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


@lru_cache(maxsize=256)
def neighborhood_axis_numpy(length: int, kernel_size: int, dilation: int) -> Tuple[np.ndarray, np.ndarray]:
    """Key and bias indices of every position along one axis, each (length, kernel_size) int64, read-only.

    Unchecked: the caller has validated the window (check_window_fits).
    """
    pos = np.arange(length)
    group = pos % dilation
    in_group = pos // dilation
    group_len = (length - group + dilation - 1) // dilation
    start = np.minimum(np.maximum(in_group - kernel_size // 2, 0), group_len - kernel_size)
    keys = group[:, None] + dilation * (start[:, None] + np.arange(kernel_size))
    bias = (keys - pos[:, None]) // dilation + kernel_size - 1
    keys.flags.writeable = bias.flags.writeable = False
    return keys, bias


def neighborhood_axis_tables(length: int, kernel_size: int, dilation: int,
                             device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
    """`neighborhood_axis_numpy` as fresh int64 tensors on `device`, each (length, kernel_size)."""
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


@lru_cache(maxsize=64)
def rpb_index_numpy(height: int, width: int, kernel_size: int, dilation: int) -> np.ndarray:
    """(H, W, k, k) int64, read-only: flat index row * (2k-1) + col into a (2k-1, 2k-1) rpb table of every query's
    window slots (t_row, t_col). Unchecked, like `neighborhood_axis_numpy`."""
    _, row_bias = neighborhood_axis_numpy(height, kernel_size, dilation)
    _, col_bias = neighborhood_axis_numpy(width, kernel_size, dilation)
    index = row_bias[:, None, :, None] * (2 * kernel_size - 1) + col_bias[None, :, None, :]
    index.flags.writeable = False
    return index


def rpb_index(height: int, width: int, kernel_size: int, dilation: int, device: torch.device) -> torch.Tensor:
    """`rpb_index_numpy` as a fresh int64 tensor (H, W, k, k) on `device`."""
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


@lru_cache(maxsize=128)
def padded_window_valid_numpy(height: int, width: int, kernel_size: int) -> np.ndarray:
    """(H, W, k*k) bool, read-only: slot t of pixel (i, j) of a zero-padded k x k window lies inside the map."""
    offsets = np.arange(kernel_size) - kernel_size // 2
    rows = np.arange(height)[:, None] + offsets[None, :]
    cols = np.arange(width)[:, None] + offsets[None, :]
    row_ok = (rows >= 0) & (rows < height)
    col_ok = (cols >= 0) & (cols < width)
    valid = (row_ok[:, None, :, None] & col_ok[None, :, None, :]).reshape(height, width, kernel_size * kernel_size)
    valid.flags.writeable = False
    return valid


def window_valid_mask(height: int, width: int, kernel_size: int = 3,
                      device: torch.device = torch.device('cpu')) -> torch.Tensor:
    """(H, W, k*k) bool mask of the zero-padded window slots that lie inside an H x W map."""
    check_kernel_size(kernel_size)
    return torch.tensor(padded_window_valid_numpy(height, width, kernel_size), device=device)
