"""Detection training step time and peak memory per backbone, against timm's convnext_tiny in the same run.

Each backbone goes under the same torchvision detector (zoo.tasks.detection.build_detector: features_only +
FPN, default heads at FPN width 256) and trains on random boxes and masks at --img-size (no resizing: min_size
and max_size are the image size). One step = forward with losses, backward, AdamW update. Every model runs in
a fresh process, so its peak memory is that process's peak resident set (on CUDA: peak allocated memory);
the baseline's process imports the same modules, so the difference between rows is the model's own.
Times are medians of --steps steps after one warm-up step; ratios are against the first model (the baseline).

    PYTHONPATH=. .venv/bin/python benchmarks/detection_cpu.py --models convnext_tiny nat_mini transnext_micro
"""
import argparse
import datetime
import json
import multiprocessing
import platform
import resource
import statistics
import time
from typing import Dict, List

import torch

BASELINE = 'convnext_tiny'


def _targets(batch: int, size: int, generator: torch.Generator) -> List[Dict[str, torch.Tensor]]:
    """Three random boxes per image, with their filled boxes as masks (labels 1..3)."""
    targets = []
    for _ in range(batch):
        corner = torch.rand(3, 2, generator=generator) * size * 0.6
        extent = (torch.rand(3, 2, generator=generator) * 0.3 + 0.1) * size
        boxes = torch.cat([corner, corner + extent], dim=1).round()
        masks = torch.zeros(3, size, size, dtype=torch.uint8)
        for mask, (x0, y0, x1, y1) in zip(masks, boxes.int().tolist()):
            mask[y0:y1, x0:x1] = 1
        targets.append(dict(boxes=boxes, labels=torch.tensor([1, 2, 3]), masks=masks))
    return targets


def measure(name: str, arch: str, size: int, batch: int, steps: int, device: str, threads: int = 0) -> Dict:
    """Median step seconds and peak memory (MiB) of training `arch` over backbone `name` (in this process)."""
    import zoo  # noqa: F401  (registers the zoo's models)
    from zoo.tasks.detection import build_detector
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    detector = build_detector(name, 3, dict(arch=arch, min_size=size, max_size=size)).to(device).train()
    optimizer = torch.optim.AdamW(detector.parameters(), lr=1e-4)
    generator = torch.Generator().manual_seed(0)
    images = [torch.rand(3, size, size, generator=generator).to(device) for _ in range(batch)]
    targets = [{k: v.to(device) for k, v in t.items()} for t in _targets(batch, size, generator)]
    times = []
    for _ in range(steps + 1):
        start = time.perf_counter()
        loss = sum(detector(images, targets).values())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if device == 'cuda':
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    if device == 'cuda':
        peak = torch.cuda.max_memory_allocated() / 2 ** 20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
    params = sum(p.numel() for p in detector.parameters()) / 1e6
    return dict(model=name, step_s=statistics.median(times[1:]), peak_mib=peak, params_m=params)


def _run(queue, *args):
    queue.put(measure(*args))


def measure_in_fresh_process(*args) -> Dict:
    context = multiprocessing.get_context('spawn')
    queue = context.Queue()
    process = context.Process(target=_run, args=(queue, *args))
    process.start()
    result = queue.get()
    process.join()
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--models', nargs='+', default=[BASELINE, 'nat_mini', 'transnext_micro'],
                        help='backbones; the first is the baseline of the ratios')
    parser.add_argument('--arch', default='mask_rcnn', choices=['mask_rcnn', 'retinanet', 'fcos'])
    parser.add_argument('--img-size', type=int, default=512)
    parser.add_argument('--batch', type=int, default=1)
    parser.add_argument('--steps', type=int, default=3)
    parser.add_argument('--threads', type=int, default=0, help='torch threads in each process (0: torch default)')
    parser.add_argument('--json', default=None)
    args = parser.parse_args()
    device = 'cuda' if torch.cuda.is_available() else 'cpu'
    rows = [measure_in_fresh_process(name, args.arch, args.img_size, args.batch, args.steps, device, args.threads)
            for name in args.models]
    base = rows[0]
    print(f'{args.arch}, {args.img_size}x{args.img_size}, batch {args.batch}, {device}, '
          f'{args.threads or torch.get_num_threads()} threads, {platform.machine()}, {datetime.date.today()}')
    print(f'{"backbone":<22}{"params M":>10}{"step s":>10}{"x base":>8}{"peak MiB":>10}{"x base":>8}')
    for row in rows:
        print(f'{row["model"]:<22}{row["params_m"]:>10.1f}{row["step_s"]:>10.2f}{row["step_s"] / base["step_s"]:>8.2f}'
              f'{row["peak_mib"]:>10.0f}{row["peak_mib"] / base["peak_mib"]:>8.2f}')
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(dict(vars(args), device=device, rows=rows), f, indent=1)


if __name__ == '__main__':
    main()
