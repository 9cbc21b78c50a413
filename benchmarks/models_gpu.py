"""Whole models on a GPU with the Triton kernels against the plain-PyTorch reference, in one run.

For each zoo model the kernels its layers use are switched on and off with `zoo.layers.kernels.gpu_kernels` (the
Triton kernels `backend="auto"` may run on CUDA), so both runs are the code path a user gets:

1. Parity: eval logits in fp32 with the kernels against the reference on the same weights (randomly
   perturbed, so no branch is zeroed at init) and images (max |difference| / max |reference logit|).
2. Speed: a training step (bf16 autocast forward, cross-entropy, backward; no optimizer) and an inference
   forward (bf16 autocast, no grad), images/s from CUDA events (median of `--iters` after `--warmup`), and
   the training step's peak allocated memory. timm's convnext_tiny and swin_tiny run beside them as the
   alternatives, with ratios in the table.

    PYTHONPATH=. python benchmarks/models_gpu.py --json $OUT/models_gpu.json

--dry-run needs no GPU: batch 1, one iteration, nat_tiny and convnext_tiny on CPU (checks the plumbing only).
"""
import argparse
import contextlib
import json
import platform
import statistics
import sys
import time
from typing import Callable, Dict, Iterator, List, Optional, Sequence

import timm
import torch
import torch.nn.functional as F

import zoo  # noqa: F401  (registers the models)
from zoo.layers.contmix import ContMix
from zoo.layers.kernels import gpu_kernels
from zoo.layers.neighborhood_attn import NeighborhoodAttention2d

# model -> the kernels its layers call through backend='auto'
ZOO_MODELS = {
    'nat_tiny': ('na2d',),
    'dinat_tiny': ('na2d',),
    'transnext_micro': ('aggregated_window',),
    'transnext_tiny': ('aggregated_window',),
    'overlock_xt': ('na2d',),
    'halonet_paper_h1': ('halo',),
}
BASELINES = ('convnext_tiny', 'swin_tiny_patch4_window7_224')


def input_size(model: torch.nn.Module) -> int:
    return model.pretrained_cfg['input_size'][-1]


def median_seconds(fn: Callable[[], None], warmup: int, iters: int, device: torch.device) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if device.type == 'cuda':
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            begin = time.perf_counter()
            fn()
            times.append(time.perf_counter() - begin)
    return statistics.median(times)


def perturb(model: torch.nn.Module, std: float = 0.1) -> None:
    """Add noise to every parameter: at init many residual branches are zeroed (zero-init last norm, layer
    scale), which would hide a kernel's output from the logits."""
    gen = torch.Generator(device='cpu').manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(std * torch.randn(param.shape, generator=gen).to(param.device))


def parity(model: torch.nn.Module, names: Sequence[str], images: torch.Tensor) -> Dict[str, float]:
    """fp32 eval logits with the kernels on against the reference (on perturbed weights)."""
    perturb(model)
    model.eval()
    with torch.no_grad():
        with gpu_kernels(()):
            reference = model(images).float()
        with gpu_kernels(names):
            fused = model(images).float()
    scale = reference.abs().max().item()
    return dict(max_abs_diff=(fused - reference).abs().max().item(), logit_scale=scale,
                rel_max_diff=(fused - reference).abs().max().item() / max(scale, 1e-12),
                same_top1=bool((fused.argmax(-1) == reference.argmax(-1)).all()))


def speed(model: torch.nn.Module, batch: int, args, device: torch.device) -> Dict[str, float]:
    """Training-step and inference images/s under bf16 autocast, and the training step's peak memory."""
    size = input_size(model)
    images = torch.randn(batch, 3, size, size, device=device)
    labels = torch.randint(0, model.num_classes, (batch,), device=device)
    autocast = dict(device_type=device.type, dtype=torch.bfloat16)

    def train_step():
        with torch.autocast(**autocast):
            loss = F.cross_entropy(model(images).float(), labels)
        loss.backward()
        model.zero_grad(set_to_none=True)

    def infer():
        with torch.no_grad(), torch.autocast(**autocast):
            model(images)
    model.train()
    if device.type == 'cuda':
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    train_s = median_seconds(train_step, args.warmup, args.iters, device)
    peak = torch.cuda.max_memory_allocated() / 2 ** 20 if device.type == 'cuda' else float('nan')
    model.eval()
    infer_s = median_seconds(infer, args.warmup, args.iters, device)
    return dict(train_img_s=batch / train_s, infer_img_s=batch / infer_s, train_peak_mib=peak)


