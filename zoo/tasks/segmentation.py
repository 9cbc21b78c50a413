"""Semantic segmentation: segmentation_models_pytorch UPerNet / FPN over any zoo backbone, trained from a recipe.

The backbone enters smp as a timm universal encoder (`tu-<name>`), i.e. through `features_only` with strides
4/8/16/32; nothing here knows a family. Metrics: mIoU / aAcc from a confusion matrix (mmseg's definitions:
per-class IoU averaged over the classes that occur in the prediction or the ground truth).

Recipe keys used: `model` (name, constructor kwargs, `checkpoint` = classification weights for the backbone),
`head` (`arch`: upernet | fpn, `output_stride`, and the smp decoder's own arguments, e.g. `decoder_channels`),
`data` (`name`: shapes | ade20k | maskfolder, `root`, `img_size` = crop size, `num_classes`, `ignore_index`),
`optim`, `schedule` (e.g. `sched: poly`, per update with `sched_on_updates`), `aug.hflip`, `aug.scale` (random
rescale ratio range), `eval` (`mode`: whole | slide, with `crop_size` and `stride` for mmseg's sliding-window
inference).
"""
import argparse
import dataclasses
import inspect
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import segmentation_models_pytorch as smp
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader

from zoo.data.segmentation import MaskFolder, SegTransform, ShapesSegmentation, ade20k_folders
from zoo.manifest import verify_listed_checkpoint
from zoo.progress import track
from zoo.recipes import Recipe, RecipeError, recipe_to_dict
from zoo.tasks.artifact import CONFIG_FILE, WEIGHTS_FILE, load_weights, read_config, save_weights, write_config
from zoo.tasks.engine import Monitor, RunData, TaskModule, backbone_no_weight_decay, fit, start_run
from zoo.tasks.inference import Inference
from zoo.tasks.protocol import Task, data_root

__all__ = ['ARCHITECTURES', 'Segmenter', 'build_segmenter', 'decoder_arguments', 'check_batch', 'slide_logits',
           'segment_logits', 'confusion_matrix',
           'segmentation_metrics', 'build_datasets', 'SegmentationModule', 'train', 'evaluate', 'save_segmenter',
           'load_segmenter', 'TASK']
# the weights file of segmentation runs written before the task artifact format (a torch state dict; the run's
# recipe.yaml, one folder up, describes the model)
LEGACY_WEIGHTS = 'segmenter.pt'

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


def build_datasets(recipe: Recipe, splits: Sequence[str] = ('train', 'val')) -> Tuple:
    """(*one dataset per split, num_classes) for `data.name`: 'shapes' (built in, background = class 0), 'ade20k'
    (root/images|annotations/training|validation, label 0 ignored) or 'maskfolder' (root/train|val/images|masks,
    e.g. written by zoo.data.shapes.export_segmentation)."""
    d, a = recipe.data, recipe.aug
    mean, std = _mean_std(recipe)
    common = dict(crop_size=d.img_size, mean=mean, std=std, ignore_index=d.ignore_index)
    transforms = {'train': SegTransform(train=True, ratio_range=tuple(a.scale), hflip=a.hflip, **common),
                  'val': SegTransform(train=False, **common)}
    if d.name == 'shapes':
        classes = d.num_classes or 10
        kw = dict(img_size=d.img_size, num_classes=classes, seed=d.seed)
        sizes = {'train': d.train_size, 'val': d.val_size}
        return (*(ShapesSegmentation(sizes[split], split=split, transform=transforms[split], **kw)
                  for split in splits), classes + 1)
    if d.name not in ('ade20k', 'maskfolder'):
        raise ValueError(f"data.name must be 'shapes', 'ade20k' or 'maskfolder' for segmentation, got {d.name!r}")
    if not d.num_classes:
        raise ValueError(f'data.num_classes is required for data.name={d.name}')
    return (*(MaskFolder(*_split_folders(recipe, split), transform=transforms[split],
                         reduce_zero_label=d.name == 'ade20k', ignore_index=d.ignore_index) for split in splits),
            d.num_classes)


