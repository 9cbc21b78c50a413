"""Halo attention: blocked local self-attention with factorised relative position logits (HaloNet).

Paper: Scaling Local Self-Attention for Parameter Efficient Visual Backbones (Vaswani et al., CVPR 2021),
https://arxiv.org/abs/2103.12731. No official code exists; the module reproduces timm's `HaloAttn`
(timm/layers/halo_attn.py), the only executable definition, and takes its constructor arguments and state-dict
names (`q`, `kv`, `pos_embed.height_rel`, `pos_embed.width_rel`).

Semantics, for block size b, halo h, window win = b + 2h and query stride s (b divisible by s):

* queries: the (H/s, W/s) query map is cut into non-overlapping (b/s) x (b/s) blocks;
* keys/values: query block (i, j) attends to the win x win window of the stride-1 key map whose top-left
  corner is (i*b - h, j*b - h), i.e. the block's footprint plus h pixels on every side;
* border rule ``border='zeros'`` (default, timm's): key/value positions outside the map are zeros that still
  take part in the softmax, with logit = their relative-position term (q . 0 = 0) and value 0.
  ``border='mask'``: those positions are excluded from the softmax (every window holds its own block, so a
  row is never fully masked);
* logits = scale * q.k + rel, or scale * (q.k + rel) with ``scale_pos_embed``; rel for query (qy, qx) of its
  block and key (ky, kx) of its window is q.height_rel[ky - qy + win - 1] + q.width_rel[kx - qx + win - 1]
  (window coordinates, as timm's relative-to-absolute trick computes; qy counts subsampled query rows).

Layout of the functional API: (B, heads, H, W, head_dim), the same as zoo.layers.neighborhood.
The reference path unfolds keys and values into per-block windows (about (win/b)^2 copies of the map) and
gathers the relative logits from two (2*win - 1)-long tables; nothing is O((HW)^2).
"""
import math
from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import make_divisible, trunc_normal_

from .kernels import dispatch
from .window_geometry import join_bands, row_bands

__all__ = ['HaloAttention', 'RelPosEmbed2d', 'halo_attention_2d', 'halo_relative_logits', 'check_halo_shapes',
           'BORDERS', 'HALO_BACKENDS', 'BAND_LOGITS']

BORDERS = ('zeros', 'mask')
# backend= values of halo_attention_2d.
HALO_BACKENDS = dispatch.backend_choices('halo')


def _positive_int(value, name: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f'{name} must be an int >= {minimum}, got {value!r}')
    return value


