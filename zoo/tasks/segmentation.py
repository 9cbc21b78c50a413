"""Semantic segmentation: segmentation_models_pytorch UPerNet / FPN over any zoo backbone, trained from a recipe.

The backbone enters smp as a timm universal encoder (`tu-<name>`), i.e. through `features_only` with strides
4/8/16/32; nothing here knows a family. Metrics: mIoU / aAcc from a confusion matrix (mmseg's definitions:
per-class IoU averaged over the classes that occur in the prediction or the ground truth).

Recipe keys used: `model` (name, constructor kwargs, `checkpoint` = classification weights for the backbone),
`head` (`arch`: upernet | fpn, `output_stride`, and the smp decoder's own arguments, e.g. `decoder_channels`),
`data` (`name`: shapes | ade20k | maskfolder, `root`, `img_size` = crop size, `num_classes`, `ignore_index`),
`optim`, `schedule` (per-step, e.g. `sched: poly`), `aug.hflip`, `aug.scale` (random rescale ratio range).
"""
import inspect
import math
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import pytorch_lightning as pl
import segmentation_models_pytorch as smp
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

import zoo  # noqa: F401  (registers the zoo's models)
from zoo.data.segmentation import MaskFolder, SegTransform, ShapesSegmentation, ade20k_folders
from zoo.manifest import verify_listed_checkpoint
from zoo.recipes import Recipe
from zoo.tasks.engine import (backbone_no_weight_decay, build_trainer, check_finite_loss, create_optimizer,
                              create_scheduler, prepare_run_dir, resume_checkpoint, ScheduledModule, write_metrics)

__all__ = ['ARCHITECTURES', 'Segmenter', 'build_segmenter', 'decoder_arguments', 'check_batch', 'confusion_matrix',
           'segmentation_metrics', 'build_datasets', 'SegmentationModule', 'train', 'evaluate']

ARCHITECTURES = {'upernet': smp.UPerNet, 'fpn': smp.FPN}
# get_encoder() and TimmUniversalEncoder take these names themselves, so a backbone argument with one of them
# (e.g. OverLoCK's or a ViT's `depth`) cannot travel through smp's **kwargs to timm.create_model
_SMP_ENCODER_ARGS = ('name', 'in_channels', 'depth', 'weights')
# set by build_segmenter's own arguments (or by smp), never by the backbone's constructor arguments
_RESERVED_MODEL_ARGS = ('features_only', 'out_indices', 'output_stride', 'pretrained', 'in_chans')


class Segmenter(nn.Module):
    """An smp segmentation model (`net`) whose forward checks its input first: (B, C, H, W) -> (B, classes, H, W)."""

    def __init__(self, net: nn.Module, in_chans: int, num_classes: int):
        super().__init__()
        self.net = net
        self.in_chans = in_chans
        self.num_classes = num_classes

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        check_batch(images, self.in_chans)
        if self.training and images.shape[0] < 2:
            # the decoders' BatchNorm after global pooling sees one value per channel and cannot normalise it
            raise ValueError(f'training a segmenter needs a batch of at least 2 images, got {images.shape[0]} '
                             f'(call .eval() for single-image inference)')
        return self.net(images)

    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        """The backbone's exempt parameters (e.g. NAT rpb), as the official downstream configs exempt them."""
        return backbone_no_weight_decay(self.net.encoder.model, 'net.encoder.model.')


