"""Faults and bad input on the paths a user takes: damaged checkpoints on --resume, non-finite data or losses in
every task, damaged model folders and recipes. Each is one clear error (or a documented fallback), never a raw
traceback or lost work.

Policy (README, "Failures"): models propagate NaN and Inf like any torch module; the tasks check every training
batch and loss and stop with a FloatingPointError naming the step, epoch and batch, leaving the checkpoints already
written untouched."""
import subprocess
import sys
import warnings

import pytest
import torch

from conftest import REPO
from zoo.tasks import classification, compression, detection, load_recipe, segmentation
from zoo.tasks.engine import PREVIOUS_LAST

CLASSIFICATION = REPO / 'recipes' / 'classification' / 'quickstart.yaml'
TINY_CLASSIFICATION = ['data.train_size=32', 'data.val_size=16', 'data.batch_size=16', 'data.eval_batch_size=16',
                       'data.workers=0', 'data.img_size=32', 'schedule.epochs=2', 'schedule.warmup_epochs=0']


def _zoo(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, '-m', 'zoo.cli', *args], capture_output=True, text=True, timeout=600)


def _one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode == 2, result.stderr
    assert 'Traceback' not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith('zoo ')]
    assert len(errors) == 1, result.stderr
    for fragment in fragments:
        assert fragment in errors[0], errors[0]


def _truncate(path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 3])


def test_damaged_last_checkpoint_falls_back_to_the_previous_one(tmp_path):
    run = tmp_path / 'run'
    recipe = load_recipe(CLASSIFICATION, TINY_CLASSIFICATION)
    classification.train(recipe, str(run))
    checkpoints = run / 'checkpoints'
    previous = torch.load(checkpoints / PREVIOUS_LAST, weights_only=True)
    assert previous['epoch'] == 0  # the epoch-0 checkpoint, kept when the epoch-1 one replaced it
    _truncate(checkpoints / 'last.ckpt')
    longer = load_recipe(CLASSIFICATION, [*TINY_CLASSIFICATION, 'schedule.epochs=3'])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        metrics = classification.train(longer, str(run), resume='last')
    assert any('unreadable' in str(w.message) and PREVIOUS_LAST in str(w.message) for w in caught)
    assert metrics['epochs'] == 3


def test_resume_with_no_good_checkpoint_is_one_clear_line(tmp_path):
    run = tmp_path / 'run'
    classification.train(load_recipe(CLASSIFICATION, [*TINY_CLASSIFICATION, 'schedule.epochs=1']), str(run))
    _truncate(run / 'checkpoints' / 'last.ckpt')
    assert not (run / 'checkpoints' / PREVIOUS_LAST).exists()
    result = _zoo('train', str(CLASSIFICATION), '--output', str(run), '--resume',
                  *(f'--set={item}' for item in TINY_CLASSIFICATION))
    _one_line_error(result, 'cannot resume from', 'last.ckpt', 'unreadable')


def _nan_image_batch(batch_size: int = 2, size: int = 32) -> torch.Tensor:
    images = torch.rand(batch_size, 3, size, size)
    images[1, 0, 3, 4] = float('nan')
    return images


def test_classification_stops_on_a_non_finite_batch():
    module = classification.ClassificationModule(load_recipe(CLASSIFICATION, TINY_CLASSIFICATION), 10)
    batch = (_nan_image_batch(), torch.tensor([1, 2]), 0)
    with pytest.raises(FloatingPointError, match=r'batch 7 of epoch 0 \(step 0\) holds NaN or infinite input'):
        module.training_step(batch, 7)


def test_segmentation_stops_on_a_non_finite_batch():
    recipe = load_recipe(REPO / 'recipes' / 'segmentation' / 'quickstart.yaml', ['data.img_size=32'])
    module = segmentation.SegmentationModule(recipe, 11)
    batch = (_nan_image_batch(), torch.zeros(2, 32, 32, dtype=torch.long))
    with pytest.raises(FloatingPointError, match=r'batch 3 of epoch 0 \(step 0\) holds NaN'):
        module.training_step(batch, 3)


def test_detection_stops_on_a_non_finite_image(tmp_path):
    recipe = load_recipe(REPO / 'recipes' / 'detection' / 'quickstart.yaml', ['data.train_size=4', 'data.val_size=2'])
    train_set, val_set = detection.build_datasets(recipe, tmp_path / 'data')
    module = detection.DetectionModule(recipe, train_set.num_classes, val_set)
    images, targets = zip(*[train_set[i] for i in range(2)])
    images = [images[0], images[1].clone().fill_(float('inf'))]
    with pytest.raises(FloatingPointError, match=r'batch 5 of epoch 0 \(step 0\) holds NaN or infinite'):
        module.training_step((images, list(targets)), 5)


