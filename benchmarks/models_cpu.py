"""Whole models on the CPU, interleaved in one process: each zoo model with `backend='auto'` (what users get) and
with every operator on its reference (`reference_only()`), beside a timm baseline; min of the repeats, ratios to
the baseline. A training step is forward, cross-entropy and backward. `--compile` adds each model (baseline
included) under torch.compile (inductor, what `trainer.compile` and `zoo bench --compile` use); the warm-up round
compiles.

    python benchmarks/models_cpu.py --models nat_mini dinat_mini --baseline convnext_tiny --batch 16 --mode train
"""
import argparse
import contextlib

import timm
import torch

import zoo  # noqa: F401  (registers the zoo models)
from interleaved import best_seconds
from zoo.layers.kernels import reference_only


def step_fn(model: torch.nn.Module, x: torch.Tensor, mode: str):
    """One eval forward (no_grad) or one training step of `model` on `x`."""
    labels = torch.randint(0, model.num_classes, (x.shape[0],))

    def step():
        if mode == 'eval':
            with torch.no_grad():
                model(x)
            return
        model.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), labels).backward()
    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--models', nargs='+', default=['nat_mini', 'dinat_mini'])
    parser.add_argument('--baseline', default='convnext_tiny')
    parser.add_argument('--batch', type=int, default=16)
    parser.add_argument('--img-size', type=int, default=224)
    parser.add_argument('--mode', choices=('eval', 'train'), default='train')
    parser.add_argument('--repeats', type=int, default=3)
    parser.add_argument('--compile', action='store_true', help='also time every model under torch.compile')
    args = parser.parse_args()
    torch.manual_seed(0)
    x = torch.randn(args.batch, 3, args.img_size, args.img_size)
    arms = {}
    for name in [args.baseline, *args.models]:
        model = timm.create_model(name).train(args.mode == 'train')
        arms[name] = (step_fn(model, x, args.mode), contextlib.nullcontext)
        if name != args.baseline:
            arms[f'{name} (reference)'] = (arms[name][0], reference_only)
        if args.compile:
            arms[f'{name} (compiled)'] = (step_fn(torch.compile(model), x, args.mode), contextlib.nullcontext)
    best = best_seconds(arms, args.repeats)
    print(f'{args.mode}, batch {args.batch}, {args.img_size}px, torch {torch.__version__}, '
          f'{torch.get_num_threads()} threads, min of {args.repeats} interleaved repeats')
    for name, seconds in best.items():
        print(f'{name:<28} {args.batch / seconds:7.2f} img/s  {best[args.baseline] / seconds:5.2f}x {args.baseline}')


if __name__ == '__main__':
    main()