def build_segmenter(model_name: str, num_classes: int, arch: str = 'upernet', model_kwargs: Optional[Dict] = None,
                    checkpoint: Optional[str] = None, pretrained: bool = False, output_stride: int = 32,
                    in_chans: int = 3, **decoder_kwargs) -> Segmenter:
    """An smp `arch` model with the timm/zoo backbone `model_name` as encoder: (B, C, H, W) -> (B, classes, H, W).

    `model_kwargs` go to the backbone's constructor; `checkpoint` is a classification checkpoint of it (loaded
    through the family's checkpoint_filter_fn), `pretrained` loads the model's default weights instead;
    `output_stride` 8 or 16 dilates the last stages where the backbone supports it; `decoder_kwargs` go to the
    smp architecture (e.g. `decoder_channels`).

    Raises:
        ValueError: unknown arch, model or decoder argument, or a backbone whose features smp cannot use.
    """
    if arch not in ARCHITECTURES:
        raise ValueError(f'head.arch must be one of {", ".join(ARCHITECTURES)}, got {arch!r}')
    if not timm.is_model(model_name):
        raise ValueError(f'unknown model {model_name!r} (see `zoo list`)')
    unknown = sorted(set(decoder_kwargs) - set(decoder_arguments(arch)))
    if unknown:
        raise ValueError(f'unknown {arch} head arguments {unknown}; allowed: '
                         f'{", ".join(["arch", "output_stride", *decoder_arguments(arch)])}')
    kwargs = dict(model_kwargs or {})
    reserved = sorted(set(kwargs) & set(_RESERVED_MODEL_ARGS))
    if reserved:
        raise ValueError(f'backbone arguments {reserved} are set by the segmenter (use head.output_stride, '
                         f'model.pretrained or model.checkpoint), remove them from the model arguments')
    _check_feature_strides(model_name, kwargs)
    if checkpoint:
        verify_listed_checkpoint(checkpoint)
        kwargs['pretrained_cfg_overlay'] = dict(file=checkpoint)
    load = bool(checkpoint) or pretrained
    clashing = {k: kwargs.pop(k) for k in list(kwargs) if k in _SMP_ENCODER_ARGS}
    net = ARCHITECTURES[arch](encoder_name=f'tu-{model_name}', encoder_weights=True if load else None,
                              in_channels=in_chans, classes=num_classes, output_stride=output_stride,
                              **decoder_kwargs, **kwargs)
    if clashing:
        _rebuild_backbone(net.encoder, model_name, dict(kwargs, **clashing), load, output_stride)
    return Segmenter(net, in_chans, num_classes)


def decoder_arguments(arch: str) -> List[str]:
    """The smp architecture's own constructor arguments a recipe's `head:` may set (not the encoder's)."""
    params = inspect.signature(ARCHITECTURES[arch].__init__).parameters
    # training needs raw logits and a single output: no output activation, no smp classification aux head
    excluded = ('self', 'kwargs', 'classes', 'in_channels', 'activation', 'aux_params')
    return [p for p in params if p not in excluded and not p.startswith('encoder_')]


def _check_feature_strides(model_name: str, model_kwargs: Dict) -> None:
    """smp needs `features_only` strides exactly 4/8/16/32 (or 2..32); say which model breaks the rule."""
    with torch.device('meta'):
        features = timm.create_model(model_name, features_only=True, **model_kwargs)
    strides = list(features.feature_info.reduction())
    if strides not in ([4, 8, 16, 32], [2, 4, 8, 16, 32]):
        raise ValueError(f'{model_name}: segmentation needs feature maps at strides 4, 8, 16, 32 (features_only), '
                         f'got strides {strides}')


def _rebuild_backbone(encoder: nn.Module, model_name: str, kwargs: Dict, pretrained: bool,
                      output_stride: int) -> None:
    """Replace the encoder's timm model by one built with every constructor argument (see _SMP_ENCODER_ARGS)."""
    built = encoder.model
    extra = dict(output_stride=output_stride) if output_stride != 32 else {}
    rebuilt = timm.create_model(model_name, features_only=True, out_indices=built.feature_info.out_indices,
                                pretrained=pretrained, **extra, **kwargs)
    if rebuilt.feature_info.channels() != built.feature_info.channels():
        raise ValueError(f'{model_name}: constructor arguments {sorted(kwargs)} change the feature channels, '
                         f'which smp fixes from its own build; pass them to a registered variant instead')
    encoder.model = rebuilt


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int) -> torch.Tensor:
    """(num_classes, num_classes) int64 counts, rows = ground truth, columns = prediction.

    pred, target: (...) integer tensors of the same shape; pixels with `target == ignore_index` are skipped.
    """
    if pred.shape != target.shape:
        raise ValueError(f'prediction and target shapes differ: {tuple(pred.shape)} vs {tuple(target.shape)}')
    keep = target != ignore_index
    target, pred = target[keep].long(), pred[keep].long()
    if target.numel() and (target.min() < 0 or target.max() >= num_classes):
        raise ValueError(f'target labels must be in [0, {num_classes}) or {ignore_index} (ignored), '
                         f'got values {target.min().item()}..{target.max().item()}')
    return torch.bincount(target * num_classes + pred, minlength=num_classes ** 2).reshape(num_classes, num_classes)


def segmentation_metrics(confusion: torch.Tensor) -> Dict[str, float]:
    """mIoU, mAcc, aAcc in % from a confusion matrix; classes absent from both truth and prediction are skipped."""
    confusion = confusion.double()
    intersection = confusion.diag()
    truth, predicted = confusion.sum(1), confusion.sum(0)
    union = truth + predicted - intersection
    iou = intersection[union > 0] / union[union > 0]
    accuracy = intersection[truth > 0] / truth[truth > 0]
    total = confusion.sum()
    return {'mIoU': 100 * iou.mean().item() if iou.numel() else 0.0,
            'mAcc': 100 * accuracy.mean().item() if accuracy.numel() else 0.0,
            'aAcc': 100 * (intersection.sum() / total).item() if total > 0 else 0.0}


