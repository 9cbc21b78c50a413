"""NAT / DiNAT (zoo.models.nat) on the pretrained-file path a user takes: the official checkpoint layouts, the
relative-position-bias resize of another kernel size, and the files that must be refused (foreign, another size,
truncated, pickled code). Parity with the official outputs is in test_parity.py, the timm contract in
test_contract.py."""
import pickle
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

import zoo  # noqa: F401  (registers the models)
from zoo.models.nat import checkpoint_filter_fn

TINY = dict(embed_dim=16, depths=(1, 1, 2, 1), num_heads=(1, 2, 2, 4), kernel_size=3)


def _tiny_state(**kwargs):
    torch.manual_seed(0)
    return timm.create_model('nat_mini', **{**TINY, **kwargs}).eval()


def _load(path, **kwargs):
    return timm.create_model('nat_mini', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)),
                             **{**TINY, **kwargs}).eval()


@pytest.mark.parametrize('wrap', ['raw', 'model', 'state_dict', 'module_prefix'])
def test_official_checkpoint_layouts_load(tmp_path, wrap):
    """The official .pth files are raw state dicts; training scripts wrap them or add 'module.'."""
    model = _tiny_state()
    state = model.state_dict()
    payload = {'raw': state, 'model': {'model': state, 'epoch': 3}, 'state_dict': {'state_dict': state},
               'module_prefix': {f'module.{k}': v for k, v in state.items()}}[wrap]
    path = tmp_path / 'ckpt.pth'
    torch.save(payload, path)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(_load(path)(x), model(x), rtol=0, atol=0)


def test_rpb_of_another_kernel_size_is_resized_bicubically():
    source = _tiny_state(kernel_size=3).state_dict()
    target = timm.create_model('nat_mini', **{**TINY, 'kernel_size': 5})
    filtered = checkpoint_filter_fn(source, target)
    key = 'levels.0.blocks.0.attn.rpb'
    expected = torch.nn.functional.interpolate(source[key][None], size=(9, 9), mode='bicubic')[0]
    torch.testing.assert_close(filtered[key], expected)
    target.load_state_dict(filtered, strict=True)


def test_foreign_checkpoint_is_refused_with_the_key_names(tmp_path):
    path = tmp_path / 'other.safetensors'
    save_file({'backbone.conv.weight': torch.zeros(3, 3)}, str(path))
    with pytest.raises(RuntimeError, match=r'Missing key\(s\).*patch_embed'):
        _load(path)


def test_checkpoint_of_another_size_is_refused(tmp_path):
    path = tmp_path / 'wider.safetensors'
    save_file(_tiny_state(embed_dim=32).state_dict(), str(path))
    with pytest.raises(RuntimeError, match='size mismatch'):
        _load(path)


def test_truncated_checkpoint_is_refused(tmp_path):
    path = tmp_path / 'cut.safetensors'
    save_file(_tiny_state().state_dict(), str(path))
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(Exception, match='(?i)(header|deserializ|incomplete|invalid)'):
        _load(path)


class _Payload:
    def __reduce__(self):
        return (Path.touch, (Path('/tmp/zoo_unpickled_marker'),))


def test_loading_never_unpickles_objects(tmp_path):
    marker = Path('/tmp/zoo_unpickled_marker')
    marker.unlink(missing_ok=True)
    path = tmp_path / 'evil.pth'
    with open(path, 'wb') as f:
        pickle.dump({'model': _Payload()}, f)
    with pytest.raises(RuntimeError, match='weights_only=True blocked'):
        _load(path)
    assert not marker.exists()