def _split_folders(recipe: Recipe, split: str) -> Tuple[Path, Path]:
    """(images, masks) folders of a split of an ADE20K tree (root/images|annotations/training|validation) or a
    mask folder (root/<split>/images|masks)."""
    if recipe.data.name == 'ade20k':
        return ade20k_folders(str(data_root(recipe, 'images/ and annotations/ of ADE20K')), split)
    root = data_root(recipe, 'train/ and val/, each with images/ and masks/')
    return root / split / 'images', root / split / 'masks'


def _data_paths(recipe: Recipe) -> List[Path]:
    """The folders the recipe's data reads (train and val images and masks); none for the shapes set."""
    if recipe.data.name not in ('ade20k', 'maskfolder'):
        return []
    return [folder for split in ('train', 'val') for folder in _split_folders(recipe, split)]


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


def slide_logits(model, images: torch.Tensor, num_classes: int, crop_size: int, stride: int) -> torch.Tensor:
    """mmseg's sliding-window inference: (B, C, H, W) -> (B, num_classes, H, W) logits, each pixel the mean of the
    logits of the `crop_size` windows covering it. Windows start every `stride` pixels; the last one of a row or
    column is moved back to end at the border, and a side shorter than the window is taken whole."""
    batch, _, height, width = images.shape
    rows = max(height - crop_size + stride - 1, 0) // stride + 1
    cols = max(width - crop_size + stride - 1, 0) // stride + 1
    logits = images.new_zeros(batch, num_classes, height, width)
    count = images.new_zeros(1, 1, height, width)
    for row in range(rows):
        for col in range(cols):
            bottom, right = min(row * stride + crop_size, height), min(col * stride + crop_size, width)
            top, left = max(bottom - crop_size, 0), max(right - crop_size, 0)
            logits[:, :, top:bottom, left:right] += model(images[:, :, top:bottom, left:right])
            count[:, :, top:bottom, left:right] += 1
    return logits / count