def _mean_std(recipe: Recipe) -> Tuple[Tuple[float, ...], Tuple[float, ...]]:
    d = recipe.data
    cfg = timm.models.get_pretrained_cfg(recipe.model.name)
    mean = d.mean or (cfg.mean if cfg else (0.485, 0.456, 0.406))
    std = d.std or (cfg.std if cfg else (0.229, 0.224, 0.225))
    return tuple(mean), tuple(std)


def build_datasets(recipe: Recipe) -> Tuple[Dataset, Dataset, int]:
    """(train, val, num_classes) for `data.name`: 'shapes' (built in, background = class 0), 'ade20k'
    (root/images|annotations/training|validation, label 0 ignored) or 'maskfolder' (root/train|val/images|masks,
    e.g. written by zoo.data.shapes.export_segmentation)."""
    d, a = recipe.data, recipe.aug
    mean, std = _mean_std(recipe)
    common = dict(crop_size=d.img_size, mean=mean, std=std, ignore_index=d.ignore_index)
    train_tf = SegTransform(train=True, ratio_range=tuple(a.scale), hflip=a.hflip, **common)
    val_tf = SegTransform(train=False, **common)
    if d.name == 'shapes':
        classes = d.num_classes or 10
        kw = dict(img_size=d.img_size, num_classes=classes, seed=d.seed)
        return (ShapesSegmentation(d.train_size, split='train', transform=train_tf, **kw),
                ShapesSegmentation(d.val_size, split='val', transform=val_tf, **kw), classes + 1)
    if d.name not in ('ade20k', 'maskfolder'):
        raise ValueError(f"data.name must be 'shapes', 'ade20k' or 'maskfolder' for segmentation, got {d.name!r}")
    if not d.root or not d.num_classes:
        raise ValueError(f'data.root and data.num_classes are required for data.name={d.name}')
    if d.name == 'ade20k':
        folders = {split: ade20k_folders(d.root, split) for split in ('train', 'val')}
    else:
        folders = {split: (Path(d.root) / split / 'images', Path(d.root) / split / 'masks')
                   for split in ('train', 'val')}
    reduce = d.name == 'ade20k'
    return (MaskFolder(*folders['train'], transform=train_tf, reduce_zero_label=reduce, ignore_index=d.ignore_index),
            MaskFolder(*folders['val'], transform=val_tf, reduce_zero_label=reduce, ignore_index=d.ignore_index),
            d.num_classes)


def _segmenter_from_recipe(recipe: Recipe, num_classes: int) -> Segmenter:
    head = dict(recipe.head)
    arch = head.pop('arch', 'upernet')
    output_stride = head.pop('output_stride', 32)
    model = build_segmenter(recipe.model.name, num_classes, arch=arch, model_kwargs=recipe.model.kwargs,
                            checkpoint=recipe.model.checkpoint, pretrained=recipe.model.pretrained,
                            output_stride=output_stride, **head)
    if recipe.trainer.grad_checkpointing:
        model.net.encoder.model.set_grad_checkpointing(True)
    return model


def check_batch(images: torch.Tensor, in_chans: int = 3, multiple: int = 32) -> None:
    """Raise ValueError unless images is a float (B, in_chans, H, W) batch with H, W divisible by `multiple`."""
    if images.ndim != 4 or images.shape[1] != in_chans:
        raise ValueError(f'segmentation input must be (B, {in_chans}, H, W), got shape {tuple(images.shape)}')
    if not images.is_floating_point():
        raise ValueError(f'segmentation input must be a floating point tensor, got {images.dtype}')
    if images.shape[2] % multiple or images.shape[3] % multiple:
        raise ValueError(f'segmentation input needs H and W divisible by {multiple} (stride-32 features), '
                         f'got {images.shape[2]}x{images.shape[3]}')


