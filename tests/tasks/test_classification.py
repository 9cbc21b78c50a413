"""`zoo train` / `zoo eval` end to end on tiny shapes runs: outputs, evaluation, resume, NaN stop."""
import importlib.util
import json
import math
import subprocess
import sys

import pytest
import pytorch_lightning as pl
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from conftest import REPO, require
from zoo.tasks import load_recipe
from zoo.tasks import classification, engine

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


_KILL_RANK_ONE = """
import os, signal, sys
import pytorch_lightning as pl
from zoo import cli
from zoo.tasks import engine

class KillRankOne(pl.Callback):
    # SIGKILL, no clean-up: what an out-of-memory kill or a lost node does to one process of the job
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_rank == 1 and trainer.global_step == {step}:
            os.kill(os.getpid(), signal.SIGKILL)

build = engine.build_trainer
def build_with_kill(*args, **kwargs):
    trainer = build(*args, **kwargs)
    trainer.callbacks.append(KillRankOne())
    return trainer

engine.build_trainer = build_with_kill
sys.exit(cli.main(sys.argv[1:]))
"""


def test_ddp_job_with_a_killed_process_resumes_to_the_uninterrupted_weights(tmp_path):
    """Two gloo DDP processes through the real launcher; rank 1 is SIGKILLed mid-epoch (after the step-2 checkpoint,
    6 steps per epoch). The launcher takes the job down, `--resume` continues from the last checkpoint, and the final
    weights equal those of a run that was never interrupted: data position, optimizer and schedule all come back on
    both ranks. The uninterrupted run itself splits the steps across the ranks, prints one run folder and reduces
    its validation metrics over both halves of val (`zoo eval` of its model reproduces them)."""
    ddp = [*[a for kv in TINY_RUN for a in ('--set', kv)], '--set', 'data.train_size=96', '--set', 'data.batch_size=8',
           '--set', 'schedule.epochs=2', '--set', 'trainer.checkpoint_every_steps=2', '--set', 'trainer.devices=2',
           '--set', 'trainer.strategy=ddp', '--set', 'trainer.accelerator=cpu', '--set', 'aug.hflip=0',
           '--set', 'aug.scale=[1.0,1.0]', '--set', 'aug.train_interpolation=bilinear', '--set',
           'data.eval_batch_size=10']
    whole = _zoo('train', str(QUICKSTART), '--output', str(tmp_path / 'whole'), *ddp)
    assert whole.returncode == 0, whole.stderr[-3000:]
    assert whole.stdout.count('run folder:') == 1
    assert torch.load(tmp_path / 'whole' / 'checkpoints' / 'last.ckpt', weights_only=True)['global_step'] == \
        2 * 96 // (8 * 2)  # two epochs of 96 images, batch 8 on each of the two ranks
    evaluated = _zoo('eval', '--checkpoint', str(tmp_path / 'whole' / 'model'), '--data', 'shapes', '--shapes-size',
                     '40', '--workers', '0', '--json', str(tmp_path / 'e.json'))
    assert evaluated.returncode == 0, evaluated.stderr
    metrics = json.loads((tmp_path / 'whole' / 'metrics.json').read_text())
    assert json.loads((tmp_path / 'e.json').read_text())['top1'] == pytest.approx(metrics['val_top1'], abs=1e-9)
    script = tmp_path / 'kill_rank_one.py'
    script.write_text(_KILL_RANK_ONE.format(step=3))
    killed = subprocess.run([sys.executable, str(script), 'train', str(QUICKSTART), '--output', str(tmp_path / 'run'),
                             *ddp], capture_output=True, text=True, timeout=300)
    assert killed.returncode != 0
    assert torch.load(tmp_path / 'run' / 'checkpoints' / 'last.ckpt', weights_only=True)['global_step'] == 2
    assert not (tmp_path / 'run' / 'model').exists()
    resumed = _zoo('train', str(QUICKSTART), '--output', str(tmp_path / 'run'), '--resume', *ddp)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    expected = load_file(str(tmp_path / 'whole' / 'model' / 'model.safetensors'))
    got = load_file(str(tmp_path / 'run' / 'model' / 'model.safetensors'))
    assert expected.keys() == got.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=1e-6, msg=key)


class _Killed(Exception):
    pass


