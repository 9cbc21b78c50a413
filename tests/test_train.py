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


def _zoo(*args):
    return subprocess.run([sys.executable, '-m', 'zoo.cli', *args], capture_output=True, text=True, timeout=300)


def test_predict_names_the_classes_of_a_trained_run(tmp_path):
    from PIL import Image

    from zoo.data.shapes import SHAPE_CLASSES, ShapesConfig, render_sample
    _train(tmp_path / 'run')
    image = tmp_path / 'shape.png'
    Image.fromarray(render_sample(ShapesConfig(num_samples=1, img_size=32), 0).image).save(image)
    result = _zoo('predict', str(image), '--checkpoint', str(tmp_path / 'run' / 'model'), '--top-k', '3')
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == str(image) and len(lines) == 4
    assert all(line.split()[-1] in SHAPE_CLASSES for line in lines[1:])
    broken = tmp_path / 'broken.png'
    broken.write_bytes(b'no image here')
    result = _zoo('predict', str(broken), '--checkpoint', str(tmp_path / 'run' / 'model'))
    assert result.returncode == 2 and 'cannot read image' in result.stderr


def test_convert_official_checkpoint_and_refuse_another_architecture(tmp_path):
    torch.manual_seed(0)
    official = timm.create_model('nat_mini').eval()
    torch.save(official.state_dict(), tmp_path / 'nat_mini.pth')
    result = _zoo('convert', str(tmp_path / 'nat_mini.pth'), str(tmp_path / 'converted'), '--model', 'nat_mini')
    assert result.returncode == 0, result.stderr
    converted = timm.create_model(f'local-dir:{tmp_path / "converted"}', pretrained=True).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(converted(x), official(x), rtol=0, atol=0)
    result = _zoo('convert', str(tmp_path / 'nat_mini.pth'), str(tmp_path / 'wrong'), '--model', 'dinat_s_tiny')
    assert result.returncode == 2 and 'does not match dinat_s_tiny' in result.stderr
    assert 'Missing key(s)' in result.stderr and not (tmp_path / 'wrong' / 'model.safetensors').exists()


def test_two_process_ddp_on_cpu(tmp_path):
    """gloo DDP through the real launcher: steps split across ranks, metrics reduced over both halves of val."""
    run = tmp_path / 'ddp'
    result = _zoo('train', str(QUICKSTART), '--output', str(run), *[a for kv in TINY_RUN for a in ('--set', kv)],
                  '--set', 'data.batch_size=8', '--set', 'data.eval_batch_size=10', '--set', 'trainer.devices=2',
                  '--set', 'trainer.strategy=ddp', '--set', 'trainer.accelerator=cpu')
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count('run folder:') == 1
    assert torch.load(run / 'checkpoints' / 'last.ckpt', weights_only=False)['global_step'] == 48 // (8 * 2)
    metrics = json.loads((run / 'metrics.json').read_text())
    evaluated = _zoo('eval', '--checkpoint', str(run / 'model'), '--data', 'shapes', '--shapes-size', '40',
                     '--workers', '0', '--json', str(tmp_path / 'e.json'))
    assert evaluated.returncode == 0, evaluated.stderr
    assert json.loads((tmp_path / 'e.json').read_text())['top1'] == pytest.approx(metrics['val_top1'], abs=1e-9)