class SegmentationModule(ScheduledModule):
    """An smp segmenter trained with pixel cross-entropy (ignore_index) and a per-step timm schedule."""

    def __init__(self, recipe: Recipe, num_classes: int, updates_per_epoch: int, run_dir: Optional[Path] = None):
        super().__init__()
        self.recipe = recipe
        self.run_dir = run_dir
        self.num_classes = num_classes
        self.updates_per_epoch = updates_per_epoch
        self.model = _segmenter_from_recipe(recipe, num_classes)
        self.fit_seconds = 0.0
        self._confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> logits (B, num_classes, H, W)."""
        return self.model(images)

    def configure_optimizers(self):
        world_size = self.trainer.world_size if self._trainer is not None else 1
        optimizer = create_optimizer(self.model, self.recipe, world_size)
        self.scheduler = create_scheduler(optimizer, self.recipe, self.updates_per_epoch)
        return optimizer

    def training_step(self, batch, batch_idx):
        images, masks = batch
        loss = F.cross_entropy(self(images), masks, ignore_index=self.recipe.data.ignore_index)
        check_finite_loss(loss.detach(), self.global_step, self.current_epoch, self.run_dir)
        self.log('train_loss', loss, prog_bar=True, on_step=True, on_epoch=True)
        self.log('lr', self.trainer.optimizers[0].param_groups[0]['lr'], on_step=True, on_epoch=False)
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx):
        if self.scheduler is not None:
            self.scheduler.step_update(self.global_step)

    def on_validation_epoch_start(self):
        self._confusion = torch.zeros(self.num_classes, self.num_classes, dtype=torch.int64, device=self.device)

    def validation_step(self, batch, batch_idx):
        images, masks = batch
        pred = self(images).argmax(1)
        self._confusion += confusion_matrix(pred, masks, self.num_classes, self.recipe.data.ignore_index)

    def on_validation_epoch_end(self):
        confusion = self.trainer.strategy.reduce(self._confusion, reduce_op='sum')
        self.log_dict({f'val_{k}': v for k, v in segmentation_metrics(confusion).items()}, prog_bar=True)


def _loader(dataset: Dataset, recipe: Recipe, train: bool) -> DataLoader:
    d = recipe.data
    return DataLoader(dataset, batch_size=d.batch_size if train else (d.eval_batch_size or d.batch_size),
                      shuffle=train, drop_last=train, num_workers=d.workers, persistent_workers=d.workers > 0,
                      pin_memory=torch.cuda.is_available())


def train(recipe: Recipe, output: str, resume: Optional[str] = None) -> Dict[str, float]:
    """Train the recipe's segmenter; writes the run folder (zoo.tasks.engine) and returns the final metrics.

    The final weights go to OUTPUT/model/segmenter.pt (a plain state dict, load with weights_only=True).
    """
    if recipe.phases:
        raise ValueError('segmentation recipes do not support `phases`')
    out = prepare_run_dir(recipe, output)
    pl.seed_everything(recipe.trainer.seed, workers=True, verbose=False)
    train_set, val_set, num_classes = build_datasets(recipe)
    train_loader, val_loader = _loader(train_set, recipe, True), _loader(val_set, recipe, False)
    updates = max(1, math.ceil(len(train_loader) / recipe.trainer.accumulate))
    module = SegmentationModule(recipe, num_classes, updates, run_dir=out)
    trainer = build_trainer(recipe, out, monitor='val_mIoU')
    resume = resume_checkpoint(resume, out)
    trainer.fit(module, train_loader, val_loader, ckpt_path=resume, weights_only=True)
    final = trainer.validate(module, val_loader, verbose=False)[0]
    metrics = {'val_mIoU': final['val_mIoU'], 'val_mAcc': final['val_mAcc'], 'val_aAcc': final['val_aAcc'],
               'num_classes': num_classes, 'epochs': trainer.current_epoch, 'seconds': round(module.fit_seconds, 1)}
    if trainer.is_global_zero:
        (out / 'model').mkdir(exist_ok=True)
        torch.save(module.model.state_dict(), out / 'model' / 'segmenter.pt')
        write_metrics(out, metrics)
    return metrics


def evaluate(recipe: Recipe, checkpoint: str, batch_size: Optional[int] = None,
             workers: int = 0) -> Dict[str, float]:
    """mIoU / mAcc / aAcc (%) of the recipe's segmenter with weights `checkpoint` (segmenter.pt or a Lightning
    .ckpt of a run) on the recipe's validation split."""
    _, val_set, num_classes = build_datasets(recipe)
    model = _segmenter_from_recipe(recipe, num_classes)
    state = torch.load(checkpoint, map_location='cpu', weights_only=True)
    if 'state_dict' in state:  # Lightning checkpoint: the module holds the segmenter as `model.`
        state = {k[len('model.'):]: v for k, v in state['state_dict'].items() if k.startswith('model.')}
    model.load_state_dict(state)
    model.eval()
    loader = DataLoader(val_set, batch_size=batch_size or recipe.data.eval_batch_size or recipe.data.batch_size,
                        num_workers=workers)
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64)
    with torch.no_grad():
        for images, masks in loader:
            confusion += confusion_matrix(model(images).argmax(1), masks, num_classes, recipe.data.ignore_index)
    return dict(segmentation_metrics(confusion), images=len(val_set))
