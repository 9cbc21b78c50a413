"""TransNeXt speed and memory against the alternatives, in one run (not a test; figures go to RESULTS.md).

1. Window operator (the 3x3 zero-padded part of aggregated attention), forward and forward+backward:
   * reference  zoo.layers.aggregated_attn.window_qk / window_av (backend='torch'): k*k shifted views of a
                zero-padded map, autograd saves views;
   * unfold     the official attention_native.py route, written here: F.unfold of keys and values
                (k*k copies of each), masked_fill(-inf) of the padded slots, two batched products;
   * blocked    the blocked neighbourhood-attention halves (zoo.layers.kernels.na2d_blocked) on the map
                zero-padded by one pixel, where every window is centred (`blocked_window`);
   * triton     (CUDA only) zoo.layers.kernels.aggregated_triton, in fp32 / fp16 / bf16.
   Outputs and gradients are compared with the reference before anything is timed.
2. Whole models on CPU, eval forward: transnext_micro / transnext_tiny (reference path, which `auto` picks on
   CPU) against timm's swin_tiny_patch4_window7_224 and convnext_tiny: images/s at each batch size and peak
   resident memory of a fresh process running that forward.

    PYTHONPATH=. .venv/bin/python benchmarks/transnext_cpu.py --batch-sizes 1 32 --json /tmp/transnext.json
"""
import argparse
import datetime
import json
import multiprocessing as mp
import platform
import resource
import statistics
import time
from typing import Callable, Dict, List

import torch
import torch.nn.functional as F

# Pass/fail bound on ||impl - fp32 reference|| / ||fp32 reference|| (outputs and gradients), per input dtype.
REL_L2_TOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 3e-2}
# (name, heads, H, W, head_dim): TransNeXt-micro stages 1-3 at 224 (head dim 24).
OP_CASES = [('56x56 h2', 2, 56, 56, 24), ('28x28 h4', 4, 28, 28, 24), ('14x14 h8', 8, 14, 14, 24)]
MODELS = ['transnext_micro', 'transnext_tiny', 'swin_tiny_patch4_window7_224', 'convnext_tiny']


def unfold_window(query, key, value, attn_fn):
    """Official-style window attention part: unfold k and v (B, h, N, d, 9 copies), masked logits, weighted sum.

    attn_fn maps the (B, h, N, 9) logits to weights, as the reference pipeline does (softmax here).
    """
    batch, heads, height, width, dim = query.shape

    def unfold(x):
        maps = x.permute(0, 1, 4, 2, 3).reshape(batch, heads * dim, height, width)
        return F.unfold(maps, 3, padding=1).view(batch, heads, dim, 9, height * width).permute(0, 1, 4, 3, 2)

    ones = torch.ones(1, 1, height, width)
    padding = F.unfold(ones, 3, padding=1).view(1, 1, 9, height * width).transpose(-1, -2) == 0
    logits = (query.flatten(2, 3).unsqueeze(-2) @ unfold(key).transpose(-2, -1)).squeeze(-2)
    weights = attn_fn(logits.masked_fill(padding, float('-inf')))
    return (weights.unsqueeze(-2) @ unfold(value)).squeeze(-2).view(batch, heads, height, width, dim)


def blocked_window(query, key, value, attn_fn):
    """The window part through the blocked neighbourhood-attention halves (zoo.layers.kernels.na2d_blocked): on a
    map zero-padded by one pixel every in-map query's 3 x 3 window is centred (never shifted), so na2d_qk / na2d_av
    of the padded maps, cropped, with -inf on the padding slots, are the zero-padded window operators."""
    from zoo.layers.aggregated_attn import window_valid_mask
    from zoo.layers.kernels import na2d_blocked

    def pad(x):
        return F.pad(x, (0, 0, 1, 1, 1, 1))
    height, width = query.shape[2:4]
    logits = na2d_blocked.na2d_qk(pad(query), pad(key), 3, 1, None)[:, :, 1:-1, 1:-1]
    weights = attn_fn(logits.masked_fill(~window_valid_mask(height, width, 3, query.device), float('-inf')))
    return na2d_blocked.na2d_av(pad(weights), pad(value), 3, 1)[:, :, 1:-1, 1:-1]


def reference_window(query, key, value, attn_fn, backend='torch'):
    from zoo.layers.aggregated_attn import window_av, window_qk
    logits = window_qk(query, key, None, 3, backend=backend)
    return window_av(attn_fn(logits), value, 3, backend=backend)


def _outputs_and_grads(fn: Callable, inputs: List[torch.Tensor]) -> List[torch.Tensor]:
    """fn's output and the gradients of its inputs for a fixed cotangent, on fresh leaf copies."""
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*leaves)
    gen = torch.Generator(device=out.device).manual_seed(0)
    out.backward(torch.randn(out.shape, generator=gen, device=out.device).to(out.dtype))
    return [out.detach()] + [t.grad for t in leaves]


def _rel_l2(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want.double()).norm() / want.double().norm().clamp_min(1e-30)).item()


