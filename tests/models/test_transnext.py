"""TransNeXt beyond the shared contract: any-size inference, input errors, official file layouts, operator
semantics checked against independent brute-force definitions."""
import json

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import zoo  # noqa: F401  (registers the models)
from conftest import fixtures_path, fixtures_root
from zoo.layers import aggregated_attn, convglu
from zoo.layers.aggregated_attn import relative_coords_cpb, window_av, window_length_scale, window_qk
from zoo.layers.window_geometry import row_bands
from zoo.models.transnext import checkpoint_filter_fn

TINY = dict(embed_dims=(24, 48, 72, 96), num_heads=(1, 2, 3, 4), depths=(1, 1, 1, 1), img_size=64)
CASE_96 = 'transnext_tiny_reduced_96_pretrain64'


def _case(name: str):
    fixtures_root()
    folder = fixtures_path() / 'transnext'
    case = json.loads((folder / f'{name}.json').read_text())
    return case, folder / f'{name}.state.safetensors', load_file(str(folder / f'{name}.io.safetensors'))


def test_checkpoint_from_another_resolution_runs_without_rebuilding():
    """Official 96x96 model built with pretrain_size=64 == zoo model built at img_size=64, fed 96x96 images."""
    case, state, io = _case(CASE_96)
    kwargs = {k: v for k, v in case['zoo_kwargs'].items() if k not in ('img_size', 'pretrain_size')}
    model = timm.create_model(case['zoo_name'], pretrained=True, img_size=64, pretrained_cfg_overlay=dict(
        file=str(state), num_classes=kwargs['num_classes']), **kwargs).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(io['input']), io['logits'], rtol=0, atol=case['atol'])


def test_features_only_gives_official_post_norm_features():
    case, state, io = _case(CASE_96)
    kwargs = dict(case['zoo_kwargs'])
    model = timm.create_model(case['zoo_name'], pretrained=True, features_only=True, pretrained_cfg_overlay=dict(
        file=str(state), num_classes=kwargs['num_classes']), **kwargs).eval()
    assert model.feature_info.reduction() == [4, 8, 16, 32]
    with torch.no_grad():
        feats = model(io['input'])
    for i, feat in enumerate(feats):
        torch.testing.assert_close(feat, io[f'features.{i}'], rtol=1e-4, atol=case['atol'])


@pytest.mark.parametrize('wrap', ['model', 'state_dict', 'module'])
def test_filter_unwraps_official_layouts(wrap):
    state = load_file(str(_case(CASE_96)[1]))
    model = timm.create_model('transnext_tiny', **_case(CASE_96)[0]['zoo_kwargs'])
    wrapped = {f'module.{k}': v for k, v in state.items()} if wrap == 'module' else {wrap: state}
    wrapped_buffers = dict(wrapped) if wrap != 'module' else {**wrapped, 'relative_pos_index1': torch.zeros(3)}
    filtered = checkpoint_filter_fn(wrapped_buffers, model)
    assert filtered.keys() == state.keys()
    model.load_state_dict(filtered, strict=True)


