"""OpenMMLab integration: backbones built through mmengine's Config + root MODELS registry (no mmdet/mmseg/mmcv),
their output shapes, the official downstream checkpoint layouts, and input checking."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F

from conftest import REPO, fixtures_root, require

require('mmengine', "pip install 'attention-zoo[openmmlab]'")
from mmengine.config import Config  # noqa: E402
from mmengine.registry import MODELS  # noqa: E402

import zoo.integrations.openmmlab  # noqa: E402,F401  (registers the backbone types)
from tests.family_facts import nat as nat_family  # noqa: E402
from tests.family_facts import overlock as overlock_family  # noqa: E402
from tests.family_facts import moh as moh_family  # noqa: E402
from tests.family_facts import transnext as transnext_family  # noqa: E402

CONFIGS = sorted(p for p in (REPO / 'configs' / 'openmmlab').glob('mm*/*.py') if not p.name.startswith('_'))

NAT_TINY = nat_family.TINY[-1][1]
DINAT_TINY = nat_family.TINY[-2][1]
OVERLOCK_TINY = overlock_family.TINY[0][1]
TRANSNEXT_TINY = transnext_family.TINY[0][1]
GENERIC_CASES = [
    ('nat_mini', NAT_TINY),
    ('transnext_micro', TRANSNEXT_TINY),
    ('moh_transnext_base_50', moh_family.TINY[0][1]),
    ('overlock_xt', OVERLOCK_TINY),
    ('halonet_paper_h0', dict(block_size=2, halo_size=1, widths=(8, 16, 16, 32), num_heads=(1, 2, 2, 2),
                              depths=(1, 1, 2, 1), stem_chs=8)),
]


def _backbone_cfg(path: Path):
    cfg = Config.fromfile(str(path))
    head = cfg.model.neck if 'neck' in cfg.model else cfg.model.decode_head
    return cfg.model.backbone, list(head.in_channels)


@pytest.mark.heavy
@pytest.mark.parametrize('path', CONFIGS, ids=[p.stem for p in CONFIGS])
def test_config_backbone_feature_shapes(path):
    backbone_cfg, in_channels = _backbone_cfg(path)
    backbone = MODELS.build(backbone_cfg).eval()
    with torch.no_grad():
        feats = backbone(torch.randn(1, 3, 64, 64))
    assert isinstance(feats, tuple)
    assert [f.shape[1] for f in feats] == in_channels
    assert [tuple(f.shape[2:]) for f in feats] == [(64 // s, 64 // s) for s in (4, 8, 16, 32)]


def test_child_registry_finds_the_root_types():
    """mmdet's and mmseg's MODELS are children of the root registry; unscoped types resolve upwards."""
    from mmengine.registry import Registry
    child = Registry('model', parent=MODELS, scope='downstream_test')
    backbone = child.build(dict(type='DiNAT', **DINAT_TINY))
    assert type(backbone).__name__ == 'DiNATBackbone'


@pytest.mark.parametrize('name,kwargs', GENERIC_CASES, ids=[n for n, _ in GENERIC_CASES])
def test_zoo_backbone_matches_timm_features_only(name, kwargs):
    backbone = MODELS.build(dict(type='ZooBackbone', model_name=name, out_indices=(1, 2, 3), **kwargs)).eval()
    reference = timm.create_model(name, features_only=True, out_indices=(1, 2, 3), **kwargs).eval()
    reference.load_state_dict(backbone.body.state_dict())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        got, want = backbone(x), reference(x)
    assert len(got) == 3 and backbone.strides == [8, 16, 32]
    for g, w, c in zip(got, want, backbone.out_channels):
        assert g.shape[1] == c
        torch.testing.assert_close(g, w)


@pytest.mark.parametrize('name,kwargs', [
    ('swin_tiny_patch4_window7_224', dict(embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1), img_size=64,
                                          window_size=4)),
    ('convnext_tiny', dict(dims=(8, 16, 24, 32), depths=(1, 1, 1, 1))),
])
def test_zoo_backbone_with_timm_models_gives_nchw(name, kwargs):
    backbone = MODELS.build(dict(type='ZooBackbone', model_name=name, **kwargs)).eval()
    with torch.no_grad():
        feats = backbone(torch.randn(1, 3, 64, 64))
    assert [tuple(f.shape) for f in feats] == [(1, c, 64 // s, 64 // s)
                                               for c, s in zip(backbone.out_channels, backbone.strides)]
    assert backbone.strides == [4, 8, 16, 32]


def _layer_norm_2d(x, weight, bias, eps):
    return F.layer_norm(x.permute(0, 2, 3, 1), x.shape[1:2], weight, bias, eps).permute(0, 3, 1, 2)


def _random_like(state):
    """Fresh random values (BatchNorm running variances kept positive) so a load that is skipped shows."""
    out = {k: (torch.randn_like(v) if v.is_floating_point() else v.clone()) for k, v in state.items()}
    return {k: (v.abs() + 0.5 if k.endswith('running_var') else v) for k, v in out.items()}


def _load_through_mmengine(cfg, state, tmp_path):
    """Save `state` as a detector checkpoint (`backbone.` prefix, plus a neck key) and load it with the init_cfg
    an mmdet/mmseg config uses."""
    path = tmp_path / 'detector.pth'
    torch.save({'state_dict': {**{f'backbone.{k}': v for k, v in state.items()},
                               'neck.lateral_convs.0.conv.weight': torch.zeros(1)}}, path)
    backbone = MODELS.build(dict(cfg, init_cfg=dict(type='Pretrained', checkpoint=str(path), prefix='backbone.')))
    backbone.init_weights()
    return backbone.eval()


def test_nat_official_downstream_checkpoint_loads_and_normalises(tmp_path):
    classifier = timm.create_model('nat_mini', **NAT_TINY).eval()
    # Official downstream layout: the classifier's names minus `norm`/`head`, plus norm0..3 (C, 2C, 4C, 8C).
    state = _random_like({k: v for k, v in classifier.state_dict().items() if not k.startswith(('norm.', 'head.'))})
    widths = [NAT_TINY['embed_dim'] * 2 ** i for i in range(4)]
    for i, c in enumerate(widths):
        state[f'norm{i}.weight'], state[f'norm{i}.bias'] = 1 + 0.1 * torch.randn(c), 0.1 * torch.randn(c)
    backbone = _load_through_mmengine(dict(type='NAT', **NAT_TINY), state, tmp_path)
    classifier.load_state_dict(state, strict=False)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        got = backbone(x)
        levels = classifier.forward_intermediates(x, intermediates_only=True)
    for i, (g, level) in enumerate(zip(got, levels)):
        torch.testing.assert_close(g, _layer_norm_2d(level, state[f'norm{i}.weight'], state[f'norm{i}.bias'], 1e-5))


def test_overlock_official_detection_checkpoint_loads_with_context_projection(tmp_path):
    classifier = timm.create_model('overlock_xt', **OVERLOCK_TINY).eval()
    state = _random_like({k: v for k, v in classifier.state_dict().items()
                          if not k.startswith(('head.', 'aux_head.'))})
    dims = OVERLOCK_TINY['embed_dim']
    ctx, fused = dims[3], dims[3] + dims[3] // 4
    widths = [dims[0], dims[1], dims[2] + dims[3] // 4, fused, ctx]
    for i, c in enumerate(widths):
        state[f'extra_norm.{i}.weight'], state[f'extra_norm.{i}.bias'] = 1 + 0.1 * torch.randn(c), 0.1 * torch.randn(c)
    state['h_proj.0.weight'], state['h_proj.0.bias'] = torch.randn(fused, ctx, 1, 1) * ctx ** -0.5, torch.randn(fused)
    state['h_proj.1.weight'], state['h_proj.1.bias'] = torch.randn(fused, 1, 1, 1), torch.randn(fused)
    backbone = _load_through_mmengine(dict(type='overlock_xt', context_proj=True, **OVERLOCK_TINY), state, tmp_path)
    classifier.load_state_dict(state, strict=False)
    contexts = []
    classifier.blocks4.register_forward_hook(lambda m, a, out: contexts.append(out))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        got = backbone(x)
        levels = classifier.forward_intermediates(x, intermediates_only=True)
        context = _layer_norm_2d(contexts[0], state['extra_norm.4.weight'], state['extra_norm.4.bias'], 1e-6)
        projected = F.conv2d(context, state['h_proj.0.weight'], state['h_proj.0.bias'])
        projected = F.conv2d(projected, state['h_proj.1.weight'], state['h_proj.1.bias'], groups=fused)
    for i, (g, level) in enumerate(zip(got, levels)):
        want = _layer_norm_2d(level, state[f'extra_norm.{i}.weight'], state[f'extra_norm.{i}.bias'], 1e-6)
        torch.testing.assert_close(g, want + projected if i == 3 else want)


def test_overlock_segmentation_backbone_has_no_context_projection():
    backbone = MODELS.build(dict(type='overlock_xt', **OVERLOCK_TINY))
    assert len(backbone.extra_norm) == 4
    assert not any(k.startswith(('h_proj', 'body.model.head', 'body.model.aux_head')) for k in backbone.state_dict())


def _manifest_keys(folder: str, variant: str):
    data = json.loads((fixtures_root() / folder / f'keys_{variant}.json').read_text())
    return data['keys'] if 'keys' in data else {k: v for k, v in data.items() if k != 'num_params'}


def _official_layout(path: Path):
    """(backbone cfg, official downstream key -> shape, head in_channels) for a full-size config, from the
    classification key manifest and the downstream backbone's description (docs/nat_dinat.md §6-7, docs/transnext.md
    §7, docs/overlock.md §7)."""
    backbone_cfg, in_channels = _backbone_cfg(path)
    kind = backbone_cfg.type
    if kind in ('NAT', 'DiNAT'):
        variant = {'NAT': 'nat_tiny', 'DiNAT': 'dinat_tiny'}[kind]
        keys = {k: s for k, s in _manifest_keys(variant.split('_')[0], variant).items()
                if not k.startswith(('norm.', 'head.'))}
        for i, c in enumerate(in_channels):
            keys[f'norm{i}.weight'] = keys[f'norm{i}.bias'] = [c]
    elif kind.startswith('transnext'):
        keys = {k: s for k, s in _manifest_keys('transnext', kind).items() if not k.startswith('head.')}
    else:
        keys = {k: s for k, s in _manifest_keys('overlock', kind).items() if not k.startswith(('head.', 'aux_head.'))}
        ctx = keys['high_level_proj.weight'][1]
        for i, c in enumerate(in_channels + ([ctx] if backbone_cfg.get('context_proj') else [])):
            keys[f'extra_norm.{i}.weight'] = keys[f'extra_norm.{i}.bias'] = [c]
        if backbone_cfg.get('context_proj'):
            fused = in_channels[3]
            keys.update({'h_proj.0.weight': [fused, ctx, 1, 1], 'h_proj.0.bias': [fused],
                         'h_proj.1.weight': [fused, 1, 1, 1], 'h_proj.1.bias': [fused]})
    return backbone_cfg, keys, in_channels


def _distinct_backbones():
    """One config per distinct backbone dict (mmdet and mmseg configs often share one)."""
    seen = {}
    for path in CONFIGS:
        seen.setdefault(repr(_backbone_cfg(path)), path)
    return sorted(seen.values())


def test_configs_cover_every_official_type():
    types = {_backbone_cfg(p)[0].type for p in CONFIGS}
    assert {'NAT', 'DiNAT', 'transnext_tiny', 'overlock_t'} <= types
    assert {p.parent.name for p in CONFIGS} == {'mmdet', 'mmseg'}


@pytest.mark.parametrize('path', _distinct_backbones(), ids=lambda p: p.stem)
def test_full_size_config_backbone_matches_head_and_official_layout(path):
    """The full-size backbone of a config: its channels and strides are what the neck / decode head expects,
    and a state dict in the official downstream layout loads strictly."""
    backbone_cfg, keys, in_channels = _official_layout(path)
    backbone = MODELS.build(backbone_cfg)
    assert backbone.out_channels == in_channels
    assert backbone.strides == [4, 8, 16, 32]
    state = {k: torch.zeros(shape, dtype=torch.long if k.endswith('num_batches_tracked') else torch.float32)
             for k, shape in keys.items()}
    backbone.load_state_dict(state, strict=True)


def test_classification_checkpoint_as_pretrained(tmp_path):
    classifier = timm.create_model('transnext_micro', **TRANSNEXT_TINY).eval()
    state = _random_like(classifier.state_dict())
    torch.save(state, tmp_path / 'cls.pth')
    classifier.load_state_dict(state)
    backbone = MODELS.build(dict(type='transnext_micro', pretrained=str(tmp_path / 'cls.pth'), **TRANSNEXT_TINY))
    backbone.init_weights()  # must not re-initialise the loaded weights
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        got = backbone.eval()(x)
        want = classifier.forward_intermediates(x, intermediates_only=True)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


def test_norm_eval_keeps_batchnorm_in_eval_mode():
    backbone = MODELS.build(dict(type='ZooBackbone', model_name='overlock_xt', norm_eval=True, **OVERLOCK_TINY))
    backbone.train()
    norms = [m for m in backbone.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert norms and not any(m.training for m in norms)
    assert backbone.body.training


@pytest.mark.parametrize('cfg,frozen_stages,frozen_tops', [
    (dict(type='NAT', **NAT_TINY), 0, ['model.patch_embed']),
    (dict(type='NAT', **NAT_TINY), 2, ['model.patch_embed', 'model.levels.0', 'model.levels.1']),
    # stage 2's output (sub_blocks3) needs the overview net (blocks4, high_level_proj): they freeze with it
    (dict(type='overlock_xt', **OVERLOCK_TINY), 3, ['model.patch_embed1', 'model.blocks1', 'model.patch_embed2',
                                                    'model.blocks2', 'model.patch_embed3', 'model.blocks3',
                                                    'model.patch_embed4', 'model.blocks4', 'model.high_level_proj',
                                                    'model.sub_blocks3']),
    (dict(type='ZooBackbone', model_name='resnet18'), 2, ['conv1', 'bn1', 'layer1']),  # five timm stages (act1 first)
])
def test_frozen_stages_freeze_the_stem_and_first_stages(cfg, frozen_stages, frozen_tops):
    """OpenMMLab's frozen_stages: no gradient and eval mode for the stem and stages 0..k-1, the rest trains."""
    backbone = MODELS.build(dict(cfg, frozen_stages=frozen_stages))
    backbone.train()
    sum(f.mean() for f in backbone(torch.randn(2, 3, 64, 64))).backward()
    for name, param in backbone.body.named_parameters():
        frozen = any(name == top or name.startswith(top + '.') for top in frozen_tops)
        assert param.requires_grad != frozen and (param.grad is None) == frozen, name
    modules = dict(backbone.body.named_modules())
    assert not any(modules[top].training for top in frozen_tops) and backbone.body.training


