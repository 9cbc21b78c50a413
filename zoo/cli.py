"""The `zoo` command: `zoo list`, `zoo bench` (training, evaluation and conversion come with the engine)."""
import argparse
import sys
from typing import List, Optional

import timm
import torch

import zoo
from zoo import bench
from zoo.manifest import official_entry


def _params_m(name: str) -> float:
    """Parameter count in millions, built on the meta device so that large models cost nothing."""
    with torch.device('meta'):
        model = timm.create_model(name)
    return sum(p.numel() for p in model.parameters()) / 1e6


def cmd_list(args: argparse.Namespace) -> int:
    names = zoo.list_models(args.pattern)
    if args.pretrained:
        names = [n for n in names if timm.models.get_pretrained_cfg(n) and timm.models.get_pretrained_cfg(n).url]
    if not names:
        print(f'no zoo model matches {args.pattern!r}', file=sys.stderr)
        return 1
    rows = [('model', 'params(M)', 'top-1', 'weights')]
    for name in names:
        entry = official_entry(name)
        top1 = f'{entry["top1"]:.1f}' if entry and entry.get('top1') is not None else '-'
        cfg = timm.models.get_pretrained_cfg(name)
        rows.append((name, f'{_params_m(name):.2f}', top1, cfg.url if cfg and cfg.url else '-'))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    for row in rows:
        print(f'{row[0]:<{widths[0]}}  {row[1]:>{widths[1]}}  {row[2]:>{widths[2]}}  {row[3]}')
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    results = bench.benchmark_models(args.model, baseline=None if args.baseline == 'none' else args.baseline,
                                     batch_sizes=args.batch_size, img_size=args.img_size, device=args.device,
                                     precision=args.precision, warmup=args.warmup, min_iters=args.iters,
                                     min_seconds=args.seconds)
    print(bench.format_table(results))
    if args.json:
        bench.write_json(results, args.json)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog='zoo', description='attention-zoo: attention-era vision backbones')
    sub = parser.add_subparsers(dest='command', required=True)

    p = sub.add_parser('list', help='registered models with parameters, official top-1 and weight location')
    p.add_argument('pattern', nargs='?', default='*', help='glob over model names, e.g. "dinat_*"')
    p.add_argument('--pretrained', action='store_true', help='only models with official weights')
    p.set_defaults(func=cmd_list)

    p = sub.add_parser('bench', help='throughput, peak memory, params and MACs vs a timm baseline')
    p.add_argument('--model', nargs='+', required=True, help='models to measure')
    p.add_argument('--baseline', default='convnext_tiny', help="timm model measured first, or 'none'")
    p.add_argument('--batch-size', nargs='+', type=int, default=[1, 32])
    p.add_argument('--img-size', type=int, default=None, help="square input size (default: each model's cfg)")
    p.add_argument('--device', default=None, help='cpu or cuda (default: cuda when available)')
    p.add_argument('--precision', default='fp32', choices=sorted(bench.PRECISIONS))
    p.add_argument('--warmup', type=int, default=2)
    p.add_argument('--iters', type=int, default=3, help='minimum timed iterations')
    p.add_argument('--seconds', type=float, default=2.0, help='minimum timed seconds')
    p.add_argument('--json', default=None, help='also write the results as JSON to this file')
    p.set_defaults(func=cmd_bench)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ValueError as err:
        print(f'zoo {args.command}: error: {err}', file=sys.stderr)
        return 2


if __name__ == '__main__':
    sys.exit(main())
