"""backend='triton' (zoo.layers.kernels.halo_triton) against the plain-PyTorch reference of halo attention.

Without CUDA the kernels run in the Triton interpreter on CPU tensors (TRITON_INTERPRET is set by
tests/conftest.py), which runs programs one after another: shapes here are tiny. With CUDA the same tests
run on the GPU, plus larger shapes.
"""
import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import TRITON_HALF_DTYPES as HALF_DTYPES, fixtures_path, fixtures_root
from zoo.layers import HaloAttention, halo_attention_2d
from zoo.layers.kernels import halo_triton

CUDA = torch.cuda.is_available()
DEVICE = torch.device('cuda' if CUDA else 'cpu')
FP32_TOL = dict(atol=1e-4, rtol=1e-4) if CUDA else dict(atol=1e-5, rtol=1e-5)

# (B, heads, H, W, stride, block, halo, d_qk, d_v, scale_pos_embed, border): non-square maps, odd block (query
# rows not a power of two), strided queries, head dims that are not powers of two, both border rules, a block
# split into several query chunks.
CASES = [
    (2, 2, 8, 12, 1, 4, 1, 6, 5, False, 'zeros'),
    (1, 2, 8, 8, 2, 4, 2, 4, 8, True, 'mask'),
    (1, 1, 6, 9, 1, 3, 1, 4, 4, False, 'mask'),
    (1, 1, 10, 5, 1, 5, 0, 3, 3, False, 'zeros'),
    (1, 2, 18, 9, 1, 9, 1, 4, 3, False, 'mask'),  # 81 queries a block: two programs (MAX_QUERY_ROWS) share it
]
if CUDA:
    CASES += [
        (2, 4, 32, 32, 1, 8, 3, 16, 16, False, 'zeros'),
        (2, 8, 32, 64, 2, 8, 3, 32, 64, False, 'zeros'),
        (1, 4, 40, 40, 1, 10, 3, 32, 32, True, 'mask'),
        (1, 8, 28, 28, 1, 14, 2, 64, 160, False, 'zeros'),
    ]
CASE_IDS = ['x'.join(map(str, c[:4])) + f'-s{c[4]}-b{c[5]}h{c[6]}-d{c[7]}v{c[8]}-{c[10]}' for c in CASES]


def _inputs(case, dtype=torch.float32):
    """query, key, value, height_rel, width_rel and grad_out for one case."""
    batch, heads, height, width, stride, block, halo, qk_dim, v_dim = case[:9]
    win = block + 2 * halo
    gen = torch.Generator().manual_seed(0)

    def randn(*shape, std=1.0):
        return (torch.randn(*shape, generator=gen) * std).to(device=DEVICE, dtype=dtype)
    return (randn(batch, heads, height // stride, width // stride, qk_dim), randn(batch, heads, height, width, qk_dim),
            randn(batch, heads, height, width, v_dim), randn(2 * win - 1, qk_dim, std=0.5),
            randn(2 * win - 1, qk_dim, std=0.5), randn(batch, heads, height // stride, width // stride, v_dim))


def _run(case, backend, inputs):
    """Output and the gradients of q, k, v and both tables, on fresh leaves."""
    *_, block, halo, _, _, scale_pos_embed, border = case[4:]
    leaves = [t.detach().clone().requires_grad_() for t in inputs[:5]]
    out = halo_attention_2d(*leaves[:3], case[5], case[6], leaves[3], leaves[4], scale_pos_embed=case[9],
                            border=case[10], backend=backend)
    out.backward(inputs[5])
    return [out.detach()] + [t.grad for t in leaves]


@pytest.mark.parametrize('case', CASES, ids=CASE_IDS)
def test_triton_matches_reference_forward_and_backward(case):
    inputs = _inputs(case)
    for got, expected in zip(_run(case, 'triton', inputs), _run(case, 'torch', inputs)):
        torch.testing.assert_close(got, expected, **FP32_TOL)


HALF_TOL = {torch.float16: dict(atol=4e-3, rtol=4e-3), torch.bfloat16: dict(atol=3e-2, rtol=3e-2)}


@pytest.mark.parametrize('dtype', HALF_DTYPES, ids=str)
def test_half_precision_against_fp32_reference(dtype):
    case = CASES[0]
    inputs = _inputs(case, dtype)
    expected = _run(case, 'torch', [t.float() for t in inputs])
    got = _run(case, 'triton', inputs)
    for g, e in zip(got, expected):
        assert g.dtype == dtype
        torch.testing.assert_close(g.float(), e, **HALF_TOL[dtype])


def test_module_with_triton_backend_reproduces_fixture():
    fixtures_root()
    path = fixtures_path() / 'halo' / 'halo_b4_h1_c32to48_nh2_dh12_bias.json'
    case = json.loads(path.read_text())
    layer = HaloAttention(**case['zoo_kwargs'], backend='triton').eval().to(DEVICE)
    layer.load_state_dict(load_file(str(path.with_name(case['files']['state']))), strict=True)
    io = load_file(str(path.with_name(case['files']['io'])))
    with torch.no_grad():
        out = layer(io['input'].to(DEVICE))
    torch.testing.assert_close(out.cpu(), io['output'], rtol=0, atol=case['atol'])


def _opcheck_args(op_name):
    case = (1, 1, 4, 6, 1, 2, 1, 4, 4, False, 'zeros')
    query, key, value, height_rel, width_rel, grad_out = _inputs(case)
    from zoo.layers.halo_attn import _blocks, halo_relative_logits
    rel_h, rel_w = halo_relative_logits(_blocks(query, 2), height_rel, width_rel, 4)
    rel_h, rel_w = rel_h.detach(), rel_w.detach()
    out, lse = halo_triton._forward(query, key, value, rel_h, rel_w, 2, 1, 0.5, False)
    leaves = [t.clone().requires_grad_() for t in (query, key, value, rel_h, rel_w)]
    return {
        'halo_fwd': (*leaves, 2, 1, 0.5, False),
        'halo_bwd': (grad_out, query, key, value, rel_h, rel_w, out, lse, 2, 1, 0.5, False),
    }[op_name]


@pytest.mark.parametrize('op_name', ['halo_fwd', 'halo_bwd'])
def test_opcheck(op_name):
    torch.library.opcheck(getattr(torch.ops.zoo, op_name).default, _opcheck_args(op_name))


def test_export_sees_single_op():
    class Attention(torch.nn.Module):
        def forward(self, query, key, value, height_rel, width_rel):
            return halo_attention_2d(query, key, value, 4, 1, height_rel, width_rel, backend='triton')

    case = CASES[0]
    inputs = _inputs(case)[:5]
    program = torch.export.export(Attention(), inputs)
    targets = [node.target for node in program.graph.nodes if node.op == 'call_function']
    assert torch.ops.zoo.halo_fwd.default in targets
    torch.testing.assert_close(program.module()(*inputs),
                               halo_attention_2d(*inputs[:3], 4, 1, *inputs[3:], backend='torch'), **FP32_TOL)
