"""CPU timing of 2-D neighborhood attention: our reference against the alternatives one could use.

Implementations (all compute softmax(scale * q.k) @ v over dilated, border-shifted k x k windows):

* reference   zoo.layers.neighborhood_attention_2d(backend='torch'): loops over the k*k window
              slots on whole-map gathers; custom autograd, so forward and forward+backward.
* dense       zoo.layers.neighborhood_attention_2d(backend='dense'): one scaled_dot_product_attention over
              all H*W keys with the neighbourhood as an additive bias (-inf outside, rpb inside); what
              backend='auto' runs on CPU for maps up to 400 tokens. O((H*W)^2) memory.
* natten      natten.na2d with backend 'flex-fna', eager (the only CPU path of natten 0.21.7 without
              its compiled library); forward only, natten has no CPU backward. Skipped if natten
              is not installed.
* unfold      a naive alternative written here: F.unfold of the unpadded key and value maps (every
              valid window position), then each query picks the window its border-shifted start
              points at, which materialises (B*heads, head_dim, k*k, H, W) for keys and values,
              and two einsums around a softmax; autograd gives the backward.
* flex        torch flex_attention, eager, with a block mask built from a neighbourhood mask_mod.
              Eager flex materialises the full (H*W)^2 score matrix; forward only (no CPU backward).

Every alternative's output (and, where it has one, its input gradients) is compared with the
reference before anything is timed. Times are medians of several runs with time.perf_counter
(or process CPU time, --clock cpu), taken round-robin across the implementations of a case.

    PYTHONPATH=. .venv/bin/python benchmarks/na2d_cpu.py --json /tmp/na2d_cpu.json
"""
import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
import warnings
from dataclasses import dataclass
from functools import partial
from typing import Callable, Dict, Hashable, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

from zoo.layers.neighborhood import neighborhood_attention_2d

NATTEN_INSTALL = 'pip install --no-build-isolation --no-deps natten==0.21.7'
TOLERANCE = 1e-4
# 'cpu' (process CPU time) leaves out the time other processes hold the cores; it only measures the
# work itself with --threads 1, since with more threads it also counts OpenMP threads spinning.
CLOCKS = {'wall': time.perf_counter, 'cpu': time.process_time}

# Eager flex_attention (also what natten runs on CPU) warns on every call that it is unfused, and
# natten 0.21.7 passes flex's deprecated return_lse; both are known, and would flood the table.
warnings.filterwarnings('ignore', message='flex_attention called without torch.compile')
warnings.filterwarnings('ignore', message='return_lse is deprecated')

# (name, heads, H, W, head_dim, kernel_size, dilation); the batch comes from --batch.
CASES = [
    ('56x56 h2 k7 d1', 2, 56, 56, 32, 7, 1),
    ('28x28 h4 k7 d2', 4, 28, 28, 32, 7, 2),
    ('14x14 h8 k7 d1', 8, 14, 14, 32, 7, 1),
    ('16x16 h1 k5 d1', 1, 16, 16, 32, 5, 1),  # the quickstart model's first level at 64x64 input
]


