"""Speed, memory and size of models, each compared with timm baselines measured in the same run.

Throughput is the median over timed iterations after warm-up, of an eval forward or (train=True) of a training
step: forward in train mode, cross-entropy against random labels, backward. compile=True wraps each model in
torch.compile (the warm-up then includes compiling). Peak memory is the CUDA allocator's peak on
GPU; on CPU each measurement runs in a fresh child process and reports that process's peak resident size
(so it includes the interpreter and torch, about the same constant for every model). MACs are counted at
batch 1: matmul/conv MACs from torch's FLOP counter plus the operator MACs it cannot see (neighborhood
attention), i.e. the "FLOPs" papers report with fvcore.
"""
import contextlib
import json
import multiprocessing
import resource
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Sequence, Union

import timm
import torch
from torch.utils.flop_counter import FlopCounterMode

from zoo.layers.kernels import reference_only
from zoo.progress import track

__all__ = ['BenchResult', 'count_macs', 'count_routed_macs', 'benchmark_models', 'format_table', 'write_json']

PRECISIONS = {'fp32': None, 'bf16': torch.bfloat16, 'fp16': torch.float16}


@dataclass
class BenchResult:
    model: str
    params_m: float
    gmacs: float
    img_size: List[int]
    device: str
    precision: str
    img_per_s: Dict[int, float] = field(default_factory=dict)
    peak_mb: Dict[int, float] = field(default_factory=dict)
    vs_baseline: Dict[int, float] = field(default_factory=dict)
    mode: str = 'eval'
    compiled: bool = False
    gmacs_routed: Optional[float] = None  # mixture-of-heads models: GMACs of the routed execution


def _model_and_input(name: str, batch_size: int, img_size: Optional[int], device: str, **kwargs):
    model = timm.create_model(name, **kwargs).eval().to(device)
    size = model.pretrained_cfg['input_size'][1:] if img_size is None else (img_size, img_size)
    return model, torch.randn(batch_size, 3, *size, device=device)


def count_macs(model: torch.nn.Module, x: torch.Tensor) -> int:
    """Multiply-accumulates of one forward of `model` on `x`."""
    extra = []
    hooks = [module.register_forward_pre_hook(lambda mod, args: extra.append(mod.macs_not_counted(args[0])))
             for module in model.modules() if hasattr(module, 'macs_not_counted')]
    try:
        with torch.no_grad(), reference_only(), FlopCounterMode(display=False) as counter:
            model(x)
    finally:
        for hook in hooks:
            hook.remove()
    return counter.get_total_flops() // 2 + sum(extra)


def count_routed_macs(model: torch.nn.Module, x: torch.Tensor) -> int:
    """MACs of one forward when mixture-of-heads attention runs routed: `count_macs` less the attention of every
    (token, routed head) pair the token did not select (`macs_skipped_by_routing` of each such layer). Equals
    `count_macs` for models without routed heads."""
    inputs = []
    hooks = [module.register_forward_pre_hook(lambda mod, args: inputs.append((mod, args[0])))
             for module in model.modules() if hasattr(module, 'macs_skipped_by_routing')]
    try:
        total = count_macs(model, x)
    finally:
        for hook in hooks:
            hook.remove()
    return total - sum(module.macs_skipped_by_routing(layer_input) for module, layer_input in inputs)


def _routed_gmacs(model: torch.nn.Module, x: torch.Tensor) -> Optional[float]:
    """GMACs of the routed execution for models with routed mixture-of-heads layers, else None."""
    if not any(getattr(m, 'routed_head', 0) for m in model.modules()):
        return None
    return count_routed_macs(model, x) / 1e9


def _gmacs_cell(result: BenchResult) -> str:
    """'all heads' GMACs, and '/routed' GMACs where a mixture-of-heads model computes fewer."""
    routed = f'/{result.gmacs_routed:.2f}' if result.gmacs_routed is not None else ''
    return f'{result.gmacs:.2f}{routed}'


def _sync(device: str) -> None:
    if device.startswith('cuda'):
        torch.cuda.synchronize()


def _train_step(model: torch.nn.Module, x: torch.Tensor, labels: torch.Tensor, dtype: Optional[torch.dtype]) -> None:
    """Forward (under autocast when dtype is set), cross-entropy, backward; gradients are dropped first."""
    model.zero_grad(set_to_none=True)
    with torch.autocast(x.device.type, dtype=dtype, enabled=dtype is not None):
        logits = model(x)
    torch.nn.functional.cross_entropy(logits.float(), labels).backward()


def _time_step(model, x, precision: str, train: bool, warmup: int, min_iters: int, min_seconds: float) -> float:
    """Median seconds of one eval forward, or of one training step when train is set."""
    dtype = PRECISIONS[precision]
    if train:
        labels = torch.randint(0, model.num_classes, (x.shape[0],), device=x.device)  # timm models have num_classes
        context = contextlib.nullcontext()

        def step():
            _train_step(model, x, labels, dtype)
    else:
        context = torch.no_grad()

        def step():
            with torch.autocast(x.device.type, dtype=dtype, enabled=dtype is not None):
                model(x)
    times = []
    with context:
        for _ in range(warmup):
            step()
        _sync(str(x.device))
        start = time.perf_counter()
        while len(times) < min_iters or time.perf_counter() - start < min_seconds:
            t0 = time.perf_counter()
            step()
            _sync(str(x.device))
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _measure(name: str, batch_size: int, img_size: Optional[int], device: str, precision: str, warmup: int,
             min_iters: int, min_seconds: float, train: bool = False, compile: bool = False) -> Dict[str, float]:
    """Throughput (img/s) and peak memory (MB) of one model at one batch size, in this process."""
    torch.manual_seed(0)
    model, x = _model_and_input(name, batch_size, img_size, device)
    model.train(train)
    if compile:
        model = torch.compile(model)
    if device.startswith('cuda'):
        torch.cuda.reset_peak_memory_stats()
    seconds = _time_step(model, x, precision, train, warmup, min_iters, min_seconds)
    if device.startswith('cuda'):
        peak_mb = torch.cuda.max_memory_allocated() / 2 ** 20
    else:
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return dict(img_per_s=batch_size / seconds, peak_mb=peak_mb)


