"""GPU check and benchmark of the Triton neighbourhood-attention kernels (zoo.layers.kernels.na2d_triton).

Run from the repository root on a CUDA machine:

    PYTHONPATH=. python benchmarks/na2d_gpu.py --json $OUT/na2d_gpu.json

1. Checks: triton against the plain-PyTorch reference, forward and backward (fused; unfused qk and
   av too), fp32/fp16/bf16, on several shapes; the reference runs in fp32 on upcast inputs. Prints
   relative L2 and max errors; the script exits 1 when any check fails.
2. Timing (triton.testing.do_bench, median, L2 flushed between runs): forward and forward+backward
   of the reference, the fused triton kernel and torch.compile'd flex_attention with a block mask
   that implements the same neighbourhood (border-shifted, dilated windows). Flex runs once without
   rpb and once with rpb added through score_mod (rpb[h, (key - query)/d + k - 1] per axis, rpb
   requiring grad); triton is timed in both modes and compared with the flex run of the same mode,
   the reference with rpb. Forward passes are timed with autograd recording, as in training.
   Items past --budget-s are skipped and recorded as such; the JSON is rewritten after each item.
3. --sweep: fused triton timings (fp16, rpb) for several tile configurations, to retune
   `na2d_triton._tile_config`.

--dry-run needs no GPU: it checks the argument parsing and the flex mask_mod / score_mod logic
against zoo.layers.neighborhood_indices on tiny shapes, and runs eager flex_attention on CPU
against the reference.
"""
import argparse
import json
import platform
import sys
import time
import warnings
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import torch

from zoo.layers import neighborhood as nb
from zoo.layers.neighborhood import neighborhood_indices

DTYPES = {'fp32': torch.float32, 'fp16': torch.float16, 'bf16': torch.bfloat16}
# Pass/fail bound on ||triton - reference|| / ||reference|| per dtype (reference in fp32).
REL_L2_TOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 3e-2}


@dataclass(frozen=True)
class Shape:
    """One attention problem; tensors are (batch, heads, height, width, head_dim)."""
    name: str
    batch: int
    heads: int
    height: int
    width: int
    head_dim: int
    kernel_size: int
    dilation: int = 1


CHECK_SHAPES = [
    Shape('13x11-k3-d2-dim6', 2, 2, 13, 11, 6, 3, 2),
    Shape('24x20-k7-dim32', 2, 3, 24, 20, 32, 7),
    Shape('56x56-k7-dim32', 2, 2, 56, 56, 32, 7),
    Shape('64x64-k13-dim32', 1, 2, 64, 64, 32, 13),
    Shape('45x31-k5-d3-dim32', 2, 2, 45, 31, 32, 5, 3),
]


def bench_shapes(batch: int) -> List[Shape]:
    """NAT/DiNAT-like stages: head_dim 32, kernel 7 (13 on the 64x64 map), one dilated DiNAT layer."""
    return [
        Shape('56x56-h2-k7', batch, 2, 56, 56, 32, 7),
        Shape('56x56-h4-k7', batch, 4, 56, 56, 32, 7),
        Shape('28x28-h4-k7', batch, 4, 28, 28, 32, 7),
        Shape('64x64-h4-k13', batch, 4, 64, 64, 32, 13),
        Shape('56x56-h4-k7-d4', batch, 4, 56, 56, 32, 7, 4),
    ]


# ----------------------------------------------------------------------------------------------
# flex_attention with the neighbourhood rule.
# ----------------------------------------------------------------------------------------------

