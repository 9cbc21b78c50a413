"""CPU timing of halo attention and of the HaloNet paper models, each against its alternative in the same run.

1. Operator: zoo.layers.HaloAttention (reference backend: unfold windows + gathered relative logits) against
   timm's HaloAttn (unfold + the pad-and-reshape relative-to-absolute trick) on the same weights, forward and
   forward+backward, at HaloNet stage shapes. Outputs and gradients are compared before timing; medians of
   round-robin runs (see benchmarks/na2d_cpu.py for why round-robin on a shared machine).
2. Models: img/s, peak resident memory and GMACs of halonet_paper_h0 ... h4 at their native sizes, with
   timm's resnet50 (224, the baseline of the ratios) and halonet50ts (256) measured in the same run through
   zoo.bench (each measurement in a fresh process).

    PYTHONPATH=. .venv/bin/python benchmarks/halo_cpu.py --json /tmp/halo_cpu.json
"""
import argparse
import datetime
import json
import os
import sys
from typing import Dict, List, Optional

import torch
from timm.layers.halo_attn import HaloAttn

from benchmarks.na2d_cpu import CLOCKS, cpu_model, interleaved_medians
from zoo.bench import benchmark_models, format_table
from zoo.layers import HaloAttention

TOLERANCE = 1e-4
# (name, dim, dim_out, heads, H, W, block, halo, stride): stage-1 and stage-3 blocks of H1, H5's widened value,
# and a strided (downsampling) block.
OP_CASES = [
    ('H1 s1 64x64', 64, 64, 4, 64, 64, 8, 3, 1),
    ('H1 s3 16x16', 256, 256, 8, 16, 16, 8, 3, 1),
    ('H5 s3 28x28 v2.5', 256, 640, 8, 28, 28, 14, 2, 1),
    ('H1 s2->3 32x32', 256, 256, 8, 32, 32, 8, 3, 2),
]
MODELS = ['halonet50ts'] + [f'halonet_paper_h{i}' for i in range(5)]


def _pair(case):
    """(ours, timm's) HaloAttn on the same weights for one case."""
    _, dim, dim_out, heads, _, _, block, halo, stride = case
    kwargs = dict(dim=dim, dim_out=dim_out, num_heads=heads, dim_head=dim // heads, block_size=block,
                  halo_size=halo, stride=stride)
    torch.manual_seed(0)
    ours = HaloAttention(**kwargs, backend='torch')
    theirs = HaloAttn(**kwargs)
    theirs.load_state_dict(ours.state_dict())
    return ours, theirs


def _forward_backward(layer, x, grad_out):
    x.grad = None
    layer(x).backward(grad_out)
    return x.grad


def run_op_case(case, args) -> Dict[str, object]:
    name, dim, _, _, height, width, *_ = case
    ours, theirs = _pair(case)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(args.batch, dim, height, width, generator=gen).requires_grad_()
    with torch.no_grad():
        out = ours(x)
        diff_out = (out - theirs(x)).abs().max().item()
    grad_out = torch.randn(out.shape, generator=gen)
    diff_grad = (_forward_backward(ours, x, grad_out) - _forward_backward(theirs, x, grad_out)).abs().max().item()
    if max(diff_out, diff_grad) > TOLERANCE:
        raise SystemExit(f'{name}: timm HaloAttn disagrees with ours (output {diff_out:.2e}, grad {diff_grad:.2e})')

    def forward(layer):
        def run():
            with torch.no_grad():
                layer(x)
        return run
    timers = {}
    for impl, layer in (('zoo', ours), ('timm', theirs)):
        timers[(impl, 'fwd')] = (forward(layer), args.warmup, args.repeats)
        timers[(impl, 'fwd+bwd')] = (lambda layer=layer: _forward_backward(layer, x, grad_out), args.warmup,
                                     args.repeats)
    medians = interleaved_medians(timers, CLOCKS[args.clock])
    print(f'  {name}: agree (out {diff_out:.1e}, grad {diff_grad:.1e})', file=sys.stderr, flush=True)
    return {'case': name, 'batch': args.batch, 'max_abs_diff_out': diff_out, 'max_abs_diff_grad': diff_grad,
            'median_s': {f'{impl} {mode}': res['median_s'] for (impl, mode), res in medians.items()}}


def format_op_table(records: List[Dict[str, object]]) -> str:
    """Medians in ms; 'x zoo' = timm / zoo (above 1: ours is faster)."""
    header = f"{'case':<20} {'zoo fwd':>9} {'timm fwd':>9} {'x zoo':>6} {'zoo f+b':>9} {'timm f+b':>9} {'x zoo':>6}"
    lines = [header, '-' * len(header)]
    for rec in records:
        m = {k: v * 1e3 for k, v in rec['median_s'].items()}
        lines.append(f"{rec['case']:<20} {m['zoo fwd']:>9.1f} {m['timm fwd']:>9.1f} "
                     f"{m['timm fwd'] / m['zoo fwd']:>6.2f} "
                     f"{m['zoo fwd+bwd']:>9.1f} {m['timm fwd+bwd']:>9.1f} "
                     f"{m['timm fwd+bwd'] / m['zoo fwd+bwd']:>6.2f}")
    return '\n'.join(lines)


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--batch', type=int, default=4, help='operator batch')
    parser.add_argument('--model-batch', type=int, nargs='+', default=[1], help='model batch sizes')
    parser.add_argument('--threads', type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument('--warmup', type=int, default=2)
    parser.add_argument('--repeats', type=int, default=10)
    parser.add_argument('--min-seconds', type=float, default=2.0, help='minimum timed seconds per model')
    parser.add_argument('--clock', choices=sorted(CLOCKS), default='wall')
    parser.add_argument('--skip-models', action='store_true', help='operator table only')
    parser.add_argument('--json', metavar='PATH', help='also write the results as JSON')
    return parser.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    env = {'date': datetime.datetime.now().astimezone().isoformat(timespec='seconds'), 'cpu': cpu_model(),
           'threads': torch.get_num_threads(), 'torch': torch.__version__,
           'command': ' '.join([sys.executable] + sys.argv), 'loadavg_start': os.getloadavg()}
    print(f"{env['date']}  {env['cpu']}  threads={env['threads']}  clock={args.clock}  torch {env['torch']}")
    print('load average at start (1, 5, 15 min): %.2f %.2f %.2f' % env['loadavg_start'])
    ops = [run_op_case(case, args) for case in OP_CASES]
    print(format_op_table(ops))
    print('x zoo = timm median / zoo median (> 1: ours is faster)')
    models = []
    if not args.skip_models:
        results = benchmark_models(MODELS, baseline='resnet50', batch_sizes=args.model_batch, device='cpu',
                                   min_seconds=args.min_seconds)
        print(format_table(results))
        print('each model at its own default size (resnet50 224, halonet50ts 256, H0-H2 256, H3 320, H4 384)')
        models = [vars(r) for r in results]
    env['loadavg_end'] = os.getloadavg()
    print('load average at end (1, 5, 15 min): %.2f %.2f %.2f' % env['loadavg_end'])
    if args.json:
        with open(args.json, 'w') as f:
            json.dump({'environment': env, 'args': vars(args), 'operator': ops, 'models': models}, f, indent=2)


if __name__ == '__main__':
    main()
