"""The blocked neighbourhood-attention backend (zoo.layers.kernels.na2d_blocked) against the reference.

The reference (backend='torch') is itself checked against a brute force and the official fixtures in test_na2d.py;
here the blocked path must give its outputs and gradients on every kind of shape (odd and even maps, maps exactly
k * d wide, dilation groups of unequal length, several tiles per axis and partial last tiles), the fixtures through
the documented calls, and half precision within the reference's own error.
"""
import importlib.util
import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, fixtures_path, fixtures_root
from zoo.layers import na2d_av, na2d_qk, neighborhood_attention_2d
from zoo.layers.kernels import na2d_blocked
from zoo.layers.kernels.dispatch import Call, select
from zoo.layers.neighborhood_attn import NeighborhoodAttention2d

NA2D_CASES = sorted((fixtures_path() / 'na2d').glob('*.json'))

SHAPES = [  # (H, W, kernel, dilation): odd/even, H = k * d, unequal dilation groups, one window covering the map
    (9, 11, 3, 1), (8, 6, 3, 2), (10, 9, 3, 3), (11, 10, 5, 2), (7, 7, 7, 1), (21, 22, 7, 3),
]
TILES = [None, 3]  # the default tile (one or two per axis here) and a small one: many tiles, partial last tiles


def _inputs(height, width, kernel_size, with_rpb, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, 2, height, width, 4, generator=gen, dtype=dtype) for _ in range(3))
    rpb = torch.randn(2, 2 * kernel_size - 1, 2 * kernel_size - 1, generator=gen, dtype=dtype) if with_rpb else None
    return q, k, v, rpb


def _value_and_grads(fn, *tensors):
    """fn(*tensors) and the gradients of <fn(*tensors), a fixed random direction> in every tensor."""
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    out = fn(*leaves)
    direction = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype)
    return [out] + list(torch.autograd.grad(out, leaves, direction))


def _assert_all_close(got, expected, atol):
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=0, atol=atol)


@pytest.mark.parametrize('height,width,kernel_size,dilation', SHAPES)
@pytest.mark.parametrize('with_rpb', [True, False])
@pytest.mark.parametrize('tile', TILES)
def test_fused_equals_reference_forward_and_backward(height, width, kernel_size, dilation, with_rpb, tile):
    q, k, v, rpb = _inputs(height, width, kernel_size, with_rpb)
    tensors = (q, k, v) + ((rpb,) if with_rpb else ())

    def run(backend_fn):
        return _value_and_grads(lambda q, k, v, *b: backend_fn(q, k, v, b[0] if b else None), *tensors)

    blocked = run(lambda q, k, v, b: na2d_blocked.neighborhood_attention_2d(q, k, v, kernel_size, dilation, b, 0.7,
                                                                            tile=tile))
    reference = run(lambda q, k, v, b: neighborhood_attention_2d(q, k, v, kernel_size, dilation, b, 0.7,
                                                                 backend='torch'))
    _assert_all_close(blocked, reference, atol=1e-12)


@pytest.mark.parametrize('chunk', [200, 20000])
@pytest.mark.parametrize('height,width,kernel_size,dilation', [(21, 22, 7, 3), (11, 10, 5, 2)])
def test_chunks_equal_reference_forward_and_backward(monkeypatch, chunk, height, width, kernel_size, dilation):
    """Chunked runs give the reference's outputs and gradients: bands of one tile row (200 logits), of two tile rows
    (20000 logits at 21 x 22) and two whole images (20000 at 11 x 10). The chunks must cover every tile once and
    the backward's accumulations must add up."""
    monkeypatch.setattr(na2d_blocked, 'CHUNK_LOGITS', chunk)
    q, k, v, rpb = _inputs(height, width, kernel_size, with_rpb=True)
    q, k, v = (torch.cat([t, 2 * t, -t]) for t in (q, k, v))  # three images: several chunks of whole images
    chunks = list(na2d_blocked._plan(q, kernel_size, dilation, 3).bands(3, 2))
    assert len(chunks) > 1
    got, expected = (_value_and_grads(lambda q, k, v, b: fn(q, k, v, kernel_size, dilation, b, 0.7), q, k, v, rpb)
                     for fn in (lambda *a: na2d_blocked.neighborhood_attention_2d(*a, tile=3),
                                lambda *a: neighborhood_attention_2d(*a, backend='torch')))
    _assert_all_close(got, expected, atol=1e-12)