def neighborhood_mask_mod(height: int, width: int, kernel_size: int, dilation: int) -> Callable:
    """flex mask_mod over the flattened H*W sequence: key in the query's border-shifted, dilated window."""
    radius = kernel_size // 2

    def axis_in_window(q_pos, kv_pos, length):
        group = q_pos % dilation
        group_len = (length - group + dilation - 1) // dilation
        start = torch.minimum(torch.clamp(q_pos // dilation - radius, min=0), group_len - kernel_size)
        kv_in_group = kv_pos // dilation
        return (kv_pos % dilation == group) & (kv_in_group >= start) & (kv_in_group < start + kernel_size)

    def mask_mod(b, h, q_idx, kv_idx):
        return (axis_in_window(q_idx // width, kv_idx // width, height)
                & axis_in_window(q_idx % width, kv_idx % width, width))
    return mask_mod


def rpb_score_mod(rpb: torch.Tensor, width: int, kernel_size: int, dilation: int) -> Callable:
    """flex score_mod adding rpb[h, (kr - qr)/d + k - 1, (kc - qc)/d + k - 1] to the scaled score.

    Indices are clamped so that pairs outside the window (masked afterwards) stay in bounds.
    """
    last = 2 * kernel_size - 2

    def score_mod(score, b, h, q_idx, kv_idx):
        d_row = (kv_idx // width - q_idx // width) // dilation + kernel_size - 1
        d_col = (kv_idx % width - q_idx % width) // dilation + kernel_size - 1
        return score + rpb[h, d_row.clamp(0, last), d_col.clamp(0, last)]
    return score_mod


def flex_runner(shape: Shape, device: torch.device, compiled: bool) -> Callable:
    """fn(query, key, value, rpb or None, scale) -> (B, heads, H, W, dim) through flex_attention."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    seq = shape.height * shape.width
    mask_mod = neighborhood_mask_mod(shape.height, shape.width, shape.kernel_size, shape.dilation)
    block_mask = create_block_mask(mask_mod, None, None, seq, seq, device=str(device))
    attention = torch.compile(flex_attention, dynamic=False) if compiled else flex_attention

    def run(query, key, value, rpb, scale):
        score_mod = None if rpb is None else rpb_score_mod(rpb, shape.width, shape.kernel_size, shape.dilation)
        out = attention(query.flatten(2, 3), key.flatten(2, 3), value.flatten(2, 3), score_mod=score_mod,
                        block_mask=block_mask, scale=scale)
        return out.view(value.shape)
    return run


def check_flex_rules(shape: Shape) -> None:
    """mask_mod and score_mod against the reference index tables, for every (query, key) pair."""
    k, d, height, width = shape.kernel_size, shape.dilation, shape.height, shape.width
    rows, row_bias = neighborhood_indices(height, k, d)
    cols, col_bias = neighborhood_indices(width, k, d)
    seq = height * width
    # Reference: dense (seq, seq) window mask and rpb index (row_index, col_index) of each pair.
    expected = torch.zeros(seq, seq, dtype=torch.bool)
    expected_bias = torch.full((seq, seq), -1, dtype=torch.long)
    span = 2 * k - 1
    for i in range(height):
        for j in range(width):
            keys = (rows[i][:, None] * width + cols[j][None, :]).reshape(-1)
            expected[i * width + j, keys] = True
            expected_bias[i * width + j, keys] = (row_bias[i][:, None] * span + col_bias[j][None, :]).reshape(-1)
    q_idx = torch.arange(seq)[:, None]
    kv_idx = torch.arange(seq)[None, :]
    got = neighborhood_mask_mod(height, width, k, d)(0, 0, q_idx, kv_idx)
    if not torch.equal(got, expected):
        raise AssertionError(f'flex mask_mod differs from the reference windows for {shape}')
    # An rpb whose entries are their own flat index makes score_mod return the index it gathered.
    rpb = torch.arange(span * span, dtype=torch.float64).view(1, span, span)
    gathered = rpb_score_mod(rpb, width, k, d)(torch.zeros(seq, seq, dtype=torch.float64), 0, 0, q_idx, kv_idx)
    if not torch.equal(gathered.long()[expected], expected_bias[expected]):
        raise AssertionError(f'flex score_mod rpb index differs from the reference for {shape}')


def check_flex_eager(shape: Shape) -> float:
    """Eager (CPU) flex with mask and rpb score_mod against the reference forward; returns max error."""
    gen = torch.Generator().manual_seed(0)
    dims = (shape.batch, shape.heads, shape.height, shape.width, shape.head_dim)
    query, key, value = (torch.randn(*dims, generator=gen) for _ in range(3))
    rpb = torch.randn(shape.heads, 2 * shape.kernel_size - 1, 2 * shape.kernel_size - 1, generator=gen)
    scale = shape.head_dim ** -0.5
    out = flex_runner(shape, torch.device('cpu'), compiled=False)(query, key, value, rpb, scale)
    ref = nb.neighborhood_attention_2d(query, key, value, shape.kernel_size, shape.dilation, rpb=rpb,
                                       scale=scale, backend='torch')
    return (out - ref).abs().max().item()


def check_blocked(shape: Shape) -> float:
    """Max error of the blocked path (the timed 'blocked' rows) against the reference, with rpb, on CPU."""
    gen = torch.Generator().manual_seed(0)
    dims = (shape.batch, shape.heads, shape.height, shape.width, shape.head_dim)
    query, key, value = (torch.randn(*dims, generator=gen) for _ in range(3))
    rpb = torch.randn(shape.heads, 2 * shape.kernel_size - 1, 2 * shape.kernel_size - 1, generator=gen)
    outs = [nb.neighborhood_attention_2d(query, key, value, shape.kernel_size, shape.dilation, rpb=rpb,
                                         backend=backend) for backend in ('blocked', 'torch')]
    return (outs[0] - outs[1]).abs().max().item()


def dry_run() -> None:
    """Structure checks that need no GPU."""
    tiny = [Shape('7x9-k3', 1, 2, 7, 9, 16, 3), Shape('10x6-k3-d2', 1, 2, 10, 6, 16, 3, 2),
            Shape('12x13-k5-d2', 1, 2, 12, 13, 16, 5, 2), Shape('9x11-k3-d3', 1, 2, 9, 11, 16, 3, 3)]
    warnings.filterwarnings('ignore', message='flex_attention called without torch.compile')
    for shape in tiny:
        check_flex_rules(shape)
        error = check_flex_eager(shape)
        print(f'dry-run {shape.name}: flex mask/score_mod match the reference tables; eager flex vs '
              f'reference max error {error:.2e}')
        if error > 1e-4:
            raise AssertionError(f'eager flex differs from the reference on {shape}: {error:.2e}')
        blocked_error = check_blocked(shape)
        print(f'dry-run {shape.name}: blocked vs reference max error {blocked_error:.2e}')
        if blocked_error > 1e-4:
            raise AssertionError(f'the blocked path differs from the reference on {shape}: {blocked_error:.2e}')


# ----------------------------------------------------------------------------------------------
# Checks on CUDA.
# ----------------------------------------------------------------------------------------------

def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix('torch.')


def _randn(shape, dtype, device, gen):
    return torch.randn(*shape, generator=gen, device=device).to(dtype)


def _poison_allocator(tensors: List[torch.Tensor]) -> None:
    """Fill freed cached blocks of these sizes with NaN bytes, so an unwritten output shows up as NaN."""
    junk = [torch.empty(t.numel() * t.element_size(), dtype=torch.uint8, device=t.device).fill_(0xFF)
            for t in tensors]
    del junk


def _grads(fn: Callable, inputs: List[Optional[torch.Tensor]], grad_out: torch.Tensor):
    """(output, grads of the non-None inputs) of fn on fresh leaf copies."""
    leaves = [None if t is None else t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*leaves)
    out.backward(grad_out)
    return [out.detach()] + [t.grad for t in leaves if t is not None]


def _errors(got: torch.Tensor, want: torch.Tensor) -> Dict[str, float]:
    got, want = got.double(), want.double()
    rel_l2 = ((got - want).norm() / want.norm().clamp_min(1e-30)).item()
    return dict(rel_l2=rel_l2 if torch.isfinite(got).all() else float('nan'),
                max_abs=(got - want).abs().max().item(), ref_max=want.abs().max().item())


def _compare(label: str, names: List[str], got: List[torch.Tensor], want: List[torch.Tensor],
             dtype: torch.dtype, context: Optional[List[torch.Tensor]] = None) -> List[dict]:
    """One record per tensor; `context` (the reference run in `dtype`) gives its own error for scale."""
    records = []
    for index, (name, g, w) in enumerate(zip(names, got, want)):
        err = _errors(g, w)
        if context is not None:
            err['ref_in_dtype_rel_l2'] = _errors(context[index], w)['rel_l2']
        err['ok'] = bool(err['rel_l2'] <= REL_L2_TOL[dtype])  # NaN compares False
        records.append(dict(check=label, tensor=name, **err))
        line = (f"  {label:40s} {name:6s} rel_l2 {err['rel_l2']:.2e} max_abs {err['max_abs']:.2e} "
                f"(|ref| {err['ref_max']:.1e})")
        if context is not None:
            line += f" reference-in-{_dtype_name(dtype)} rel_l2 {err['ref_in_dtype_rel_l2']:.2e}"
        print(line if err['ok'] else line + '  <-- FAIL', flush=True)
    return records


def run_checks(device: torch.device, seed: int) -> List[dict]:
    """Triton vs reference, forward and backward, for every check shape and dtype (fresh inputs each)."""
    records = []
    gen = torch.Generator(device=device).manual_seed(seed)
    for dtype in DTYPES.values():
        for shape in CHECK_SHAPES:
            records += _check_fused(shape, dtype, device, gen)
            records += _check_unfused(shape, dtype, device, gen)
    return records


def _check_fused(shape: Shape, dtype: torch.dtype, device: torch.device, gen) -> List[dict]:
    k, d = shape.kernel_size, shape.dilation
    dims = (shape.batch, shape.heads, shape.height, shape.width, shape.head_dim)
    inputs = [_randn(dims, dtype, device, gen) for _ in range(3)]
    inputs.append(_randn((shape.heads, 2 * k - 1, 2 * k - 1), dtype, device, gen))
    grad_out = _randn(dims, dtype, device, gen)

    def run(backend):
        return lambda q, kk, v, b: nb.neighborhood_attention_2d(q, kk, v, k, d, rpb=b, backend=backend)
    _poison_allocator(inputs[:3] * 2)
    got = _grads(run('triton'), inputs, grad_out)
    want = _grads(run('torch'), [t.float() for t in inputs], grad_out.float())
    context = None if dtype == torch.float32 else _grads(run('torch'), inputs, grad_out)
    return _compare(f'fused {shape.name} {_dtype_name(dtype)}', ['out', 'dq', 'dk', 'dv', 'drpb'], got, want,
                    dtype, context)


def _check_unfused(shape: Shape, dtype: torch.dtype, device: torch.device, gen) -> List[dict]:
    k, d = shape.kernel_size, shape.dilation
    dims = (shape.batch, shape.heads, shape.height, shape.width, shape.head_dim)
    query, key = _randn(dims, dtype, device, gen), _randn(dims, dtype, device, gen)
    rpb = _randn((shape.heads, 2 * k - 1, 2 * k - 1), dtype, device, gen)
    grad_logits = _randn((*dims[:4], k * k), dtype, device, gen)
    attn = _randn((*dims[:4], k * k), torch.float32, device, gen).softmax(-1).to(dtype)
    value, grad_out = _randn(dims, dtype, device, gen), _randn(dims, dtype, device, gen)

    def qk(backend):
        return lambda q, kk, b: nb.na2d_qk(q, kk, k, d, rpb=b, backend=backend)

    def av(backend):
        return lambda a, v: nb.na2d_av(a, v, k, d, backend=backend)
    label = f'{shape.name} {_dtype_name(dtype)}'
    records = _compare(f'qk {label}', ['logits', 'dq', 'dk', 'drpb'],
                       _grads(qk('triton'), [query, key, rpb], grad_logits),
                       _grads(qk('torch'), [query.float(), key.float(), rpb.float()], grad_logits.float()), dtype)
    records += _compare(f'av {label}', ['out', 'dattn', 'dvalue'],
                        _grads(av('triton'), [attn, value], grad_out),
                        _grads(av('torch'), [attn.float(), value.float()], grad_out.float()), dtype)
    return records


# ----------------------------------------------------------------------------------------------
# Timing on CUDA.
# ----------------------------------------------------------------------------------------------

def _bench(fn: Callable, grad_to_none: List[torch.Tensor]) -> float:
    import triton.testing
    return triton.testing.do_bench(fn, warmup=25, rep=100, grad_to_none=grad_to_none, return_mode='median')


def _timing_inputs(shape: Shape, dtype: torch.dtype, device: torch.device):
    gen = torch.Generator(device=device).manual_seed(0)
    dims = (shape.batch, shape.heads, shape.height, shape.width, shape.head_dim)
    query, key, value = (_randn(dims, dtype, device, gen).requires_grad_() for _ in range(3))
    # rpb is a float32 parameter in NAT models, also under autocast.
    span = 2 * shape.kernel_size - 1
    rpb = _randn((shape.heads, span, span), torch.float32, device, gen).requires_grad_()
    return query, key, value, rpb, _randn(dims, dtype, device, gen)


def _time_modes(run: Callable, leaves: List[torch.Tensor], grad_out: torch.Tensor) -> Dict[str, float]:
    """Median ms of run() forward, and of forward plus backward."""
    def forward_backward():
        run().backward(grad_out)
    return dict(fwd=_bench(run, leaves), fwd_bwd=_bench(forward_backward, leaves))


class Recorder:
    """Collects timing rows, enforces the time budget and rewrites the JSON after each row."""

    def __init__(self, report: dict, json_path: Optional[str], budget_s: float):
        self.report, self.json_path = report, json_path
        self.deadline = time.monotonic() + budget_s

    def measure(self, row: dict, fn: Callable[[], Dict[str, float]]) -> None:
        if time.monotonic() > self.deadline:
            row.update(skipped='time budget exhausted')
        else:
            try:
                row.update(fn())
            except Exception as error:  # a backend that fails on a shape is reported, not fatal
                row.update(error=f'{type(error).__name__}: {error}'[:500])
        self.report['timings'].append(row)
        print('  ' + ', '.join(f'{k}={v:.3f}' if isinstance(v, float) else f'{k}={v}' for k, v in row.items()),
              flush=True)
        self.save()

    def save(self) -> None:
        if self.json_path:
            with open(self.json_path, 'w') as f:
                json.dump(self.report, f, indent=1)


def _attention_call(backend: str, flex: Callable, shape: Shape, query, key, value, rpb, scale: float) -> Callable:
    """Zero-argument forward of one backend ('torch', 'triton', 'blocked' or 'flex') on fixed inputs."""
    if backend == 'flex':
        return lambda: flex(query, key, value, rpb, scale)
    return lambda: nb.neighborhood_attention_2d(query, key, value, shape.kernel_size, shape.dilation, rpb=rpb,
                                                scale=scale, backend=backend)


def run_timings(shapes: List[Shape], dtypes: List[torch.dtype], device: torch.device, recorder: Recorder,
                with_reference: bool, flex_rpb: bool) -> None:
    """Per dtype and shape: triton, flex and the blocked path (cuBLAS / SDPA) without rpb, then with rpb, then the
    reference (with rpb)."""
    variants = [('triton', False), ('flex', False), ('blocked', False), ('triton', True), ('blocked', True)]
    variants += [('flex', True)] if flex_rpb else []
    variants += [('torch', True)] if with_reference else []
    for dtype in dtypes:
        for shape in shapes:
            query, key, value, rpb, grad_out = _timing_inputs(shape, dtype, device)
            scale = shape.head_dim ** -0.5
            flex = flex_runner(shape, device, compiled=True)
            for backend, use_rpb in variants:
                bias = rpb if use_rpb else None
                run = _attention_call(backend, flex, shape, query, key, value, bias, scale)
                leaves = [query, key, value] + ([rpb] if use_rpb else [])
                recorder.measure(
                    dict(shape=shape.name, dtype=_dtype_name(dtype), backend=backend, rpb=use_rpb),
                    lambda: dict(_time_modes(run, leaves, grad_out),
                                 **_parity(run, query, key, value, bias, shape, scale)))


def _parity(run: Callable, query, key, value, rpb, shape: Shape, scale: float) -> Dict[str, float]:
    """Forward max error of this backend against the fp32 reference, so every timed row is checked."""
    out = run().detach().float()  # with autograd on, as timed: no extra flex compile for inference
    with torch.no_grad():
        ref = nb.neighborhood_attention_2d(query.float(), key.float(), value.float(), shape.kernel_size,
                                           shape.dilation, rpb=rpb, scale=scale, backend='torch')
    return dict(max_err_vs_ref=(out - ref).abs().max().item())


def run_sweep(shapes: List[Shape], device: torch.device, recorder: Recorder) -> None:
    """Fused triton fp16 timings with rpb for several launch shapes."""
    from zoo.layers.kernels import na2d_triton
    configs = [(8, 8, 32, 4, 2), (8, 8, 64, 4, 2), (8, 8, 32, 4, 3), (8, 8, 32, 8, 2), (4, 16, 32, 4, 2),
               (16, 8, 64, 8, 2), (8, 16, 64, 8, 2), (16, 16, 64, 8, 2)]
    default = na2d_triton._tile_config
    try:
        for shape in shapes:
            query, key, value, rpb, grad_out = _timing_inputs(shape, torch.float16, device)
            run = _attention_call('triton', None, shape, query, key, value, rpb, shape.head_dim ** -0.5)
            for config in configs:
                na2d_triton._tile_config = lambda dev, c=config: na2d_triton.TileConfig(*c)
                recorder.measure(dict(sweep=shape.name, config='x'.join(map(str, config))),
                                 lambda: _time_modes(run, [query, key, value, rpb], grad_out))
    finally:
        na2d_triton._tile_config = default


def _cell(value: Optional[float], width: int = 9) -> str:
    return f'{value:{width}.3f}' if value is not None else '-'.rjust(width)


def _ratio(a: Optional[float], b: Optional[float], width: int = 9) -> str:
    return f'{a / b:{width}.2f}' if a is not None and b else '-'.rjust(width)


def print_table(rows: List[dict]) -> None:
    """Timings with triton/flex, blocked/triton (same rpb mode) and triton/reference (with rpb) ratios."""
    index = {(r['shape'], r['dtype'], r['backend'], r['rpb']): r for r in rows if 'shape' in r}
    print(f"\n{'shape':18s} {'dtype':9s} {'rpb':5s} {'mode':8s} {'torch ms':>9s} {'triton ms':>10s} "
          f"{'flex ms':>9s} {'blocked ms':>10s} {'tri/flex':>9s} {'blk/tri':>9s} {'tri/torch':>10s}")
    for (shape, dtype, backend, use_rpb), row in index.items():
        if backend != 'triton':
            continue
        flex = index.get((shape, dtype, 'flex', use_rpb), {})
        blocked = index.get((shape, dtype, 'blocked', use_rpb), {})
        ref = index.get((shape, dtype, 'torch', True), {}) if use_rpb else {}
        for mode in ('fwd', 'fwd_bwd'):
            t, f, b, r = row.get(mode), flex.get(mode), blocked.get(mode), ref.get(mode)
            print(f'{shape:18s} {dtype:9s} {str(use_rpb):5s} {mode:8s} {_cell(r)} {_cell(t, 10)} {_cell(f)} '
                  f'{_cell(b, 10)} {_ratio(t, f)} {_ratio(b, t)} {_ratio(t, r, 10)}')


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--json', help='write results here (rewritten after each timing row)')
    parser.add_argument('--dry-run', action='store_true', help='no GPU: check parsing and the flex mask logic')
    parser.add_argument('--batch', type=int, default=16, help='batch of the timed shapes (default 16)')
    parser.add_argument('--shapes', nargs='*', help='timed shape names to keep (default: all)')
    parser.add_argument('--dtypes', nargs='*', default=['fp16', 'bf16'], choices=['fp16', 'bf16', 'fp32'])
    parser.add_argument('--skip-checks', action='store_true', help='time only')
    parser.add_argument('--skip-timing', action='store_true', help='check only')
    parser.add_argument('--no-reference', action='store_true', help='do not time the plain-PyTorch reference')
    parser.add_argument('--no-flex-rpb', action='store_true', help='time flex without rpb only')
    parser.add_argument('--sweep', action='store_true', help='also time several triton tile configurations')
    parser.add_argument('--seed', type=int, default=0, help='seed of the check inputs')
    parser.add_argument('--budget-s', type=float, default=300.0,
                        help='seconds for timing and sweep; later rows are recorded as skipped (default 300)')
    args = parser.parse_args(argv)
    known = {s.name for s in bench_shapes(args.batch)}
    unknown = set(args.shapes or []) - known
    if unknown:
        parser.error(f'unknown shapes {sorted(unknown)}; choose from {sorted(known)}')
    return args


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    report = dict(args=vars(args), torch=torch.__version__, python=platform.python_version(),
                  checks=[], timings=[])
    if args.dry_run:
        dry_run()
        report['dry_run'] = 'ok'
        Recorder(report, args.json, 0).save()
        print('dry run OK')
        return 0
    if not torch.cuda.is_available():
        print('CUDA is not available; use --dry-run on a machine without a GPU', file=sys.stderr)
        return 2
    import triton
    device = torch.device('cuda')
    report.update(device=torch.cuda.get_device_name(), triton=triton.__version__)
    # Each (shape, dtype, score_mod) recompiles flex: raise the limit so it never falls back to eager.
    dynamo_config = torch._dynamo.config
    setattr(dynamo_config, 'recompile_limit' if hasattr(dynamo_config, 'recompile_limit') else 'cache_size_limit', 64)
    recorder = Recorder(report, args.json, args.budget_s)
    passed = True
    if not args.skip_checks:
        print('== checks: triton vs reference (fp32 on upcast inputs)', flush=True)
        report['checks'] = run_checks(device, args.seed)
        passed = all(r['ok'] for r in report['checks'])
        report['checks_passed'] = passed
        recorder.save()
    if not args.skip_timing:
        shapes = [s for s in bench_shapes(args.batch) if not args.shapes or s.name in args.shapes]
        recorder.deadline = time.monotonic() + args.budget_s
        print(f'== timings on {report["device"]} (ms, median)', flush=True)
        run_timings(shapes, [DTYPES[name] for name in args.dtypes], device, recorder,
                    with_reference=not args.no_reference, flex_rpb=not args.no_flex_rpb)
        if args.sweep:
            print('== tile sweep (fused triton, fp16, rpb)', flush=True)
            run_sweep(shapes, device, recorder)
        print_table(report['timings'])
    print(f"\nchecks {'passed' if passed else 'FAILED'}")
    return 0 if passed else 1


if __name__ == '__main__':
    sys.exit(main())
