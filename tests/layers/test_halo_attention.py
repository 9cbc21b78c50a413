"""Halo attention (zoo.layers.halo_attn).

* operator fixtures (../shared/fixtures/halo, made with timm's HaloAttn): strict load + output within atol;
* both border rules against a brute-force per-query definition written here (float64, explicit windows);
* clear errors for inputs the blocked attention cannot tile.
"""
import json

import pytest
import torch
from safetensors.torch import load_file

import zoo  # noqa: F401  (registers the models)
from conftest import fixtures_path, fixtures_root
from zoo.layers import HaloAttention, halo_attention_2d, halo_attn

HALO_CASES = sorted(fixtures_path().glob('halo/halo_*.json'))


@pytest.mark.parametrize('path', HALO_CASES, ids=[p.stem for p in HALO_CASES])
def test_fixture_case_loads_strictly_and_reproduces_timm(path):
    fixtures_root()
    case = json.loads(path.read_text())
    layer = HaloAttention(**case['zoo_kwargs']).eval()
    layer.load_state_dict(load_file(str(path.with_name(case['files']['state']))), strict=True)
    io = load_file(str(path.with_name(case['files']['io'])))
    with torch.no_grad():
        out = layer(io['input'])
    torch.testing.assert_close(out, io['output'], rtol=0, atol=case['atol'])
    derived = case['derived']
    assert (layer.dim_head_qk, layer.dim_head_v, layer.win_size, layer.block_stride) == (
        derived['dim_head_qk'], derived['dim_head_v'], derived['win_size'], derived['block_stride'])


def test_fixture_folder_is_present():
    root = fixtures_root()
    assert len(list((root / 'halo').glob('halo_*.json'))) >= 4


def brute_force_halo(query, key, value, block_size, halo_size, height_rel, width_rel, scale, scale_pos_embed,
                     border):
    """One query at a time, straight from the definition (window coordinates, zero or excluded padding)."""
    batch, heads, q_height, q_width, _ = query.shape
    height, width = key.shape[2:4]
    stride = height // q_height
    block_q = block_size // stride
    win = block_size + 2 * halo_size
    out = value.new_zeros(batch, heads, q_height, q_width, value.shape[-1])
    for i in range(q_height):
        for j in range(q_width):
            (by, qy), (bx, qx) = divmod(i, block_q), divmod(j, block_q)
            logits, values = [], []
            for ky in range(win):
                for kx in range(win):
                    y, x = by * block_size - halo_size + ky, bx * block_size - halo_size + kx
                    inside = 0 <= y < height and 0 <= x < width
                    if not inside and border == 'mask':
                        continue
                    k = key[:, :, y, x] if inside else torch.zeros_like(key[:, :, 0, 0])
                    v = value[:, :, y, x] if inside else torch.zeros_like(value[:, :, 0, 0])
                    q = query[:, :, i, j]
                    dot = (q * k).sum(-1)
                    rel = (q * height_rel[ky - qy + win - 1]).sum(-1) + (q * width_rel[kx - qx + win - 1]).sum(-1)
                    logits.append((dot + rel) * scale if scale_pos_embed else dot * scale + rel)
                    values.append(v)
            attn = torch.stack(logits, -1).softmax(-1)
            out[:, :, i, j] = (attn[..., None] * torch.stack(values, -2)).sum(-2)
    return out


