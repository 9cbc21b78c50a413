"""Checkpoint unwrapping and reading (zoo/models/_checkpoint.py), and every family's filter using them."""
import importlib

import pytest
import timm
import torch
from safetensors.torch import save_file

import zoo  # noqa: F401  (registers the models)
from tiny_configs import FAMILY_REPRESENTATIVES, tiny_kwargs
from zoo.models import FAMILY_MODULES
from zoo.models._checkpoint import WRAPPER_KEYS, read_state_dict, unwrap_state_dict

FILTER_FAMILIES = [m for m in FAMILY_MODULES if hasattr(importlib.import_module(f'zoo.models.{m}'),
                                                        'checkpoint_filter_fn')]
ONE_PER_FAMILY = {m: next(n for n in FAMILY_REPRESENTATIVES if n in timm.list_models(module=m))
                  for m in FILTER_FAMILIES}


def _state(value: float) -> dict:
    """A two-tensor state dict whose tensors all hold `value`, so the picked wrapper is visible."""
    return {'w': torch.full((2, 3), value), 'b': torch.full((3,), value)}


def _picked(state: dict) -> float:
    assert state.keys() == {'w', 'b'}
    return state['w'][0, 0].item()


def test_wrapper_precedence_is_timms_with_ema_first():
    checkpoint = {key: _state(i) for i, key in enumerate(WRAPPER_KEYS)}
    checkpoint.update(epoch=3, optimizer={'lr': 0.1})
    assert WRAPPER_KEYS == ('state_dict_ema', 'model_ema', 'state_dict', 'model', 'module')
    for i in range(len(WRAPPER_KEYS)):  # drop the keys before i: key i wins
        assert _picked(unwrap_state_dict({k: v for k, v in checkpoint.items() if k not in WRAPPER_KEYS[:i]})) == i
    assert _picked(unwrap_state_dict(checkpoint, use_ema=False)) == WRAPPER_KEYS.index('state_dict')
    assert _picked(unwrap_state_dict({'model_ema': _state(7), 'model': _state(8)}, use_ema=False)) == 8


def test_nested_wrappers_and_prefixes_are_removed():
    raw = _state(5)
    wrapped = {'module': {'model': {f'_orig_mod.module.{k}': v for k, v in raw.items()}}, 'epoch': 1}
    out = unwrap_state_dict(wrapped)
    assert _picked(out) == 5 and all(out[k] is raw[k] for k in raw)
    assert unwrap_state_dict(raw) == raw


@pytest.mark.parametrize('checkpoint,message', [
    (torch.zeros(3), r'expected a state dict .*got Tensor'),
    ([torch.zeros(3)], r'expected a state dict .*got list'),
    ({'epoch': 3, 'w': torch.zeros(1)}, r"not a state dict: entries \['epoch'\]"),
    ({'state_dict': None, 'args': 'x'}, r"entries \['args', 'state_dict'\]"),
])
def test_what_is_not_a_state_dict_is_a_clear_error(checkpoint, message):
    with pytest.raises(ValueError, match=message):
        unwrap_state_dict(checkpoint)


@pytest.mark.parametrize('family', FILTER_FAMILIES)
def test_every_family_filter_unwraps_the_same_way(family):
    """Each checkpoint_filter_fn takes the EMA copy of a DDP/compiled training checkpoint, like timm's file path."""
    name = ONE_PER_FAMILY[family]
    torch.manual_seed(0)
    model = timm.create_model(name, **tiny_kwargs(name))
    filter_fn = importlib.import_module(f'zoo.models.{family}').checkpoint_filter_fn
    state = model.state_dict()
    decoy = {k: torch.zeros_like(v) for k, v in state.items()}
    checkpoint = {'state_dict_ema': {f'module._orig_mod.{k}': v for k, v in state.items()}, 'state_dict': decoy,
                  'model': decoy, 'epoch': 7}
    filtered, expected = filter_fn(checkpoint, model), filter_fn(state, model)
    assert filtered.keys() == expected.keys()
    assert all(torch.equal(filtered[k], expected[k]) for k in expected)
    model.load_state_dict(filtered, strict=True)