def segment_logits(model, images: torch.Tensor, recipe: Recipe, num_classes: int) -> torch.Tensor:
    """Evaluation logits (B, num_classes, H, W) by the recipe's `eval.mode`: the whole image at once, or sliding
    windows of eval.crop_size (default data.img_size) every eval.stride pixels (default 2/3 of the window: mmseg's
    512 / 341)."""
    e = recipe.eval
    if e.mode == 'whole':
        return model(images)
    crop = e.crop_size or recipe.data.img_size
    return slide_logits(model, images, num_classes, crop, e.stride or crop * 2 // 3)


class SegmentationModule(TaskModule):
    """An smp segmenter trained with pixel cross-entropy (ignore_index) and a timm schedule, evaluated on whole
    images or sliding windows (`eval.mode`)."""

    def __init__(self, recipe: Recipe, num_classes: int, run_dir: Optional[Path] = None):
        super().__init__(recipe, run_dir)
        self.num_classes = num_classes
        self.model = _segmenter_from_recipe(recipe, num_classes)
        self._confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> logits (B, num_classes, H, W)."""
        return self.model(images)

    def parameter_groups(self):
        return self.model  # timm exempts 1-d tensors and the segmenter's no_weight_decay() names

    def training_step(self, batch, batch_idx):
        images, masks = batch
        self.check_batch_finite(images, batch_idx)
        loss = F.cross_entropy(self(images), masks, ignore_index=self.recipe.data.ignore_index)
        self.log_training_loss(loss, batch_idx, images.shape[0])
        return loss

    def on_validation_epoch_start(self):
        self._confusion = torch.zeros(self.num_classes, self.num_classes, dtype=torch.int64, device=self.device)

    def validation_step(self, batch, batch_idx):
        images, masks = batch
        pred = segment_logits(self.model, images, self.recipe, self.num_classes).argmax(1)
        self._confusion += confusion_matrix(pred, masks, self.num_classes, self.recipe.data.ignore_index)

    def on_validation_epoch_end(self):
        confusion = self.trainer.strategy.reduce(self._confusion, reduce_op='sum')
        self.log_dict({f'val_{k}': v for k, v in segmentation_metrics(confusion).items()}, prog_bar=True,
                      batch_size=1)


def save_segmenter(segmenter: Segmenter, folder: Path, recipe: Recipe, num_classes: int) -> Path:
    """The task artifact: folder/model.safetensors + folder/config.json holding the resolved recipe (model, head and
    data settings) and the class count, everything load_segmenter needs."""
    save_weights(folder, segmenter.state_dict())
    write_config(folder, {'recipe': recipe_to_dict(recipe), 'num_classes': num_classes})
    return folder


def _recipe_of_config(folder: Path, config: Dict) -> Recipe:
    from zoo.tasks import validate_recipe
    if not isinstance(config.get('recipe'), dict) or not isinstance(config.get('num_classes'), int):
        raise ValueError(f'{folder / CONFIG_FILE} is not a segmenter config (it needs `recipe` and `num_classes`)')
    return validate_recipe(config['recipe'], str(folder / CONFIG_FILE), check_model=False)


def _legacy_recipe(weights: Path, recipe_path: Optional[str]) -> Recipe:
    """The recipe of a segmenter.pt or Lightning .ckpt: --recipe, else the run folder's recipe.yaml."""
    from zoo.tasks import load_recipe
    path = Path(recipe_path) if recipe_path else weights.resolve().parents[1] / 'recipe.yaml'
    if not path.is_file():
        raise ValueError(f'no recipe at {path}: pass --recipe (the recipe.yaml of the run that wrote {weights})')
    return load_recipe(path)


def _legacy_state(weights: Path) -> Dict[str, torch.Tensor]:
    """The segmenter weights of a segmenter.pt or of a Lightning checkpoint of the run (tensors only)."""
    try:
        state = torch.load(str(weights), map_location='cpu', weights_only=True)
    except Exception as err:  # torch raises RuntimeError, EOFError, pickle and zip errors for damaged files
        raise ValueError(f'{weights}: not a readable checkpoint ({type(err).__name__}: {err})') from None
    if isinstance(state, dict) and 'state_dict' in state:  # Lightning checkpoint: the segmenter is `model.`
        state = {k[len('model.'):]: v for k, v in state['state_dict'].items() if k.startswith('model.')}
    return state


def load_segmenter(checkpoint: str, recipe_path: Optional[str] = None) -> Tuple[Segmenter, Recipe, int]:
    """(segmenter in eval mode, its recipe, class count) from a model folder written by `zoo train`, or from a
    segmenter.pt / Lightning .ckpt of a run (their recipe: `recipe_path`, else the run folder's recipe.yaml)."""
    path = Path(checkpoint)
    if not path.exists():
        raise FileNotFoundError(f'segmenter checkpoint not found: {path}')
    if path.is_dir() and (path / LEGACY_WEIGHTS).is_file() and not (path / CONFIG_FILE).is_file():
        path = path / LEGACY_WEIGHTS
    if path.is_dir():
        config = read_config(path)
        recipe = _recipe_of_config(path, config)
        num_classes, state = config['num_classes'], load_weights(path / WEIGHTS_FILE)
    else:
        recipe = _legacy_recipe(path, recipe_path)
        num_classes, state = build_datasets(recipe, splits=('val',))[-1], _legacy_state(path)
    model = _segmenter_from_recipe(dataclasses.replace(recipe, model=dataclasses.replace(
        recipe.model, checkpoint=None, pretrained=False)), num_classes)
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise ValueError(f'{checkpoint}: the weights do not fit the {recipe.model.name} segmenter: {err}') from None
    return model.eval(), recipe, num_classes


def train(recipe: Recipe, output: str, resume: Optional[str] = None) -> Dict[str, float]:
    """Train the recipe's segmenter; writes the run folder (zoo.tasks.engine) and returns the final metrics.

    The final weights go to OUTPUT/model (save_segmenter).
    """
    out = start_run(recipe, output)
    train_set, val_set, num_classes = build_datasets(recipe)
    data = RunData(recipe, train_set, val_set)
    module = SegmentationModule(recipe, num_classes, run_dir=out)

    def summarize(trainer) -> Dict:
        final = trainer.validate(module, datamodule=data, verbose=False)[0]
        return {'val_mIoU': final['val_mIoU'], 'val_mAcc': final['val_mAcc'], 'val_aAcc': final['val_aAcc'],
                'num_classes': num_classes}

    def export(folder: Path) -> None:
        save_segmenter(module.model, folder, recipe, num_classes)

    return fit(module, recipe, out, data, Monitor('val_mIoU', 'max'), resume, export, summarize)


def evaluate(checkpoint: str, data_root: Optional[str] = None, batch_size: Optional[int] = None, workers: int = 0,
             recipe_path: Optional[str] = None, inference: Inference = Inference()) -> Dict[str, float]:
    """mIoU / mAcc / aAcc (%) of a trained segmenter (load_segmenter) on the validation split of the data it was
    trained on, or of that dataset type under `data_root`, with the recipe's eval mode (whole or sliding windows);
    plus the image count and throughput (images per second over the whole loop, image reading included)."""
    model, recipe, num_classes = load_segmenter(checkpoint, recipe_path)
    if data_root:
        recipe = dataclasses.replace(recipe, data=dataclasses.replace(recipe.data, root=data_root))
    val_set = build_datasets(recipe, splits=('val',))[0]
    loader = DataLoader(val_set, batch_size=batch_size or recipe.data.eval_batch_size or recipe.data.batch_size,
                        num_workers=workers, pin_memory=inference.device.type == 'cuda')
    model = inference.prepare(model)
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64)
    start = time.perf_counter()
    with torch.no_grad():
        for images, masks in track(loader, 'eval', unit='batch'):
            with inference.autocast():
                logits = segment_logits(model, inference.images(images), recipe, num_classes)
            confusion += confusion_matrix(logits.argmax(1).cpu(), masks, num_classes, recipe.data.ignore_index)
    seconds = time.perf_counter() - start
    return dict(segmentation_metrics(confusion), images=len(val_set), seconds=round(seconds, 2),
                images_per_second=round(len(val_set) / seconds, 2))


