"""backend='triton' (zoo.layers.kernels.na2d_triton) against the plain-PyTorch reference.

Without CUDA the kernels run in the Triton interpreter on CPU tensors, which costs a Python call
per Triton operation and runs the programs one after another: shapes here are tiny (batch 2 x 2
heads, or 1 x 1 where a case launches many programs). With CUDA the same tests run on the GPU,
plus a few larger shapes. bf16 runs on CUDA only (see HALF_DTYPES).

TRITON_INTERPRET is set by tests/conftest.py when there is no GPU, before anything imports triton
(@triton.jit reads it when a kernel, or triton's own library, is defined).
"""
import pytest
import torch

from conftest import TRITON_HALF_DTYPES as HALF_DTYPES
from zoo.layers import neighborhood as nb
from zoo.layers.kernels import na2d_triton

CUDA = torch.cuda.is_available()
DEVICE = torch.device('cuda' if CUDA else 'cpu')
# fp32 tolerance; CUDA cases are larger, so sums are longer and orders differ more.
FP32_TOL = dict(atol=1e-4, rtol=1e-4) if CUDA else dict(atol=1e-5, rtol=1e-5)

# (height, width, kernel_size, dilation, head_dim, value_dim, with_rpb): non-square maps, k 3 and 5,
# dilation 1 and 2 (3 in test_dilation_3), head dims that are not powers of two.
CASES = [
    (7, 9, 3, 1, 4, 4, True),
    (10, 6, 3, 2, 6, 6, True),
    (7, 9, 5, 1, 6, 6, False),
    (10, 6, 5, 1, 4, 6, True),
]
if CUDA:
    CASES += [
        (24, 20, 7, 1, 32, 32, True),
        (29, 33, 5, 3, 16, 24, True),
        (56, 56, 7, 1, 32, 32, True),
        (40, 64, 13, 1, 32, 32, True),
        (45, 31, 7, 2, 24, 24, False),
    ]
CASE_IDS = [f'{h}x{w}-k{k}-d{d}-dim{c}v{cv}-{"rpb" if b else "norpb"}' for h, w, k, d, c, cv, b in CASES]


def _randn(*shape, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen).to(device=DEVICE, dtype=dtype)


def _attention_inputs(height, width, kernel_size, head_dim, value_dim, with_rpb, batch=2, heads=2,
                      dtype=torch.float32):
    """query, key (B, heads, H, W, head_dim), value and grad_out (..., value_dim), rpb or None."""
    query = _randn(batch, heads, height, width, head_dim, dtype=dtype, seed=1)
    key = _randn(batch, heads, height, width, head_dim, dtype=dtype, seed=2)
    value = _randn(batch, heads, height, width, value_dim, dtype=dtype, seed=3)
    rpb = _randn(heads, 2 * kernel_size - 1, 2 * kernel_size - 1, dtype=dtype, seed=4) if with_rpb else None
    grad_out = _randn(batch, heads, height, width, value_dim, dtype=dtype, seed=5)
    return query, key, value, rpb, grad_out


def _forward_backward(fn, inputs, grad_out):
    """Run fn on fresh leaf copies of inputs (None passes through); return (output, input grads)."""
    leaves = [None if t is None else t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*leaves)
    out.backward(grad_out)
    return out.detach(), [t.grad for t in leaves if t is not None]


def _assert_all_close(actual, expected, **tol):
    assert len(actual) == len(expected)
    for got, want in zip(actual, expected):
        assert got.dtype == want.dtype and got.shape == want.shape
        torch.testing.assert_close(got, want, **tol)


def _check_fused(case, scale=None, dtype=torch.float32, tol=FP32_TOL, batch=2, heads=2):
    """Fused triton forward and backward against the fp32 reference on the same inputs."""
    height, width, k, d, head_dim, value_dim, with_rpb = case
    query, key, value, rpb, grad_out = _attention_inputs(
        height, width, k, head_dim, value_dim, with_rpb, batch=batch, heads=heads, dtype=dtype)

    def run(backend):
        return lambda q, kk, v, b: nb.neighborhood_attention_2d(q, kk, v, k, d, rpb=b, scale=scale, backend=backend)
    out, grads = _forward_backward(run('triton'), (query, key, value, rpb), grad_out)
    ref_out, ref_grads = _forward_backward(
        run('torch'), [None if t is None else t.float() for t in (query, key, value, rpb)], grad_out.float())
    _assert_all_close([t.float() for t in [out, *grads]], [ref_out, *ref_grads], **tol)
    assert out.dtype == dtype and all(g.dtype == dtype for g in grads)


