"""Time of MoH attention on CPU (or a GPU with --device cuda): the routed execution (each routed head computed only
for the tokens that selected it) against the masked one (every head computed, unselected ones multiplied by 0, as
the official code does).

Layers: the routed attention layers of MoH-ViT at 224 (docs/moh.md §1), built alone with the variant's dim, heads,
split, map size and pooling ratio; routers drawn as randn / sqrt(C) (gate logits of std 1; the model init gives
nearly uniform gates). Whole models: forward of the `moh_transnext_*` models at 224. Every pair runs interleaved
(masked, routed, masked, routed, ...) in one process after one warm-up each; the figure is the minimum over
--repeats, and the ratio masked / routed (> 1: routed is faster). The share of active (token, head) pairs is printed
beside it.

    PYTHONPATH=. .venv/bin/python benchmarks/moh_cpu.py --threads 2 --repeats 7
"""
import argparse
import datetime
import platform
import time
from typing import Callable, Dict, List, Tuple

import timm
import torch

import zoo  # noqa: F401  (registers the models)
from zoo.layers.aggregated_attn import AggregatedAttention, ScaledCosineAttention

# (label, dim, heads, shared_head, routed_head, map side at 224, sr_ratio or None for full attention)
LAYERS = [
    ('small_80 stage3', 288, 12, 3, 6, 14, 2),
    ('small_80 stage4', 576, 24, 8, 12, 7, None),
    ('small_75 stage4', 576, 24, 4, 12, 7, None),
    ('base_50 stage2', 192, 8, 2, 4, 28, 4),
    ('base_50 stage3', 384, 16, 2, 6, 14, 2),
    ('base_50 stage4', 768, 32, 4, 8, 7, None),
]
MODELS = ['moh_transnext_small_80', 'moh_transnext_base_50']


def _layer_pair(dim: int, heads: int, shared: int, routed: int, side: int, sr_ratio) -> Tuple[torch.nn.Module, ...]:
    """(masked, routed) copies of one attention layer with the same weights, eval mode."""
    args = dict(dim=dim, num_heads=heads, pretrain_size=(side, side), shared_head=shared, routed_head=routed)
    if sr_ratio is not None:
        args['sr_ratio'] = sr_ratio
    cls = ScaledCosineAttention if sr_ratio is None else AggregatedAttention
    masked = cls(moh_backend='torch', **args).eval()
    with torch.no_grad():
        for name in ('wg', 'wg_0', 'wg_1'):
            if hasattr(masked, name):
                getattr(masked, name).weight.normal_(0, dim ** -0.5)
    routed_layer = cls(moh_backend='routed', **args).eval()
    routed_layer.load_state_dict(masked.state_dict())
    return masked, routed_layer


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _interleaved(first: Callable, second: Callable, repeats: int) -> Tuple[float, float]:
    """Minimum seconds of first() and second(), timed alternately after one warm-up each."""
    first(), second()
    times: Dict[int, List[float]] = {0: [], 1: []}
    for _ in range(repeats):
        for slot, fn in enumerate((first, second)):
            _sync()
            start = time.perf_counter()
            fn()
            _sync()
            times[slot].append(time.perf_counter() - start)
    return min(times[0]), min(times[1])


def _active_share(layer: torch.nn.Module, x: torch.Tensor) -> float:
    return float((layer.head_gates(x.flatten(1, 2)).gates != 0).float().mean())


def bench_layers(batch_sizes: List[int], repeats: int, device: str) -> None:
    print(f'{"layer":<18}{"batch":>6}{"active":>8}{"masked ms":>11}{"routed ms":>11}{"masked/routed":>15}')
    for label, dim, heads, shared, routed, side, sr_ratio in LAYERS:
        torch.manual_seed(0)
        masked, routed_layer = (m.to(device) for m in _layer_pair(dim, heads, shared, routed, side, sr_ratio))
        for batch in batch_sizes:
            x = torch.randn(batch, side, side, dim, device=device)
            with torch.no_grad():
                a, b = _interleaved(lambda: masked(x), lambda: routed_layer(x), repeats)
            print(f'{label:<18}{batch:>6}{_active_share(masked, x):>8.2f}{a * 1e3:>11.2f}{b * 1e3:>11.2f}'
                  f'{a / b:>15.2f}')


def bench_models(names: List[str], repeats: int, device: str) -> None:
    print(f'{"model (224, batch 1)":<26}{"masked ms":>11}{"routed ms":>11}{"masked/routed":>15}')
    x = torch.randn(1, 3, 224, 224, device=device)
    for name in names:
        torch.manual_seed(0)
        masked = timm.create_model(name, moh_backend='torch').eval().to(device)
        routed = timm.create_model(name, moh_backend='routed').eval().to(device)
        routed.load_state_dict(masked.state_dict())
        with torch.no_grad():
            a, b = _interleaved(lambda: masked(x), lambda: routed(x), repeats)
        print(f'{name:<26}{a * 1e3:>11.1f}{b * 1e3:>11.1f}{a / b:>15.2f}')


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--threads', type=int, default=2)
    parser.add_argument('--repeats', type=int, default=7)
    parser.add_argument('--batch-sizes', type=int, nargs='+', default=[1, 8])
    parser.add_argument('--models', nargs='*', default=MODELS, help='whole models to time (none: layers only)')
    parser.add_argument('--device', default='cpu', help="'cpu' or 'cuda'")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    where = torch.cuda.get_device_name() if args.device == 'cuda' else platform.processor() or platform.machine()
    print(f'{datetime.date.today()} {where} threads={args.threads} torch={torch.__version__} repeats={args.repeats} '
          f'(min of interleaved repeats)')
    bench_layers(args.batch_sizes, args.repeats, args.device)
    if args.models:
        bench_models(args.models, args.repeats, args.device)


if __name__ == '__main__':
    main()