def _child(queue, args) -> None:
    torch.set_num_threads(args.pop('threads'))
    queue.put(_measure(**args))


def _measure_isolated(threads: int, **args) -> Dict[str, float]:
    """`_measure` in a fresh process, so that its peak resident size belongs to this measurement alone."""
    ctx = multiprocessing.get_context('spawn')
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(queue, dict(args, threads=threads)))
    proc.start()
    proc.join()
    if proc.exitcode != 0:
        raise RuntimeError(f'benchmark of {args["name"]} at batch {args["batch_size"]} failed in its child process '
                           f'(exit code {proc.exitcode})')
    return queue.get()


def benchmark_models(models: Sequence[str], baseline: Union[str, Sequence[str], None] = 'convnext_tiny',
                     batch_sizes: Sequence[int] = (1, 32), img_size: Optional[int] = None, device: Optional[str] = None,
                     precision: str = 'fp32', warmup: int = 2, min_iters: int = 3, min_seconds: float = 2.0,
                     train: bool = False, compile: bool = False, isolate: bool = True) -> List[BenchResult]:
    """Benchmark the baselines (first, in order) and `models` with the same settings; ratios are vs the first
    baseline.

    baseline: one timm model name, several (e.g. ('convnext_tiny', 'swin_tiny_patch4_window7_224')), or None.
    train: time a training step (forward + backward) instead of an eval forward; compile: wrap in torch.compile.
    isolate: on CPU, measure each model in a fresh child process (its peak resident size is then its own).
    """
    if precision not in PRECISIONS:
        raise ValueError(f'precision must be one of {sorted(PRECISIONS)}, got {precision!r}')
    device = device or ('cuda' if torch.cuda.is_available() else 'cpu')
    baselines = [baseline] if isinstance(baseline, str) else list(baseline or ())
    names = baselines + [m for m in models if m not in baselines]
    unknown = [n for n in names if not timm.is_model(n)]
    if unknown:
        raise ValueError(f'unknown model(s): {", ".join(unknown)} (see `zoo list` or timm.list_models())')
    results = []
    for name in track(names, 'bench', unit='model'):
        model, x = _model_and_input(name, 1, img_size, 'cpu')
        result = BenchResult(name, sum(p.numel() for p in model.parameters()) / 1e6, count_macs(model, x) / 1e9,
                             list(x.shape[-2:]), device, precision, mode='train' if train else 'eval',
                             compiled=compile)
        result.gmacs_routed = _routed_gmacs(model, x)
        del model
        for batch_size in batch_sizes:
            args = dict(name=name, batch_size=batch_size, img_size=img_size, device=device, precision=precision,
                        warmup=warmup, min_iters=min_iters, min_seconds=min_seconds, train=train, compile=compile)
            measured = (_measure(**args) if device.startswith('cuda') or not isolate
                        else _measure_isolated(torch.get_num_threads(), **args))
            result.img_per_s[batch_size] = measured['img_per_s']
            result.peak_mb[batch_size] = measured['peak_mb']
        results.append(result)
    if baselines:
        base = results[0]
        for result in results:
            result.vs_baseline = {bs: result.img_per_s[bs] / base.img_per_s[bs] for bs in batch_sizes}
    return results


def format_table(results: Sequence[BenchResult]) -> str:
    """Fixed-format text table, one row per model; the first row is the baseline when one was given."""
    batch_sizes = list(results[0].img_per_s)
    header = ['model', 'params(M)', 'GMACs'] + [f'img/s@{bs}' for bs in batch_sizes] \
        + [f'peakMB@{bs}' for bs in batch_sizes] + [f'x_base@{bs}' for bs in batch_sizes]
    rows = [header]
    for r in results:
        rows.append([r.model, f'{r.params_m:.2f}', _gmacs_cell(r)]
                    + [f'{r.img_per_s[bs]:.1f}' for bs in batch_sizes]
                    + [f'{r.peak_mb[bs]:.0f}' for bs in batch_sizes]
                    + [f'{r.vs_baseline[bs]:.2f}' if r.vs_baseline else '-' for bs in batch_sizes])
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ['  '.join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
             for row in rows]
    first = results[0]
    lines.append(f'{first.mode}{" compiled" if first.compiled else ""} device={first.device} '
                 f'precision={first.precision} img={first.img_size[0]}x{first.img_size[1]} '
                 f'threads={torch.get_num_threads()} torch={torch.__version__}; x_base = img/s / {results[0].model} '
                 f'img/s')
    return '\n'.join(lines)


def write_json(results: Sequence[BenchResult], path: str) -> None:
    with open(path, 'w') as f:
        json.dump([asdict(r) for r in results], f, indent=1)
        f.write('\n')