@contextlib.contextmanager
def neighbourhood_backend(model: torch.nn.Module, backend: str) -> Iterator[None]:
    """Inside this block every neighbourhood-attention layer of model (NAT/DiNAT attention, ContMix) runs `backend`
    instead of its own setting."""
    layers = [m for m in model.modules() if isinstance(m, (NeighborhoodAttention2d, ContMix))]
    previous = [m.backend for m in layers]
    for layer in layers:
        layer.backend = backend
    try:
        yield
    finally:
        for layer, value in zip(layers, previous):
            layer.backend = value


def save(report: Dict, path: Optional[str]) -> None:
    if path:
        with open(path, 'w') as f:
            json.dump(report, f, indent=1)


def run(args, device: torch.device, report: Dict) -> List[Dict]:
    """Appends one row per model to report['rows'], saving the report after each (a cut-off run keeps its rows)."""
    rows = report.setdefault('rows', [])
    for name in args.models + args.baselines:
        names = ZOO_MODELS.get(name, ())
        torch.manual_seed(0)
        model = timm.create_model(name).to(device)
        row = dict(model=name, kernels=list(names), params_m=sum(p.numel() for p in model.parameters()) / 1e6,
                   img_size=input_size(model))
        try:
            if names:
                images = torch.randn(args.parity_batch, 3, row['img_size'], row['img_size'], device=device)
                row.update(parity(model, names, images))
            modes = [('reference', ()), ('triton', names)] if names else [('timm', ())]
            for mode, enabled in modes:
                with gpu_kernels(enabled):
                    row[mode] = speed(model, args.batch, args, device)
            if 'na2d' in names:  # the blocked plain-PyTorch path (cuBLAS / SDPA), what runs without Triton
                with neighbourhood_backend(model, 'blocked'):
                    row['blocked'] = speed(model, args.batch, args, device)
        except Exception as error:  # one model failing is reported, the others still run
            row['error'] = f'{type(error).__name__}: {error}'[:500]
        rows.append(row)
        print(json.dumps(row), flush=True)
        save(report, args.json)
        del model
    return rows


def format_table(rows: List[Dict]) -> str:
    """Markdown: each zoo model's reference, triton and blocked rows, ratios against the reference and
    convnext_tiny."""
    base = next((r['timm'] for r in rows if r['model'] == 'convnext_tiny' and 'timm' in r), None)
    lines = ['| model | path | train img/s | infer img/s | train peak MiB | train x ref | train x convnext_tiny '
             '| logits rel diff |', '|---|---|---|---|---|---|---|---|']
    for row in rows:
        if 'error' in row:
            lines.append(f"| {row['model']} | error | {row['error']} | | | | | |")
            continue
        ref = row.get('reference')
        for mode in ('reference', 'triton', 'blocked', 'timm'):
            if mode not in row:
                continue
            r = row[mode]
            vs_ref = f"{r['train_img_s'] / ref['train_img_s']:.2f}" if ref else '-'
            vs_base = f"{r['train_img_s'] / base['train_img_s']:.2f}" if base else '-'
            diff = f"{row['rel_max_diff']:.1e}" if mode == 'triton' else '-'
            lines.append(f"| {row['model']} | {mode} | {r['train_img_s']:.0f} | {r['infer_img_s']:.0f} "
                         f"| {r['train_peak_mib']:.0f} | {vs_ref} | {vs_base} | {diff} |")
    return '\n'.join(lines)


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--models', nargs='+', default=list(ZOO_MODELS), choices=list(ZOO_MODELS))
    parser.add_argument('--baselines', nargs='*', default=list(BASELINES))
    parser.add_argument('--batch', type=int, default=64)
    parser.add_argument('--parity-batch', type=int, default=4)
    parser.add_argument('--warmup', type=int, default=3)
    parser.add_argument('--iters', type=int, default=10)
    parser.add_argument('--json', metavar='PATH')
    parser.add_argument('--dry-run', action='store_true', help='CPU, batch 1, nat_tiny + convnext_tiny')
    args = parser.parse_args(argv)
    if args.dry_run:
        args.models, args.baselines, args.batch, args.parity_batch, args.warmup, args.iters = \
            ['nat_tiny'], ['convnext_tiny'], 1, 1, 0, 1
    return args


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        print('CUDA is not available; use --dry-run on a machine without a GPU', file=sys.stderr)
        return 2
    device = torch.device('cuda' if torch.cuda.is_available() and not args.dry_run else 'cpu')
    report = dict(args=vars(args), torch=torch.__version__, timm=timm.__version__, python=platform.python_version(),
                  device=torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu')
    run(args, device, report)
    table = format_table(report['rows'])
    print(f"\n{report['device']}, batch {args.batch}, bf16 autocast, median of {args.iters}\n{table}")
    return 1 if any('error' in r for r in report['rows']) else 0


if __name__ == '__main__':
    sys.exit(main())
