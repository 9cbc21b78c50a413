"""Segmentation training step: time and peak memory of smp UPerNet (or FPN) over zoo backbones vs timm baselines.

Each model runs in its own spawned process, so its peak memory is its own: on CPU the process's peak resident
set size minus its size just before the first step (weights, optimizer state and the step's activations
beyond what building the model took); on CUDA torch.cuda.max_memory_allocated. A step is forward, pixel
cross-entropy, backward and an AdamW update on random images and labels of `--img-size`^2; the time is the
median over `--steps` steps after `--warmup`, with ratios against the first baseline (timm convnext_tiny).

    PYTHONPATH=. .venv/bin/python benchmarks/segmentation_cpu.py --img-size 512 --batch 2 --steps 2
"""
import argparse
import datetime
import multiprocessing
import platform
import resource
import statistics
import time
from typing import Dict, List

import torch
import torch.nn.functional as F

BASELINES = ['convnext_tiny', 'swin_tiny_patch4_window7_224']
ZOO_MODELS = ['nat_mini', 'transnext_micro', 'overlock_xt']


def backbone_kwargs(name: str, img_size: int) -> Dict:
    """timm's Swin fixes its input size at construction; the others take any multiple of 32."""
    return dict(img_size=img_size) if name.startswith('swin') else {}


def _rss_mib() -> float:
    """Current resident set size of this process (Linux /proc), MiB."""
    with open('/proc/self/statm') as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2 ** 20


def measure(name: str, args: argparse.Namespace) -> Dict:
    """One model's training-step time (s) and peak memory (MiB), in the calling (fresh) process; with --kernels, only
    those Triton kernels may run on CUDA."""
    from zoo.layers.kernels import GPU_VERIFIED, gpu_kernels
    with gpu_kernels(GPU_VERIFIED if args.kernels is None else args.kernels):
        return _measure_step(name, args)


def _measure_step(name: str, args: argparse.Namespace) -> Dict:
    from zoo.tasks.segmentation import build_segmenter
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    model = build_segmenter(name, args.classes, arch=args.arch, model_kwargs=backbone_kwargs(name, args.img_size))
    model = model.to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    images = torch.randn(args.batch, 3, args.img_size, args.img_size, device=device)
    labels = torch.randint(0, args.classes, (args.batch, args.img_size, args.img_size), device=device)
    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats()
    before = _rss_mib()
    times: List[float] = []
    for step in range(args.warmup + args.steps):
        start = time.perf_counter()
        loss = F.cross_entropy(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if device.type == 'cuda':
            torch.cuda.synchronize()
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
    if device.type == 'cuda':
        peak = torch.cuda.max_memory_allocated() / 2 ** 20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - before  # ru_maxrss is KiB on Linux
    params = sum(p.numel() for p in model.parameters()) / 1e6
    return {'model': name, 'params_m': params, 'step_s': statistics.median(times), 'peak_mib': peak}


def _worker(name: str, args: argparse.Namespace, queue) -> None:
    """Always answers: a model that fails is reported as an error row instead of leaving the parent waiting."""
    try:
        queue.put(measure(name, args))
    except Exception as error:
        queue.put({'model': name, 'error': f'{type(error).__name__}: {error}'[:300]})


def run(names: List[str], args: argparse.Namespace) -> List[Dict]:
    """Measure every model in its own spawned process (a clean peak-memory count each)."""
    context = multiprocessing.get_context('spawn')
    results = []
    for name in names:
        queue = context.Queue()
        process = context.Process(target=_worker, args=(name, args, queue))
        process.start()
        process.join()  # the row is a small dict, so the child's queue feeder never blocks its exit
        died = {'model': name, 'error': f'worker exited with code {process.exitcode} before reporting'}
        results.append(died if queue.empty() else queue.get())
    return results


def format_table(results: List[Dict]) -> str:
    measured = [r for r in results if 'error' not in r]
    lines = [f"| {r['model']} | error: {r['error']} | | | | |" for r in results if 'error' in r]
    if not measured:
        return '\n'.join(lines)
    base = measured[0]
    versus = f"vs {base['model']}"
    lines = [f'| model | params (M) | step (s) | {versus} | peak memory (MiB) | {versus} |',
             '|---|---|---|---|---|---|'] + lines
    for r in measured:
        lines.append(f"| {r['model']} | {r['params_m']:.1f} | {r['step_s']:.3f} | {r['step_s'] / base['step_s']:.2f} "
                     f"| {r['peak_mib']:.0f} | {r['peak_mib'] / base['peak_mib']:.2f} |")
    return '\n'.join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--models', nargs='+', default=ZOO_MODELS)
    parser.add_argument('--baselines', nargs='+', default=BASELINES)
    parser.add_argument('--arch', default='upernet', choices=['upernet', 'fpn'])
    parser.add_argument('--img-size', type=int, default=512)
    parser.add_argument('--batch', type=int, default=2)
    parser.add_argument('--classes', type=int, default=150)
    parser.add_argument('--steps', type=int, default=2)
    parser.add_argument('--warmup', type=int, default=1)
    parser.add_argument('--threads', type=int, default=2)
    parser.add_argument('--kernels', nargs='*', default=None,
                        help="Triton kernels backend='auto' may use on CUDA (default: zoo.layers.kernels.GPU_VERIFIED)")
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    args = parser.parse_args()
    print(f'{datetime.date.today()} {platform.machine()} torch {torch.__version__} device {args.device}; '
          f'{args.arch} training step, batch {args.batch}, {args.img_size}x{args.img_size}, {args.classes} classes')
    print(format_table(run(args.baselines + args.models, args)))


if __name__ == '__main__':
    main()
