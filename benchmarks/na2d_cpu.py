"""CPU timing of 2-D neighborhood attention: our reference against the alternatives one could use.

Implementations (all compute softmax(scale * q.k) @ v over dilated, border-shifted k x k windows):

* reference   zoo.layers.neighborhood_attention_2d(backend='torch'): loops over the k*k window
              slots on whole-map gathers; custom autograd, so forward and forward+backward.
* dense       zoo.layers.neighborhood_attention_2d(backend='dense'): one scaled_dot_product_attention over
              all H*W keys with the neighbourhood as an additive bias (-inf outside, rpb inside); what
              backend='auto' runs on CPU for maps up to 400 tokens (larger maps skip it). O((H*W)^2) memory.
* blocked     backend='blocked' (zoo.layers.kernels.na2d_blocked): query tiles against their key block (tile +
              halo) as batched masked matrix products, in cache-sized chunks, with a backward that recomputes
              each chunk's probabilities.
* natten      natten.na2d with backend 'flex-fna', eager (the only CPU path of natten 0.21.7 without
              its compiled library); forward only, natten has no CPU backward. Skipped if natten
              is not installed.
* unfold      a naive alternative written here: F.unfold of the unpadded key and value maps (every
              valid window position), then each query picks the window its border-shifted start
              points at, which materialises (B*heads, head_dim, k*k, H, W) for keys and values,
              and two einsums around a softmax; autograd gives the backward.
* flex        torch flex_attention, eager, with a block mask built from a neighbourhood mask_mod.
              Eager flex materialises the full (H*W)^2 score matrix; forward only (no CPU backward).

--cases picks the shapes: 'small' (default), 'nat224' (every neighbourhood-attention layer shape of nat_mini and
dinat_mini at 224 x 224; use --batch 32) or 'contmix' (OverLoCK's ContMix aggregation, the value half na2d_av with
its dynamic kernels: reference vs blocked vs 'unfold', a stand-in of the official pure-PyTorch path that gathers
all k*k neighbours at once). --impls keeps only the implementations named.

Every alternative's output (and, where it has one, its input gradients) is compared with the
reference before anything is timed. Times are the minimum and the median of several runs with time.perf_counter
(or process CPU time, --clock cpu), taken round-robin across the implementations of a case; the table prints the
minimum and its ratio to the reference's.

    PYTHONPATH=. .venv/bin/python benchmarks/na2d_cpu.py --json /tmp/na2d_cpu.json
    PYTHONPATH=. .venv/bin/python benchmarks/na2d_cpu.py --cases nat224 --batch 32 --impls reference dense blocked
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
from typing import Callable, Dict, Hashable, List, NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

from zoo.layers.kernels.na2d_dense import fits as dense_fits
from zoo.layers.neighborhood import na2d_av, neighborhood_attention_2d

NATTEN_INSTALL = 'pip install --no-build-isolation --no-deps natten==0.21.7'
TOLERANCE = 1e-4
# 'cpu' (process CPU time) leaves out the time other processes hold the cores; it only measures the
# work itself with --threads 1, since with more threads it also counts OpenMP threads spinning.
CLOCKS = {'wall': time.perf_counter, 'cpu': time.process_time}

# Eager flex_attention (also what natten runs on CPU) warns on every call that it is unfused, and
# natten 0.21.7 passes flex's deprecated return_lse; both are known, and would flood the table.
warnings.filterwarnings('ignore', message='flex_attention called without torch.compile')
warnings.filterwarnings('ignore', message='return_lse is deprecated')


class Case(NamedTuple):
    """One shape; the batch comes from --batch. op: 'na2d' (fused attention) or 'av' (na2d_av; heads = groups)."""
    name: str
    heads: int
    height: int
    width: int
    head_dim: int
    kernel_size: int
    dilation: int
    op: str = 'na2d'


CASES = {
    'small': [
        Case('56x56 h2 k7 d1', 2, 56, 56, 32, 7, 1),
        Case('28x28 h4 k7 d2', 4, 28, 28, 32, 7, 2),
        Case('14x14 h8 k7 d1', 8, 14, 14, 32, 7, 1),
        Case('16x16 h1 k5 d1', 1, 16, 16, 32, 5, 1),  # the quickstart model's first level at 64x64 input
    ],
    # nat_mini / dinat_mini at 224: levels of 56, 28, 14, 7 pixels with 2, 4, 8, 16 heads of 32 channels, k 7;
    # dinat_mini alternates dilation 1 with 8, 4, 2 (in its dilated layers every group is one 7 x 7 window)
    'nat224': [
        Case('56x56 h2 k7 d1', 2, 56, 56, 32, 7, 1),
        Case('56x56 h2 k7 d8', 2, 56, 56, 32, 7, 8),
        Case('28x28 h4 k7 d1', 4, 28, 28, 32, 7, 1),
        Case('28x28 h4 k7 d4', 4, 28, 28, 32, 7, 4),
        Case('14x14 h8 k7 d1', 8, 14, 14, 32, 7, 1),
        Case('14x14 h8 k7 d2', 8, 14, 14, 32, 7, 2),
        Case('7x7 h16 k7 d1', 16, 7, 7, 32, 7, 1),
    ],
    # overlock_xt's Focus-Net ContMix at 224: 8 groups of 16 channels at 14 x 14 with the large kernel 13 and the
    # small 5, 12 groups of 14 at 7 x 7 with k 7; at 512 the first level is 32 x 32; k 17, the largest ContMix kernel
    # of the paper's family, at 32 x 32
    'contmix': [
        Case('14x14 g8 k13', 8, 14, 14, 16, 13, 1, 'av'),
        Case('14x14 g8 k5', 8, 14, 14, 16, 5, 1, 'av'),
        Case('7x7 g12 k7', 12, 7, 7, 14, 7, 1, 'av'),
        Case('32x32 g8 k13', 8, 32, 32, 16, 13, 1, 'av'),
        Case('32x32 g8 k17', 8, 32, 32, 16, 17, 1, 'av'),
    ],
}


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


def unfold_windows(x, kernel_size, dilation):
    """Every query's window of x, all k*k neighbours at once: (B, heads, H, W, D) -> (B*heads, D, k*k, H, W)."""
    batch, heads, height, width, dim = x.shape
    rows = window_starts(height, kernel_size, dilation)
    cols = window_starts(width, kernel_size, dilation)
    # A window starting at (r, c) is unfold's output column (r, c): unfold only lists windows
    # that fit, and border-shifted windows always fit, so no padding is needed.
    maps = x.reshape(batch * heads, height, width, dim).permute(0, 3, 1, 2)
    unfolded = F.unfold(maps, kernel_size, dilation=dilation)
    unfolded = unfolded.view(batch * heads, dim, kernel_size * kernel_size,
                             height - dilation * (kernel_size - 1), width - dilation * (kernel_size - 1))
    return unfolded[:, :, :, rows[:, None], cols[None, :]]