def test_chunk_budget_is_the_cpus_only_on_the_cpu(monkeypatch):
    """CHUNK_LOGITS (a CPU cache size) splits a CPU call; other devices chunk by DEVICE_CHUNK_LOGITS only."""
    monkeypatch.setattr(na2d_blocked, 'CHUNK_LOGITS', 200)
    geometry = na2d_blocked._Geometry(21, 22, 7, 3, None)
    assert len(list(na2d_blocked._Map(geometry, torch.device('cpu')).bands(3, 2))) > 1
    assert len(list(na2d_blocked._Map(geometry, torch.device('meta')).bands(3, 2))) == 1


@pytest.mark.parametrize('height,width,kernel_size,dilation', SHAPES)
@pytest.mark.parametrize('tile', TILES)
def test_halves_equal_reference_forward_and_backward(height, width, kernel_size, dilation, tile):
    q, k, v, rpb = _inputs(height, width, kernel_size, with_rpb=True)
    qk = [_value_and_grads(lambda a, b, c: fn(a, b, c), q, k, rpb) for fn in (
        lambda a, b, c: na2d_blocked.na2d_qk(a, b, kernel_size, dilation, c, tile=tile),
        lambda a, b, c: na2d_qk(a, b, kernel_size, dilation, c, backend='torch'))]
    _assert_all_close(*qk, atol=1e-12)
    attn = qk[1][0].detach().softmax(-1)
    av = [_value_and_grads(fn, attn, v) for fn in (
        lambda a, b: na2d_blocked.na2d_av(a, b, kernel_size, dilation, tile=tile),
        lambda a, b: na2d_av(a, b, kernel_size, dilation, backend='torch'))]
    _assert_all_close(*av, atol=1e-12)


@pytest.mark.parametrize('height,width,kernel_size,dilation', [(4, 5, 3, 1), (6, 7, 3, 2)])
def test_gradcheck(height, width, kernel_size, dilation):
    q, k, v, rpb = _inputs(height, width, kernel_size, with_rpb=True)
    # one head of two channels: few enough inputs for the numerical Jacobian to stay quick
    q, k, v = (t[:, :1, ..., :2].contiguous().requires_grad_() for t in (q, k, v))
    rpb = rpb[:1].contiguous().requires_grad_()
    attn = torch.rand(*q.shape[:4], kernel_size ** 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda a, b, c, d: neighborhood_attention_2d(a, b, c, kernel_size, dilation, d, backend='blocked'),
        (q, k, v, rpb), fast_mode=True)
    assert torch.autograd.gradcheck(lambda a, b, c: na2d_qk(a, b, kernel_size, dilation, c, backend='blocked'),
                                    (q, k, rpb), fast_mode=True)
    assert torch.autograd.gradcheck(lambda a, b: na2d_av(a, b, kernel_size, dilation, backend='blocked'), (attn, v),
                                    fast_mode=True)


@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16])
def test_half_precision_within_the_references_own_error(dtype):
    """Both backends in half precision against the float64 result: the blocked error is at most twice the
    reference's (fused, both halves)."""
    q, k, v, rpb = _inputs(13, 12, 5, with_rpb=True, dtype=torch.float32)
    attn = torch.rand(*q.shape[:4], 25).softmax(-1)
    ops = {
        'fused': (lambda b, q, k, v, r: neighborhood_attention_2d(q, k, v, 5, 2, r, backend=b), (q, k, v, rpb)),
        'qk': (lambda b, q, k, r: na2d_qk(q, k, 5, 2, r, backend=b), (q, k, rpb)),
        'av': (lambda b, *t: na2d_av(*t, 5, 2, backend=b), (attn, v)),
    }
    for name, (op, tensors) in ops.items():
        exact = op('torch', *(t.double() for t in tensors))
        errors = {}
        for backend in ('torch', 'blocked'):
            low = op(backend, *(t.to(dtype) for t in tensors))
            assert low.dtype == dtype, (name, backend)
            errors[backend] = (low.double() - exact).abs().max().item()
        assert errors['blocked'] <= 2 * errors['torch'], (name, errors)


