"""`zoo train` / `zoo eval` end to end on tiny shapes runs: outputs, evaluation, resume, NaN stop."""
import json
import subprocess
import sys

import pytest
import timm
import torch
from safetensors.torch import load_file

from conftest import REPO
from zoo.recipes import load_recipe
from zoo.tasks import classification

QUICKSTART = REPO / 'recipes' / 'classification' / 'quickstart.yaml'
TINY_RUN = ['data.train_size=48', 'data.val_size=40', 'data.batch_size=16', 'data.eval_batch_size=20',
            'data.workers=0', 'data.img_size=32', 'schedule.epochs=1', 'schedule.warmup_epochs=0']


def _train(out, *overrides, resume=None):
    recipe = load_recipe(QUICKSTART, [*TINY_RUN, *overrides])
    return classification.train(recipe, str(out), resume=resume)


def test_train_writes_the_run_folder_and_eval_reproduces_its_metrics(tmp_path):
    metrics = _train(tmp_path / 'run')
    run = tmp_path / 'run'
    assert set(json.loads((run / 'metrics.json').read_text())) >= {'val_top1', 'val_top5', 'epochs', 'seconds'}
    assert metrics['epochs'] == 1 and 0 <= metrics['val_top1'] <= 100
    for name in ('recipe.yaml', 'checkpoints/last.ckpt', 'checkpoints/best.ckpt', 'logs/metrics.csv',
                 'model/model.safetensors', 'model/config.json'):
        assert (run / name).is_file(), name
    assert load_recipe(run / 'recipe.yaml').data.train_size == 48
    model = timm.create_model(f'local-dir:{run / "model"}', pretrained=True)
    assert tuple(model.pretrained_cfg['input_size']) == (3, 32, 32) and model.num_classes == 10
    saved = load_file(str(run / 'model' / 'model.safetensors'))
    assert all(torch.equal(saved[k], v) for k, v in model.state_dict().items())
    result = subprocess.run([sys.executable, '-m', 'zoo.cli', 'eval', '--checkpoint', str(run / 'model'), '--data',
                             'shapes', '--shapes-size', '40', '--workers', '0', '--json', str(tmp_path / 'e.json')],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    evaluated = json.loads((tmp_path / 'e.json').read_text())
    assert evaluated['top1'] == pytest.approx(metrics['val_top1'], abs=1e-9)
    assert evaluated['images'] == 40


def test_resume_continues_from_the_last_checkpoint(tmp_path):
    _train(tmp_path)
    first = torch.load(tmp_path / 'checkpoints' / 'last.ckpt', weights_only=False)
    metrics = _train(tmp_path, 'schedule.epochs=2', resume='last')
    second = torch.load(tmp_path / 'checkpoints' / 'last.ckpt', weights_only=False)
    assert metrics['epochs'] == 2
    assert second['global_step'] == 2 * first['global_step']
    assert second['zoo_scheduler'] is not None


def test_nan_loss_stops_with_a_clear_message_and_keeps_the_last_checkpoint(tmp_path):
    _train(tmp_path)
    last = tmp_path / 'checkpoints' / 'last.ckpt'
    before = last.read_bytes()
    with pytest.raises(FloatingPointError, match=r'training loss became nan.*last good checkpoint'):
        _train(tmp_path, 'optim.lr=1.0e30', 'schedule.warmup_epochs=0', 'loss.smoothing=0.0')
    assert last.read_bytes() == before


def test_missing_data_root_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match='dataset folder not found'):
        _train(tmp_path, 'data.name=imagefolder', f'data.root={tmp_path / "nowhere"}')


def test_resume_without_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match='no checkpoint to resume from'):
        _train(tmp_path, resume='last')