@pytest.mark.parametrize('frozen_stages', [-2, 5, 1.0])
def test_frozen_stages_out_of_range_is_a_value_error(frozen_stages):
    with pytest.raises(ValueError, match='frozen_stages'):
        MODELS.build(dict(type='NAT', frozen_stages=frozen_stages, **NAT_TINY))


@pytest.mark.parametrize('bad,match', [
    (torch.randn(1, 4, 64, 64), r'\(B, 3, H, W\)'),
    (torch.randn(3, 64, 64), 'shape'),
    (torch.zeros(1, 3, 64, 64, dtype=torch.uint8), 'uint8'),
])
def test_bad_input_is_a_value_error(bad, match):
    backbone = MODELS.build(dict(type='DiNAT', **DINAT_TINY))
    with pytest.raises(ValueError, match=match):
        backbone(bad)


@pytest.mark.parametrize('cfg,match', [
    (dict(type='ZooBackbone', model_name='nat_mini', out_indices=(2, 1)), 'out_indices'),
    (dict(type='ZooBackbone', model_name='nat_mini', out_indices=()), 'out_indices'),
    (dict(type='ZooBackbone', model_name='nat_mini', pretrained='x.pth', init_cfg=dict(type='Pretrained')),
     'not both'),
])
def test_bad_arguments_are_value_errors(cfg, match):
    with pytest.raises(ValueError, match=match):
        MODELS.build(dict(cfg, **NAT_TINY))


def test_zoo_does_not_need_mmengine_and_custom_imports_registers_the_types():
    """In a fresh interpreter: `import zoo` leaves mmengine alone; loading a config imports the adapter
    through its `custom_imports`, after which the registry knows the family types."""
    config = REPO / 'configs' / 'openmmlab' / 'mmseg' / 'upernet_nat_tiny_512x512_160k_ade20k.py'
    code = ('import sys, zoo\n'
            'assert "mmengine" not in sys.modules, "zoo imported mmengine"\n'
            'from mmengine.registry import MODELS\n'
            'assert MODELS.get("NAT") is None\n'
            'from mmengine.config import Config\n'
            f'Config.fromfile({str(config)!r})\n'
            'assert MODELS.get("NAT") is not None and MODELS.get("ZooBackbone") is not None\n')
    subprocess.run([sys.executable, '-c', code], check=True, cwd=REPO)
