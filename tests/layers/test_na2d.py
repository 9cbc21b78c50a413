"""Neighborhood attention operator: official fixtures, an independent brute force, autograd and bad input."""
import itertools
import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from conftest import fixtures_path, fixtures_root
from zoo.layers import na2d_av, na2d_qk, neighborhood_attention_2d, neighborhood_indices
from zoo.layers.neighborhood_attn import NeighborhoodAttention2d
from zoo.models.nat import GlobalAttentionRPB

NA2D_CASES = sorted((fixtures_path() / 'na2d').glob('*.json'))


def brute_force_na(q, k, v, kernel_size, dilation, rpb=None, scale=1.0):
    """Direct transcription of the definition, one query at a time, in float64.

    q, k, v: (B, heads, H, W, d) -> (B, heads, H, W, d).
    """
    height, width = q.shape[2:4]
    radius = kernel_size // 2

    def window(i, length):
        group, in_group = i % dilation, i // dilation
        group_len = len(range(group, length, dilation))
        start = min(max(in_group - radius, 0), group_len - kernel_size)
        return [group + dilation * (start + t) for t in range(kernel_size)]

    q, k, v = q.double(), k.double(), v.double()
    out = torch.empty_like(v)
    for i, j in itertools.product(range(height), range(width)):
        keys = [(ki, kj) for ki in window(i, height) for kj in window(j, width)]
        key_vecs = torch.stack([k[:, :, ki, kj] for ki, kj in keys], dim=2)
        val_vecs = torch.stack([v[:, :, ki, kj] for ki, kj in keys], dim=2)
        logits = torch.einsum('bhd,bhnd->bhn', q[:, :, i, j] * scale, key_vecs)
        if rpb is not None:
            bias = torch.stack([rpb[:, (ki - i) // dilation + kernel_size - 1, (kj - j) // dilation + kernel_size - 1]
                                for ki, kj in keys], dim=1)
            logits = logits + bias.double()
        out[:, :, i, j] = torch.einsum('bhn,bhnd->bhd', logits.softmax(-1), val_vecs)
    return out


@pytest.mark.parametrize('path', NA2D_CASES, ids=[p.stem for p in NA2D_CASES])
def test_official_na2d_fixtures(path):
    fixtures_root()
    case = json.loads(path.read_text())
    t = load_file(str(path.with_suffix('.safetensors')))
    k, d, scale = case['kernel_size'], case['dilation'], case['scale']
    rpb = t.get('rpb')
    out = neighborhood_attention_2d(t['q'], t['k'], t['v'], k, dilation=d, rpb=rpb, scale=scale, backend='torch')
    torch.testing.assert_close(out, t['output'], rtol=0, atol=case['atol'])
    logits = na2d_qk(t['q'] * scale, t['k'], k, d, rpb, backend='torch')
    torch.testing.assert_close(logits, t['logits'], rtol=0, atol=case['atol'])
    torch.testing.assert_close(na2d_av(t['attn'], t['v'], k, d, backend='torch'), t['output'], rtol=0,
                               atol=case['atol'])
    rows, row_bias = neighborhood_indices(t['q'].shape[2], k, d)
    cols, col_bias = neighborhood_indices(t['q'].shape[3], k, d)
    for name, got in (('key_index_h', rows), ('key_index_w', cols), ('bias_index_h', row_bias),
                      ('bias_index_w', col_bias)):
        assert torch.equal(got, t[name]), name


SHAPES = [  # (H, W, kernel, dilation)
    (9, 11, 3, 1), (12, 13, 3, 4), (13, 10, 5, 2), (15, 15, 5, 3), (14, 17, 7, 2), (9, 9, 9, 1), (13, 14, 13, 1),
    (8, 15, 3, 2), (21, 7, 7, 1),
]


@pytest.mark.parametrize('height,width,kernel_size,dilation', SHAPES)
@pytest.mark.parametrize('with_rpb', [True, False])
@pytest.mark.parametrize('backend', ['torch', 'dense'])
def test_matches_brute_force(height, width, kernel_size, dilation, with_rpb, backend):
    gen = torch.Generator().manual_seed(height * 100 + width * 10 + kernel_size + dilation)
    q, k, v = (torch.randn(2, 3, height, width, 8, generator=gen) for _ in range(3))
    rpb = torch.randn(3, 2 * kernel_size - 1, 2 * kernel_size - 1, generator=gen) if with_rpb else None
    out = neighborhood_attention_2d(q, k, v, kernel_size, dilation, rpb, scale=0.4, backend=backend)
    expected = brute_force_na(q, k, v, kernel_size, dilation, rpb, scale=0.4)
    torch.testing.assert_close(out.double(), expected, rtol=0, atol=2e-6)


def test_window_equal_to_map_is_full_attention_with_bias():
    """With k = H = W every query sees the whole map, so NA must equal dense attention."""
    q, k, v = (torch.randn(1, 2, 5, 5, 4, dtype=torch.float64) for _ in range(3))
    out = neighborhood_attention_2d(q, k, v, 5, scale=1.0)
    dense = F.scaled_dot_product_attention(q.flatten(2, 3), k.flatten(2, 3), v.flatten(2, 3), scale=1.0)
    torch.testing.assert_close(out, dense.view_as(out))


@pytest.mark.parametrize('height,width,kernel_size,dilation', [(5, 6, 3, 1), (7, 6, 3, 2), (5, 5, 5, 1)])
@pytest.mark.parametrize('backend', ['torch', 'dense'])
def test_gradcheck_fused(height, width, kernel_size, dilation, backend):
    gen = torch.Generator().manual_seed(0)
    args = [torch.randn(2, 2, height, width, 3, generator=gen, dtype=torch.float64, requires_grad=True)
            for _ in range(3)]
    rpb = torch.randn(2, 2 * kernel_size - 1, 2 * kernel_size - 1, generator=gen, dtype=torch.float64,
                      requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda q, k, v, b: neighborhood_attention_2d(q, k, v, kernel_size, dilation, b, backend=backend),
        (*args, rpb))


@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16])
def test_dense_half_precision_matches_reference(dtype):
    q, k, v = (torch.randn(2, 2, 11, 12, 16).to(dtype) for _ in range(3))
    rpb = torch.randn(2, 9, 9).to(dtype)
    dense = neighborhood_attention_2d(q, k, v, 5, 2, rpb, backend='dense')
    ref = neighborhood_attention_2d(q, k, v, 5, 2, rpb, backend='torch')
    assert dense.dtype == dtype
    torch.testing.assert_close(dense.float(), ref.float(), rtol=0, atol=0.02)


