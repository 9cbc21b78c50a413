"""timm model contract, checked for every registered zoo model (tiny configs, CPU)."""
import fnmatch
import subprocess
import sys

import pytest
import timm
import timm.optim
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

import zoo
from tiny_configs import ALL_MODELS, FAMILY_REPRESENTATIVES, no_gradient, tiny_kwargs

HIERARCHICAL_STRIDES = [4, 8, 16, 32]


def build(name: str, **kwargs) -> torch.nn.Module:
    """Tiny-config model, seeded so that two builds with the same arguments hold the same weights."""
    torch.manual_seed(0)
    return timm.create_model(name, **{**tiny_kwargs(name), **kwargs})


def input_for(model: torch.nn.Module, batch: int = 2) -> torch.Tensor:
    torch.manual_seed(0)
    return torch.randn(batch, *model.pretrained_cfg['input_size'])


def training_input(model: torch.nn.Module) -> torch.Tensor:
    """A small (2, 3, 64, 64) batch, or the cfg's input size for fixed-size models."""
    if model.pretrained_cfg.get('fixed_input_size'):
        return input_for(model)
    torch.manual_seed(0)
    return torch.randn(2, 3, 64, 64)


def is_hierarchical(model: torch.nn.Module) -> bool:
    return len({info['reduction'] for info in model.feature_info}) > 1


def gradient_problems(model: torch.nn.Module, allowed: dict) -> list:
    """After a backward pass: every parameter has a finite gradient, except those matching the family's
    NO_GRADIENT globs (`allowed`), which must be frozen (DDP and optimizers skip them) and have none."""
    problems = []
    for name, param in model.named_parameters():
        if any(fnmatch.fnmatch(name, pattern) for pattern in allowed):
            if param.requires_grad or param.grad is not None:
                problems.append(f'{name}: listed in NO_GRADIENT but trainable or given a gradient')
        elif not param.requires_grad:
            problems.append(f'{name}: frozen but not listed in NO_GRADIENT')
        elif param.grad is None or not torch.isfinite(param.grad).all():
            problems.append(f'{name}: no finite gradient')
    return problems


def test_every_family_is_registered():
    assert {'nat_mini', 'nat_tiny', 'nat_small', 'nat_base', 'dinat_mini', 'dinat_tiny', 'dinat_small', 'dinat_base',
            'dinat_large', 'dinat_s_tiny', 'nat_isotropic_small', 'vitrpb_small', 'moh_transnext_small_80',
            'moh_transnext_small_75', 'moh_transnext_base_75', 'moh_transnext_base_50'} <= set(ALL_MODELS)


def test_names_do_not_shadow_timm_models():
    """No zoo name replaces one of timm's own entries (timm only warns when that happens)."""
    timm_only = subprocess.run([sys.executable, '-c', 'import timm; print("\\n".join(timm.list_models()))'],
                               capture_output=True, text=True, check=True).stdout.split()
    assert len(timm_only) > 1000
    assert not set(ALL_MODELS) & set(timm_only)


@pytest.mark.parametrize('name', ALL_MODELS)
def test_forward_and_grad_checkpointing(name):
    model = build(name).eval()
    x = input_for(model)
    with torch.no_grad():
        out = model(x)
        model.set_grad_checkpointing(True)
        out_ckpt = model(x)
    assert out.shape == (2, model.num_classes)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out_ckpt, out)


@pytest.mark.parametrize('name', ALL_MODELS)
def test_backward_reaches_every_parameter(name):
    """criterion(model(x), y).backward() with default arguments gives every trainable parameter a gradient (DDP
    without find_unused_parameters, timm's backward check), and only the family's NO_GRADIENT ones are frozen."""
    model = build(name, num_classes=42).train()
    out = model(training_input(model))
    assert out.shape == (2, 42)
    F.cross_entropy(out, torch.tensor([3, 41])).backward()
    allowed = no_gradient(name)
    names = [n for n, _ in model.named_parameters()]
    assert all(fnmatch.filter(names, pattern) for pattern in allowed), f'a NO_GRADIENT glob matches nothing: {allowed}'
    problems = gradient_problems(model, allowed)
    assert not problems, problems


def _training_step(name: str, checkpointing: bool):
    """One seeded cross-entropy step of a fresh tiny model without dropout or drop path: (loss, parameter gradients,
    number of module calls in forward + backward; a checkpointed run recomputes its blocks in the backward)."""
    model = build(name, drop_rate=0., drop_path_rate=0.).train()
    model.set_grad_checkpointing(checkpointing)
    x = training_input(model)
    calls = []
    hook = torch.nn.modules.module.register_module_forward_hook(lambda *args: calls.append(1))
    try:
        torch.manual_seed(1)  # models that draw random numbers in training (PGQA's noise) draw the same ones
        loss = F.cross_entropy(model(x), torch.tensor([0, 1]))
        loss.backward()
    finally:
        hook.remove()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}, len(calls)


