"""Throughput of `zoo eval` (classification) the way a user runs it on ImageNet-val-like data: JPEG files of
ImageNet's typical size (500x375) decoded, resized and centre-cropped by the model's eval transform, then the model.

Compares the run settings a user can pick (fp32, --channels-last, --amp) interleaved in one run (A B C A B C ...),
min of the repeats, ratios to fp32. The model has random weights saved to a file first: what is timed is the same
for official weights.

    python benchmarks/eval_cpu.py --model nat_mini convnext_tiny --images 128 --repeats 3
"""
import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import timm
import torch
from PIL import Image
from safetensors.torch import save_file

import zoo  # noqa: F401  (registers the zoo models)
from zoo.cli import main as zoo_main

SETTINGS = {'fp32': [], 'channels_last': ['--channels-last'], 'amp_bf16': ['--amp']}


def write_images(folder: Path, count: int, classes: int = 4) -> None:
    """`count` random 500x375 JPEGs in `classes` ImageNet synset folders (the layout of ImageNet val)."""
    rng = np.random.default_rng(0)
    synsets = ['n01440764', 'n01443537', 'n01484850', 'n01491361'][:classes]
    for i in range(count):
        target = folder / synsets[i % classes] / f'{i:05d}.JPEG'
        target.parent.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, (375, 500, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(target, quality=90)


def run_eval(model: str, weights: Path, data: Path, flags, batch_size: int, workers: int, out: Path) -> dict:
    argv = ['eval', '--model', model, '--checkpoint', str(weights), '--data', str(data), '--batch-size',
            str(batch_size), '--workers', str(workers), '--device', 'cpu', '--results-file', str(out), '--quiet',
            *flags]
    if zoo_main(argv) != 0:
        raise SystemExit(f'zoo eval failed: {argv}')
    return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--model', nargs='+', default=['nat_mini', 'convnext_tiny'])
    parser.add_argument('--images', type=int, default=128)
    parser.add_argument('--batch-size', type=int, default=64)
    parser.add_argument('--workers', type=int, default=2)
    parser.add_argument('--repeats', type=int, default=3)
    args = parser.parse_args()
    print(f'torch {torch.__version__}, {torch.get_num_threads()} threads, {args.images} images, batch '
          f'{args.batch_size}, {args.workers} workers')
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_images(tmp / 'val', args.images)
        for name in args.model:
            weights = tmp / f'{name}.safetensors'
            save_file(timm.create_model(name).state_dict(), str(weights))
            best = {setting: 0.0 for setting in SETTINGS}
            for _ in range(args.repeats):
                for setting, flags in SETTINGS.items():
                    record = run_eval(name, weights, tmp / 'val', flags, args.batch_size, args.workers,
                                      tmp / 'result.json')
                    best[setting] = max(best[setting], record['images_per_second'])
            ratios = '  '.join(f'{s} {best[s]:6.1f} img/s ({best[s] / best["fp32"]:.2f}x)' for s in SETTINGS)
            print(f'{name:<16} {ratios}')


if __name__ == '__main__':
    main()