def unfold_na2d(query, key, value, kernel_size, dilation, scale):
    """Naive neighbourhood attention by unfolding every window. (B, heads, H, W, D) in and out."""
    batch, heads, height, width, dim = query.shape
    q = query.reshape(batch * heads, height, width, dim) * scale
    attn = torch.einsum('nijc,nctij->nijt', q, unfold_windows(key, kernel_size, dilation)).softmax(dim=-1)
    return unfold_na2d_av(attn.view(batch, heads, height, width, -1), value, kernel_size, dilation)


def unfold_na2d_av(attn, value, kernel_size, dilation):
    """na2d_av by gathering all k*k neighbours at once, as OverLoCK's pure-PyTorch ContMix does.

    attn (B, heads, H, W, k*k), value (B, heads, H, W, D) -> (B, heads, H, W, D).
    """
    batch, heads, height, width, dim = value.shape
    weights = attn.reshape(batch * heads, height, width, -1)
    out = torch.einsum('nijt,nctij->nijc', weights, unfold_windows(value, kernel_size, dilation))
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


def _leaves(*tensors: torch.Tensor) -> List[torch.Tensor]:
    return [t.detach().clone().requires_grad_() for t in tensors]


def build_impls(q, k, v, kernel_size, dilation, scale, natten, use_flex: bool) -> List[Impl]:
    """Implementations of the fused attention for one case; inputs are laid out for each outside the timed call."""
    height, width = q.shape[2], q.shape[3]
    impls = []
    for backend, name in (('torch', 'reference'), ('dense', 'dense'), ('blocked', 'blocked')):
        if backend == 'dense' and not dense_fits(q.shape):
            continue  # O((HW)^2) memory: only where backend='auto' could pick it
        leaves = _leaves(q, k, v)
        impls.append(Impl(name, partial(neighborhood_attention_2d, *leaves, kernel_size, dilation, scale=scale,
                                        backend=backend), leaves, _same_layout, slow=False, grad=True))
    natives = _leaves(q, k, v)
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


def build_av_impls(attn, value, kernel_size, dilation) -> List[Impl]:
    """Implementations of na2d_av (ContMix's aggregation) for one case."""
    impls = []
    for backend, name in (('torch', 'reference'), ('blocked', 'blocked')):
        leaves = _leaves(attn, value)
        impls.append(Impl(name, partial(na2d_av, *leaves, kernel_size, dilation, backend=backend), leaves,
                          _same_layout, slow=False, grad=True))
    gathered = _leaves(attn, value)
    impls.append(Impl('unfold', partial(unfold_na2d_av, *gathered, kernel_size, dilation), gathered, _same_layout,
                      slow=False, grad=True))
    return impls