def _check_qk(case, dtype=torch.float32, tol=FP32_TOL, batch=2, heads=2):
    """Unfused logits and their gradients (query, key, rpb) against the fp32 reference."""
    height, width, k, d, head_dim, _, with_rpb = case
    query, key, _, rpb, _ = _attention_inputs(
        height, width, k, head_dim, head_dim, with_rpb, batch=batch, heads=heads, dtype=dtype)
    grad_logits = _randn(batch, heads, height, width, k * k, dtype=dtype, seed=6)

    def run(backend):
        return lambda q, kk, b: nb.na2d_qk(q, kk, k, d, rpb=b, backend=backend)
    out, grads = _forward_backward(run('triton'), (query, key, rpb), grad_logits)
    ref_out, ref_grads = _forward_backward(
        run('torch'), [None if t is None else t.float() for t in (query, key, rpb)], grad_logits.float())
    _assert_all_close([t.float() for t in [out, *grads]], [ref_out, *ref_grads], **tol)


def _check_av(case, dtype=torch.float32, tol=FP32_TOL, batch=2, heads=2):
    """Unfused weighted sum and its gradients (attn, value) against the fp32 reference."""
    height, width, k, d, _, value_dim, _ = case
    attn = _randn(batch, heads, height, width, k * k, seed=7).softmax(-1).to(dtype)
    value = _randn(batch, heads, height, width, value_dim, dtype=dtype, seed=8)
    grad_out = _randn(batch, heads, height, width, value_dim, dtype=dtype, seed=9)

    def run(backend):
        return lambda a, v: nb.na2d_av(a, v, k, d, backend=backend)
    out, grads = _forward_backward(run('triton'), (attn, value), grad_out)
    ref_out, ref_grads = _forward_backward(run('torch'), (attn.float(), value.float()), grad_out.float())
    _assert_all_close([t.float() for t in [out, *grads]], [ref_out, *ref_grads], **tol)


@pytest.mark.parametrize('case', CASES, ids=CASE_IDS)
def test_fused_matches_reference(case):
    _check_fused(case)


def test_fused_custom_scale():
    _check_fused(CASES[0], scale=0.37)


def test_frozen_rpb():
    # rpb that needs no gradient takes the backward path without the rpb atomics.
    height, width, k, d, head_dim, value_dim, _ = CASES[0]
    query, key, value, rpb, grad_out = _attention_inputs(height, width, k, head_dim, value_dim, True)

    def run(backend):
        return lambda q, kk, v: nb.neighborhood_attention_2d(q, kk, v, k, d, rpb=rpb, backend=backend)
    out, grads = _forward_backward(run('triton'), (query, key, value), grad_out)
    ref_out, ref_grads = _forward_backward(run('torch'), (query, key, value), grad_out)
    _assert_all_close([out, *grads], [ref_out, *ref_grads], **FP32_TOL)


def test_dilation_3():
    # Nine groups of uneven sizes (3 or 4 cells per axis); one batch and head keep the interpreter quick.
    case = (9, 11, 3, 3, 4, 4, True)
    _check_fused(case, batch=1, heads=1)
    _check_qk(case, batch=1, heads=1)


@pytest.mark.parametrize('case', CASES, ids=CASE_IDS)
def test_qk_matches_reference(case):
    _check_qk(case)


@pytest.mark.parametrize('case', CASES, ids=CASE_IDS)
def test_av_matches_reference(case):
    _check_av(case)