@pytest.mark.parametrize('size', [(64, 96), (128, 64)])
def test_any_size_divisible_by_32(size):
    model = timm.create_model('transnext_micro', **TINY).eval()
    x = torch.randn(1, 3, *size)
    with torch.no_grad():
        feats = model.forward_intermediates(x, intermediates_only=True)
        out = model(x)
    assert [tuple(f.shape[-2:]) for f in feats] == [(size[0] // s, size[1] // s) for s in (4, 8, 16, 32)]
    assert out.shape == (1, 1000) and torch.isfinite(out).all()


@pytest.mark.parametrize('bad,message', [
    (torch.randn(1, 3, 72, 64), r'divisible by 32, got 72x64'),
    (torch.randn(1, 3, 64, 48), r'divisible by 32, got 64x48'),
    (torch.randn(1, 1, 64, 64), r'3 input channels, got 1'),
    (torch.zeros(1, 3, 64, 64, dtype=torch.uint8), r'floating-point'),
    (torch.randn(3, 64, 64), r'\(B, 3, H, W\)'),
])
def test_bad_input_raises_one_clear_error(bad, message):
    model = timm.create_model('transnext_micro', **TINY).eval()
    with pytest.raises(ValueError, match=message):
        model(bad)


def test_no_weight_decay_names_the_official_parameters():
    model = timm.create_model('transnext_micro', **TINY)
    names = model.no_weight_decay()
    assert 'block1.0.attn.query_embedding' in names and 'block4.0.attn.temperature' in names
    assert 'block2.0.attn.relative_pos_bias_local' in names and 'block3.0.attn.cpb_fc1.weight' in names
    assert not any('learnable_tokens' in n for n in names)  # decayed in the official recipe


# bfloat16 keeps 8 significant bits: one rounding moves a value by up to 2**-8 of its size
BF16_UNIT_ROUNDOFF = 2 ** -8


def test_autocast_bfloat16_stays_within_bfloat16_precision():
    """bf16 autocast logits stay within a few bf16 roundings of the float64 logits, relative to their size (the
    rounding errors of the layers add up to ~1.8 roundings on this model over seeds; 4 are allowed)."""
    torch.manual_seed(0)
    model = timm.create_model('transnext_micro', **TINY).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        with torch.autocast('cpu', dtype=torch.bfloat16):
            out = model(x)
        ref = model.double()(x.double())
    assert out.dtype == torch.bfloat16
    tolerance = 4 * BF16_UNIT_ROUNDOFF * ref.abs().max().item()
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=tolerance)


# ---- operators against brute-force definitions (independent of the implementation's shifted views) ----

def _unfold_window(x: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """(B, h, H, W, d) -> (B, h, H, W, k*k, d) zero-padded neighbours, via F.unfold (the official route)."""
    batch, heads, height, width, dim = x.shape
    maps = x.permute(0, 1, 4, 2, 3).reshape(batch, heads * dim, height, width)
    cols = F.unfold(maps, kernel_size, padding=kernel_size // 2)             # (B, h*d*k*k, H*W)
    cols = cols.view(batch, heads, dim, kernel_size ** 2, height, width)
    return cols.permute(0, 1, 4, 5, 3, 2)


def test_window_ops_match_unfold_definition():
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 2, 3, 5, 6, 8).unbind(0)
    bias = torch.randn(3, 9)
    logits = window_qk(q, k, bias, 3, backend='torch')
    keys = _unfold_window(k, 3)
    inside = _unfold_window(torch.ones(1, 1, 5, 6, 1), 3)[0, 0, ..., 0] > 0
    expected = ((q[..., None, :] * keys).sum(-1) + bias[:, None, None]).masked_fill(~inside, float('-inf'))
    torch.testing.assert_close(logits, expected)
    attn = torch.randn(2, 3, 5, 6, 9)
    torch.testing.assert_close(window_av(attn, v, 3, backend='torch'),
                               (attn[..., None] * _unfold_window(v, 3)).sum(-2))


def test_length_scale_counts_in_map_window_slots():
    scale = window_length_scale(4, 5, 3, pool_len=7).view(4, 5)
    counts = torch.exp(scale) - 7
    assert counts[0, 0].round() == 4 and counts[0, 2].round() == 6 and counts[2, 2].round() == 9
    assert counts[3, 4].round() == 4 and counts[2, 0].round() == 6


@pytest.mark.parametrize('query,key,pretrain', [((8, 6), (2, 3), (16, 16)), ((7, 7), (7, 7), (7, 7)),
                                                ((12, 12), (3, 3), (8, 8))])
def test_cpb_coordinates_match_pairwise_definition(query, key, pretrain):
    """Every (query, key) pair's coordinates, computed directly with torch's adaptive pooling."""
    table, index = relative_coords_cpb(query, key, pretrain)
    qh, qw = torch.meshgrid(torch.arange(query[0]).float(), torch.arange(query[1]).float(), indexing='ij')
    kh = F.adaptive_avg_pool1d(torch.arange(query[0]).float()[None], key[0])[0]
    kw = F.adaptive_avg_pool1d(torch.arange(query[1]).float()[None], key[1])[0]
    kh, kw = torch.meshgrid(kh, kw, indexing='ij')
    dh = (qh.reshape(-1, 1) - kh.reshape(1, -1)) / (pretrain[0] - 1) * 8
    dw = (qw.reshape(-1, 1) - kw.reshape(1, -1)) / (pretrain[1] - 1) * 8
    delta = torch.stack([dh, dw], -1)
    expected = torch.sign(delta) * torch.log2(delta.abs() + 1) / torch.log2(torch.tensor(8.))
    torch.testing.assert_close(table[index], expected)


@pytest.mark.parametrize('attention', ['aggregated', 'full'])
def test_query_bands_give_the_one_band_result(monkeypatch, attention):
    """With a band budget of one map row per band and the CPB's MLP in chunks of 5 offsets, both attentions (outputs
    and every gradient) equal their one-band run: the bands cover every query once, the bias rows follow them, and
    the MLP chunks cover every offset once."""
    torch.manual_seed(0)
    if attention == 'aggregated':
        module = aggregated_attn.AggregatedAttention(16, 2, (8, 8), sr_ratio=2)
    else:
        module = aggregated_attn.ScaledCosineAttention(16, 2, (8, 8))
    module.double()  # float64: the bands only change the order of the gradients' sums
    x = torch.randn(2, 7, 9, 16, dtype=torch.float64, requires_grad=True)

    def run():
        module.zero_grad()
        x.grad = None
        out = module(x)
        out.backward(torch.ones_like(out))
        return [out, x.grad] + [p.grad for p in module.parameters()]

    whole = run()
    keys = 12 if attention == 'aggregated' else 63  # pooled 3 x 4 grid, or every token
    monkeypatch.setattr(aggregated_attn, 'QUERY_BAND_LOGITS', 2 * 2 * 9 * keys * 2 - 1)  # one row per band
    monkeypatch.setattr(aggregated_attn, 'CPB_ROWS', 5)
    assert len(list(row_bands(7, 2 * 2 * 9 * keys, aggregated_attn.QUERY_BAND_LOGITS))) == 7
    banded = run()
    for got, expected in zip(banded, whole):
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize('rows_per_band', [1, 2, 4])
def test_convglu_bands_give_the_one_piece_result(monkeypatch, rows_per_band):
    """Without gradients ConvGLU runs image by image in bands of rows, each with a row of halo for its 3x3 conv, once
    an image's hidden map exceeds the budget: any band height (one row, a last band shorter than the others) gives
    the one-piece output. Maps within the budget, and any run with gradients, are one piece."""
    torch.manual_seed(0)
    mlp = convglu.ConvGLU(6, 12).double().eval()
    x = torch.randn(2, 7, 5, 6, dtype=torch.float64)
    calls = []
    mlp.fc1.register_forward_hook(lambda module, args, out: calls.append(tuple(out.shape[:2])))
    with torch.no_grad():
        whole = mlp(x)
    assert calls == [(2, 7)]
    per_row = 5 * 2 * mlp.hidden_features  # width * the two fc1 branches
    monkeypatch.setattr(convglu, 'BAND_ELEMENTS', per_row * rows_per_band)
    bands = -(-7 // rows_per_band)
    calls.clear()
    with torch.no_grad():
        torch.testing.assert_close(mlp(x), whole, rtol=0, atol=1e-12)
    assert len(calls) == 2 * bands and all(images == 1 for images, _ in calls)
    calls.clear()
    mlp(x).sum().backward()
    assert calls == [(2, 7)] and mlp.fc1.weight.grad is not None