def test_module_under_autocast_within_the_references_own_error():
    """A NeighborhoodAttention2d forward under CPU bf16 autocast (q, k, v leave the bf16 projection) is as close to
    the float32 forward with the blocked path as with the reference."""
    torch.manual_seed(0)
    module = NeighborhoodAttention2d(32, 4, 7, dilation=2, backend='torch').eval()
    x = torch.randn(2, 16, 15, 32)
    with torch.no_grad():
        exact = module(x)
        errors = {}
        for backend in ('torch', 'blocked'):
            module.backend = backend
            with torch.autocast('cpu', dtype=torch.bfloat16):
                errors[backend] = (module(x).float() - exact).abs().max().item()
    assert errors['blocked'] <= 2 * errors['torch'], errors


@pytest.mark.parametrize('path', NA2D_CASES, ids=[p.stem for p in NA2D_CASES])
def test_official_na2d_fixtures(path):
    """The fixture's documented call (and its two halves) with backend='blocked'."""
    fixtures_root()
    case = json.loads(path.read_text())
    t = load_file(str(path.with_suffix('.safetensors')))
    k, d, scale, atol = case['kernel_size'], case['dilation'], case['scale'], case['atol']
    rpb = t.get('rpb')
    out = neighborhood_attention_2d(t['q'], t['k'], t['v'], k, dilation=d, rpb=rpb, scale=scale, backend='blocked')
    torch.testing.assert_close(out, t['output'], rtol=0, atol=atol)
    logits = na2d_qk(t['q'] * scale, t['k'], k, d, rpb, backend='blocked')
    torch.testing.assert_close(logits, t['logits'], rtol=0, atol=atol)
    torch.testing.assert_close(na2d_av(t['attn'], t['v'], k, d, backend='blocked'), t['output'], rtol=0, atol=atol)