def check_halo_shapes(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, block_size: int,
                      halo_size: int) -> int:
    """Validate the functional API's inputs; returns the query stride s = H / Hq.

    query (B, heads, H/s, W/s, d_qk), key (B, heads, H, W, d_qk), value (B, heads, H, W, d_v).
    """
    _positive_int(block_size, 'block_size')
    _positive_int(halo_size, 'halo_size', minimum=0)
    for name, t in (('query', query), ('key', key), ('value', value)):
        if not isinstance(t, torch.Tensor) or t.dim() != 5:
            raise ValueError(f'{name} must be a (B, heads, H, W, head_dim) tensor, got '
                             f'{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}')
        if not t.is_floating_point():
            raise ValueError(f'{name} must be floating point, got {t.dtype}')
        if t.dtype != query.dtype or t.device != query.device:
            raise ValueError(f'query, key and value must share dtype and device, got {query.dtype}/{query.device} '
                             f'and {name} {t.dtype}/{t.device}')
    if key.shape[:4] != value.shape[:4] or key.shape[-1] != query.shape[-1] or key.shape[:2] != query.shape[:2]:
        raise ValueError(f'inconsistent shapes: query {tuple(query.shape)}, key {tuple(key.shape)}, '
                         f'value {tuple(value.shape)} (key must be (B, heads, H, W, query head_dim), value '
                         f'(B, heads, H, W, any))')
    height, width = key.shape[2:4]
    if height % block_size or width % block_size:
        raise ValueError(f'halo attention needs H and W divisible by block_size {block_size}, got {height}x{width}')
    q_height, q_width = query.shape[2:4]
    # a Python int even for symbolic sizes (graph capture): block sizes derived from it stay constants
    stride = int(height // q_height) if q_height else 0
    if stride < 1 or q_height * stride != height or q_width * stride != width or block_size % stride:
        raise ValueError(f'query map {q_height}x{q_width} must be the {height}x{width} key map subsampled by a '
                         f'stride that divides block_size {block_size}')
    return stride


def _blocks(x: torch.Tensor, block: int) -> torch.Tensor:
    """(B, heads, H, W, d) -> (B, heads, H/block * W/block, block*block, d), blocks row-major."""
    batch, heads, height, width, dim = x.shape
    x = x.reshape(batch, heads, height // block, block, width // block, block, dim).transpose(3, 4)
    return x.reshape(batch, heads, -1, block * block, dim)


def _unblocks(x: torch.Tensor, block: int, height: int, width: int) -> torch.Tensor:
    """Inverse of `_blocks`: (B, heads, n_blocks, block*block, d) -> (B, heads, H, W, d)."""
    batch, heads, _, _, dim = x.shape
    x = x.reshape(batch, heads, height // block, width // block, block, block, dim).transpose(3, 4)
    return x.reshape(batch, heads, height, width, dim)


def _windows(x: torch.Tensor, block_size: int, halo_size: int) -> torch.Tensor:
    """Zero-padded halo windows as a view: (B, heads, H, W, d) -> (B, heads, H/b, W/b, d, win, win), win = b + 2h
    (`_window_rows` copies the windows of a band of block rows out of it)."""
    win = block_size + 2 * halo_size
    x = F.pad(x, (0, 0, halo_size, halo_size, halo_size, halo_size))
    return x.unfold(2, win, block_size).unfold(3, win, block_size)


def _window_rows(windows: torch.Tensor, band: slice) -> torch.Tensor:
    """The windows of the block rows in band: (B, heads, nh, nw, d, win, win) view -> (B, heads, rows * nw, win*win,
    d), blocks row-major."""
    windows = windows[:, :, band]
    batch, heads, n_h, n_w, dim, win = windows.shape[:6]
    return windows.permute(0, 1, 2, 3, 5, 6, 4).reshape(batch, heads, n_h * n_w, win * win, dim)


# Logits per band of block rows of the reference (about 16 MiB in float32): at 1024 x 1024 the logits and the
# relative terms of a whole HaloNet stage never exist at once (benchmarks/RESULTS.md, "Peak memory at 1024 x 1024");
# at 224 x 224 and batch 8 every stage is one band.
BAND_LOGITS = 1 << 22


def _window_valid(length: int, block_size: int, halo_size: int, device) -> torch.Tensor:
    """(length / b, win) bool along one axis: window slot t of block i lies inside the map."""
    win = block_size + 2 * halo_size
    pos = torch.arange(length // block_size, device=device)[:, None] * block_size - halo_size
    pos = pos + torch.arange(win, device=device)
    return (pos >= 0) & (pos < length)


def halo_relative_logits(query_blocks: torch.Tensor, height_rel: torch.Tensor, width_rel: torch.Tensor,
                         win: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Factorised relative logits per query and window row / column.

    Args:
        query_blocks: (B, heads, n_blocks, bq*bq, d_qk), queries of each block row-major.
        height_rel, width_rel: (2*win - 1, d_qk) tables.
        win: window size b + 2h.

    Returns:
        rel_h, rel_w: (B, heads, n_blocks, bq*bq, win); rel_h[..., m, ky] = q_m . height_rel[ky - qy + win - 1]
        and rel_w[..., m, kx] = q_m . width_rel[kx - qx + win - 1], with (qy, qx) = divmod(m, bq).
    """
    for name, table in (('height_rel', height_rel), ('width_rel', width_rel)):
        if table.dim() != 2 or tuple(table.shape) != (2 * win - 1, query_blocks.shape[-1]):
            raise ValueError(f'{name} must have shape (2*win - 1, head_dim) = {(2 * win - 1, query_blocks.shape[-1])},'
                             f' got {tuple(table.shape)}')
    block_q = math.isqrt(query_blocks.shape[-2])
    pos = torch.arange(block_q, device=query_blocks.device)
    # index[qy, ky] = ky - qy + win - 1, one row per query row (or column) of the block
    index = torch.arange(win, device=query_blocks.device)[None, :] - pos[:, None] + win - 1
    rows = index.repeat_interleave(block_q, dim=0)  # query m -> its row qy = m // bq
    cols = index.repeat(block_q, 1)  # query m -> its column qx = m % bq
    lead = query_blocks.shape[:-2]
    # the last dim named by its positive index: onnx's reference evaluator mis-slices GatherElements with axis -1
    last = query_blocks.dim() - 1
    rel_h = (query_blocks @ height_rel.to(query_blocks.dtype).t()).gather(last, rows.expand(*lead, -1, -1))
    rel_w = (query_blocks @ width_rel.to(query_blocks.dtype).t()).gather(last, cols.expand(*lead, -1, -1))
    return rel_h, rel_w


def _border_mask(height: int, width: int, block_size: int, halo_size: int, device) -> torch.Tensor:
    """(n_blocks, 1, win*win) bool, True where a window slot lies inside the H x W map."""
    rows = _window_valid(height, block_size, halo_size, device)
    cols = _window_valid(width, block_size, halo_size, device)
    valid = rows[:, None, :, None] & cols[None, :, None, :]  # (nh, nw, win, win)
    return valid.reshape(rows.shape[0] * cols.shape[0], 1, -1)


def _reference(query, key, value, block_size, halo_size, rel_h, rel_w, scale, border):
    """softmax over each block's window, plain PyTorch, band by band of block rows; rel_h / rel_w already scaled as
    the logits need."""
    height, width = key.shape[2:4]
    stride = int(height // query.shape[2])
    q = _blocks(query, block_size // stride) * scale
    keys, values = _windows(key, block_size, halo_size), _windows(value, block_size, halo_size)
    valid = _border_mask(height, width, block_size, halo_size, query.device) if border == 'mask' else None
    batch, heads, num_blocks, queries = q.shape[:4]
    block_rows, win = height // block_size, block_size + 2 * halo_size
    per_block_row = num_blocks // block_rows
    bands = []
    for rows, blocks in row_bands(block_rows, batch * heads * per_block_row * queries * win * win, BAND_LOGITS,
                                  per_block_row):
        logits = q[:, :, blocks] @ _window_rows(keys, rows).transpose(-1, -2)
        rel = rel_h[:, :, blocks, :, :, None] + rel_w[:, :, blocks, :, None, :]  # (B, heads, n, bq*bq, win, win)
        logits = logits + rel.flatten(-2)
        if valid is not None:
            logits = logits.masked_fill(~valid[blocks], float('-inf'))
        bands.append(logits.softmax(dim=-1) @ _window_rows(values, rows))
    return _unblocks(join_bands(bands, 2), block_size // stride, query.shape[2], query.shape[3])


def halo_attention_2d(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, block_size: int,
                      halo_size: int, height_rel: torch.Tensor, width_rel: torch.Tensor,
                      scale: Optional[float] = None, scale_pos_embed: bool = False, border: str = 'zeros',
                      backend: str = 'auto') -> torch.Tensor:
    """Blocked local attention: every (b/s)^2 query block attends to its (b + 2h)^2 halo window.

    Args:
        query: (B, heads, H/s, W/s, d_qk); the query stride s (1 = no downsampling) must divide block_size.
        key: (B, heads, H, W, d_qk); H and W divisible by block_size.
        value: (B, heads, H, W, d_v).
        block_size, halo_size: b and h (window b + 2h).
        height_rel, width_rel: (2*(b + 2h) - 1, d_qk) relative position tables, shared by the heads.
        scale: multiplies q.k; default d_qk ** -0.5.
        scale_pos_embed: multiply the relative logits by the scale too (timm's option).
        border: 'zeros' (padding keys take part with k = v = 0, timm's rule) or 'mask' (they are excluded).
        backend: 'auto' (Triton on CUDA once verified, else the reference) | 'torch' | 'triton'.

    Returns:
        (B, heads, H/s, W/s, d_v).
    """
    stride = check_halo_shapes(query, key, value, block_size, halo_size)
    if border not in BORDERS:
        raise ValueError(f'border must be one of {BORDERS}, got {border!r}')
    scale = query.shape[-1] ** -0.5 if scale is None else float(scale)
    win = block_size + 2 * halo_size
    rel_h, rel_w = halo_relative_logits(_blocks(query, block_size // stride), height_rel, width_rel, win)
    if scale_pos_embed:
        rel_h, rel_w = rel_h * scale, rel_w * scale
    if dispatch.resolve('halo', backend, query) == 'triton':
        from .kernels import halo_triton
        return halo_triton.halo_attention_2d(query, key, value, rel_h, rel_w, block_size, halo_size, scale,
                                             border == 'mask')
    return _reference(query, key, value, block_size, halo_size, rel_h, rel_w, scale, border)


class RelPosEmbed2d(nn.Module):
    """Factorised relative position tables `height_rel`, `width_rel`, each (2*win - 1, dim_head).

    Same parameter names and shapes as timm's `PosEmbedRel`; the logits are computed in `halo_attention_2d`.
    """

    def __init__(self, win_size: int, dim_head: int, device=None, dtype=None):
        super().__init__()
        self.height_rel = nn.Parameter(torch.empty(2 * win_size - 1, dim_head, device=device, dtype=dtype))
        self.width_rel = nn.Parameter(torch.empty(2 * win_size - 1, dim_head, device=device, dtype=dtype))


class HaloAttention(nn.Module):
    """Multi-head halo attention over an NCHW map, with timm `HaloAttn`'s arguments and state-dict names.

    Widths: dim_out (default dim) is the value width, dim_head_v = dim_out / num_heads; the query/key width per
    head is dim_head, else make_divisible(dim_out * qk_ratio, 8) // num_heads. So a HaloNet block with
    q/k width w and value width rv * w is HaloAttention(w, dim_out=rv * w, dim_head=w // num_heads).

    Stride 2: a strided 1x1 query conv (query blocks b/2) when b is even, else (or with avg_down) attention
    at stride 1 followed by a 2x2 average pool, as in timm.

    Args:
        dim, dim_out, feat_size (unused, timm compatibility), stride, num_heads, dim_head, block_size,
        halo_size, qk_ratio, qkv_bias, avg_down, scale_pos_embed: as timm's HaloAttn.
        border: 'zeros' (timm's zero-padded halo, default) or 'mask' (padding keys excluded from the softmax).
        backend: operator backend passed to `halo_attention_2d`.
    """

    def __init__(self, dim: int, dim_out: Optional[int] = None, feat_size=None, stride: int = 1,
                 num_heads: int = 8, dim_head: Optional[int] = None, block_size: int = 8, halo_size: int = 3,
                 qk_ratio: float = 1.0, qkv_bias: bool = False, avg_down: bool = False,
                 scale_pos_embed: bool = False, border: str = 'zeros', backend: str = 'auto',
                 device=None, dtype=None):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        dim_out = dim_out or dim
        if dim_out % num_heads:
            raise ValueError(f'dim_out {dim_out} is not divisible by num_heads {num_heads}')
        if stride not in (1, 2):
            raise ValueError(f'stride must be 1 or 2, got {stride}')
        if border not in BORDERS:
            raise ValueError(f'border must be one of {BORDERS}, got {border!r}')
        self.num_heads = num_heads
        self.dim_head_qk = dim_head or make_divisible(dim_out * qk_ratio, divisor=8) // num_heads
        self.dim_head_v = dim_out // num_heads
        self.scale = self.dim_head_qk ** -0.5
        self.scale_pos_embed = scale_pos_embed
        self.block_size = _positive_int(block_size, 'block_size')
        self.halo_size = _positive_int(halo_size, 'halo_size', minimum=0)
        self.win_size = block_size + 2 * halo_size
        self.border = border
        self.backend = backend
        use_avg_pool = stride > 1 and (avg_down or block_size % stride != 0)
        self.block_stride = stride if stride > 1 and not use_avg_pool else 1
        self.q = nn.Conv2d(dim, num_heads * self.dim_head_qk, 1, stride=self.block_stride, bias=qkv_bias, **dd)
        self.kv = nn.Conv2d(dim, num_heads * (self.dim_head_qk + self.dim_head_v), 1, bias=qkv_bias, **dd)
        self.pos_embed = RelPosEmbed2d(self.win_size, self.dim_head_qk, **dd)
        self.pool = nn.AvgPool2d(2, 2) if use_avg_pool else nn.Identity()
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """timm's init: trunc-normal projections with std fan_in ** -0.5, tables with std scale."""
        std = self.q.weight.shape[1] ** -0.5
        trunc_normal_(self.q.weight, std=std)
        trunc_normal_(self.kv.weight, std=std)
        trunc_normal_(self.pos_embed.height_rel, std=self.scale)
        trunc_normal_(self.pos_embed.width_rel, std=self.scale)

    def _split_heads(self, x: torch.Tensor, dims: Tuple[int, ...]) -> Tuple[torch.Tensor, ...]:
        """(B, heads * sum(dims), H, W) grouped per head -> one (B, heads, H, W, d) tensor per entry of dims."""
        batch, _, height, width = x.shape
        x = x.reshape(batch, self.num_heads, sum(dims), height, width).permute(0, 1, 3, 4, 2)
        return torch.split(x, dims, dim=-1)

    def _pad_to_blocks(self, x: torch.Tensor) -> torch.Tensor:
        """Zero-pad (B, C, H, W) bottom/right to multiples of block_size.

        With bias-free q/kv projections a zero pixel gives zero keys and values, which is what the 'zeros' border
        rule already puts outside the map: the real queries see the same window contents as at the border. The
        'mask' rule would need to know the real extent, so it requires exact multiples.
        """
        pad_h, pad_w = -x.shape[2] % self.block_size, -x.shape[3] % self.block_size
        if not (pad_h or pad_w):
            return x
        if self.border != 'zeros' or self.kv.bias is not None:
            raise ValueError(f"halo attention with border={self.border!r} and qkv_bias={self.kv.bias is not None} "
                             f"needs H and W divisible by block_size {self.block_size}, got "
                             f"{x.shape[2]}x{x.shape[3]} (only border='zeros' without qkv bias pads)")
        return F.pad(x, (0, pad_w, 0, pad_h))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, dim, H, W) -> (B, dim_out, H/stride, W/stride), H and W divisible by stride.

        Maps that are not multiples of block_size are zero-padded and the output cropped (`_pad_to_blocks`).
        """
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            raise ValueError(f'HaloAttention expects a (B, C, H, W) map, got '
                             f'{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}')
        if x.shape[1] != self.q.in_channels:
            raise ValueError(f'HaloAttention expects {self.q.in_channels} input channels, got {x.shape[1]}')
        stride = self.block_stride * (2 if isinstance(self.pool, nn.AvgPool2d) else 1)
        if x.shape[2] % stride or x.shape[3] % stride:
            raise ValueError(f'halo attention with stride {stride} needs H and W divisible by {stride}, '
                             f'got {x.shape[2]}x{x.shape[3]}')
        out_h, out_w = x.shape[2] // stride, x.shape[3] // stride
        x = self._pad_to_blocks(x)
        (query,) = self._split_heads(self.q(x), (self.dim_head_qk,))
        # kv output channels are grouped per head as [k_h, v_h] (timm's layout)
        key, value = self._split_heads(self.kv(x), (self.dim_head_qk, self.dim_head_v))
        out = halo_attention_2d(query, key, value, self.block_size, self.halo_size, self.pos_embed.height_rel,
                                self.pos_embed.width_rel, self.scale, self.scale_pos_embed, self.border,
                                self.backend)
        batch, _, height, width, _ = out.shape
        out = out.permute(0, 1, 4, 2, 3).reshape(batch, self.num_heads * self.dim_head_v, height, width)
        return self.pool(out)[:, :, :out_h, :out_w]