def _kill_before_batch(index: int):
    """A callback that stops training abruptly before training batch `index` (0-based) of the first epoch."""
    class Kill(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx == index:
                raise _Killed(f'killed before batch {index}')
    return Kill()


def _with_callback(build_trainer, callback: pl.Callback):
    """build_trainer, with `callback` added to every trainer it builds."""
    def build(*args, **kwargs):
        trainer = build_trainer(*args, **kwargs)
        trainer.callbacks.append(callback)
        return trainer
    return build


def test_resume_mid_epoch_continues_at_the_data_position(tmp_path, monkeypatch):
    """A run killed mid-epoch and resumed ends with exactly the weights of a run that was never interrupted:
    the sampler position, optimizer and scheduler all come back (augmentation off, so only they matter)."""
    deterministic = ['data.train_size=96', 'schedule.epochs=2', 'trainer.checkpoint_every_steps=2', 'aug.hflip=0',
                     'aug.scale=[1.0,1.0]', 'aug.train_interpolation=bilinear']
    _train(tmp_path / 'whole', *deterministic)
    with monkeypatch.context() as patch:
        patch.setattr(engine, 'build_trainer', _with_callback(engine.build_trainer, _kill_before_batch(3)))
        with pytest.raises(_Killed):
            _train(tmp_path / 'killed', *deterministic)
    state = torch.load(tmp_path / 'killed' / 'checkpoints' / 'last.ckpt', weights_only=True)
    assert state['global_step'] == 2  # the checkpoint is mid-epoch (6 batches per epoch)
    _train(tmp_path / 'killed', *deterministic, resume='last')
    whole = load_file(str(tmp_path / 'whole' / 'model' / 'model.safetensors'))
    resumed = load_file(str(tmp_path / 'killed' / 'model' / 'model.safetensors'))
    assert whole.keys() == resumed.keys()
    for key in whole:
        torch.testing.assert_close(resumed[key], whole[key], rtol=0, atol=1e-6, msg=key)


@pytest.mark.parametrize('name,expected', [('adamw', 'AdamW'), ('sgd', 'SGD'), ('lamb', 'Lamb')])
def test_recipe_optimizers_with_layer_decay(name, expected):
    """optim.name picks timm's optimizer; layer_decay scales each layer group's lr by decay ** depth-from-top."""
    recipe = load_recipe(QUICKSTART, [*TINY_RUN, f'optim.name={name}', 'optim.layer_decay=0.5', 'optim.lr=0.01'])
    module = classification.ClassificationModule(recipe, num_classes=10)
    optimizer = module.configure_optimizers()
    assert type(optimizer).__name__ == expected
    scales = sorted({group['lr_scale'] for group in optimizer.param_groups})
    assert len(scales) > 2 and scales[-1] == 1.0
    assert all(scale == pytest.approx(0.5 ** round(math.log(scale, 0.5))) for scale in scales)
    head = {id(p) for p in module.model.get_classifier().parameters()}
    exempt = {id(p) for n, p in module.model.named_parameters()
              if p.dim() <= 1 or any(n.endswith(k) for k in module.model.no_weight_decay())}
    for group in optimizer.param_groups:
        if head & {id(p) for p in group['params']}:
            assert group['lr_scale'] == 1.0
        if group['weight_decay'] == 0.0:  # norms, biases and what the model exempts (position biases)
            assert {id(p) for p in group['params']} <= exempt


def test_wandb_logs_offline_into_the_run_folder(tmp_path):
    require('wandb', "pip install 'attention-zoo[wandb]'")
    _train(tmp_path, 'logging.wandb=true')
    runs = list((tmp_path / 'logs' / 'wandb').glob('offline-run-*'))
    assert len(runs) == 1 and any(runs[0].glob('*.wandb'))


def test_wandb_without_the_package_is_a_clear_error(tmp_path, monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, 'find_spec',
                        lambda name, *a: None if name == 'wandb' else real_find_spec(name, *a))
    with pytest.raises(ValueError, match=r"wandb is not installed: pip install 'attention-zoo\[wandb\]'"):
        _train(tmp_path, 'logging.wandb=true')
    assert not (tmp_path / 'checkpoints' / 'last.ckpt').exists()  # refused before any training


def test_aux_weight_trains_the_auxiliary_head(tmp_path):
    """loss.aux_weight: main + w * aux criterion through the model's forward_with_aux (OverLoCK's Overview head)."""
    path = tmp_path / 'overlock_tiny.yaml'
    path.write_text('task: classification\nsource: test\n'
                    'model: {name: overlock_xt, depth: [1, 1, 1, 1], sub_depth: [2, 1], embed_dim: [16, 32, 48, 64], '
                    'sub_num_heads: [2, 2], projection: 64}\n'
                    'data: {name: shapes, img_size: 64}\nloss: {aux_weight: 0.4}\n')
    recipe = load_recipe(path)
    module = classification.ClassificationModule(recipe, num_classes=10)
    images, labels = torch.randn(2, 3, 64, 64), torch.tensor([1, 7])
    loss, parts = module._training_loss(images, labels)
    logits, aux = module.model.forward_with_aux(images)
    expected = F.cross_entropy(logits, labels) + 0.4 * F.cross_entropy(aux, labels)
    torch.testing.assert_close(loss, expected)
    assert parts == {}
    loss.backward()
    assert all(p.grad is not None for p in module.model.aux_head.parameters())
    with pytest.raises(ValueError, match='nat_mini has no auxiliary head'):
        classification.ClassificationModule(load_recipe(QUICKSTART, [*TINY_RUN, 'loss.aux_weight=0.4']), 10)


def test_updates_per_epoch_count_each_process_share():
    """Under DDP every process draws 1/world of the data per epoch, so the per-update lr schedule must count the
    updates of one process (counting the whole set stretched the schedule by the process count)."""
    recipe = load_recipe(QUICKSTART, [*TINY_RUN, 'data.batch_size=8', 'trainer.accumulate=2'])
    train_set, val_set, _ = classification.build_datasets(recipe)
    data = engine.RunData(recipe, train_set, val_set)
    assert len(train_set) == 48
    assert [data.batches_per_epoch(world) for world in (1, 2, 5)] == [6, 3, 1]  # 5 processes: 10 each (padded)


def _star_folder(root, count: int = 12, extra_class: str = None):
    """A folder holding only shapes-val images of one class (star), optionally plus a class folder of another
    name: what a user points `zoo eval` at."""
    from PIL import Image

    from zoo.data.shapes import SHAPE_CLASSES, ShapesConfig, render_sample
    config = ShapesConfig(num_samples=400, img_size=64, split='val')
    star = SHAPE_CLASSES.index('star')
    samples = (render_sample(config, i) for i in range(config.num_samples))
    stars = [s for s in samples if int(s.labels[0]) == star][:count]
    (root / 'star').mkdir(parents=True)
    for i, sample in enumerate(stars):
        Image.fromarray(sample.image).save(root / 'star' / f'{i}.png')
    if extra_class:
        (root / extra_class).mkdir()
        Image.fromarray(stars[0].image).save(root / extra_class / '0.png')
    return root


def test_eval_maps_class_folders_by_name(tmp_path):
    """A folder with only star/ images was scored 0 % (folder order gave them label 0, circle); labels now come
    from the model's class names: the shipped quickstart model (92 % on shapes) names most stars correctly."""
    data = _star_folder(tmp_path / 'stars')
    result = _zoo('eval', '--checkpoint', str(REPO / 'checkpoints' / 'quickstart'), '--data', str(data),
                  '--workers', '0', '--json', str(tmp_path / 'e.json'))
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / 'e.json').read_text())['top1'] > 60


