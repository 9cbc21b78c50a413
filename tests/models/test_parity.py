"""Parity with the official implementations, through the path a user takes (`../shared/fixtures`).

Model cases: build with `timm.create_model(zoo_name, pretrained=True, pretrained_cfg_overlay=dict(file=STATE,
num_classes=N), **zoo_kwargs)`, compare logits (and features / pre-logits where stored) within the case's atol.
Manifests: every full-size official key -> shape manifest loads strictly through the family's
checkpoint_filter_fn, on the meta device, and parameter counts equal the official ones.
Operator cases (na2d): the documented call, with the default backend, reproduces the official output.
"""
import json
import sys
from pathlib import Path
from typing import List

import pytest
import timm
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import zoo  # noqa: F401  (registers the models)
from conftest import fixtures_path, fixtures_root
from tiny_configs import PARITY_FOLDERS
from zoo.layers import neighborhood_attention_2d

# Fixture folders of the families that exist in the zoo (each family's tests/family_facts file names its own).
FAMILIES = PARITY_FOLDERS

# The public cases and manifests (JSON stems) of every fixture folder, written out: the tests below glob the
# folders at import, so a folder that lost files would otherwise just run fewer cases. Hidden cases may sit beside
# them.
EXPECTED_FIXTURES = {
    'nat': ['nat_mini_k7_224', 'nat_small_k5_layerscale_odd',
            *(f'keys_nat_{v}' for v in ('mini', 'tiny', 'small', 'base', 'isotropic_small', 'isotropic_base'))],
    'dinat': ['dinat_mini_k7_224', 'dinat_base_k5_layerscale_odd', 'dinat_s_tiny_k5_pad',
              *(f'keys_dinat_{v}' for v in ('mini', 'tiny', 'small', 'base', 'large', 'large_384', 'large_384_11x11',
                                            'large_21k', 'large_21k_11x11', 'isotropic_small', 'isotropic_base')),
              *(f'keys_dinat_s_{v}' for v in ('tiny', 'small', 'base', 'large', 'large_384', 'large_21k')),
              'keys_vitrpb_small', 'keys_vitrpb_base'],
    'transnext': ['transnext_micro_reduced_64', 'transnext_tiny_reduced_96_pretrain64',
                  *(f'keys_transnext_{v}' for v in ('micro', 'tiny', 'small', 'base', 'micro_AAAA'))],
    'overlock': ['overlock_xt_reduced_64', 'overlock_xt_reduced_64_reparam', 'overlock_t_reduced_k9-7-7-5_160x128',
                 *(f'keys_overlock_{v}{form}' for v in ('xt', 't', 's', 'b') for form in ('', '_reparam'))],
    'halo': ['halo_b8_h3_c64_nh4', 'halo_b4_h1_c32to48_nh2_dh12_bias', 'halo_b8_h2_c48to64_nh4_qk05_s2_scalepos',
             'halo_b4_h1_c32_nh4_s2_avgdown', 'halonet_family'],
    'sparsifiner': ['deit_s_reduced_keep100', 'deit_s_reduced_keep025', 'deit_s_reduced_keep025_prune',
                    'lvvit_s_reduced_keep025', 'keys_sparsifiner_deit_small', 'keys_sparsifiner_lvvit_small'],
    'kdgqa': ['mhsa_e96', 'gqa_e96_kv3', 'kdgqa_e96_kv3_b1', 'kdgqa_e96_kv3_b2', 'dgqa_ema_e96_kv3_b2',
              'pgqa_e96_kv3_b2',
              *(f'keys_vit_{size}_patch16_224_{scheme}' for size in ('small', 'base', 'large')
                for scheme in ('gqa', 'dgqa_ema')),
              *(f'keys_vit_small_patch16_224_{scheme}' for scheme in ('mhsa', 'kdgqa', 'pgqa'))],
    'na2d': ['na2d_k3_d1_odd', 'na2d_k5_d2_rect', 'na2d_k7_d3_exact_h', 'na2d_k13_d1_exact_h', 'na2d_k5_d1_norpb_even',
             'na2d_k7_d2_exact_both'],
    'moh': ['moh_transnext_small_75_reduced_64', 'moh_transnext_base_50_reduced_64_shared1',
            *(f'keys_moh_transnext_{v}' for v in ('small_80', 'small_75', 'base_75', 'base_50'))],
}


