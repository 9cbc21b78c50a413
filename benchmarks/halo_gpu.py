"""GPU check and benchmark of the Triton halo-attention kernel (zoo.layers.kernels.halo_triton).

Run from the repository root on a CUDA machine:

    PYTHONPATH=. python benchmarks/halo_gpu.py --json $OUT/halo_gpu.json

1. Checks: triton against the plain-PyTorch reference (fp32, on upcast inputs), forward and backward (q, k, v
   and both relative tables), fp32 / fp16 / bf16, both border rules, strided queries, on HaloNet stage shapes.
   Prints relative L2 and max errors; exits 1 when a check fails.
2. Timing (triton.testing.do_bench, median): forward and forward+backward of the reference and of triton at
   HaloNet H1 / H5 stage shapes, ratio reference / triton.

--dry-run needs no GPU: Triton runs in its interpreter on CPU tensors (TRITON_INTERPRET=1, set before triton is
imported), only the checks on one tiny shape, no timing.
"""
import argparse
import json
import os
import sys
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional

DTYPE_NAMES = ('fp32', 'fp16', 'bf16')
REL_L2_TOL = {'fp32': 1e-4, 'fp16': 1e-2, 'bf16': 3e-2}


@dataclass(frozen=True)
class Shape:
    """One halo-attention problem: maps are (batch, heads, H, W, dim); stride subsamples the queries."""
    name: str
    batch: int
    heads: int
    height: int
    width: int
    qk_dim: int
    v_dim: int
    block: int
    halo: int
    stride: int = 1
    border: str = 'zeros'


CHECK_SHAPES = [
    Shape('tiny-b4h1-odd-dims', 1, 2, 8, 12, 6, 5, 4, 1),
    Shape('H1-s1-64x64', 2, 4, 64, 64, 16, 16, 8, 3),
    Shape('H1-down-32x32-s2', 2, 8, 32, 32, 32, 32, 8, 3, stride=2),
    Shape('H3-40x40-b10-mask', 2, 8, 40, 40, 32, 32, 10, 3, border='mask'),
    Shape('H5-28x28-b14-v2.5', 2, 8, 28, 28, 32, 80, 14, 2),
]
TIME_SHAPES = [
    Shape('H1 stage1 64x64 B32', 32, 4, 64, 64, 16, 16, 8, 3),
    Shape('H1 stage3 16x16 B32', 32, 8, 16, 16, 32, 32, 8, 3),
    Shape('H5 stage2 56x56 B32', 32, 8, 56, 56, 16, 40, 14, 2),
    Shape('H7 stage1 160x160 B8', 8, 4, 160, 160, 16, 64, 10, 3),
]


def inputs(shape: Shape, device, dtype, seed: int = 0):
    """query, key, value, height_rel, width_rel, grad_out."""
    import torch
    gen = torch.Generator().manual_seed(seed)
    win = shape.block + 2 * shape.halo
    hq, wq = shape.height // shape.stride, shape.width // shape.stride

    def randn(*dims, std=1.0):
        return (torch.randn(*dims, generator=gen) * std).to(device=device, dtype=dtype)
    return (randn(shape.batch, shape.heads, hq, wq, shape.qk_dim),
            randn(shape.batch, shape.heads, shape.height, shape.width, shape.qk_dim),
            randn(shape.batch, shape.heads, shape.height, shape.width, shape.v_dim),
            randn(2 * win - 1, shape.qk_dim, std=0.5), randn(2 * win - 1, shape.qk_dim, std=0.5),
            randn(shape.batch, shape.heads, hq, wq, shape.v_dim))


def run(shape: Shape, backend: str, tensors, backward: bool = True):
    """Output and (with backward) the gradients of q, k, v and both tables."""
    from zoo.layers import halo_attention_2d
    leaves = [t.detach().clone().requires_grad_(backward) for t in tensors[:5]]
    out = halo_attention_2d(*leaves[:3], shape.block, shape.halo, leaves[3], leaves[4], border=shape.border,
                            backend=backend)
    if not backward:
        return [out]
    out.backward(tensors[5])
    return [out.detach()] + [t.grad for t in leaves]