@pytest.mark.parametrize('dtype', [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize('height,width,kernel_size,dilation', [(21, 22, 7, 1), (21, 21, 5, 4), (22, 21, 9, 2)])
def test_auto_sends_to_blocked_only_where_it_equals_the_reference(dtype, height, width, kernel_size, dilation):
    """Wherever 'auto' picks the blocked path (CPU float32, here past the dense path's 400 tokens), the operators under
    'auto' give the reference's result; elsewhere 'auto' does not pick it."""
    q, k, v, rpb = (t.to(dtype) for t in _inputs(height, width, kernel_size, with_rpb=True, dtype=torch.float32))
    picked = select('na2d', Call.of(q, has_rpb=True))
    assert (picked == 'blocked') == (dtype == torch.float32)
    for operator in ('na2d_qk', 'na2d_av'):
        assert (select(operator, Call.of(q, has_rpb=True)) == 'blocked') == (dtype == torch.float32)
    if picked != 'blocked':
        return
    attn = torch.rand(*q.shape[:4], kernel_size ** 2).softmax(-1)
    for auto, reference in (
            (neighborhood_attention_2d(q, k, v, kernel_size, dilation, rpb),
             neighborhood_attention_2d(q, k, v, kernel_size, dilation, rpb, backend='torch')),
            (na2d_qk(q, k, kernel_size, dilation, rpb), na2d_qk(q, k, kernel_size, dilation, rpb, backend='torch')),
            (na2d_av(attn, v, kernel_size, dilation), na2d_av(attn, v, kernel_size, dilation, backend='torch'))):
        torch.testing.assert_close(auto, reference, rtol=0, atol=2e-6)


def test_memory_stays_bounded_by_the_tiles():
    """The key blocks of a 56 x 56 map with k 7 are a small multiple of the input, never (HW)^2: T x T queries read
    (T + k - 1)^2 keys; a dilation group short enough is one tile whose block is the group itself."""
    assert na2d_blocked.default_tile(56, 1) == na2d_blocked.TILE
    plan = na2d_blocked.axis_plan(56, 7, 1, na2d_blocked.TILE)
    assert (plan.tile, plan.tiles, plan.key_len) == (na2d_blocked.TILE, -(-56 // na2d_blocked.TILE),
                                                     na2d_blocked.TILE + 6)
    assert na2d_blocked.default_tile(56, 8) == 7  # 56 / 8 = 7 positions per group
    dilated = na2d_blocked.axis_plan(56, 7, 8, 7)
    assert (dilated.groups, dilated.tile, dilated.tiles, dilated.key_len) == (8, 7, 1, 7)


def test_gpu_benchmark_dry_run_checks_the_blocked_path(tmp_path, monkeypatch):
    """benchmarks/na2d_gpu.py --dry-run (what benchmarks/gpu_session.sh's smoke step runs before a GPU session)
    compares the blocked path with the reference on CPU and fails loudly when they differ."""
    spec = importlib.util.spec_from_file_location('na2d_gpu', REPO / 'benchmarks' / 'na2d_gpu.py')
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.main(['--dry-run', '--json', str(tmp_path / 'dry.json')]) == 0
    monkeypatch.setattr(script, 'check_blocked', lambda shape: 1.0)
    with pytest.raises(AssertionError, match='the blocked path differs from the reference'):
        script.dry_run()


@pytest.mark.parametrize('operator', ['fused', 'qk', 'av'])
def test_compiles_as_one_graph_and_matches_eager(operator):
    """Under torch.compile (fullgraph) the fused operator is the chunked operator `zoo::na2d_blocked` and the halves
    build their tables in the graph; values and gradients equal the eager path."""
    q, k, v, rpb = _inputs(10, 9, 3, with_rpb=True)
    attn = torch.rand(*q.shape[:4], 9, dtype=torch.float64).softmax(-1)
    fn, tensors = {
        'fused': (lambda q, k, v, b: na2d_blocked.neighborhood_attention_2d(q, k, v, 3, 2, b, 0.7, tile=4),
                  (q, k, v, rpb)),
        'qk': (lambda q, k, b: na2d_blocked.na2d_qk(q, k, 3, 2, b, tile=4), (q, k, rpb)),
        'av': (lambda a, v: na2d_blocked.na2d_av(a, v, 3, 2, tile=4), (attn, v)),
    }[operator]
    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend='eager')
    _assert_all_close(_value_and_grads(compiled, *tensors), _value_and_grads(fn, *tensors), atol=1e-12)


@pytest.mark.parametrize('with_rpb,dilation,tile', [(True, 2, 4), (False, 1, None)])
def test_the_chunked_operator_passes_opcheck(with_rpb, dilation, tile):
    """torch.library.opcheck: the operator's schema, its shape function (fake tensors, also with dynamic shapes under
    AOT autograd) and its autograd registration agree with what it computes."""
    q, k, v, rpb = (t if t is None else t.requires_grad_() for t in _inputs(10, 9, 3, with_rpb))
    torch.library.opcheck(na2d_blocked._fused_op, (q, k, v, rpb, 0.7, 3, dilation, tile))


def _graph_targets(capture) -> set:
    """The call targets of the graph `capture` records of the blocked fused operator on a small map."""
    q, k, v, rpb = _inputs(10, 9, 3, with_rpb=True)
    fn = lambda q, k, v, b: na2d_blocked.neighborhood_attention_2d(q, k, v, 3, 2, b, 0.7)  # noqa: E731
    return {str(node.target) for node in capture(fn, (q, k, v, rpb)).nodes if node.op == 'call_function'}


def test_compile_calls_the_chunked_operator_and_export_holds_plain_ops():
    """torch.compile keeps the chunks (one opaque call); an exported program holds plain ops, which other runtimes
    (ONNX) can run."""
    graphs = []

    def recording_backend(graph_module, example_inputs):
        graphs.append(graph_module.graph)
        return graph_module.forward

    def compiled_graph(fn, inputs):
        torch._dynamo.reset()
        torch.compile(fn, fullgraph=True, backend=recording_backend)(*inputs)
        return graphs[-1]

    class Wrapped(torch.nn.Module):
        def __init__(self, fn):
            super().__init__()
            self.fn = fn

        def forward(self, *inputs):
            return self.fn(*inputs)

    def exported_graph(fn, inputs):
        return torch.export.export(Wrapped(fn), inputs).graph

    assert 'zoo.na2d_blocked.default' in _graph_targets(compiled_graph)
    exported = _graph_targets(exported_graph)
    assert exported and not any(target.startswith('zoo.') for target in exported)