def interleaved_medians(timers: Dict[Hashable, Tuple[Callable[[], object], int, int]],
                        clock: Callable[[], float]) -> Dict[Hashable, Dict[str, object]]:
    """Median and minimum time of each callable by `clock`; timers maps a key to (fn, warmup, repeats).

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
    return {key: {'median_s': statistics.median(times), 'min_s': min(times), 'samples_s': times}
            for key, times in samples.items()}


def max_abs_diff(a: List[torch.Tensor], b: List[torch.Tensor]) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a, b))


def run_case(case: Case, args, natten) -> Dict[str, object]:
    """Check every implementation against the reference, then time it; returns the JSON record."""
    gen = torch.Generator().manual_seed(0)
    shape = (args.batch, case.heads, case.height, case.width, case.head_dim)
    if case.op == 'av':
        logits = torch.randn(*shape[:4], case.kernel_size ** 2, generator=gen)
        value, grad_out = (torch.randn(shape, generator=gen) for _ in range(2))
        impls = build_av_impls(logits.softmax(-1), value, case.kernel_size, case.dilation)
    else:
        q, k, v, grad_out = (torch.randn(shape, generator=gen) for _ in range(4))
        impls = build_impls(q, k, v, case.kernel_size, case.dilation, case.head_dim ** -0.5, natten,
                            not args.no_flex)
    impls = [impl for impl in impls if impl.name == 'reference' or args.impls is None or impl.name in args.impls]
    expected_out = impls[0].forward()
    expected_grads = impls[0].forward_backward(grad_out)
    results, timers = {}, {}
    for impl in impls:
        out_diff = max_abs_diff([impl.forward()], [expected_out])
        grad_diff = max_abs_diff(impl.forward_backward(grad_out), expected_grads) if impl.grad else None
        if out_diff > TOLERANCE or (grad_diff is not None and grad_diff > TOLERANCE):
            raise SystemExit(f'{case.name}: {impl.name} disagrees with the reference (output {out_diff:.2e}, '
                             f'gradients {grad_diff})')
        results[impl.name] = {'max_abs_diff_out': out_diff, 'max_abs_diff_grad': grad_diff}
        warmup, repeats = (args.slow_warmup, args.slow_repeats) if impl.slow else (args.warmup, args.repeats)
        timers[(impl.name, 'forward')] = (impl.forward, warmup, repeats)
        if impl.grad and not args.forward_only:
            timers[(impl.name, 'forward_backward')] = (partial(impl.forward_backward, grad_out), warmup, repeats)
    print(f'  {case.name}: outputs agree, timing', file=sys.stderr, flush=True)
    for (impl_name, mode), timing in interleaved_medians(timers, CLOCKS[args.clock]).items():
        results[impl_name][mode] = timing
    return {'case': case.name, 'op': case.op, 'batch': args.batch, 'heads': case.heads, 'height': case.height,
            'width': case.width, 'head_dim': case.head_dim, 'kernel_size': case.kernel_size,
            'dilation': case.dilation, 'results': results}


def format_table(records: List[Dict[str, object]]) -> str:
    """Minimum times in ms; 'x ref' is alternative / reference (< 1: the alternative is faster)."""
    header = (f"{'case':<16} {'impl':<10} {'fwd ms':>9} {'x ref':>7} {'fwd+bwd ms':>11} {'x ref':>7} "
              f"{'max|diff| out':>14} {'max|diff| grad':>15}")
    lines = [header, '-' * len(header)]
    for rec in records:
        ref = rec['results']['reference']
        for impl, res in rec['results'].items():
            fwd = res['forward']['min_s']
            fwd_cells = f"{fwd * 1e3:>9.1f} {fwd / ref['forward']['min_s']:>7.2f}"
            if 'forward_backward' in res:
                fb = res['forward_backward']['min_s']
                fb_cells = f"{fb * 1e3:>11.1f} {fb / ref['forward_backward']['min_s']:>7.2f}"
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
    parser.add_argument('--cases', choices=sorted(CASES), default='small', help='which shapes (module docstring)')
    parser.add_argument('--impls', nargs='+', default=None,
                        help='time only these implementations beside the reference (default: all)')
    parser.add_argument('--forward-only', action='store_true', help='skip the forward+backward timings')
    parser.add_argument('--threads', type=int, default=len(os.sched_getaffinity(0)),
                        help='torch.set_num_threads (default: all cores this process may use)')
    parser.add_argument('--warmup', type=int, default=2, help='untimed runs of each fast implementation')
    parser.add_argument('--repeats', type=int, default=10, help='timed runs of each fast implementation')
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
    records = [run_case(case, args, natten) for case in CASES[args.cases]]
    env['loadavg_end'] = os.getloadavg()
    print(format_table(records))
    print("x ref = alternative min / reference min (> 1: the reference is faster); n/a: no CPU backward or "
          "--forward-only")
    print('load average at end (1, 5, 15 min): %.2f %.2f %.2f' % env['loadavg_end'])
    if args.json:
        with open(args.json, 'w') as f:
            json.dump({'environment': env, 'args': vars(args), 'cases': records}, f, indent=2)


if __name__ == '__main__':
    main()