def test_eval_refuses_class_folders_the_model_does_not_know(tmp_path):
    data = _star_folder(tmp_path / 'mixed', count=2, extra_class='hexagon')
    result = _zoo('eval', '--checkpoint', str(REPO / 'checkpoints' / 'quickstart'), '--data', str(data))
    assert result.returncode == 2 and "class folders ['hexagon']" in result.stderr, result.stderr


def test_imagenet_synset_folders_map_through_timm_imagenet_info(tmp_path):
    from timm.data import ImageNetInfo
    model = timm.create_model('nat_mini', num_classes=1000)
    (tmp_path / 'n01443537').mkdir()  # goldfish, ImageNet class 1
    torch.save(torch.zeros(1), tmp_path / 'n01443537' / 'x.png')
    folder = classification.folder_for_model(str(tmp_path), model)
    assert ImageNetInfo().index_to_label_name(1) == 'n01443537' and folder.target_transform(0) == 1


def test_eval_and_predict_without_weights_are_refused():
    for command in (('eval', '--model', 'nat_mini', '--data', 'shapes'), ('predict', 'x.png', '--model', 'nat_mini')):
        result = _zoo(*command)
        assert result.returncode == 2 and '--checkpoint is required' in result.stderr, result.stderr


def test_training_set_smaller_than_one_batch_fails_before_training(tmp_path):
    """It used to exit 0 after zero epochs and export an untrained model."""
    result = _zoo('train', str(QUICKSTART), '--output', str(tmp_path / 'run'), '--set', 'data.train_size=8',
                  '--set', 'data.workers=0')
    assert result.returncode == 2 and 'makes no full batch' in result.stderr, result.stderr
    assert not (tmp_path / 'run' / 'model').exists()


def test_classification_reads_16_bit_images_like_every_task(tmp_path):
    """One loader (zoo.data.images): a 16-bit PNG keeps its top 8 bits instead of being clipped to 255."""
    import numpy as np
    from PIL import Image

    from zoo.data.folder import SafeImageFolder
    from zoo.data.images import load_rgb
    pixels = (np.arange(64 * 64, dtype=np.uint32).reshape(64, 64) * 16).astype(np.uint16)
    (tmp_path / 'grey').mkdir()
    Image.fromarray(pixels).save(tmp_path / 'grey' / 'sixteen.png')
    image, _ = SafeImageFolder(str(tmp_path))[0]
    expected = load_rgb(tmp_path / 'grey' / 'sixteen.png', mode='convert').permute(1, 2, 0).numpy()
    assert np.array_equal(np.asarray(image), expected)
    assert np.array_equal(expected[..., 0], (pixels >> 8).astype(np.uint8))  # clipping made 99.6 % of them 255


def test_run_files_respect_the_umask(tmp_path):
    """Atomic writes go through a private temp file (mode 0600); the finished files get what a plain open() gives."""
    import os
    previous = os.umask(0o027)
    try:
        _train(tmp_path / 'run')
    finally:
        os.umask(previous)
    for name in ('metrics.json', 'checkpoints/last.ckpt', 'model/model.safetensors', 'model/config.json'):
        assert (tmp_path / 'run' / name).stat().st_mode & 0o777 == 0o640, name