@pytest.mark.parametrize('border', ['zeros', 'mask'])
@pytest.mark.parametrize('shape', [
    # (B, heads, H, W, stride, block, halo, d_qk, d_v, scale_pos_embed)
    (2, 2, 8, 12, 1, 4, 1, 3, 5, False),
    (1, 2, 8, 8, 2, 4, 2, 4, 6, True),
    (1, 1, 6, 9, 1, 3, 2, 4, 4, False),
], ids=['b4h1', 'b4h2-s2-scalepos', 'b3h2-odd'])
@pytest.mark.parametrize('banded', [False, True], ids=['one-band', 'row-bands'])
def test_reference_matches_brute_force(monkeypatch, border, shape, banded):
    """The reference, in one band and in bands of one block row (every case has two or three), against the
    definition."""
    if banded:
        monkeypatch.setattr(halo_attn, 'BAND_LOGITS', 1)
    batch, heads, height, width, stride, block, halo, qk_dim, v_dim, scale_pos_embed = shape
    win = block + 2 * halo
    gen = torch.Generator().manual_seed(0)
    query = torch.randn(batch, heads, height // stride, width // stride, qk_dim, generator=gen, dtype=torch.float64)
    key = torch.randn(batch, heads, height, width, qk_dim, generator=gen, dtype=torch.float64)
    value = torch.randn(batch, heads, height, width, v_dim, generator=gen, dtype=torch.float64)
    tables = [torch.randn(2 * win - 1, qk_dim, generator=gen, dtype=torch.float64) for _ in range(2)]
    got = halo_attention_2d(query, key, value, block, halo, *tables, scale=0.4, scale_pos_embed=scale_pos_embed,
                            border=border, backend='torch')
    expected = brute_force_halo(query, key, value, block, halo, *tables, 0.4, scale_pos_embed, border)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)


def test_border_rules_differ_only_where_windows_leave_the_map():
    torch.manual_seed(0)
    layer = HaloAttention(16, num_heads=2, block_size=4, halo_size=2).eval()
    masked = HaloAttention(16, num_heads=2, block_size=4, halo_size=2, border='mask').eval()
    masked.load_state_dict(layer.state_dict())
    x = torch.randn(1, 16, 16, 16)
    with torch.no_grad():
        diff = (layer(x) - masked(x)).abs().amax(dim=1)[0]
    # only the 2 x 2 interior blocks (rows/cols 4..11) have windows inside the 16 x 16 map
    assert diff[4:12, 4:12].max() == 0
    assert diff[:4].min() > 0 and diff[:, 12:].min() > 0


def test_halo_attention_backward_reaches_every_parameter():
    layer = HaloAttention(8, dim_out=16, num_heads=2, dim_head=4, block_size=4, halo_size=1, stride=2,
                          qkv_bias=True)
    layer(torch.randn(2, 8, 8, 8)).square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in layer.parameters())


@pytest.mark.parametrize('call, message', [
    (lambda: HaloAttention(16, num_heads=2, block_size=4, border='mask')(torch.randn(1, 16, 12, 10)),
     'divisible by block_size 4, got 12x10'),
    (lambda: HaloAttention(16, num_heads=2, block_size=4)(torch.randn(16, 8, 8)), r'\(B, C, H, W\) map'),
    (lambda: HaloAttention(16, num_heads=2, block_size=4)(torch.randn(1, 8, 8, 8)), '16 input channels, got 8'),
    (lambda: HaloAttention(16, num_heads=3), 'not divisible by num_heads 3'),
    (lambda: HaloAttention(16, num_heads=2, border='reflect'), 'border must be one of'),
    (lambda: halo_attention_2d(torch.randn(1, 1, 4, 4, 2), torch.randn(1, 1, 4, 4, 2), torch.randn(1, 1, 4, 4, 2),
                               4, 1, torch.randn(11, 2), torch.randn(5, 2)), r'width_rel must have shape'),
    (lambda: halo_attention_2d(torch.randn(1, 1, 3, 4, 2), torch.randn(1, 1, 4, 4, 2), torch.randn(1, 1, 4, 4, 2),
                               4, 1, torch.randn(11, 2), torch.randn(11, 2)), 'subsampled by a stride'),
    (lambda: halo_attention_2d(torch.zeros(1, 1, 4, 4, 2, dtype=torch.long), torch.randn(1, 1, 4, 4, 2),
                               torch.randn(1, 1, 4, 4, 2), 4, 1, torch.randn(11, 2), torch.randn(11, 2)),
     'floating point'),
])
def test_bad_inputs_raise_value_error(call, message):
    with pytest.raises(ValueError, match=message):
        call()
