"""Every task learns: short fixed-seed runs of the real training path (recipe -> task.train -> run folder) whose
loss falls and whose metric beats an independently computed chance level by a clear margin.

Sizes are chosen for a 2-core CPU (each run 10-40 s there). The margins leave room for the small numeric
differences between machines; the figures measured when the thresholds were set are in each docstring."""
import csv
from pathlib import Path
from typing import List

import torch

from conftest import REPO
from zoo.codecs.metrics import psnr_uint8
from zoo.data.photos import load_held_out_photos
from zoo.tasks import classification, compression, detection, load_recipe, segmentation
from zoo.tasks.segmentation import confusion_matrix, segmentation_metrics

RECIPES = REPO / 'recipes'


def _epoch_losses(run: Path, column: str = 'train_loss_epoch') -> List[float]:
    """The per-epoch means of a logged training loss, in epoch order, from the run's CSV log."""
    with open(run / 'logs' / 'metrics.csv') as f:
        return [float(row[column]) for row in csv.DictReader(f) if row.get(column)]


def test_classification_learns_the_shapes(tmp_path):
    """A small NAT, 8 epochs of 2000 32x32 shapes: measured 20 s, loss 2.3 -> 1.35, val top-1 47.5 % (10 classes).
    (At lr 2e-3 this run diverges after three epochs.)"""
    recipe = load_recipe(RECIPES / 'classification' / 'quickstart.yaml', [
        'data.train_size=2000', 'data.val_size=200', 'data.img_size=32', 'data.batch_size=32', 'data.workers=0',
        'schedule.epochs=8', 'schedule.warmup_epochs=1', 'optim.lr=0.001', 'model.embed_dim=32',
        'model.depths=[1,1,1,1]', 'model.num_heads=[1,2,2,4]', 'model.kernel_size=3', 'aug.scale=[1.0,1.0]',
        'loss.smoothing=0'])
    metrics = classification.train(recipe, str(tmp_path))
    losses = _epoch_losses(tmp_path)
    assert len(losses) == 8 and losses[-1] < 0.8 * losses[0], losses
    chance = 100 / 10
    assert metrics['val_top1'] > 3 * chance, metrics


def test_detection_learns_the_shapes(tmp_path):
    """FCOS over a small NAT, 3 epochs of 160 64x64 images: measured 7 s, loss 2.4 -> 1.5, box mAP 8.3 where the
    same detector untrained scores about 0."""
    recipe = load_recipe(RECIPES / 'detection' / 'quickstart.yaml', [
        'head.arch=fcos', 'data.train_size=160', 'data.val_size=32', 'schedule.epochs=3', 'trainer.val_every=3'])
    torch.manual_seed(recipe.trainer.seed)
    _, val_set = detection.build_datasets(recipe, tmp_path / 'data')
    untrained = detection.build_detector(recipe.model.name, val_set.num_classes, recipe.head, recipe.model.kwargs,
                                         mean=recipe.data.mean, std=recipe.data.std)
    chance = detection.evaluate(untrained, val_set)['bbox_mAP']
    metrics = detection.train(recipe, str(tmp_path / 'run'))
    losses = _epoch_losses(tmp_path / 'run')
    assert len(losses) == 3 and losses[-1] < 0.8 * losses[0], losses
    assert metrics['bbox_mAP'] > chance + 3, (chance, metrics)


def test_segmentation_learns_the_shapes(tmp_path):
    """UPerNet over a small NAT, 6 epochs of 600 64x64 images: measured 24 s, loss 2.2 -> 0.8, val mIoU 19.6 where
    predicting background everywhere scores about 6."""
    recipe = load_recipe(RECIPES / 'segmentation' / 'quickstart.yaml', [
        'data.train_size=600', 'data.val_size=60', 'schedule.epochs=6', 'trainer.val_every=6'])
    val_set, classes = segmentation.build_datasets(recipe, splits=('val',))
    confusion = sum(confusion_matrix(torch.zeros_like(mask), mask, classes, recipe.data.ignore_index)
                    for _, mask in val_set)
    background_only = segmentation_metrics(confusion)['mIoU']
    metrics = segmentation.train(recipe, str(tmp_path))
    losses = _epoch_losses(tmp_path)
    assert len(losses) == 6 and losses[-1] < 0.6 * losses[0], losses
    assert metrics['val_mIoU'] > background_only + 8, (background_only, metrics)


def test_compression_learns_the_photos(tmp_path):
    """s2lic_tiny, 3 epochs of 240 64x64 crops (90 steps): measured 27 s of training, held-out 20 dB at 0.5 bpp from
    real bitstreams, where giving every pixel its image's mean colour scores 13.5 dB on average."""
    recipe = load_recipe(RECIPES / 'compression' / 'quickstart.yaml', [
        'data.img_size=64', 'data.train_size=240', 'schedule.epochs=3', 'trainer.val_every=3', 'optim.lr=0.002'])
    photos = load_held_out_photos().values()
    mean_colour = sum(psnr_uint8(image.float().mean((1, 2), keepdim=True).round().to(torch.uint8).expand_as(image)
                                 .contiguous(), image) for image in photos) / len(photos)
    metrics = compression.train(recipe, str(tmp_path))
    losses = _epoch_losses(tmp_path)
    assert len(losses) == 3 and losses[-1] < 0.2 * losses[0], losses
    assert metrics['test_psnr'] > mean_colour + 4 and metrics['test_bpp'] < 2, (mean_colour, metrics)


def test_two_phase_distillation_fits_the_predictor_then_trains_the_backbone(tmp_path):
    """Sparsifiner's two phases from one recipe. Phase 1's objective, the connectivity predictor's reconstruction of
    the teacher's attention, falls from its first logged value by more than 10x (measured 25x); phase 2 starts from
    phase 1's predictor, keeps it frozen, and its distillation loss falls. (On this tiny CPU setup phase 2's top-1
    stays near chance, so it is not asserted.)"""
    recipe_path = tmp_path / 'two_phase.yaml'
    recipe_path.write_text(f'''base: {RECIPES / 'classification' / 'sparsifiner' / 'sparsifiner_quickstart.yaml'}
data: {{train_size: 400, val_size: 40, batch_size: 16}}
phases:
  - schedule: {{epochs: 2}}
    optim: {{lr: 2.0e-3}}
    loss:
      distill: {{cls_weight: 0.0, kl_weight: 0.0, token_weight: 0.0, attn_weight: 0.01,
                trainable: ['blocks.*.attn.mask_predictor.*']}}
  - schedule: {{epochs: 3}}
    optim: {{lr: 1.0e-3}}
    loss:
      distill: {{frozen: ['blocks.*.attn.mask_predictor.*']}}
''')
    classification.train(load_recipe(recipe_path), str(tmp_path / 'run'))
    first, second = tmp_path / 'run' / 'phase1', tmp_path / 'run' / 'phase2'
    reconstruction = [float(row['train_attn_step']) for row in csv.DictReader(open(first / 'logs' / 'metrics.csv'))
                      if row.get('train_attn_step')]
    assert reconstruction[-1] < reconstruction[0] / 10, reconstruction
    from safetensors.torch import load_file
    fitted, final = (load_file(str(run / 'model' / 'model.safetensors')) for run in (first, second))
    predictor = [key for key in fitted if '.mask_predictor.' in key]
    assert predictor and all(torch.equal(fitted[key], final[key]) for key in predictor)
    losses = _epoch_losses(second)
    assert len(losses) == 3 and losses[-1] < losses[0], losses
