"""Triton window kernels of aggregated attention against the plain-PyTorch reference.

On CPU they run in the Triton interpreter (conftest sets TRITON_INTERPRET=1), on tiny shapes; with a GPU the
same tests run on CUDA. Forward and backward, fp32 and half precision.
"""
import pytest
import torch

from zoo.layers.aggregated_attn import AggregatedAttention, window_av, window_qk

DEVICE = 'cuda' if torch.cuda.is_available() else 'cpu'


def _run(fn, inputs, grad_seed=1):
    """Output and input gradients of fn(*inputs) against a fixed random cotangent (zero where the output is -inf)."""
    leaves = [t.detach().clone().requires_grad_(t.requires_grad) for t in inputs]
    out = fn(*leaves)
    gen = torch.Generator(device=out.device).manual_seed(grad_seed)
    cotangent = torch.randn(out.shape, generator=gen, device=out.device, dtype=out.dtype)
    finite = torch.isfinite(out)
    (torch.where(finite, out, 0) * cotangent.masked_fill(~finite, 0)).sum().backward()
    return [out.detach()] + [t.grad for t in leaves if t.requires_grad]


def _tensors(*shapes, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen).to(DEVICE, dtype).requires_grad_() for s in shapes]


@pytest.mark.parametrize('batch,heads,height,width,dim,kernel_size', [
    (2, 2, 5, 7, 24, 3),     # head dim not a power of two, non-square
    (1, 3, 4, 3, 16, 5),     # window wider than the map on one axis
])
def test_window_qk_matches_reference(batch, heads, height, width, dim, kernel_size):
    query, key = _tensors((batch, heads, height, width, dim), (batch, heads, height, width, dim))
    bias, = _tensors((heads, kernel_size ** 2), seed=2)
    ref = _run(lambda q, k, b: window_qk(q, k, b, kernel_size, backend='torch'), (query, key, bias))
    got = _run(lambda q, k, b: window_qk(q, k, b, kernel_size, backend='triton'), (query, key, bias))
    assert torch.equal(torch.isinf(got[0]), torch.isinf(ref[0]))
    for g, r in zip(got, ref):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('batch,heads,height,width,dim,kernel_size', [
    (2, 2, 5, 7, 24, 3),
    (1, 1, 3, 6, 8, 5),
])
def test_window_av_matches_reference(batch, heads, height, width, dim, kernel_size):
    attn, value = _tensors((batch, heads, height, width, kernel_size ** 2), (batch, heads, height, width, dim))
    ref = _run(lambda a, v: window_av(a, v, kernel_size, backend='torch'), (attn, value))
    got = _run(lambda a, v: window_av(a, v, kernel_size, backend='triton'), (attn, value))
    for g, r in zip(got, ref):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16])
def test_half_precision_forward_and_backward(dtype):
    """Half inputs accumulate in fp32: the kernel must match the reference run in fp32 on the same values."""
    query, key, value = _tensors(*[(1, 2, 4, 5, 16)] * 3, dtype=dtype)
    weights = window_qk(query, key, None, 3, backend='triton')
    reference = window_qk(query.float(), key.float(), None, 3, backend='torch')
    assert weights.dtype == dtype
    # one rounding of an fp32-accumulated value: within one unit of the dtype's precision
    torch.testing.assert_close(weights.float(), reference, rtol=torch.finfo(dtype).eps, atol=1e-5)
    attn = weights.float().softmax(-1).to(dtype)
    out = _run(lambda a, v: window_av(a, v, 3, backend='triton'), (attn, value))
    ref = _run(lambda a, v: window_av(a, v, 3, backend='torch'), (attn.float(), value.float()))
    for g, r in zip(out, ref):
        assert g.dtype == dtype
        # products summed over the window lose digits where they cancel: bound by the tensor's scale
        eps = torch.finfo(dtype).eps
        torch.testing.assert_close(g.float(), r, rtol=2 * eps, atol=2 * eps * r.abs().max().item())


def test_ops_are_registered_with_fake_kernels():
    """torch.library's own checks: schema, fake (meta) kernel and autograd registration of every op."""
    a, b = _tensors((1, 1, 3, 4, 8), (1, 1, 3, 4, 8))
    weights, = _tensors((1, 1, 3, 4, 9), seed=3)
    bias, = _tensors((1, 9), seed=4)
    checks = ('test_schema', 'test_faketensor', 'test_autograd_registration')
    torch.library.opcheck(torch.ops.zoo.window_dot.default, (a, b, bias, 3, True), test_utils=checks)
    torch.library.opcheck(torch.ops.zoo.window_sum.default, (weights, b, 3), test_utils=checks)
    torch.library.opcheck(torch.ops.zoo.window_scatter.default, (weights, b, 3), test_utils=checks)


def test_aggregated_attention_module_same_with_either_backend():
    """The whole layer (window + pooled keys + learnable tokens), forward and parameter gradients."""
    torch.manual_seed(0)
    layer = AggregatedAttention(48, 2, pretrain_size=(8, 8), sr_ratio=4, backend='torch').to(DEVICE)
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.1 * torch.randn_like(p))
    x = torch.randn(2, 8, 12, 48, device=DEVICE)
    results = {}
    for backend in ('torch', 'triton'):
        layer.backend = backend
        layer.zero_grad()
        out = layer(x)
        out.square().mean().backward()
        results[backend] = [out.detach()] + [p.grad.clone() for p in layer.parameters()]
    for got, ref in zip(results['triton'], results['torch']):
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)