def test_filter_families_are_every_family_but_the_codec():
    assert set(FILTER_FAMILIES) == set(FAMILY_MODULES) - {'s2lic'}


def test_read_state_dict_formats_and_ema(tmp_path):
    raw = _state(1.)
    save_file(raw, str(tmp_path / 'w.safetensors'))
    assert _picked(read_state_dict(tmp_path / 'w.safetensors')) == 1
    torch.save({'state_dict': _state(2.), 'state_dict_ema': _state(3.), 'epoch': 4, 'optimizer': {'lr': 0.1}},
               str(tmp_path / 'train.pth'))
    assert _picked(read_state_dict(str(tmp_path / 'train.pth'))) == 3
    assert _picked(read_state_dict(tmp_path / 'train.pth', use_ema=False)) == 2
    with pytest.raises(FileNotFoundError, match='checkpoint not found'):
        read_state_dict(tmp_path / 'absent.pth')


def test_timm_file_path_and_read_state_dict_pick_the_same_weights(tmp_path):
    """The order is timm's, so a training checkpoint gives one model whichever way it is read."""
    name = 'nat_mini'
    torch.manual_seed(0)
    states = [timm.create_model(name, **tiny_kwargs(name)).state_dict() for _ in range(2)]
    path = tmp_path / 'train.pth'
    torch.save({'state_dict': states[0], 'state_dict_ema': states[1]}, str(path))
    through_timm = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)),
                                     **tiny_kwargs(name))
    direct = timm.create_model(name, **tiny_kwargs(name))
    direct.load_state_dict(zoo.models.nat.checkpoint_filter_fn(read_state_dict(path), direct), strict=True)
    for key, value in through_timm.state_dict().items():
        assert torch.equal(value, direct.state_dict()[key]) and torch.equal(value, states[1][key]), key


_CALLS = []


def _run_on_load():
    _CALLS.append('ran')
    return 'payload'


class _Payload:
    """Pickles as a call of `_run_on_load`: unpickling it runs code, which weights_only loading must refuse."""

    def __reduce__(self):
        return _run_on_load, ()


def test_read_state_dict_never_runs_pickled_code(tmp_path):
    path = tmp_path / 'evil.pth'
    torch.save({'model': _state(1.), 'extra': _Payload()}, str(path))
    with pytest.raises(ValueError, match=r'evil\.pth: not a readable weights file.*weights_only'):
        read_state_dict(path)
    assert _CALLS == []


@pytest.mark.parametrize('name,content', [
    ('notes.pth', b'plain text, not a checkpoint\n'),
    ('empty.pth', b''),
    ('config.safetensors', b'{"not": "safetensors"}'),
])
def test_read_state_dict_rejects_foreign_files(tmp_path, name, content):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(ValueError, match=f'{name}: not a readable weights file'):
        read_state_dict(tmp_path / name)


@pytest.mark.parametrize('suffix', ['.pth', '.safetensors'])
def test_read_state_dict_rejects_truncated_files(tmp_path, suffix):
    path = tmp_path / f'w{suffix}'
    state = {'w': torch.randn(64, 64)}
    if suffix == '.safetensors':
        save_file(state, str(path))
    else:
        torch.save(state, str(path))
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])
    with pytest.raises(ValueError, match='not a readable weights file'):
        read_state_dict(path)


def test_read_state_dict_rejects_a_file_without_a_state_dict(tmp_path):
    torch.save(torch.zeros(3), str(tmp_path / 'tensor.pth'))
    with pytest.raises(ValueError, match=r'tensor\.pth: expected a state dict .*got Tensor'):
        read_state_dict(tmp_path / 'tensor.pth')
    torch.save({'epoch': 3, 'args': [1, 2]}, str(tmp_path / 'meta.pth'))
    with pytest.raises(ValueError, match=r"meta\.pth: not a state dict: entries \['args', 'epoch'\]"):
        read_state_dict(tmp_path / 'meta.pth')