def _median_time(fn: Callable, warmup: int, iters: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_ops(batch: int, iters: int, device: str, dtypes: List[torch.dtype]) -> List[Dict]:
    rows = []
    softmax = lambda x: x.softmax(-1)
    for name, heads, height, width, dim in OP_CASES:
        for dtype in dtypes:
            inputs = [torch.randn(batch, heads, height, width, dim, device=device, dtype=dtype, requires_grad=True)
                      for _ in range(3)]
            impls = {'reference': lambda *t: reference_window(*t, softmax),
                     'blocked': lambda *t: blocked_window(*t, softmax)}
            if device == 'cpu':
                impls['unfold'] = lambda *t: unfold_window(*t, softmax)
            else:
                impls['triton'] = lambda *t: reference_window(*t, softmax, backend='triton')
            exact = _outputs_and_grads(impls['reference'], [t.float() for t in inputs])
            for impl_name, fn in impls.items():
                error = max(_rel_l2(got, want) for got, want in zip(_outputs_and_grads(fn, inputs), exact))
                print(f'  check {name} {dtype} {impl_name}: output and gradients rel L2 {error:.1e} '
                      f'against the fp32 reference', flush=True)
                if not error <= REL_L2_TOL[dtype]:
                    raise AssertionError(f'{impl_name} differs from the fp32 reference on {name} {dtype}: {error:.1e}')
            for impl_name, fn in impls.items():
                def fwd():
                    with torch.no_grad():
                        fn(*inputs)

                def fwd_bwd():
                    fn(*inputs).sum().backward()
                rows.append(dict(case=name, dtype=str(dtype).replace('torch.', ''), impl=impl_name,
                                 fwd_ms=1e3 * _median_time(fwd, 1, iters),
                                 fwd_bwd_ms=1e3 * _median_time(fwd_bwd, 1, iters)))
    return rows


def _model_child(name: str, batch: int, size: int, iters: int, queue) -> None:
    """Run in a fresh process: images/s of eval forwards and the process's peak RSS growth (MiB)."""
    import timm
    import zoo  # noqa: F401
    torch.set_num_threads(torch.get_num_threads())
    model = timm.create_model(name).eval()
    x = torch.randn(batch, 3, size, size)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with torch.no_grad():
        seconds = _median_time(lambda: model(x), 1, iters)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    queue.put(dict(model=name, batch=batch, img_per_s=batch / seconds, peak_rss_growth_mib=(peak - before) / 1024))


def bench_models(batch_sizes: List[int], size: int, iters: int) -> List[Dict]:
    ctx = mp.get_context('spawn')
    rows = []
    for batch in batch_sizes:
        for name in MODELS:
            queue = ctx.Queue()
            proc = ctx.Process(target=_model_child, args=(name, batch, size, iters, queue))
            proc.start()
            rows.append(queue.get())
            proc.join()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--batch-sizes', type=int, nargs='+', default=[1, 32])
    parser.add_argument('--op-batch', type=int, default=8)
    parser.add_argument('--img-size', type=int, default=224)
    parser.add_argument('--iters', type=int, default=3)
    parser.add_argument('--skip-models', action='store_true')
    parser.add_argument('--json', default=None)
    args = parser.parse_args()
    device = 'cuda' if torch.cuda.is_available() else 'cpu'
    dtypes = [torch.float32] if device == 'cpu' else [torch.float16, torch.bfloat16]
    report = dict(date=datetime.date.today().isoformat(), machine=platform.machine(), threads=torch.get_num_threads(),
                  device=torch.cuda.get_device_name() if device == 'cuda' else 'cpu')
    report['ops'] = bench_ops(args.op_batch, args.iters, device, dtypes)
    print(f'window operator, batch {args.op_batch} ({device}); ratio = time / reference time')
    by_case = {}
    for row in report['ops']:
        by_case.setdefault((row['case'], row['dtype']), {})[row['impl']] = row
    for (case, dtype), impls in by_case.items():
        ref = impls['reference']
        for impl, row in impls.items():
            print(f'  {case:9s} {dtype:8s} {impl:9s} fwd {row["fwd_ms"]:8.2f} ms (x{row["fwd_ms"] / ref["fwd_ms"]:.2f})'
                  f'  fwd+bwd {row["fwd_bwd_ms"]:8.2f} ms (x{row["fwd_bwd_ms"] / ref["fwd_bwd_ms"]:.2f})')
    if not args.skip_models:
        report['models'] = bench_models(args.batch_sizes, args.img_size, args.iters)
        print(f'models at {args.img_size}x{args.img_size}, eval forward; ratio = img/s / {MODELS[0]} img/s')
        for batch in args.batch_sizes:
            rows = [r for r in report['models'] if r['batch'] == batch]
            base = rows[0]['img_per_s']
            for r in rows:
                print(f'  batch {batch:3d} {r["model"]:30s} {r["img_per_s"]:8.2f} img/s (x{r["img_per_s"] / base:.2f})'
                      f'  peak RSS +{r["peak_rss_growth_mib"]:.0f} MiB')
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(report, f, indent=1)


if __name__ == '__main__':
    main()
