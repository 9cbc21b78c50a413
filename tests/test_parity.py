"""Parity with the official implementations, through the path a user takes (`../shared/fixtures`).

Model cases: build with `timm.create_model(zoo_name, pretrained=True, pretrained_cfg_overlay=dict(file=STATE,
num_classes=N), **zoo_kwargs)`, compare logits (and features / pre-logits where stored) within the case's atol.
Manifests: every full-size official key -> shape manifest loads strictly through the family's
checkpoint_filter_fn, on the meta device, and parameter counts equal the official ones.
"""
import json
import sys
from pathlib import Path

import pytest
import timm
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import zoo  # noqa: F401  (registers the models)
from conftest import fixtures_path, fixtures_root
from tiny_configs import PARITY_FOLDERS

# Fixture folders of the families that exist in the zoo (each family's tests/families file names its own).
FAMILIES = PARITY_FOLDERS


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