# One model per family structure, plus every KDGQA scheme: their training forwards differ (PGQA draws noise, DGQA
# updates its allocation state), and checkpointing runs them twice.
CHECKPOINTING_MODELS = sorted(set(FAMILY_REPRESENTATIVES) | set(zoo.list_models('vit_small_patch16_224_*')))


@pytest.mark.parametrize('name', CHECKPOINTING_MODELS)
def test_grad_checkpointing_gives_the_plain_gradients(name):
    """Train-mode gradients with set_grad_checkpointing(True) equal the plain backward's, and the blocks really
    are recomputed (more module calls), so the checkpointed path is not the plain one again."""
    loss, grads, calls = _training_step(name, checkpointing=False)
    loss_ckpt, grads_ckpt, calls_ckpt = _training_step(name, checkpointing=True)
    assert calls_ckpt > calls, 'set_grad_checkpointing(True) recomputed nothing in the backward pass'
    assert grads_ckpt.keys() == grads.keys()
    scale = max(g.abs().max() for g in grads.values())
    torch.testing.assert_close(loss_ckpt, loss, rtol=1e-6, atol=0)
    for key, grad in grads.items():
        torch.testing.assert_close(grads_ckpt[key], grad, rtol=1e-5, atol=1e-6 * scale, msg=key)


@pytest.mark.parametrize('name', ALL_MODELS)
def test_default_cfg_and_head(name):
    model = build(name).eval()
    cfg = model.pretrained_cfg
    for field in ('license', 'paper_ids', 'origin_url', 'input_size', 'mean', 'std', 'crop_pct'):
        assert cfg.get(field), f'{name} cfg lacks {field}'
    # where the weights are, or (families without published weights) a tag and a note saying so
    assert cfg.get('url') or cfg.get('hf_hub_id') or (cfg.get('tag') == 'untrained' and cfg.get('notes')), name
    state = model.state_dict()
    assert cfg['first_conv'] + '.weight' in state and cfg['classifier'] + '.weight' in state
    assert model.num_features > 0 and model.head_hidden_size > 0
    x = input_for(model, batch=1)
    with torch.no_grad():
        feats = model.forward_features(x)
        # hierarchical models give an NCHW map, ViT-style ones (B, tokens, C)
        unpooled_dims = feats.dim()
        if unpooled_dims == 4:
            assert feats.shape[1] == model.num_features
            assert tuple(feats.shape[-2:]) == tuple(cfg['pool_size'])
        else:
            assert unpooled_dims == 3 and feats.shape[-1] == model.num_features
        assert model.forward_head(feats, pre_logits=True).shape == (1, model.head_hidden_size)
        model.reset_classifier(0)
        assert model(x).shape == (1, model.num_features)
        model.reset_classifier(0, '')
        assert model(x).dim() == unpooled_dims
        unpooled = timm.create_model(name, num_classes=0, global_pool='', **tiny_kwargs(name)).eval()
        assert unpooled(x).dim() == unpooled_dims