def window_starts(length: int, kernel_size: int, dilation: int) -> torch.Tensor:
    """(length,) first key position of each position's window along one axis.

    Dilation group g = i % d, in-group index i // d, group length ceil((L - g) / d); the window
    start clamps to the group's borders, so windows shift inward instead of being padded.
    """
    pos = torch.arange(length)
    group = pos % dilation
    group_len = (length - group + dilation - 1) // dilation
    start = torch.minimum((pos // dilation - kernel_size // 2).clamp(min=0), group_len - kernel_size)
    return group + dilation * start


def unfold_na2d(query, key, value, kernel_size, dilation, scale):
    """Naive neighbourhood attention by unfolding every window. (B, heads, H, W, D) in and out."""
    batch, heads, height, width, dim = query.shape
    rows = window_starts(height, kernel_size, dilation)
    cols = window_starts(width, kernel_size, dilation)

    def windows(x):
        # A window starting at (r, c) is unfold's output column (r, c): unfold only lists windows
        # that fit, and border-shifted windows always fit, so no padding is needed.
        maps = x.reshape(batch * heads, height, width, dim).permute(0, 3, 1, 2)
        unfolded = F.unfold(maps, kernel_size, dilation=dilation)
        unfolded = unfolded.view(batch * heads, dim, kernel_size * kernel_size,
                                 height - dilation * (kernel_size - 1), width - dilation * (kernel_size - 1))
        return unfolded[:, :, :, rows[:, None], cols[None, :]]  # (B*heads, D, k*k, H, W)

    q = query.reshape(batch * heads, height, width, dim) * scale
    attn = torch.einsum('nijc,nctij->nijt', q, windows(key)).softmax(dim=-1)
    out = torch.einsum('nijt,nctij->nijc', attn, windows(value))
    return out.view(batch, heads, height, width, dim)


def neighbourhood_block_mask(height: int, width: int, kernel_size: int, dilation: int):
    """flex_attention BlockMask over flattened H*W tokens that keeps exactly each query's window."""
    rows = window_starts(height, kernel_size, dilation)
    cols = window_starts(width, kernel_size, dilation)
    span = dilation * kernel_size

    def inside(start, key_pos):
        offset = key_pos - start
        return (offset >= 0) & (offset < span) & (offset % dilation == 0)

    def mask_mod(b, h, q_idx, kv_idx):
        return (inside(rows[q_idx // width], kv_idx // width)
                & inside(cols[q_idx % width], kv_idx % width))

    return create_block_mask(mask_mod, None, None, height * width, height * width, device='cpu')


def import_natten():
    try:
        import natten
    except ImportError:
        return None
    return natten


@dataclass
class Impl:
    """One implementation bound to one case's inputs, already in its own layout.

    run() computes the attention; to_ours maps its output to (B, heads, H, W, head_dim); grad says
    whether it has a CPU backward; slow ones get fewer timed runs.
    """
    name: str
    run: Callable[[], torch.Tensor]
    inputs: List[torch.Tensor]
    to_ours: Callable[[torch.Tensor], torch.Tensor]
    slow: bool
    grad: bool

    def forward(self) -> torch.Tensor:
        with torch.no_grad():
            return self.to_ours(self.run())

    def forward_backward(self, grad_out: torch.Tensor) -> List[torch.Tensor]:
        """Gradients of <output, grad_out> with respect to query, key and value."""
        for t in self.inputs:
            t.grad = None
        self.to_ours(self.run()).backward(grad_out)
        return [t.grad for t in self.inputs]


def _same_layout(out: torch.Tensor) -> torch.Tensor:
    return out


def build_impls(q, k, v, kernel_size, dilation, scale, natten, use_flex: bool) -> List[Impl]:
    """Implementations for one case; inputs are laid out for each outside the timed call."""
    height, width = q.shape[2], q.shape[3]
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    impls = [Impl('reference', lambda: neighborhood_attention_2d(*leaves, kernel_size, dilation, scale=scale,
                                                                  backend='torch'),
                  leaves, _same_layout, slow=False, grad=True)]
    dense = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    impls.append(Impl('dense', lambda: neighborhood_attention_2d(*dense, kernel_size, dilation, scale=scale,
                                                                 backend='dense'),
                      dense, _same_layout, slow=False, grad=True))
    natives = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    impls.append(Impl('unfold', lambda: unfold_na2d(*natives, kernel_size, dilation, scale),
                      natives, _same_layout, slow=False, grad=True))
    if natten is not None:
        heads_last = [t.permute(0, 2, 3, 1, 4).contiguous() for t in (q, k, v)]
        impls.append(Impl('natten', lambda: natten.na2d(*heads_last, kernel_size=kernel_size, dilation=dilation,
                                                        scale=scale, backend='flex-fna', torch_compile=False),
                          heads_last, lambda out: out.permute(0, 3, 1, 2, 4), slow=True, grad=False))
    if use_flex:
        block_mask = neighbourhood_block_mask(height, width, kernel_size, dilation)
        tokens = [t.flatten(2, 3).contiguous() for t in (q, k, v)]
        impls.append(Impl('flex', lambda: flex_attention(*tokens, block_mask=block_mask, scale=scale),
                          tokens, lambda out: out.unflatten(2, (height, width)), slow=True, grad=False))
    return impls


def interleaved_medians(timers: Dict[Hashable, Tuple[Callable[[], object], int, int]],
                        clock: Callable[[], float]) -> Dict[Hashable, Dict[str, object]]:
    """Median time of each callable by `clock`; timers maps a key to (fn, warmup, repeats).

    Runs are taken round-robin, one of each callable per round, so that load from other processes
    on a shared machine lands on all of them alike instead of on whichever ran during a burst.
    """
    for fn, warmup, _ in timers.values():
        for _ in range(warmup):
            fn()
    samples = {key: [] for key in timers}
    for round_index in range(max(repeats for _, _, repeats in timers.values())):
        for key, (fn, _, repeats) in timers.items():
            if round_index < repeats:
                start = clock()
                fn()
                samples[key].append(clock() - start)
    return {key: {'median_s': statistics.median(times), 'samples_s': times} for key, times in samples.items()}


def max_abs_diff(a: List[torch.Tensor], b: List[torch.Tensor]) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a, b))


def run_case(case, args, natten) -> Dict[str, object]:
    """Check every implementation against the reference, then time it; returns the JSON record."""
    name, heads, height, width, dim, kernel_size, dilation = case
    gen = torch.Generator().manual_seed(0)
    q, k, v, grad_out = (torch.randn(args.batch, heads, height, width, dim, generator=gen) for _ in range(4))
    scale = dim ** -0.5
    impls = build_impls(q, k, v, kernel_size, dilation, scale, natten, not args.no_flex)
    expected_out = impls[0].forward()
    expected_grads = impls[0].forward_backward(grad_out)
    results, timers = {}, {}
    for impl in impls:
        out_diff = max_abs_diff([impl.forward()], [expected_out])
        grad_diff = max_abs_diff(impl.forward_backward(grad_out), expected_grads) if impl.grad else None
        if out_diff > TOLERANCE or (grad_diff is not None and grad_diff > TOLERANCE):
            raise SystemExit(f'{name}: {impl.name} disagrees with the reference (output {out_diff:.2e}, '
                             f'gradients {grad_diff})')
        results[impl.name] = {'max_abs_diff_out': out_diff, 'max_abs_diff_grad': grad_diff}
        warmup, repeats = (args.slow_warmup, args.slow_repeats) if impl.slow else (args.warmup, args.repeats)
        timers[(impl.name, 'forward')] = (impl.forward, warmup, repeats)
        if impl.grad:
            timers[(impl.name, 'forward_backward')] = (partial(impl.forward_backward, grad_out), warmup, repeats)
    print(f'  {name}: outputs agree, timing', file=sys.stderr, flush=True)
    for (impl_name, mode), timing in interleaved_medians(timers, CLOCKS[args.clock]).items():
        results[impl_name][mode] = timing
    return {'case': name, 'batch': args.batch, 'heads': heads, 'height': height, 'width': width, 'head_dim': dim,
            'kernel_size': kernel_size, 'dilation': dilation, 'results': results}


def format_table(records: List[Dict[str, object]]) -> str:
    """Medians in ms; 'x ref' is alternative / reference, i.e. how many times faster ours is."""
    header = (f"{'case':<16} {'impl':<10} {'fwd ms':>9} {'x ref':>7} {'fwd+bwd ms':>11} {'x ref':>7} "
              f"{'max|diff| out':>14} {'max|diff| grad':>15}")
    lines = [header, '-' * len(header)]
    for rec in records:
        ref = rec['results']['reference']
        for impl, res in rec['results'].items():
            fwd = res['forward']['median_s']
            fwd_cells = f"{fwd * 1e3:>9.1f} {fwd / ref['forward']['median_s']:>7.2f}"
            if 'forward_backward' in res:
                fb = res['forward_backward']['median_s']
                fb_cells = f"{fb * 1e3:>11.1f} {fb / ref['forward_backward']['median_s']:>7.2f}"
            else:
                fb_cells = f"{'n/a':>11} {'':>7}"
            grad = res['max_abs_diff_grad']
            grad_cell = f'{grad:>15.1e}' if grad is not None else f"{'n/a':>15}"
            lines.append(f"{rec['case']:<16} {impl:<10} {fwd_cells} {fb_cells} {res['max_abs_diff_out']:>14.1e} "
                         f"{grad_cell}")
    return '\n'.join(lines)


def cpu_model() -> str:
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                if line.startswith('model name'):
                    return line.split(':', 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--batch', type=int, default=4)
    parser.add_argument('--threads', type=int, default=len(os.sched_getaffinity(0)),
                        help='torch.set_num_threads (default: all cores this process may use)')
    parser.add_argument('--warmup', type=int, default=2, help='untimed runs of reference and unfold')
    parser.add_argument('--repeats', type=int, default=10, help='timed runs of reference and unfold')
    parser.add_argument('--slow-warmup', type=int, default=1, help='untimed runs of natten and flex')
    parser.add_argument('--slow-repeats', type=int, default=3, help='timed runs of natten and flex (seconds each)')
    parser.add_argument('--clock', choices=sorted(CLOCKS), default='wall',
                        help="wall: time.perf_counter (default); cpu: time.process_time, for --threads 1 on a busy "
                             "shared machine")
    parser.add_argument('--no-flex', action='store_true', help='skip torch flex_attention')
    parser.add_argument('--json', metavar='PATH', help='also write the results as JSON')
    return parser.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    natten = import_natten()
    env = {'date': datetime.datetime.now().astimezone().isoformat(timespec='seconds'), 'cpu': cpu_model(),
           'threads': torch.get_num_threads(), 'torch': torch.__version__,
           'natten': getattr(natten, '__version__', None), 'command': ' '.join([sys.executable] + sys.argv),
           'loadavg_start': os.getloadavg()}
    print(f"{env['date']}  {env['cpu']}  threads={env['threads']}  clock={args.clock}  torch {env['torch']}  "
          f"natten {env['natten']}")
    # Other processes on a shared machine inflate every figure; the load average shows how much.
    print('load average at start (1, 5, 15 min): %.2f %.2f %.2f' % env['loadavg_start'])
    if natten is None:
        print(f'natten is not installed: its rows are skipped (install: {NATTEN_INSTALL})')
    records = [run_case(case, args, natten) for case in CASES]
    env['loadavg_end'] = os.getloadavg()
    print(format_table(records))
    print("x ref = alternative median / reference median (> 1: the reference is faster); n/a: no CPU backward")
    print('load average at end (1, 5, 15 min): %.2f %.2f %.2f' % env['loadavg_end'])
    if args.json:
        with open(args.json, 'w') as f:
            json.dump({'environment': env, 'args': vars(args), 'cases': records}, f, indent=2)


if __name__ == '__main__':
    main()