def test_gradcheck_halves():
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 2, 7, 6, 3, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(3))
    rpb = torch.randn(2, 5, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    attn = torch.rand(1, 2, 7, 6, 9, generator=gen, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b, c: na2d_qk(a, b, 3, 2, c, backend='torch'), (q, k, rpb))
    assert torch.autograd.gradcheck(lambda a, b: na2d_av(a, b, 3, 2, backend='torch'), (attn, v))


def test_grads_without_rpb_and_partial_requires_grad():
    q = torch.randn(1, 1, 6, 6, 4, requires_grad=True)
    k, v = torch.randn(1, 1, 6, 6, 4), torch.randn(1, 1, 6, 6, 4)
    neighborhood_attention_2d(q, k, v, 3).sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()


@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16])
def test_half_precision_close_to_float32(dtype):
    q, k, v = (torch.randn(2, 2, 12, 10, 16) for _ in range(3))
    rpb = torch.randn(2, 9, 9)
    ref = neighborhood_attention_2d(q, k, v, 5, 2, rpb)
    low = neighborhood_attention_2d(q.to(dtype), k.to(dtype), v.to(dtype), 5, 2, rpb.to(dtype))
    assert low.dtype == dtype
    torch.testing.assert_close(low.float(), ref, rtol=0, atol=0.05)


@pytest.mark.parametrize('backend,attn_drop', [('torch', 0.), ('dense', 0.), ('triton', 0.), ('torch', 0.1)])
def test_module_trains_under_autocast(backend, attn_drop, monkeypatch):
    """A mixed-precision training step gives the fp32 step's output and gradients to half precision, on every
    backend and on the attention-dropout path. CUDA's autocast runs softmax in fp32 while q, k, v stay in half
    (CPU autocast keeps softmax in half), so the softmax is made to return fp32 here as it does there."""
    softmax = torch.Tensor.softmax
    monkeypatch.setattr(torch.Tensor, 'softmax', lambda self, dim: softmax(self.float(), dim))
    torch.manual_seed(0)
    module = NeighborhoodAttention2d(32, 4, 5, dilation=2, attn_drop=attn_drop, backend=backend)
    x = torch.randn(2, 12, 11, 32)
    results = {}
    for dtype in (None, torch.float16):
        module.zero_grad()
        torch.manual_seed(1)  # the same dropout mask in both runs
        with torch.autocast('cpu', dtype=dtype or torch.float16, enabled=dtype is not None):
            out = module(x)
        out.float().square().mean().backward()
        results[dtype] = [out.detach().float()] + [p.grad.clone() for p in module.parameters()]
    for got, want in zip(results[torch.float16], results[None]):
        torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2 * want.abs().max().item())


def test_module_pads_small_maps_like_natten_0_15():
    """A 4x6 map with k=5, d=2 is zero-padded to 10x10 before qkv, attended, then cropped."""
    torch.manual_seed(0)
    module = NeighborhoodAttention2d(12, 3, 5, dilation=2).eval()
    torch.nn.init.normal_(module.rpb)
    x = torch.randn(2, 4, 6, 12)
    padded = F.pad(x, (0, 0, 0, 4, 0, 6))
    qkv = module.qkv(padded).reshape(2, 10, 10, 3, 3, 4).permute(3, 0, 4, 1, 2, 5)
    attended = brute_force_na(qkv[0], qkv[1], qkv[2], 5, 2, module.rpb.detach(), scale=4 ** -0.5)
    expected = module.proj(attended.float().permute(0, 2, 3, 1, 4).reshape(2, 10, 10, 12)[:, :4, :6])
    with torch.no_grad():
        torch.testing.assert_close(module(x), expected, rtol=0, atol=1e-5)


