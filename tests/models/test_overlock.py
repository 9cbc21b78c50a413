"""OverLoCK family: ContMix semantics against brute force, re-parameterisation, checkpoint forms, aux head,
input handling, memory shape, and the Triton aggregation path (TRITON_INTERPRET=1 without a GPU)."""
import json

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch.utils._python_dispatch import TorchDispatchMode

import zoo  # noqa: F401  (registers the models)
from conftest import fixtures_path, fixtures_root
from zoo.bench import count_macs
from zoo.layers import neighborhood
from zoo.layers.contmix import ContMix, DilatedReparamBlock, contmix_aggregate
from zoo.layers.kernels import reference_only
from zoo.models.overlock import checkpoint_filter_fn

TINY = dict(depth=(1, 1, 1, 1), sub_depth=(2, 1), embed_dim=(16, 32, 48, 64), sub_num_heads=(2, 2), projection=32,
            num_classes=7)


def _randomise_norms(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random BN statistics and affine parameters, rpb, GRN and layer scales, so every branch and fold matters."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
            if not tensor.is_floating_point():
                continue
            noise = torch.randn(tensor.shape, generator=gen)
            if name.endswith('running_var'):
                tensor.copy_(torch.rand(tensor.shape, generator=gen) + 0.5)
            elif name.endswith(('running_mean', 'bias', 'beta', 'rpb1', 'rpb2')):
                tensor.copy_(0.1 * noise)
            elif name.endswith('gamma'):
                tensor.copy_(0.3 * noise)
            elif tensor.dim() == 1 or (tensor.dim() == 4 and tensor.shape[1:] == (1, 1, 1)):
                tensor.copy_(1 + 0.1 * noise)
            else:
                tensor.copy_(noise / tensor[0].numel() ** 0.5)
    return model


def _clamped_starts(length: int, kernel_size: int) -> list:
    """NATTEN window start of each position, written out independently of zoo.layers."""
    return [min(max(i - kernel_size // 2, 0), length - kernel_size) for i in range(length)]


def _brute_force_av(attn: torch.Tensor, value: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """attn (B, G, H, W, k*k), value (B, G, H, W, c): explicit loops over queries and window slots."""
    out = torch.zeros_like(value)
    height, width = value.shape[2:4]
    rows, cols = _clamped_starts(height, kernel_size), _clamped_starts(width, kernel_size)
    for i in range(height):
        for j in range(width):
            for a in range(kernel_size):
                for c in range(kernel_size):
                    weight = attn[:, :, i, j, a * kernel_size + c, None]
                    out[:, :, i, j] += weight * value[:, :, rows[i] + a, cols[j] + c]
    return out


def _brute_force_aggregate(value: torch.Tensor, small: torch.Tensor, large: torch.Tensor) -> torch.Tensor:
    """ContMix aggregation written out: value (B, C, H, W) read as (2, G, c) channels, the first half aggregated
    with the small kernels (B, G, H, W, s*s), the second with the large ones (B, G, H, W, k*k)."""
    batch, channels, height, width = value.shape
    groups = small.shape[1]
    halves = value.view(batch, 2, groups, channels // (2 * groups), height, width).permute(1, 0, 2, 4, 5, 3)
    out_small = _brute_force_av(small, halves[0], int(small.shape[-1] ** 0.5))
    out_large = _brute_force_av(large, halves[1], int(large.shape[-1] ** 0.5))
    return torch.stack((out_small, out_large), 1).permute(0, 1, 2, 5, 3, 4).reshape(value.shape)


def _brute_force_rpb(rpb: torch.Tensor, height: int, width: int, kernel_size: int) -> torch.Tensor:
    """(G, 2k-1, 2k-1) table -> (G, H, W, k*k): the bias of each clamped window slot, by its key - query offset."""
    rows, cols = _clamped_starts(height, kernel_size), _clamped_starts(width, kernel_size)
    bias = rpb.new_zeros(rpb.shape[0], height, width, kernel_size ** 2)
    for i in range(height):
        for j in range(width):
            for a in range(kernel_size):
                for c in range(kernel_size):
                    offset_row, offset_col = rows[i] + a - i, cols[j] + c - j
                    bias[:, i, j, a * kernel_size + c] = rpb[:, offset_row + kernel_size - 1,
                                                             offset_col + kernel_size - 1]
    return bias


def test_contmix_aggregate_matches_brute_force():
    """Channels (2, G, c): first half with the small kernels, second half with the large ones, clamped windows."""
    torch.manual_seed(0)
    batch, groups, c, height, width = 2, 3, 2, 9, 7
    value = torch.randn(batch, 2 * groups * c, height, width, dtype=torch.float64)
    small = torch.randn(batch, groups, height, width, 9, dtype=torch.float64).softmax(-1)
    large = torch.randn(batch, groups, height, width, 49, dtype=torch.float64).softmax(-1)
    out = contmix_aggregate(value, small, large, backend='torch')
    torch.testing.assert_close(out, _brute_force_aggregate(value, small, large))


def test_na2d_rpb_matches_brute_force():
    torch.manual_seed(0)
    heads, k, height, width = 2, 5, 6, 8
    rpb = torch.randn(heads, 2 * k - 1, 2 * k - 1)
    bias = neighborhood.na2d_rpb(rpb, height, width, k)
    rows, cols = _clamped_starts(height, k), _clamped_starts(width, k)
    for i in range(height):
        for j in range(width):
            for a in range(k):
                for c in range(k):
                    expected = rpb[:, rows[i] + a - i + k - 1, cols[j] + c - j + k - 1]
                    torch.testing.assert_close(bias[:, i, j, a * k + c], expected, rtol=0, atol=0)
    with pytest.raises(ValueError, match='rpb must have shape'):
        neighborhood.na2d_rpb(rpb, height, width, 3)


@pytest.mark.parametrize('height,width,expected', [(4, 4, (13, 13)), (3, 8, (13, 34)), (8, 3, (34, 13)),
                                                   (13, 20, None), (5, 4, (16, 13))])
def test_contmix_resizes_short_side_to_kernel(height, width, expected):
    """Official rule: short side below k -> short side k, long side int(k / short * long)."""
    mixer = ContMix(16, 8, kernel_size=13, num_heads=2)
    assert mixer._work_size(height, width) == expected


def _contmix_reference(mixer: ContMix, feats: torch.Tensor) -> torch.Tensor:
    """ContMix on a map whose short side is below k, written from the official description: value and input are
    bilinearly resized so the short side is k (long side int(k / short * long)), the dynamic kernels (query-centre
    affinities -> weight_proj -> + relative bias -> softmax) aggregate clamped windows at that size, the result is
    average-pooled back; gate and lepe stay at the input size. Submodules serve as the convolutions only."""
    height, width = feats.shape[-2:]
    k, s, groups = mixer.kernel_size, mixer.smk_size, mixer.groups
    short, long = sorted((height, width))
    work = (k, int(k / short * long)) if height <= width else (int(k / short * long), k)
    value = mixer.fusion(feats)
    gate, lepe = mixer.gate(value), mixer.lepe(value)
    value = F.interpolate(value, size=work, mode='bilinear', align_corners=False)
    feats = F.interpolate(feats, size=work, mode='bilinear', align_corners=False)
    batch = feats.shape[0]
    query = mixer.weight_query(feats[:, :mixer.dim]) * (mixer.dim / groups) ** -0.5
    centres = mixer.weight_key(feats[:, mixer.dim:])  # (B, C/2, 7, 7)
    affinity = torch.einsum('bgci,bgcj->bgij', query.reshape(batch, groups, -1, work[0] * work[1]),
                            centres.reshape(batch, groups, -1, 49))
    logits = mixer.weight_proj(affinity.reshape(batch * groups, work[0], work[1], 49).permute(0, 3, 1, 2))
    logits = logits.permute(0, 2, 3, 1).reshape(batch, groups, *work, s * s + k * k)
    small = (logits[..., :s * s] + _brute_force_rpb(mixer.rpb1, *work, s)).softmax(-1)
    large = (logits[..., s * s:] + _brute_force_rpb(mixer.rpb2, *work, k)).softmax(-1)
    out = F.adaptive_avg_pool2d(_brute_force_aggregate(value, small, large), (height, width))
    return mixer.proj(gate * mixer.se_layer(mixer.dyconv_proj(out) + lepe))


@pytest.mark.parametrize('height,width', [(3, 5), (6, 2)])
def test_contmix_small_map_uses_resized_windows(height, width):
    """The map is smaller than the kernel: the official resize-to-k path, checked value by value (float64)."""
    torch.manual_seed(0)
    mixer = _randomise_norms(ContMix(16, 8, kernel_size=7, num_heads=2)).double().eval()
    feats = torch.randn(2, 24, height, width, dtype=torch.float64)
    assert mixer._work_size(height, width) is not None
    with torch.no_grad():
        out, expected = mixer(feats), _contmix_reference(mixer, feats)
    assert out.shape == feats.shape
    torch.testing.assert_close(out, expected, rtol=1e-9, atol=1e-9 * expected.abs().max().item())


@pytest.mark.parametrize('kernel_size', [17, 13, 7, 5])
def test_dilated_reparam_block_folds_exactly(kernel_size):
    torch.manual_seed(0)
    block = _randomise_norms(DilatedReparamBlock(6, kernel_size)).eval()
    x = torch.randn(2, 6, 19, 21)
    with torch.no_grad():
        expected = block(x)
        block.reparam()
        out = block(x)
    assert set(block.state_dict()) == {'lk_origin.weight', 'lk_origin.bias'}
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)


def _tiny(**kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    return _randomise_norms(timm.create_model('overlock_xt', **{**TINY, **kwargs})).eval()


def test_model_reparam_is_exact_and_matches_deploy_build():
    model = _tiny()
    x = torch.randn(2, 3, 64, 48)
    with torch.no_grad():
        expected = model(x)
        train_state = model.state_dict()
        model.reparam()
        torch.testing.assert_close(model(x), expected, rtol=0, atol=1e-5)
    deploy = timm.create_model('overlock_xt', deploy=True, **TINY).eval()
    assert model.state_dict().keys() == deploy.state_dict().keys()
    # a train-form checkpoint loads into a deploy build by folding on the way
    deploy.load_state_dict(checkpoint_filter_fn(train_state, deploy), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(deploy(x), expected, rtol=0, atol=1e-5)


def test_deploy_checkpoint_into_train_form_is_an_error():
    deploy_state = _tiny().reparam().state_dict()
    train = timm.create_model('overlock_xt', **TINY)
    with pytest.raises(ValueError, match='deploy=True'):
        checkpoint_filter_fn({'state_dict': deploy_state}, train)


@pytest.mark.parametrize('variant', ['xt', 't', pytest.param('s', marks=pytest.mark.heavy),
                                     pytest.param('b', marks=pytest.mark.heavy)])
def test_full_size_train_manifest_folds_into_deploy_build(variant):
    """The official train-form keys load strictly into overlock_<v>(deploy=True), with the official deploy count."""
    root = fixtures_root() / 'overlock'
    keys = json.loads((root / f'keys_overlock_{variant}.json').read_text())
    deploy_manifest = json.loads((root / f'keys_overlock_{variant}_reparam.json').read_text())
    state = {k: torch.empty(shape, device='meta', dtype=torch.int64 if k.endswith('num_batches_tracked')
                            else torch.float32) for k, shape in keys.items() if k != 'num_params'}
    with torch.device('meta'):
        model = timm.create_model(f'overlock_{variant}', deploy=True)
    model.load_state_dict(checkpoint_filter_fn(state, model), strict=True, assign=True)
    assert sum(p.numel() for p in model.parameters()) == deploy_manifest['num_params']


@pytest.mark.parametrize('variant,channels', [
    ('xt', [56, 112, 340, 420]), ('t', [64, 128, 384, 640]),
    pytest.param('s', [64, 128, 448, 640], marks=pytest.mark.heavy),
    pytest.param('b', [80, 160, 528, 720], marks=pytest.mark.heavy)])
def test_feature_channels_are_the_official_neck_inputs(variant, channels):
    with torch.device('meta'):
        model = timm.create_model(f'overlock_{variant}', features_only=True)
    assert model.feature_info.channels() == channels
    assert model.feature_info.reduction() == [4, 8, 16, 32]


def test_features_only_has_no_classifier_parameters():
    """Every parameter of the feature extractor feeds the features (the head projection and the auxiliary
    classifier are pruned), so DDP without find_unused_parameters and weight decay see only the backbone."""
    torch.manual_seed(0)
    model = timm.create_model('overlock_xt', features_only=True)
    sum(f.square().mean() for f in model(torch.randn(1, 3, 64, 64))).backward()
    assert [name for name, p in model.named_parameters() if p.grad is None] == []
    assert not any(name.startswith(('model.head', 'model.aux_head')) for name, _ in model.named_parameters())


def _case(name: str):
    path = fixtures_path() / 'overlock' / f'{name}.json'
    fixtures_root()
    case = json.loads(path.read_text())
    kwargs = dict(case['zoo_kwargs'])
    overlay = dict(file=str(path.with_name(f'{name}.state.safetensors')), num_classes=kwargs['num_classes'])
    model = timm.create_model(case['zoo_name'], pretrained=True, pretrained_cfg_overlay=overlay, **kwargs).eval()
    return model, load_file(str(path.with_name(f'{name}.io.safetensors'))), case['atol']


@pytest.mark.parametrize('name', ['overlock_xt_reduced_64', 'overlock_t_reduced_k9-7-7-5_160x128'])
def test_aux_logits_match_official(name):
    model, io, atol = _case(name)
    with torch.no_grad():
        logits, aux = model.forward_with_aux(io['input'])
    torch.testing.assert_close(logits, io['logits'], rtol=0, atol=atol)
    torch.testing.assert_close(aux, io['aux_logits'], rtol=0, atol=atol)


def test_fixture_through_deploy_build_from_train_file():
    """The train-form fixture file, loaded by the user path into a deploy=True model, gives the official logits."""
    fixtures_root()
    path = fixtures_path() / 'overlock' / 'overlock_xt_reduced_64.json'
    case = json.loads(path.read_text())
    overlay = dict(file=str(path.with_name('overlock_xt_reduced_64.state.safetensors')), num_classes=10)
    model = timm.create_model('overlock_xt', pretrained=True, pretrained_cfg_overlay=overlay, deploy=True,
                              **case['zoo_kwargs']).eval()
    io = load_file(str(path.with_name('overlock_xt_reduced_64.io.safetensors')))
    with torch.no_grad():
        torch.testing.assert_close(model(io['input']), io['logits'], rtol=0, atol=case['atol'])


def test_aux_head_is_frozen_until_asked_for():
    """The auxiliary head loads with the checkpoint but trains only after set_aux_head_trainable(True), also across
    reset_classifier; without it forward_with_aux still trains the backbone through the auxiliary loss."""
    model = _tiny().train()
    aux = [n for n, _ in model.named_parameters() if n.startswith('aux_head.')]
    assert len(aux) == 4 and not any(p.requires_grad for p in model.aux_head.parameters())
    logits, aux_logits = model.forward_with_aux(torch.randn(2, 3, 48, 32))
    aux_logits.logsumexp(-1).sum().backward()
    assert all(p.grad is None for p in model.aux_head.parameters())
    assert all(p.grad is not None for p in model.blocks4.parameters())
    model.reset_classifier(5)
    assert not any(p.requires_grad for p in model.aux_head.parameters())
    model.set_aux_head_trainable(True)
    model.reset_classifier(3)
    assert all(p.requires_grad for p in model.aux_head.parameters())
    with pytest.raises(ValueError, match='use_ds=False'):
        timm.create_model('overlock_xt', use_ds=False, **TINY).set_aux_head_trainable(True)


def test_forward_with_aux_trains_every_parameter():
    model = _tiny().train()
    model.set_aux_head_trainable(True)
    model.set_grad_checkpointing(True)
    logits, aux = model.forward_with_aux(torch.randn(2, 3, 48, 32))
    assert logits.shape == aux.shape == (2, 7)
    (logits.logsumexp(-1) + 0.4 * aux.logsumexp(-1)).sum().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, missing


@pytest.mark.parametrize('size', [(17, 23), (40, 72), (1, 1), (250, 33)])
def test_any_input_size(size):
    model = _tiny()
    with torch.no_grad():
        out = model(torch.randn(1, 3, *size))
        feats = model.forward_intermediates(torch.randn(1, 3, *size), intermediates_only=True)
    assert out.shape == (1, 7) and torch.isfinite(out).all()
    assert [f.shape[-2:] for f in feats] == [torch.Size([-(-size[0] // s), -(-size[1] // s)]) for s in (4, 8, 16, 32)]


@pytest.mark.parametrize('bad,match', [(torch.randn(3, 32, 32), r'\(B, 3, H, W\)'),
                                       (torch.randn(1, 4, 32, 32), 'input channels'),
                                       (torch.zeros(1, 3, 32, 32, dtype=torch.int64), 'floating-point')])
def test_bad_input_is_a_clear_error(bad, match):
    with pytest.raises(ValueError, match=match):
        _tiny()(bad)


class _LargestTensor(TorchDispatchMode):
    """Records the largest tensor any operator returns."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else [out]):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def _largest_tensor(mixer: ContMix, size: int) -> int:
    """The largest tensor of a forward and backward pass of `mixer` over a size x size map."""
    torch.manual_seed(0)
    x = torch.randn(1, 24, size, size, requires_grad=True)
    with _LargestTensor() as probe:
        mixer(x).sum().backward()
    return probe.largest


def test_contmix_memory_is_linear_in_the_map():
    """Forward and backward never build an (HW)^2 tensor. The reference's largest is, per group and pixel, the
    s*s + k*k kernel logits; what `auto` runs (the blocked path on the CPU spreads each query tile's weights over
    its key block) grows with the map like the map does."""
    mixer = ContMix(16, 8, kernel_size=7, num_heads=2).train()
    pixels = 64 * 64
    with reference_only():
        assert _largest_tensor(mixer, 64) <= mixer.groups * (5 * 5 + 7 * 7) * pixels < pixels * pixels // 10
    small, large = _largest_tensor(mixer, 32), _largest_tensor(mixer, 64)
    assert large <= 4 * small  # four times the pixels, at most four times the memory


# Triton path of the aggregation (na2d_av's kernel) with ContMix's shapes: G groups, small and large windows.
TRITON_CASES = [(1, 2, 2, 7, 9, 5, 7), (2, 1, 3, 6, 5, 3, 5)]


@pytest.mark.parametrize('batch,groups,c,height,width,small,large', TRITON_CASES)
def test_contmix_aggregate_triton_matches_reference(batch, groups, c, height, width, small, large):
    torch.manual_seed(0)
    device = 'cuda' if torch.cuda.is_available() else 'cpu'
    value = torch.randn(batch, 2 * groups * c, height, width, device=device)
    attn_small = torch.randn(batch, groups, height, width, small * small, device=device).softmax(-1)
    attn_large = torch.randn(batch, groups, height, width, large * large, device=device).softmax(-1)
    grad = torch.randn_like(value)
    results = []
    for backend in ('torch', 'triton'):
        leaves = [t.clone().requires_grad_() for t in (value, attn_small, attn_large)]
        out = contmix_aggregate(*leaves, backend=backend)
        out.backward(grad)
        results.append([out] + [t.grad for t in leaves])
    for ref, tri in zip(*results):
        torch.testing.assert_close(tri, ref, atol=1e-5, rtol=1e-5)


def test_model_runs_with_triton_backend():
    # small kernels keep the interpreter fast; both Focus stages take the resize path at 64x64
    model = _tiny(kernel_size=(17, 15, 7, 5))
    triton_model = _tiny(kernel_size=(17, 15, 7, 5), backend='triton')
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(triton_model(x), model(x), atol=1e-4, rtol=1e-4)


def test_macs_match_the_official_measurement():
    """Deploy-form overlock_xt at 224 (anchor: 2.70 G MACs counting the dynamic-kernel aggregation, measured on the
    official model); the aggregation's MACs come from ContMix.macs_not_counted."""
    model = timm.create_model('overlock_xt', deploy=True).eval()
    assert round(count_macs(model, torch.randn(1, 3, 224, 224)) / 1e9, 2) == 2.70


def test_no_weight_decay_follows_the_official_recipe():
    assert _tiny().no_weight_decay() == set()