def test_compression_stops_on_a_non_finite_loss(tmp_path):
    """A finite batch whose loss is not finite (weights already broken): the loss check names the batch."""
    recipe = load_recipe(REPO / 'recipes' / 'compression' / 'quickstart.yaml',
                         ['model.quality=1', 'model.name=compressai:bmshj2018-hyperprior', 'model.N=8', 'model.M=12'])
    module = compression.CompressionModule(recipe, 1, 0.01)
    with torch.no_grad():
        next(module.codec.g_a.parameters()).fill_(float('nan'))
    with pytest.raises(FloatingPointError, match=r'training loss became nan at step 0 \(epoch 0, batch 4\)'):
        module.training_step(torch.rand(2, 3, 64, 64), 4)


def test_compression_stops_on_a_non_finite_batch():
    recipe = load_recipe(REPO / 'recipes' / 'compression' / 'quickstart.yaml',
                         ['model.quality=1', 'model.name=compressai:bmshj2018-hyperprior', 'model.N=8', 'model.M=12'])
    module = compression.CompressionModule(recipe, 1, 0.01)
    with pytest.raises(FloatingPointError, match=r'batch 2 of epoch 0 \(step 0\) holds NaN'):
        module.training_step(_nan_image_batch(2, 64), 2)


@pytest.mark.parametrize('content, fragments', [
    ('{"architecture": "nat_mini", ', ('config.json is damaged: not valid JSON',)),
    ('[1, 2, 3]', ('config.json is damaged: expected a JSON object',)),
    ('{"zoo": {"format": "something-else"}}', ('damaged "zoo" metadata',)),
])
def test_damaged_model_folder_is_one_clear_line(tmp_path, content, fragments):
    folder = tmp_path / 'model'
    folder.mkdir()
    (folder / 'config.json').write_text(content)
    (folder / 'model.safetensors').write_bytes(b'not weights')
    _one_line_error(_zoo('eval', '--checkpoint', str(folder), '--data', 'shapes'), *fragments)


def test_folder_of_no_task_is_one_clear_line(tmp_path):
    (tmp_path / 'notes.txt').write_text('hello')
    _one_line_error(_zoo('eval', '--checkpoint', str(tmp_path), '--data', 'shapes'), 'not a model folder of any task')


def test_damaged_weights_in_a_model_folder_are_one_clear_line(tmp_path):
    run = tmp_path / 'run'
    classification.train(load_recipe(CLASSIFICATION, [*TINY_CLASSIFICATION, 'schedule.epochs=1']), str(run))
    _truncate(run / 'model' / 'model.safetensors')
    _one_line_error(_zoo('eval', '--checkpoint', str(run / 'model'), '--data', 'shapes'), 'model.safetensors')


@pytest.mark.parametrize('text, fragment', [
    ('task: classification\nmodel: {name: nat_mini\n', 'not valid YAML'),
    ('- task: classification\n- model: nat_mini\n', 'a recipe must be a mapping of sections, got list'),
    ('just a sentence\n', 'a recipe must be a mapping of sections, got str'),
    ('task: classification\nmodel: nat_mini\n', '`model` must be a mapping'),
    ('task: classification\nmodel: {name: nat_mini}\noptim: {name: adamww}\n', "`optim.name` 'adamww' is not a timm"),
    ('task: classification\nmodel: {name: nat_mini}\nschedule: {sched: cosin}\n', '`schedule.sched` must be one of'),
    ('task: classification\nmodel: {name: nat_mini}\ntrainer: {precision: bf17}\n', '`trainer.precision` must be'),
    ('task: detection\nmodel: {name: nat_mini}\nhead: {arch: yolo}\n', 'head.arch must be one of'),
    ('task: segmentation\nmodel: {name: nat_mini}\nhead: {decoder_chanels: 8}\n', 'unknown upernet head key'),
])
def test_bad_recipe_is_one_clear_line_before_anything_runs(tmp_path, text, fragment):
    path = tmp_path / 'recipe.yaml'
    path.write_text(text)
    _one_line_error(_zoo('train', str(path), '--dry-run'), fragment, str(path))


def test_task_module_trains_every_trainable_parameter_by_default():
    """TaskModule's default parameter_groups(): the trainable parameters, not frozen ones (an EMA copy, a teacher)."""
    from zoo.tasks.engine import TaskModule
    module = TaskModule(load_recipe(CLASSIFICATION, TINY_CLASSIFICATION))
    module.student, module.frozen = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2).requires_grad_(False)
    optimizer = module.configure_optimizers()
    trained = {id(p) for group in optimizer.param_groups for p in group['params']}
    assert trained == {id(p) for p in module.student.parameters()}