def test_module_attention_dropout_path_matches_fused_in_eval():
    module = NeighborhoodAttention2d(16, 2, 3, attn_drop=0.5)
    x = torch.randn(1, 7, 7, 16)
    module.eval()
    fused = module(x)
    module.attn_drop.p = 0.0
    module.train()
    torch.testing.assert_close(module(x), fused)


def _qkv(shape=(1, 2, 8, 8, 4)):
    return [torch.randn(shape) for _ in range(3)]


@pytest.mark.parametrize('call,message', [
    (lambda: neighborhood_attention_2d(*_qkv(), 4), 'positive odd int'),
    (lambda: neighborhood_attention_2d(*_qkv(), 0), 'positive odd int'),
    (lambda: neighborhood_attention_2d(*_qkv(), 3, dilation=0), 'dilation'),
    (lambda: neighborhood_attention_2d(*_qkv(), 5, dilation=2), r'kernel_size 5 \* dilation 2 = 10 for a 8x8 map'),
    (lambda: neighborhood_attention_2d(*_qkv((1, 2, 8, 9, 4)), 11), '= 11 for a 8x9 map'),
    (lambda: neighborhood_attention_2d(*_qkv((2, 8, 8, 4)), 3), r'\(B, heads, H, W, head_dim\)'),
    (lambda: neighborhood_attention_2d(torch.randn(1, 2, 8, 8, 4), torch.randn(1, 2, 8, 7, 4),
                                       torch.randn(1, 2, 8, 8, 4), 3), 'shapes differ'),
    (lambda: neighborhood_attention_2d(*_qkv(), 3, rpb=torch.randn(2, 3, 3)), r'rpb must have shape'),
    (lambda: neighborhood_attention_2d(torch.randn(1, 2, 8, 8, 4).double(), torch.randn(1, 2, 8, 8, 4),
                                       torch.randn(1, 2, 8, 8, 4), 3), 'dtype'),
    (lambda: neighborhood_attention_2d(*[t.long() for t in _qkv()], 3), 'floating point'),
    (lambda: neighborhood_attention_2d(*_qkv(), 3, backend='cuda'), 'backend must be one of'),
    (lambda: na2d_av(torch.randn(1, 2, 8, 8, 8), torch.randn(1, 2, 8, 8, 4), 3), r'attn must have shape'),
    (lambda: na2d_qk(*_qkv()[:2], 3, backend='natten'), r"'natten' only runs na2d\b"),
])
def test_bad_input_raises_clear_value_error(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_module_rejects_bad_configuration():
    with pytest.raises(ValueError, match='divisible'):
        NeighborhoodAttention2d(30, 4, 7)
    with pytest.raises(ValueError, match='odd'):
        NeighborhoodAttention2d(32, 4, 6)
    with pytest.raises(ValueError, match=r'\(B, H, W, C\)'):
        NeighborhoodAttention2d(32, 4, 3)(torch.randn(2, 32, 8))


def test_vitrpb_index_equals_official_flipped_query_minus_key_table():
    """The official buffer is flipud(fliplr(index of (query - key) offsets)); ours indexes (key - query)."""
    size = 5
    coords = torch.stack(torch.meshgrid(torch.arange(size), torch.arange(size), indexing='ij')).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + size - 1
    official = torch.flipud(torch.fliplr(rel[..., 0] * (2 * size - 1) + rel[..., 1]))
    assert torch.equal(GlobalAttentionRPB(8, 2, size).relative_position_index, official)


def test_tracing_first_does_not_poison_later_eager_calls():
    """torch.export before any eager call used to cache fake index tensors; eager results then went wrong."""
    from zoo.layers import window_geometry
    window_geometry.neighborhood_axis_numpy.cache_clear()
    window_geometry.rpb_index_numpy.cache_clear()
    torch.manual_seed(0)
    module = NeighborhoodAttention2d(8, 2, 3, dilation=2).eval()
    x = torch.randn(1, 9, 11, 8)
    exported = torch.export.export(module, (x,))
    with torch.no_grad():
        eager = module(x)
    qkv = module.qkv(x).reshape(1, 9, 11, 3, 2, 4).permute(3, 0, 4, 1, 2, 5)
    attended = brute_force_na(qkv[0], qkv[1], qkv[2], 3, 2, module.rpb.detach(), scale=4 ** -0.5)
    expected = module.proj(attended.float().permute(0, 2, 3, 1, 4).reshape(1, 9, 11, 8))
    torch.testing.assert_close(eager, expected.detach(), rtol=0, atol=1e-5)
    torch.testing.assert_close(exported.module()(x), eager, rtol=0, atol=1e-6)