def _case_paths(path: Path, case: dict):
    files = case.get('files', {})
    state = path.parent / files.get('state', f'{path.stem}.state.safetensors')
    io = path.parent / files.get('io', f'{path.stem}.io.safetensors')
    return state, io


def _fixture_files(pattern: str):
    """(family, path) of every fixture file matching pattern, found without skipping at collection time."""
    root = fixtures_path()
    return [(family, path) for family in FAMILIES for path in sorted((root / family).glob(pattern))]


MODEL_CASES = [(f, p) for f, p in _fixture_files('*.json') if not p.name.startswith('keys_')]
MANIFESTS = _fixture_files('keys_*.json')


def _first_case_with_features_per_family():
    """One case per fixture folder whose io file stores backbone features (`features.0`, ...)."""
    chosen = {}
    for family, path in MODEL_CASES:
        state, io = _case_paths(path, json.loads(path.read_text()))
        if family not in chosen and io.is_file():
            with safe_open(str(io), 'pt') as f:
                if 'features.0' in f.keys():
                    chosen[family] = (family, path)
    return list(chosen.values())


def test_fixture_folders_are_present():
    """Fails under CI when the fixtures are missing; elsewhere skips with the reason."""
    root = fixtures_root()
    for family in FAMILIES:
        assert any((root / family).glob('*.json')), f'no fixtures for {family} in {root}'


def _fixture_files(path: Path) -> List[Path]:
    """A fixture's JSON and the tensor files it uses: its `files` / `file` entries, else the default
    <stem>.state / .io files of a model case; manifests and the halo family table are the JSON alone."""
    data = json.loads(path.read_text())
    names = [v for v in data.get('files', {}).values() if isinstance(v, str)]
    names += [data['file']] if 'file' in data else []
    if not names and 'zoo_name' in data and not path.stem.startswith('keys_'):
        names = [f'{path.stem}.state.safetensors', f'{path.stem}.io.safetensors']
    return [path, *(path.parent / name for name in names)]


def test_every_parity_folder_lists_its_cases():
    assert set(FAMILIES) <= set(EXPECTED_FIXTURES), 'add the new folder and its cases to EXPECTED_FIXTURES'


@pytest.mark.parametrize('folder', sorted(EXPECTED_FIXTURES))
def test_fixture_folder_holds_its_cases(folder):
    """Every expected case and manifest is there with its tensor files (extra, hidden cases are welcome)."""
    root = fixtures_root() / folder
    present = {path.stem for path in root.glob('*.json')}
    missing = sorted(set(EXPECTED_FIXTURES[folder]) - present)
    assert not missing, f'{root} lacks {missing}'
    absent = [str(f) for stem in EXPECTED_FIXTURES[folder] for f in _fixture_files(root / f'{stem}.json')
              if not f.is_file()]
    assert not absent, f'files named by the fixtures are missing: {absent}'


