"""Attention FLOPs and wall time of dense, masked and truly sparse Sparsifiner attention, in one run.

Executions of one block's attention (DeiT-S shapes: 6 heads, 197 tokens, head dim 64):

* dense    scaled_dot_product_attention over all pairs (what keep 1.0 runs; DeiT-S itself);
* masked   the official path: dense logits, the connectivity mask at -inf, softmax (zoo.layers.masked_attention);
* sparse   only the kept pairs: dense cls row, gathered top-k keys/values per query (topk_sparse_attention).

For each keep ratio (1.0 / 0.5 / 0.25) it reports the attention MACs (QK^T + AV, torch's FLOP counter), the
median wall time, and the ratio to dense; then the same for the whole sparsifiner_deit_small model (predictor
included), with timm's deit_small_patch16_224 as the dense baseline. The outputs of masked and sparse are
compared before anything is timed. The 'auto' rule (SPARSE_MAX_KEEP in zoo/models/sparsifiner.py) is read off
the sparse/masked ratio column.

    PYTHONPATH=. .venv/bin/python benchmarks/sparsifiner_cpu.py --batch 8 --repeats 5
"""
import argparse
import datetime
import platform
import statistics
import time
from typing import Callable, Dict, List

import timm
import torch
from torch.utils.flop_counter import FlopCounterMode

import zoo  # noqa: F401  (registers the models)
from zoo.bench import count_macs
from zoo.layers.sparse_attn import (attention_budget, connectivity_mask, connectivity_topk, dense_attention,
                                    masked_attention, topk_sparse_attention)

KEEPS = (1.0, 0.5, 0.25)
HEADS, TOKENS, HEAD_DIM = 6, 197, 64


def median_seconds(fn: Callable, repeats: int) -> float:
    """Median wall time of fn() over `repeats` runs after one warm-up run."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def attention_macs(fn: Callable) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops() // 2


def unfused_attention(q, k, v, mask, scale):
    """masked_attention's products, unfused, so torch's FLOP counter sees them (it misses the fused CPU kernel)."""
    return (((q @ k.transpose(-2, -1)) * scale).masked_fill(~mask, float('-inf')).softmax(-1)) @ v


def attention_rows(batch: int, repeats: int) -> List[Dict]:
    """One row per (keep, execution) for a single attention call at DeiT-S shapes."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(batch, HEADS, TOKENS, HEAD_DIM) for _ in range(3))
    scale = HEAD_DIM ** -0.5
    scores = torch.randn(batch, HEADS, TOKENS - 1, TOKENS)
    dense = lambda: dense_attention(q, k, v, scale)  # noqa: E731
    every_pair = torch.ones(batch, HEADS, TOKENS, TOKENS, dtype=torch.bool)
    base_macs = attention_macs(lambda: unfused_attention(q, k, v, every_pair, scale))
    base_time = median_seconds(dense, repeats)
    rows = [dict(keep=1.0, impl='dense', macs=base_macs, seconds=base_time)]
    for keep in KEEPS[1:]:
        index = connectivity_topk(scores, attention_budget(keep, TOKENS))
        mask = connectivity_mask(index, TOKENS)
        masked = lambda: masked_attention(q, k, v, mask, scale)  # noqa: E731
        masked_macs = attention_macs(lambda: unfused_attention(q, k, v, mask, scale))
        sparse = lambda: topk_sparse_attention(q, k, v, index, scale)  # noqa: E731
        torch.testing.assert_close(sparse()[0], masked()[0], rtol=1e-4, atol=1e-5)
        rows.append(dict(keep=keep, impl='masked', macs=masked_macs, seconds=median_seconds(masked, repeats)))
        rows.append(dict(keep=keep, impl='sparse', macs=attention_macs(sparse),
                         seconds=median_seconds(sparse, repeats)))
    for row in rows:
        row['macs_ratio'], row['time_ratio'] = row['macs'] / base_macs, row['seconds'] / base_time
    return rows


def model_rows(batch: int, repeats: int) -> List[Dict]:
    """Whole-model rows: timm DeiT-S, then sparsifiner_deit_small per keep and execution."""
    x = torch.randn(batch, 3, 224, 224)
    one = x[:1]
    deit = timm.create_model('deit_small_patch16_224').eval()
    with torch.no_grad():
        base_time = median_seconds(lambda: deit(x), repeats)  # timed with timm's fused attention
    for block in deit.blocks:
        block.attn.fused_attn = False  # so the FLOP counter sees its attention products
    base_macs = count_macs(deit, one)
    rows = [dict(keep='-', impl='timm deit_small', macs=base_macs, seconds=base_time)]
    for keep in KEEPS:
        for impl in (('masked',) if keep == 1.0 else ('masked', 'sparse')):
            model = timm.create_model('sparsifiner_deit_small', attn_keep_rate=keep, attn_impl=impl).eval()
            with torch.no_grad():
                seconds = median_seconds(lambda: model(x), repeats)
            rows.append(dict(keep=keep, impl='dense' if keep == 1.0 else impl, macs=count_macs(model, one),
                             seconds=seconds))
    for row in rows:
        row['macs_ratio'], row['time_ratio'] = row['macs'] / base_macs, row['seconds'] / base_time
    return rows


def print_table(title: str, rows: List[Dict], batch: int) -> None:
    print(f'\n{title}')
    print('| keep | execution | MACs (M, batch 1) | vs dense | time (ms, batch %d) | vs dense |' % batch)
    print('|---|---|---|---|---|---|')
    for r in rows:
        print(f"| {r['keep']} | {r['impl']} | {r['macs'] / 1e6:.2f} | {r['macs_ratio']:.3f} | "
              f"{r['seconds'] * 1e3:.2f} | {r['time_ratio']:.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--batch', type=int, default=8)
    parser.add_argument('--repeats', type=int, default=5)
    parser.add_argument('--threads', type=int, default=None)
    parser.add_argument('--skip-model', action='store_true', help='only the single-attention table')
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f'{datetime.date.today()} {platform.processor() or platform.machine()}, torch {torch.__version__}, '
          f'{torch.get_num_threads()} threads')
    attn = attention_rows(args.batch, args.repeats)
    # attention MACs are per call at batch `args.batch`; divide to batch 1 for the table
    for r in attn:
        r['macs'] //= args.batch
    print_table('One attention call, DeiT-S shapes (6 heads, 197 tokens, d 64)', attn, args.batch)
    if not args.skip_model:
        print_table('sparsifiner_deit_small (full model, predictor included)', model_rows(args.batch, args.repeats),
                    args.batch)


if __name__ == '__main__':
    main()