# Tiles smaller than a dilation group, so queries (and keys) span several tiles, with clamped cells
# past the group's edge: (8, 8, 32) is the CUDA launch shape, (2, 8, 16) a non-square tile. The qk
# check runs all three unfused kernels (its backward uses av and scatter). One batch and head keeps
# the interpreter, which runs the many small-tile programs one after another, quick.
@pytest.mark.parametrize('config, case', [
    ((8, 8, 32), (11, 13, 5, 1, 6, 6, True)),
    ((8, 8, 32), (19, 17, 3, 2, 4, 4, True)),
    ((4, 4, 16), (11, 9, 3, 2, 4, 4, True)),
    ((2, 8, 16), (9, 11, 5, 1, 6, 6, True)),
], ids=['8x8x32-k5d1', '8x8x32-k3d2', '4x4x16-k3d2', '2x8x16-k5d1'])
def test_small_tiles(monkeypatch, config, case):
    monkeypatch.setattr(na2d_triton, '_tile_config', lambda device: na2d_triton.TileConfig(*config, 4, 1))
    _check_fused(case, batch=1, heads=1)
    _check_qk(case, batch=1, heads=1)


# About two units in the last place of each format (fp16 eps 9.8e-4, bf16 eps 7.8e-3): outputs and gradients are
# O(1) and the kernels accumulate in fp32, so only the final rounding (and P rounded before P @ V) remains.
# fp16 passes at 1e-3 in the interpreter; bf16 runs on CUDA only, scaled from fp16 by the 8x coarser eps.
HALF_TOL = {torch.float16: dict(atol=2e-3, rtol=2e-3), torch.bfloat16: dict(atol=1.6e-2, rtol=1.6e-2)}


@pytest.mark.parametrize('dtype', HALF_DTYPES, ids=str)
def test_half_precision(dtype):
    case = (7, 9, 3, 1, 6, 6, True)
    _check_fused(case, dtype=dtype, tol=HALF_TOL[dtype])
    _check_qk(case, dtype=dtype, tol=HALF_TOL[dtype])
    _check_av(case, dtype=dtype, tol=HALF_TOL[dtype])


def _opcheck_args(op_name):
    """Arguments of each zoo:: op on a 5 x 6 map; differentiable inputs require grad."""
    k, d = 3, 1
    query, key, value, rpb, grad_out = _attention_inputs(5, 6, k, 4, 4, True, batch=1, heads=1)
    attn = _randn(1, 1, 5, 6, k * k, seed=10).softmax(-1)
    out, lse = na2d_triton._fused_forward(query, key, value, rpb, k, d, 0.5)
    leaf = [t.clone().requires_grad_() for t in (query, key, value, rpb, attn)]
    return {
        'na2d_fused_fwd': (*leaf[:4], k, d, 0.5),
        'na2d_fused_bwd': (grad_out, query, key, value, out, lse, rpb, k, d, 0.5, True),
        'na2d_qk': (leaf[0], leaf[1], leaf[3], k, d),
        'na2d_av': (leaf[4], leaf[2], k, d),
        'na2d_scatter': (leaf[4], leaf[2], k, d),
        'na2d_rpb_grad': (attn, k, d),
    }[op_name]


@pytest.mark.parametrize('op_name', ['na2d_fused_fwd', 'na2d_fused_bwd', 'na2d_qk', 'na2d_av', 'na2d_scatter',
                                     'na2d_rpb_grad'])
def test_opcheck(op_name):
    torch.library.opcheck(getattr(torch.ops.zoo, op_name).default, _opcheck_args(op_name))


def test_export_sees_single_op():
    class Attention(torch.nn.Module):
        def forward(self, query, key, value, rpb):
            return nb.neighborhood_attention_2d(query, key, value, 3, 2, rpb=rpb, backend='triton')

    query, key, value, rpb, _ = _attention_inputs(7, 9, 3, 4, 4, True)
    program = torch.export.export(Attention(), (query, key, value, rpb))
    targets = [node.target for node in program.graph.nodes if node.op == 'call_function']
    assert torch.ops.zoo.na2d_fused_fwd.default in targets
    torch.testing.assert_close(program.module()(query, key, value, rpb),
                               nb.neighborhood_attention_2d(query, key, value, 3, 2, rpb=rpb, backend='torch'),
                               **FP32_TOL)
