"""backend='natten' against the plain-PyTorch reference.

natten is optional: the parity tests skip without it. The error-path tests need no natten, because
the backend rejects rpb, and reports a missing natten, before calling into it.
"""
import sys

import pytest
import torch

from conftest import require
from zoo.layers.neighborhood import neighborhood_attention_2d


def _qkv(batch, heads, height, width, head_dim, seed=0):
    """Three (B, heads, H, W, head_dim) float32 tensors."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, heads, height, width, head_dim, generator=gen) for _ in range(3)]


# Non-square maps, dilations 1 to 3 (uneven groups included); head_dim a power of two because
# natten's CPU path (flex) needs one.
# That path is eager flex_attention, which warns that it is unfused and that natten 0.21.7 still
# passes the deprecated return_lse; both are expected here.
@pytest.mark.filterwarnings('ignore:flex_attention called without torch.compile')
@pytest.mark.filterwarnings('ignore:return_lse is deprecated')
@pytest.mark.parametrize('shape, kernel_size, dilation, scale', [
    ((2, 2, 9, 13, 8), 3, 1, None),
    ((1, 3, 12, 17, 16), 5, 2, 0.3),
    ((1, 2, 14, 11, 16), 3, 3, None),
])
def test_natten_matches_reference(shape, kernel_size, dilation, scale):
    require('natten', 'pip install --no-build-isolation natten==0.21.7, as the Makefile does')
    q, k, v = _qkv(*shape)
    expected = neighborhood_attention_2d(q, k, v, kernel_size, dilation, scale=scale, backend='torch')
    out = neighborhood_attention_2d(q, k, v, kernel_size, dilation, scale=scale, backend='natten')
    assert out.shape == expected.shape
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_natten_rejects_rpb():
    q, k, v = _qkv(1, 2, 8, 8, 8)
    rpb = torch.zeros(2, 5, 5)
    with pytest.raises(ValueError, match='rpb'):
        neighborhood_attention_2d(q, k, v, 3, rpb=rpb, backend='natten')


def test_missing_natten_gives_install_hint(monkeypatch):
    # A None entry in sys.modules makes `import natten` raise ImportError, installed or not.
    monkeypatch.setitem(sys.modules, 'natten', None)
    q, k, v = _qkv(1, 2, 8, 8, 8)
    with pytest.raises(ImportError, match='pip install'):
        neighborhood_attention_2d(q, k, v, 3, backend='natten')