@pytest.mark.parametrize('family,path', MODEL_CASES, ids=[p.stem for _, p in MODEL_CASES])
def test_official_logits(family, path):
    fixtures_root()
    case = json.loads(path.read_text())
    state, io_path = _case_paths(path, case)
    kwargs = dict(case.get('zoo_kwargs', {}))
    overlay = dict(file=str(state))
    if 'num_classes' in kwargs:
        overlay['num_classes'] = kwargs['num_classes']
    model = timm.create_model(case['zoo_name'], pretrained=True, pretrained_cfg_overlay=overlay, **kwargs).eval()
    io = load_file(str(io_path))
    atol = case['atol']
    with torch.no_grad():
        if 'rng_seed_before_forward' in case:
            torch.manual_seed(case['rng_seed_before_forward'])
        logits = model(io['input'])
        torch.testing.assert_close(logits, io['logits'], rtol=0, atol=atol)
        feature_keys = sorted(k for k in io if k.startswith('features.'))
        if feature_keys:
            feats = model.forward_intermediates(io['input'], intermediates_only=True)
            assert len(feats) == len(feature_keys)
            for key, feat in zip(feature_keys, feats):
                torch.testing.assert_close(feat, io[key], rtol=case.get('rtol', 0) or 1e-4, atol=atol, msg=key)
        if 'pre_logits' in io:
            pre = model.forward_head(model.forward_features(io['input']), pre_logits=True)
            torch.testing.assert_close(pre, io['pre_logits'], rtol=0, atol=atol)


FEATURE_CASES = _first_case_with_features_per_family()


@pytest.mark.parametrize('family,path', FEATURE_CASES, ids=[p.stem for _, p in FEATURE_CASES])
def test_features_only_gives_official_features(family, path):
    fixtures_root()
    case = json.loads(path.read_text())
    state, io_path = _case_paths(path, case)
    kwargs = dict(case.get('zoo_kwargs', {}))
    model = timm.create_model(case['zoo_name'], pretrained=True, features_only=True,
                              pretrained_cfg_overlay=dict(file=str(state), num_classes=kwargs.get('num_classes')),
                              **kwargs).eval()
    io = load_file(str(io_path))
    with torch.no_grad():
        feats = model(io['input'])
    for i, feat in enumerate(feats):
        torch.testing.assert_close(feat, io[f'features.{i}'], rtol=1e-4, atol=case['atol'])


def _manifest(path: Path):
    data = json.loads(path.read_text())
    keys = data['keys'] if 'keys' in data else {k: v for k, v in data.items() if k != 'num_params'}
    name = data.get('zoo_name') or data.get('variant') or path.stem[len('keys_'):]
    return name, data.get('zoo_kwargs', {}), keys, data


def _dtype(name: str, data: dict) -> torch.dtype:
    return getattr(torch, data.get('non_float32_keys', {}).get(name, 'float32'))


@pytest.mark.parametrize('family,path', MANIFESTS, ids=[p.stem for _, p in MANIFESTS])
def test_full_size_manifest_loads_strictly(family, path):
    fixtures_root()
    name, kwargs, keys, data = _manifest(path)
    with torch.device('meta'):
        model = timm.create_model(name, **kwargs)
    state = {k: torch.empty(shape, dtype=_dtype(k, data), device='meta') for k, shape in keys.items()}
    filter_fn = sys.modules[type(model).__module__].checkpoint_filter_fn
    model.load_state_dict(filter_fn(state, model), strict=True, assign=True)
    if 'num_params' in data:
        assert sum(p.numel() for p in model.parameters()) == data['num_params']


NA2D_CASES = sorted((fixtures_path() / 'na2d').glob('*.json'))


@pytest.mark.parametrize('path', NA2D_CASES, ids=[p.stem for p in NA2D_CASES])
def test_na2d_through_the_documented_call(path):
    """The call each case documents, backend left at its default ('auto', whatever it resolves to here)."""
    fixtures_root()
    case = json.loads(path.read_text())
    tensors = load_file(str(path.with_name(case['file'])))
    rpb = tensors['rpb'] if case['has_rpb'] else None
    out = neighborhood_attention_2d(tensors['q'], tensors['k'], tensors['v'], case['kernel_size'],
                                    dilation=case['dilation'], rpb=rpb, scale=case['scale'])
    torch.testing.assert_close(out, tensors['output'], rtol=case.get('rtol', 0), atol=case['atol'])
