"""Throughput and K/V memory of every KDGQA attention scheme against MHSA, in the same run.

For each ViT size and batch size, the six schemes (mhsa, gqa, kdgqa, dgqa_ema, dgqa_diff, pgqa) are built with
the same width / depth / heads (eval mode, default mode, reference 'torch' backend unless --backend sdpa) and
timed round-robin: images per second are medians over several forward passes. K/V memory is measured, not
derived: forward hooks on every `attn.k` / `attn.v` projection add up the bytes of the K and V tensors one forward
produces (what a KV cache would hold). Both are printed as ratios to MHSA.

The issue's setting is ViT-S/B at 224 with batch 1 and 64; on a small shared CPU use fewer blocks and a smaller
image (the ratios are per-block quantities, so a shallower model gives the same comparison faster):

    PYTHONPATH=. .venv/bin/python benchmarks/kdgqa_cpu.py --sizes small base --batch-size 1 64
    PYTHONPATH=. .venv/bin/python benchmarks/kdgqa_cpu.py --depth 2 --img-size 112 --batch-size 1 8
"""
import argparse
import datetime
import json
import platform
import statistics
import time
from typing import Dict, List

import timm
import torch

import zoo  # noqa: F401  (registers the models)
from zoo.layers.grouped_query_attn import ATTENTION_SCHEMES, GroupedQueryAttention


def kv_bytes(model: torch.nn.Module, x: torch.Tensor) -> int:
    """Bytes of all K and V tensors one forward of `model` on `x` produces."""
    total = []
    hooks = [module.register_forward_hook(lambda mod, args, out: total.append(out.numel() * out.element_size()))
             for attn in model.modules() if isinstance(attn, GroupedQueryAttention) for module in (attn.k, attn.v)]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for hook in hooks:
            hook.remove()
    return sum(total)


def time_round_robin(models: Dict[str, torch.nn.Module], x: torch.Tensor, repeats: int) -> Dict[str, float]:
    """Median seconds per forward of each model, alternating models so load changes hit all alike."""
    times = {name: [] for name in models}
    with torch.no_grad():
        for model in models.values():
            model(x)  # warm-up
        for _ in range(repeats):
            for name, model in models.items():
                start = time.perf_counter()
                model(x)
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def run(sizes: List[str], batch_sizes: List[int], img_size: int, depth: int, repeats: int, backend: str,
        device: str) -> List[Dict]:
    rows = []
    for size in sizes:
        kwargs = dict(img_size=img_size, attn_backend=backend)
        if depth:
            kwargs['depth'] = depth
        torch.manual_seed(0)
        models = {scheme: timm.create_model(f'vit_{size}_patch16_224_{scheme}', **kwargs).eval().to(device)
                  for scheme in ATTENTION_SCHEMES}
        for batch in batch_sizes:
            x = torch.randn(batch, 3, img_size, img_size, device=device)
            seconds = time_round_robin(models, x, repeats)
            memory = {scheme: kv_bytes(model, x) for scheme, model in models.items()}
            for scheme in ATTENTION_SCHEMES:
                attn = models[scheme].blocks[0].attn
                rows.append(dict(
                    size=size, scheme=scheme, batch=batch, kv_heads=attn.num_kv_heads, heads=attn.num_heads,
                    img_per_s=batch / seconds[scheme], speed_vs_mhsa=seconds['mhsa'] / seconds[scheme],
                    kv_mb=memory[scheme] / 2 ** 20, kv_vs_mhsa=memory[scheme] / memory['mhsa']))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--sizes', nargs='+', default=['small', 'base'], choices=['small', 'base', 'large'])
    parser.add_argument('--batch-size', nargs='+', type=int, default=[1, 64])
    parser.add_argument('--img-size', type=int, default=224)
    parser.add_argument('--depth', type=int, default=0, help='blocks per model (0: the full model)')
    parser.add_argument('--repeats', type=int, default=5)
    parser.add_argument('--backend', default='torch', choices=['torch', 'sdpa'])
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--json', default=None)
    args = parser.parse_args()
    rows = run(args.sizes, args.batch_size, args.img_size, args.depth, args.repeats, args.backend, args.device)
    print(f'# {datetime.date.today()} {platform.machine()} torch {torch.__version__} threads '
          f'{torch.get_num_threads()} device {args.device}, img {args.img_size}, depth {args.depth or "full"}, '
          f'backend {args.backend}, eval, default mode')
    print('| model | scheme | kv heads | batch | img/s | speed vs MHSA | K/V MB | K/V vs MHSA |')
    print('|---|---|---|---|---|---|---|---|')
    for r in rows:
        print(f'| vit_{r["size"]} | {r["scheme"]} | {r["kv_heads"]}/{r["heads"]} | {r["batch"]} | '
              f'{r["img_per_s"]:.1f} | {r["speed_vs_mhsa"]:.2f} | {r["kv_mb"]:.2f} | {r["kv_vs_mhsa"]:.2f} |')
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(rows, f, indent=1)


if __name__ == '__main__':
    main()
