"""Codec training step (forward, RD loss, backward) in the standard layout against channels-last, same run.

zoo.tasks.compression.CompressionModule trains codecs channels-last (on_fit_start) because their convs run faster
that way on oneDNN; this measures that choice. Each codec trains at --batch crops of --crop^2 with the quickstart's
lambda; the two layouts start from the same weights, so the losses must agree (checked before timing). Medians of
round-robin runs (benchmarks/na2d_cpu.py), wall clock, on the CPU.

    PYTHONPATH=. .venv/bin/python benchmarks/compression_train_step.py --models s2lic_tiny \
        compressai:bmshj2018-hyperprior --json /tmp/train_step.json
"""
import argparse
import datetime
import json
from typing import Dict

import torch

from benchmarks.na2d_cpu import CLOCKS, cpu_model, interleaved_medians
from zoo.codecs import create_codec
from zoo.tasks.compression import LAMBDAS, rate_distortion_loss

LAYOUTS = {'standard': torch.contiguous_format, 'channels_last': torch.channels_last}


def train_step(codec: torch.nn.Module, batch: torch.Tensor, lmbda: float) -> float:
    """One forward + RD loss + backward on (B, 3, crop, crop) `batch`; returns the loss."""
    codec.zero_grad(set_to_none=True)
    loss = rate_distortion_loss(codec(batch), batch, lmbda, 'mse')['loss']
    loss.backward()
    return loss.item()


def measure(name: str, args) -> Dict[str, object]:
    torch.manual_seed(0)
    codec = create_codec(name, 3).train()
    batch = torch.rand(args.batch, 3, args.crop, args.crop)
    lmbda = LAMBDAS['mse'][3]
    timers, losses = {}, {}
    for layout, memory_format in LAYOUTS.items():
        copy = create_codec(name, 3).train()
        copy.load_state_dict(codec.state_dict())
        copy.to(memory_format=memory_format)
        inputs = batch.contiguous(memory_format=memory_format)
        torch.manual_seed(1)  # the training quantiser's noise is drawn per call: both layouts see the same noise
        losses[layout] = train_step(copy, inputs, lmbda)
        timers[layout] = (lambda copy=copy, inputs=inputs: train_step(copy, inputs, lmbda), args.warmup, args.repeats)
    if abs(losses['standard'] - losses['channels_last']) > 1e-3 * abs(losses['standard']):
        raise SystemExit(f'{name}: the layouts disagree on the loss: {losses}')
    times = interleaved_medians(timers, CLOCKS['wall'])
    record = {'model': name, 'params_m': sum(p.numel() for p in codec.parameters()) / 1e6, 'loss': losses,
              **{f'{layout}_s': times[layout]['median_s'] for layout in LAYOUTS}}
    record['speedup'] = record['standard_s'] / record['channels_last_s']
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--models', nargs='+', default=['s2lic_tiny', 'compressai:bmshj2018-hyperprior'])
    parser.add_argument('--batch', type=int, default=8)
    parser.add_argument('--crop', type=int, default=128)
    parser.add_argument('--threads', type=int, default=None, help='torch threads (default: torch\'s choice)')
    parser.add_argument('--warmup', type=int, default=1)
    parser.add_argument('--repeats', type=int, default=5)
    parser.add_argument('--json', default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    records = [measure(name, args) for name in args.models]
    print(f'{"codec":34s} {"params (M)":>10s} {"standard s":>11s} {"channels-last s":>16s} {"speedup":>8s}')
    for r in records:
        print(f'{r["model"]:34s} {r["params_m"]:10.2f} {r["standard_s"]:11.3f} {r["channels_last_s"]:16.3f} '
              f'{r["speedup"]:7.2f}x')
    if args.json:
        meta = {'date': datetime.date.today().isoformat(), 'cpu': cpu_model(), 'threads': torch.get_num_threads(),
                'torch': torch.__version__, 'batch': args.batch, 'crop': args.crop, 'repeats': args.repeats}
        with open(args.json, 'w') as f:
            json.dump({'meta': meta, 'records': records}, f, indent=2)


if __name__ == '__main__':
    main()