@pytest.mark.parametrize('name', ALL_MODELS)
def test_features_only_matches_forward_intermediates(name):
    model = build(name).eval()
    x = input_for(model, batch=1)
    with torch.no_grad():
        final, intermediates = model.forward_intermediates(x)
        torch.testing.assert_close(final, model.forward_features(x))
        features = build(name, features_only=True).eval()
        outs = features(x)
    if is_hierarchical(model):
        assert features.feature_info.reduction() == HIERARCHICAL_STRIDES
        assert len(intermediates) == 4
        for out, stride in zip(intermediates, HIERARCHICAL_STRIDES):
            assert out.shape[-2:] == torch.Size([-(-x.shape[-2] // stride), -(-x.shape[-1] // stride)])
    assert [o.shape[1] for o in outs] == features.feature_info.channels()
    for out, expected in zip(outs, intermediates[-len(outs):]):
        torch.testing.assert_close(out, expected)


@pytest.mark.parametrize('name', FAMILY_REPRESENTATIVES)
def test_features_only_trains_every_parameter(name):
    """A feature extractor holds only what its features use: no classifier or head leftovers, which DDP without
    find_unused_parameters rejects and weight decay would silently shrink."""
    features = build(name, features_only=True).train()
    sum(f.float().square().mean() for f in features(training_input(features))).backward()
    # timm's FeatureGetterNet keeps the model as `.model`: NO_GRADIENT globs are relative to it
    problems = gradient_problems(getattr(features, 'model', features), no_gradient(name))
    assert not problems, problems


@pytest.mark.parametrize('name', ALL_MODELS)
def test_forward_intermediates_options(name):
    model = build(name).eval()
    x = input_for(model, batch=1)
    with torch.no_grad():
        _, full = model.forward_intermediates(x)
        model.set_grad_checkpointing(True)
        last_two = model.forward_intermediates(x, indices=2, intermediates_only=True, stop_early=True)
        nhwc = model.forward_intermediates(x, indices=[0], output_fmt='NHWC', intermediates_only=True)
    assert len(last_two) == 2
    for got, expected in zip(last_two, full[-2:]):
        torch.testing.assert_close(got, expected)
    torch.testing.assert_close(nhwc[0].permute(0, 3, 1, 2), full[0])
    with pytest.raises(ValueError, match='output_fmt'):
        model.forward_intermediates(x, output_fmt='NLC')


@pytest.mark.parametrize('name', ALL_MODELS)
def test_prune_intermediate_layers(name):
    model = build(name).eval()
    x = input_for(model, batch=1)
    with torch.no_grad():
        _, full = model.forward_intermediates(x)
        kept = model.prune_intermediate_layers(indices=[0, 1])
        pruned = model.forward_intermediates(x, indices=kept, intermediates_only=True)
    assert kept == [0, 1]
    for got, expected in zip(pruned, full[:2]):
        torch.testing.assert_close(got, expected)


@pytest.mark.parametrize('name', ALL_MODELS)
def test_group_matcher_and_no_weight_decay(name):
    model = build(name)
    matcher = model.group_matcher()
    assert set(matcher) == {'stem', 'blocks'}
    groups = timm.optim.create_optimizer_v2(model, 'adamw', lr=1e-3, weight_decay=0.05,
                                            layer_decay=0.75).param_groups
    assert sum(len(g['params']) for g in groups) == len([p for p in model.parameters() if p.requires_grad])
    no_decay = model.no_weight_decay()
    names = [n for n, _ in model.named_parameters()]
    # timm's convention allows names the model lacks (ViT lists dist_token), but not a list that names nothing
    assert not no_decay or any(fnmatch.filter(names, pattern) for pattern in no_decay), 'no parameter named'
    undecayed = {id(p) for g in groups if g['weight_decay'] == 0 for p in g['params']}
    assert all(id(p) in undecayed for n, p in model.named_parameters()
               if any(fnmatch.fnmatch(n, pattern) for pattern in no_decay))


@pytest.mark.parametrize('name', ALL_MODELS)
def test_safetensors_round_trip(name, tmp_path):
    model = build(name).eval()
    path = tmp_path / 'model.safetensors'
    save_file(model.state_dict(), str(path))
    reloaded = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)),
                                 **tiny_kwargs(name)).eval()
    x = input_for(model, batch=1)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x), model(x), rtol=0, atol=0)
    assert load_file(str(path)).keys() == reloaded.state_dict().keys()


@pytest.mark.parametrize('name', ALL_MODELS)
def test_single_channel_input(name):
    model = build(name, in_chans=1).eval()
    size = model.pretrained_cfg['input_size'][1:]
    with torch.no_grad():
        assert model(torch.randn(1, 1, *size)).shape == (1, model.num_classes)


@pytest.mark.parametrize('name', FAMILY_REPRESENTATIVES)
def test_torch_export(name):
    model = build(name).eval()
    x = input_for(model, batch=1)
    exported = torch.export.export(model, (x,))
    with torch.no_grad():
        torch.testing.assert_close(exported.module()(x), model(x))


@pytest.mark.parametrize('name', ['nat_mini', 'dinat_tiny', 'dinat_s_tiny', 'dinat_isotropic_small'])
def test_small_inputs_pad_instead_of_failing(name):
    """The NA layers pad maps smaller than kernel * dilation (official behaviour) at any input size."""
    model = build(name, kernel_size=5).eval()
    with torch.no_grad():
        for size in [(32, 32), (40, 72), (17, 23)]:
            out = model(torch.randn(1, 3, *size))
            assert out.shape == (1, model.num_classes) and torch.isfinite(out).all()


@pytest.mark.parametrize('name', ALL_MODELS)
def test_bad_input_is_one_clear_value_error(name):
    """Wrong rank, channel count or dtype fails before the stem with a ValueError naming the problem, in forward
    and in forward_intermediates (the features_only path)."""
    model = build(name).eval()
    size = tuple(model.pretrained_cfg['input_size'][1:])
    cases = [(torch.randn(3, *size), r'\(B, 3, H, W\) image tensor, got \(3, '),
             (torch.randn(1, 3, 1, *size), r'\(B, 3, H, W\) image tensor, got \(1, 3, 1, '),
             (torch.randn(1, 1, *size), r'built for 3 input channels, got 1'),
             (torch.zeros(1, 3, *size, dtype=torch.uint8), r'floating-point image tensor, got torch.uint8')]
    for bad, message in cases:
        for call in (model, model.forward_intermediates):
            with pytest.raises(ValueError, match=message):
                call(bad)


def test_vitrpb_rejects_other_sizes():
    model = build('vitrpb_small').eval()
    with pytest.raises(ValueError, match='14x14 token map'):
        model(torch.randn(1, 3, 160, 160))


def test_list_models_is_every_zoo_name():
    assert zoo.list_models('dinat_s_*') == [n for n in ALL_MODELS if n.startswith('dinat_s_')]