def _check_recipe(recipe: Recipe) -> None:
    head = dict(recipe.head)
    arch = head.pop('arch', 'upernet')
    head.pop('output_stride', None)
    if arch not in ARCHITECTURES:
        raise RecipeError(f'{recipe.path}: head.arch must be one of {", ".join(ARCHITECTURES)}, got {arch!r}')
    unknown = sorted(set(head) - set(decoder_arguments(arch)))
    if unknown:
        raise RecipeError(f'{recipe.path}: unknown {arch} head key(s) {unknown}; allowed: '
                          f'{", ".join(["arch", "output_stride", *decoder_arguments(arch)])}')


def _evaluate_command(args: argparse.Namespace) -> Dict:
    """`zoo eval` for segmentation: a model folder (RUN/model), or a segmenter.pt / Lightning .ckpt of a run."""
    if not args.checkpoint:
        raise ValueError('--task segmentation needs --checkpoint RUN/model (or a .ckpt of the run)')
    inference = Inference.from_args(args)
    metrics = evaluate(args.checkpoint, args.data, args.batch_size, args.workers, args.recipe, inference)
    return {'checkpoint': args.checkpoint, **metrics, **inference.describe()}


def _is_legacy_segmenter_folder(folder: Path) -> bool:
    return (folder / LEGACY_WEIGHTS).is_file()


TASK = Task(name='segmentation', train=train, evaluate=_evaluate_command,
            check_recipe=_check_recipe, recognizes=_is_legacy_segmenter_folder, data_paths=_data_paths,
            datasets=('shapes', 'ade20k', 'maskfolder'))
