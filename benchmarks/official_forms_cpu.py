"""Whole models against their official implementations' CPU forms, interleaved in one process (not a test).

The official repositories run their local operators on a CPU as follows; each stand-in below does the same work
on the same weights, so a model can be timed with its operator swapped and nothing else changed:

* TransNeXt (`attention_native.py`, chosen whenever the `swattention` CUDA extension is missing): the 3 x 3
  window part unfolds keys and values (`nn.Unfold`, nine copies of each), masks the zero-padded slots with -inf
  and takes two batched products;
* OverLoCK (`models/contmix.py` without NATTEN): the ContMix aggregation unfolds the valid k x k windows of the
  values (k^2 copies), replicate-pads the unfolded map by k // 2 so border pixels take the clamped window, and
  contracts with the dynamic kernels in one einsum.

Before timing, every stand-in model's output is compared with the zoo model's ('auto' backends, what users get).
Eval forward (no_grad), min of the repeats, arms interleaved A B A B; ratio = stand-in time / zoo time.

    python benchmarks/official_forms_cpu.py --models transnext_micro overlock_xt --batch 8 [--reparam]
"""
import argparse
import contextlib
from typing import Callable, Dict, Iterator

import timm
import torch
import torch.nn.functional as F

import zoo  # noqa: F401  (registers the zoo models)
import zoo.layers.aggregated_attn as aggregated_attn
import zoo.layers.contmix as contmix
from interleaved import best_seconds


def _unfold_windows(x: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """(B, heads, H, W, d) -> (B, heads, H*W, k*k, d): every zero-padded k x k window, as nn.Unfold copies it."""
    batch, heads, height, width, dim = x.shape
    maps = x.permute(0, 1, 4, 2, 3).reshape(batch, heads * dim, height, width)
    windows = F.unfold(maps, kernel_size, padding=kernel_size // 2)
    return windows.view(batch, heads, dim, kernel_size ** 2, height * width).permute(0, 1, 4, 3, 2)


def unfold_window_qk(query, key, bias=None, kernel_size=3, backend='auto'):
    """TransNeXt's native window logits: (B, heads, H, W, d) twice -> (B, heads, H, W, k*k), -inf off the map."""
    batch, heads, height, width, dim = query.shape
    logits = (query.reshape(batch, heads, -1, 1, dim) @ _unfold_windows(key, kernel_size).transpose(-1, -2))
    logits = logits.view(batch, heads, height, width, -1)
    if bias is not None:
        logits = logits + bias[:, None, None, :]
    ones = torch.ones(1, 1, height, width, dtype=query.dtype, device=query.device)
    padding = F.unfold(ones, kernel_size, padding=kernel_size // 2).transpose(1, 2).view(height, width, -1) == 0
    return logits.masked_fill(padding, float('-inf'))


def unfold_window_av(attn, value, kernel_size=3, backend='auto'):
    """TransNeXt's native window sum: weights (B, heads, H, W, k*k), values (B, heads, H, W, d) -> same as values."""
    batch, heads, height, width, dim = value.shape
    out = attn.reshape(batch, heads, -1, 1, kernel_size ** 2) @ _unfold_windows(value, kernel_size)
    return out.view(batch, heads, height, width, dim)


def unfold_clamped_av(attn, value, kernel_size, dilation=1, backend='auto'):
    """OverLoCK's fallback aggregation: weights (B, G, H, W, k*k), values (B, G, H, W, c) -> (B, G, H, W, c)."""
    batch, groups, height, width, channels = value.shape
    maps = value.permute(0, 1, 4, 2, 3).reshape(batch, groups * channels, height, width)
    valid = F.unfold(maps, kernel_size)  # (B, G*c*k*k, (H-k+1)*(W-k+1)): the windows that fit in the map
    valid = valid.view(batch, -1, height - kernel_size + 1, width - kernel_size + 1)
    windows = F.pad(valid, (kernel_size // 2,) * 4, mode='replicate')  # border pixels take the clamped window
    windows = windows.view(batch, groups, channels, kernel_size ** 2, height, width)
    return torch.einsum('bghwt,bgcthw->bghwc', attn, windows)


@contextlib.contextmanager
def official_forms() -> Iterator[None]:
    """Inside this block the zoo models run the official CPU forms of their local operators."""
    patched = [(aggregated_attn, 'window_qk', unfold_window_qk), (aggregated_attn, 'window_av', unfold_window_av),
               (contmix, 'na2d_av', unfold_clamped_av)]
    saved = [(module, name, getattr(module, name)) for module, name, _ in patched]
    try:
        for module, name, fn in patched:
            setattr(module, name, fn)
        yield
    finally:
        for module, name, fn in saved:
            setattr(module, name, fn)


def _forward(model: torch.nn.Module, x: torch.Tensor) -> Callable[[], torch.Tensor]:
    def run():
        with torch.no_grad():
            return model(x)
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--models', nargs='+', default=['transnext_micro', 'overlock_xt'])
    parser.add_argument('--batch', type=int, default=8)
    parser.add_argument('--img-size', type=int, default=224)
    parser.add_argument('--repeats', type=int, default=3)
    parser.add_argument('--reparam', action='store_true',
                        help='fold the models that have a deploy form (OverLoCK) first, in both arms')
    args = parser.parse_args()
    torch.manual_seed(0)
    x = torch.randn(args.batch, 3, args.img_size, args.img_size)
    arms: Dict[str, tuple] = {}
    for name in args.models:
        model = timm.create_model(name).eval()
        if args.reparam and hasattr(model, 'reparam'):
            model.reparam()
        run = _forward(model, x)
        zoo_out = run()
        with official_forms():
            official_out = run()
        torch.testing.assert_close(official_out, zoo_out, rtol=1e-4, atol=1e-4)
        arms[name] = (run, contextlib.nullcontext)
        arms[f'{name} (official form)'] = (run, official_forms)
    best = best_seconds(arms, args.repeats)
    print(f'eval, batch {args.batch}, {args.img_size}px, torch {torch.__version__}, {torch.get_num_threads()} threads, '
          f'min of {args.repeats} interleaved repeats{", deploy forms" if args.reparam else ""}')
    for name in args.models:
        ours, theirs = best[name], best[f'{name} (official form)']
        print(f'{name:<18} zoo {args.batch / ours:7.2f} img/s   official form {args.batch / theirs:7.2f} img/s   '
              f'zoo is {theirs / ours:.2f}x')


if __name__ == '__main__':
    main()