def check(shape: Shape, dtype_name: str, device) -> Dict[str, object]:
    import torch
    dtype = dict(fp32=torch.float32, fp16=torch.float16, bf16=torch.bfloat16)[dtype_name]
    tensors = inputs(shape, device, dtype)
    got = run(shape, 'triton', tensors)
    expected = run(shape, 'torch', [t.float() for t in tensors])
    names = ['out', 'dq', 'dk', 'dv', 'd_height_rel', 'd_width_rel']
    errors = {}
    for name, g, e in zip(names, got, expected):
        rel = ((g.float() - e).norm() / e.norm().clamp_min(1e-12)).item()
        errors[name] = {'rel_l2': rel, 'max_abs': (g.float() - e).abs().max().item()}
    ok = all(v['rel_l2'] <= REL_L2_TOL[dtype_name] for v in errors.values())
    print(f"check {shape.name:<22} {dtype_name}: {'ok' if ok else 'FAIL'}  "
          + ' '.join(f"{k} {v['rel_l2']:.1e}" for k, v in errors.items()), flush=True)
    return {'shape': asdict(shape), 'dtype': dtype_name, 'ok': ok, 'errors': errors}


def timing(shape: Shape, dtype_name: str) -> Dict[str, object]:
    import torch
    from triton.testing import do_bench
    dtype = dict(fp32=torch.float32, fp16=torch.float16, bf16=torch.bfloat16)[dtype_name]
    tensors = inputs(shape, 'cuda', dtype)
    result = {'shape': asdict(shape), 'dtype': dtype_name}
    for backend in ('torch', 'triton'):
        result[f'{backend} fwd ms'] = do_bench(lambda: run(shape, backend, tensors, backward=False))
        result[f'{backend} fwd+bwd ms'] = do_bench(lambda: run(shape, backend, tensors))
    result['x fwd'] = result['torch fwd ms'] / result['triton fwd ms']
    result['x fwd+bwd'] = result['torch fwd+bwd ms'] / result['triton fwd+bwd ms']
    print(f"time {shape.name:<22} {dtype_name}: torch {result['torch fwd ms']:.2f}/{result['torch fwd+bwd ms']:.2f} ms"
          f"  triton {result['triton fwd ms']:.2f}/{result['triton fwd+bwd ms']:.2f} ms  "
          f"x {result['x fwd']:.2f}/{result['x fwd+bwd']:.2f} (fwd / fwd+bwd)", flush=True)
    return result


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--dtypes', nargs='+', choices=DTYPE_NAMES, default=list(DTYPE_NAMES))
    parser.add_argument('--time-dtype', choices=DTYPE_NAMES, default='bf16')
    parser.add_argument('--check-shapes', nargs='+', choices=[s.name for s in CHECK_SHAPES],
                        help='check only these shapes (default: all)')
    parser.add_argument('--no-timing', action='store_true')
    parser.add_argument('--dry-run', action='store_true', help='no GPU: interpreter, tiny check only')
    parser.add_argument('--json', metavar='PATH')
    return parser.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    if args.dry_run:
        os.environ.setdefault('TRITON_INTERPRET', '1')  # before triton is imported
    import torch
    if not args.dry_run and not torch.cuda.is_available():
        raise SystemExit('no CUDA device: run with --dry-run for the interpreter check')
    device = 'cpu' if args.dry_run else 'cuda'
    shapes = [s for s in CHECK_SHAPES if s.name in (args.check_shapes or [s.name])]
    shapes = shapes[:1] if args.dry_run else shapes
    # the interpreter's tl.dot mishandles bf16, so the dry run checks fp32 and fp16 only
    dtypes = [d for d in args.dtypes if not (args.dry_run and d == 'bf16')]
    report = {'device': torch.cuda.get_device_name() if device == 'cuda' else 'cpu (interpreter)',
              'torch': torch.__version__, 'command': ' '.join([sys.executable] + sys.argv),
              'checks': [check(s, d, device) for s in shapes for d in dtypes], 'timings': []}
    if not args.dry_run and not args.no_timing:
        report['timings'] = [timing(s, args.time_dtype) for s in TIME_SHAPES]
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(report, f, indent=2)
    return 0 if all(c['ok'] for c in report['checks']) else 1


if __name__ == '__main__':
    sys.exit(main())
