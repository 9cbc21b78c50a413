"""Image classification: training from a recipe (PyTorch Lightning + timm) and top-1/top-5 evaluation.

The task talks to any backbone through timm's contract only; data comes from an ImageFolder tree or the
built-in shapes set, transformed with timm's train/eval transforms.
"""
import argparse
import pickle
import re
import time
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

import timm
import torch
import torch.nn as nn
from safetensors import SafetensorError
from timm.data import Mixup, create_transform, resolve_data_config
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.utils import ModelEmaV3
from torch.utils.data import DataLoader, Dataset, default_collate

from zoo.data.folder import UNREADABLE, SafeImageFolder
from zoo.data.images import load_pil_rgb
from zoo.data.shapes import ShapesClassification
from zoo.data.transforms import randaugment_square_transform
from zoo.manifest import verify_listed_checkpoint
from zoo.models import read_checkpoint
from zoo.progress import track
from zoo.recipes import Recipe
from zoo.tasks.artifact import CONFIG_FILE, WEIGHTS_FILE, read_config
from zoo.tasks.distill import DistillConfig, DistillLoss
from zoo.tasks.engine import Monitor, RunData, TaskModule, fit, start_run
from zoo.tasks.inference import Inference
from zoo.tasks.phases import train_phases
from zoo.tasks.protocol import Task, data_root

__all__ = ['ClassificationModule', 'build_model', 'data_config', 'build_datasets', 'train', 'evaluate', 'predict',
           'export_model', 'skip_unreadable_collate', 'load_model', 'label_names', 'folder_for_model',
           'create_with_weights', 'Prediction', 'TASK']

# zoo predict's result for one file: (file, top-k (label, probability) or None, why the file could not be read)
Prediction = Tuple[str, Optional[List[Tuple[str, float]]], Optional[str]]


def skip_unreadable_collate(batch):
    """Collate (image, label) items, dropping unreadable ones: returns (images, labels, number dropped)."""
    items = [item for item in batch if item is not UNREADABLE]
    if not items:
        return None
    images, labels = default_collate(items)
    return images, labels, len(batch) - len(items)


def build_model(recipe: Recipe, num_classes: int) -> nn.Module:
    """The recipe's model with `num_classes` outputs, from its checkpoint when one is given."""
    kwargs = dict(recipe.model.kwargs, num_classes=num_classes)
    if recipe.model.checkpoint:
        verify_listed_checkpoint(recipe.model.checkpoint)
        # the pretrained-file path runs the family's checkpoint_filter_fn and drops a head of another size
        kwargs.update(pretrained=True, pretrained_cfg_overlay=dict(file=recipe.model.checkpoint))
    model = timm.create_model(recipe.model.name, **kwargs)
    if recipe.trainer.grad_checkpointing:
        model.set_grad_checkpointing(True)
    return model


def data_config(recipe: Recipe, model: nn.Module) -> Dict:
    """Input size, interpolation, mean/std and crop of the run: the recipe's values over the model's cfg."""
    d = recipe.data
    config = resolve_data_config({}, model=model)
    config['input_size'] = (3, d.img_size, d.img_size)
    for key in ('crop_pct', 'crop_mode', 'interpolation', 'mean', 'std'):
        if getattr(d, key) is not None:
            config[key] = tuple(getattr(d, key)) if key in ('mean', 'std') else getattr(d, key)
    return config


def _transforms(recipe: Recipe, config: Dict):
    a = recipe.aug
    if a.policy == 'torchvision_randaugment':
        train = randaugment_square_transform(config['input_size'][-1], a.randaugment_ops, a.randaugment_magnitude,
                                             a.train_interpolation, config['mean'], config['std'])
    else:
        train = create_transform(
            config['input_size'], is_training=True, auto_augment=a.auto_augment, interpolation=a.train_interpolation,
            hflip=a.hflip, color_jitter=a.color_jitter, scale=tuple(a.scale), re_prob=a.reprob, re_mode=a.remode,
            mean=config['mean'], std=config['std'])
    val = create_transform(config['input_size'], is_training=False, interpolation=config['interpolation'],
                           crop_pct=config['crop_pct'], crop_mode=config['crop_mode'], mean=config['mean'],
                           std=config['std'])
    return train, val


def build_datasets(recipe: Recipe, train_transform=None, val_transform=None) -> Tuple[Dataset, Dataset, int]:
    """(train, val, num_classes) for `data.name` 'shapes' (built in) or 'imagefolder' (root/train, root/val)."""
    d = recipe.data
    if d.name == 'shapes':
        num_classes = d.num_classes or 10
        common = dict(img_size=d.img_size, num_classes=num_classes, seed=d.seed)
        return (ShapesClassification(d.train_size, split='train', transform=train_transform, **common),
                ShapesClassification(d.val_size, split='val', transform=val_transform, **common), num_classes)
    if d.name == 'imagefolder':
        train_dir, val_dir = _data_paths(recipe)
        train = SafeImageFolder(str(train_dir), transform=train_transform)
        val = SafeImageFolder(str(val_dir), transform=val_transform)
        if train.classes != val.classes:
            raise ValueError(f'{d.root}: train/ and val/ have different class folders')
        num_classes = d.num_classes or len(train.classes)
        return train, val, num_classes
    raise ValueError(f"data.name must be 'shapes' or 'imagefolder', got {d.name!r}")


def _data_paths(recipe: Recipe) -> List[Path]:
    """The folders the recipe's data reads: root/train and root/val for an ImageFolder, none for the shapes set."""
    if recipe.data.name != 'imagefolder':
        return []
    root = data_root(recipe, 'a folder with train/ and val/')
    return [root / 'train', root / 'val']


class ClassificationModule(TaskModule):
    """A timm model trained with mixup/cutmix, label smoothing, layer decay, EMA and a per-step LR schedule."""

    def __init__(self, recipe: Recipe, num_classes: int, run_dir: Optional[Path] = None):
        super().__init__(recipe, run_dir)
        self.model = build_model(recipe, num_classes)
        if recipe.loss.aux_weight:
            self._enable_auxiliary_output()
        self.ema = ModelEmaV3(self.model, decay=recipe.trainer.ema_decay) if recipe.trainer.ema else None
        a, smoothing = recipe.aug, recipe.loss.smoothing
        self.mixup = None
        if a.mixup > 0 or a.cutmix > 0:
            self.mixup = Mixup(mixup_alpha=a.mixup, cutmix_alpha=a.cutmix, prob=a.mixup_prob,
                               switch_prob=a.mixup_switch_prob, label_smoothing=smoothing, num_classes=num_classes)
            self.train_loss = SoftTargetCrossEntropy()
        elif smoothing > 0:
            self.train_loss = LabelSmoothingCrossEntropy(smoothing)
        else:
            self.train_loss = nn.CrossEntropyLoss()
        # teacher distillation (loss.distill): a frozen teacher, per-phase freezing, model-owned loss terms
        self.distill = None
        if recipe.loss.distill:
            self.distill = DistillLoss(DistillConfig.from_dict(recipe.loss.distill), self.train_loss, num_classes)
            self.distill.prepare_student(self.model)
        self.top_k = min(5, num_classes)
        self.skipped_images = 0
        self._val = {'correct1': 0, 'correctk': 0, 'count': 0, 'loss': 0.0}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def _enable_auxiliary_output(self) -> None:
        """loss.aux_weight trains through the model's `forward_with_aux(x) -> (logits, aux)`; a model whose
        auxiliary head is frozen when unused (so that plain training leaves no parameter without a gradient)
        unfreezes it with `set_aux_head_trainable(True)`, before the optimizer, EMA and DDP see the parameters."""
        if not hasattr(self.model, 'forward_with_aux'):
            raise ValueError(f'loss.aux_weight is set but {self.recipe.model.name} has no auxiliary head '
                             f'(forward_with_aux); remove loss.aux_weight')
        if hasattr(self.model, 'set_aux_head_trainable'):
            self.model.set_aux_head_trainable(True)

    def parameter_groups(self):
        return self.model

    def optimizer_overrides(self) -> Dict:
        return dict(layer_decay=self.recipe.optim.layer_decay)

    def training_step(self, batch, batch_idx):
        if batch is None:
            return None
        images, labels, skipped = batch
        self.check_batch_finite(images, batch_idx)
        self.skipped_images += int(skipped)
        targets = labels
        if self.mixup is not None and images.shape[0] % 2 == 0:
            images, targets = self.mixup(images, labels)
        loss, parts = self._training_loss(images, targets)
        self.log_training_loss(loss, batch_idx, images.shape[0], parts)
        return loss

    def _training_loss(self, images: torch.Tensor, targets: torch.Tensor) -> Tuple[torch.Tensor, Dict]:
        """(loss, its logged parts): distillation, main + aux_weight * auxiliary head, or the plain criterion."""
        if self.distill is not None:
            return self.distill(self.model, images, targets)
        if self.recipe.loss.aux_weight:
            logits, aux = self.model.forward_with_aux(images)
            return (self.train_loss(logits, targets)
                    + self.recipe.loss.aux_weight * self._auxiliary_term(aux, targets)), {}
        return self.train_loss(self.model(images), targets), {}

    def _auxiliary_term(self, aux: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The one convention of `forward_with_aux(x) -> (logits, aux)` for auxiliary outputs: a scalar `aux` is
        a loss the model computed (e.g. a load-balancing loss), used as is; otherwise `aux` are the logits of an
        auxiliary head, scored by the training criterion like the main ones."""
        return aux if aux.dim() == 0 else self.train_loss(aux, targets)

    def on_train_batch_end(self, outputs, batch, batch_idx):
        if self.ema is not None:
            self.ema.update(self.model, step=self.global_step)
        super().on_train_batch_end(outputs, batch, batch_idx)

    def _eval_model(self) -> nn.Module:
        return self.ema.module if self.ema is not None else self.model

    def on_validation_epoch_start(self):
        self._val = {'correct1': 0, 'correctk': 0, 'count': 0, 'loss': 0.0}

    def validation_step(self, batch, batch_idx):
        if batch is None:
            return
        images, labels, skipped = batch
        logits = self._eval_model()(images)
        self._val['loss'] += nn.functional.cross_entropy(logits, labels, reduction='sum').item()
        topk = logits.topk(self.top_k, dim=1).indices
        self._val['correct1'] += (topk[:, 0] == labels).sum().item()
        self._val['correctk'] += (topk == labels[:, None]).any(dim=1).sum().item()
        self._val['count'] += labels.numel()

    def on_validation_epoch_end(self):
        totals = torch.tensor([self._val['correct1'], self._val['correctk'], self._val['count'], self._val['loss']],
                              dtype=torch.float64, device=self.device)
        totals = self.trainer.strategy.reduce(totals, reduce_op='sum')
        count = max(totals[2].item(), 1.0)
        self.log_dict({'val_top1': 100 * totals[0].item() / count, 'val_top5': 100 * totals[1].item() / count,
                       'val_loss': totals[3].item() / count}, prog_bar=True, sync_dist=False, batch_size=int(count))

    def on_save_checkpoint(self, checkpoint):
        super().on_save_checkpoint(checkpoint)
        checkpoint['zoo_ema'] = self.ema.module.state_dict() if self.ema is not None else None
        checkpoint['zoo_skipped_images'] = self.skipped_images

    def on_load_checkpoint(self, checkpoint):
        super().on_load_checkpoint(checkpoint)
        if self.ema is not None and checkpoint.get('zoo_ema') is not None:
            self.ema.module.load_state_dict(checkpoint['zoo_ema'])
        self.skipped_images = checkpoint.get('zoo_skipped_images', 0)


def export_model(model: nn.Module, config: Dict, folder: Path, label_names=None) -> Path:
    """Final weights in timm's local-dir format (model.safetensors + config.json with the data config)."""
    model.pretrained_cfg = dict(model.pretrained_cfg, **{k: config[k] for k in
                                                           ('input_size', 'interpolation', 'mean', 'std', 'crop_pct',
                                                            'crop_mode')},
                                num_classes=model.num_classes, label_names=list(label_names or []) or None)
    timm.models.save_for_hf(model, str(folder), safe_serialization=True)
    return folder


def train(recipe: Recipe, output: str, resume: Optional[str] = None,
          start_from: Optional[str] = None) -> Dict[str, float]:
    """Train the recipe's model; writes the run folder (see zoo.tasks.engine) and returns the final metrics.

    A recipe with `phases` runs them in order (zoo.tasks.phases), each in OUTPUT/phase{i}; `start_from` is the
    previous phase's last checkpoint, whose model and EMA weights the run continues from."""
    if recipe.phases:
        if resume:
            raise ValueError('--resume is not supported for recipes with phases yet; rerun the unfinished phase '
                             'as its own recipe')
        return train_phases(recipe, output, train)
    out = start_run(recipe, output)
    probe = timm.create_model(recipe.model.name, **recipe.model.kwargs)
    config = data_config(recipe, probe)
    del probe
    train_set, val_set, num_classes = build_datasets(recipe, *_transforms(recipe, config))
    data = RunData(recipe, train_set, val_set, skip_unreadable_collate)
    module = ClassificationModule(recipe, num_classes, run_dir=out)
    if start_from:
        module.load_phase_state(start_from)

    def summarize(trainer) -> Dict:
        final = trainer.validate(module, datamodule=data, verbose=False)[0]
        return {'val_top1': final['val_top1'], 'val_top5': final['val_top5'], 'val_loss': final['val_loss'],
                'skipped_images': module.skipped_images}

    def export(folder: Path) -> None:
        export_model(module._eval_model(), config, folder, getattr(train_set, 'classes', None))

    return fit(module, recipe, out, data, Monitor('val_top1', 'max'), resume, export, summarize)


def evaluate(model: nn.Module, dataset: Dataset, batch_size: int = 128, workers: int = 2,
             inference: Inference = Inference()) -> Dict[str, float]:
    """Top-1 / top-5 accuracy (%) of `model` on `dataset` (already transformed), the image counts, and the throughput
    (images per second over the whole loop, reading and decoding the images included: what a user waits for)."""
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers, collate_fn=skip_unreadable_collate,
                        pin_memory=inference.device.type == 'cuda')
    model = inference.prepare(model)
    correct1 = correct5 = count = skipped = 0
    start = time.perf_counter()
    with torch.no_grad():
        for batch in track(loader, 'eval', unit='batch'):
            if batch is None:
                continue
            images, labels, dropped = batch
            skipped += dropped
            with inference.autocast():
                logits = model(inference.images(images))
            topk = logits.topk(min(5, model.num_classes), dim=1).indices.cpu()
            correct1 += (topk[:, 0] == labels).sum().item()
            correct5 += (topk == labels[:, None]).any(dim=1).sum().item()
            count += labels.numel()
    inference.synchronize()
    seconds = time.perf_counter() - start
    if count == 0:
        raise ValueError('no readable images to evaluate')
    return {'top1': 100 * correct1 / count, 'top5': 100 * correct5 / count, 'images': count,
            'skipped_images': skipped, 'seconds': round(seconds, 2), 'images_per_second': round(count / seconds, 1)}


def label_names(model: nn.Module) -> Optional[List[str]]:
    """The class names of the model's outputs, in output order: its cfg's `label_names` (zoo train writes the
    training folders' names), else the ImageNet-1k synsets (n01440764, ...) for a 1000-class model, else None."""
    names = model.pretrained_cfg.get('label_names')
    if names:
        return list(names)
    if model.num_classes == 1000:
        from timm.data import ImageNetInfo
        return list(ImageNetInfo().label_names())
    return None


def predict(model: nn.Module, images, top_k: int = 5, inference: Inference = Inference()) -> Iterator[Prediction]:
    """(file, top-k (label, probability), None) per image file as each is computed, labels from the model's cfg,
    ImageNet names, or indices; (file, None, the reason) for a file that cannot be read, and the others go on."""
    names = model.pretrained_cfg.get('label_names')
    if not names and model.num_classes == 1000:
        from timm.data import ImageNetInfo
        info = ImageNetInfo()
        names = [info.index_to_description(i) for i in range(1000)]
    transform = eval_transform(model)
    model = inference.prepare(model)
    for path in images:
        try:
            image = load_pil_rgb(path)
        except ValueError as err:
            yield str(path), None, str(err)
            continue
        batch = inference.images(transform(image)[None])
        with torch.no_grad(), inference.autocast():
            probs = model(batch).float().softmax(-1)[0].cpu()
        values, indices = probs.topk(min(top_k, model.num_classes))
        yield str(path), [(names[i] if names else str(i), float(p)) for p, i in zip(values, indices.tolist())], None


def folder_for_model(root: str, model: nn.Module, transform=None) -> SafeImageFolder:
    """An ImageFolder whose labels are the model's output indices of its class folders, matched by name.

    A folder may hold any subset of the model's classes (e.g. only `star/`); ImageNet synset folders map onto a
    1000-class model through timm's ImageNet info. Without class names (a model trained elsewhere), the folders
    must be exactly as many as the outputs and are taken in sorted order.

    Raises:
        ValueError: class folders the model does not know, naming them.
    """
    folder = SafeImageFolder(root, transform=transform)
    names = label_names(model)
    if names is None:
        if len(folder.classes) != model.num_classes:
            raise ValueError(f'{root} has {len(folder.classes)} class folders and the model, which records no class '
                             f'names, predicts {model.num_classes}: cannot tell which folder is which class')
        return folder
    index = {name: i for i, name in enumerate(names)}
    unknown = [name for name in folder.classes if name not in index]
    if unknown:
        raise ValueError(f'class folders {unknown[:10]} of {root} are not classes of the model (it knows '
                         f'{names[:10]}{" ..." if len(names) > 10 else ""})')
    to_model = [index[name] for name in folder.classes]
    folder.target_transform = to_model.__getitem__
    return folder


def eval_data_config(model: nn.Module, img_size: Optional[int] = None, crop_pct: Optional[float] = None) -> Dict:
    """The model's pretrained-cfg eval settings (input size, crop, interpolation, mean/std), at another square input
    size or crop fraction when given (timm's resolve_data_config rules: the resize is img_size / crop_pct).

    Raises:
        ValueError: a size or crop fraction that is not positive.
    """
    if img_size is not None and img_size <= 0:
        raise ValueError(f'--img-size must be positive, got {img_size}')
    if crop_pct is not None and not 0 < crop_pct <= 1:
        raise ValueError(f'--crop-pct must be in (0, 1], got {crop_pct}')
    overrides = {key: value for key, value in (('img_size', img_size), ('crop_pct', crop_pct)) if value is not None}
    return resolve_data_config(overrides, model=model)


def eval_transform(model: nn.Module, img_size: Optional[int] = None, crop_pct: Optional[float] = None):
    """The eval transform (resize, centre crop, normalise) of `eval_data_config`."""
    return create_transform(**eval_data_config(model, img_size, crop_pct), is_training=False)


def load_model(checkpoint: Optional[str], model_name: Optional[str], num_classes: Optional[int] = None) -> nn.Module:
    """A classifier from a model folder (zoo train / convert output), or a registered model with a weights file.

    Raises:
        ValueError: a missing checkpoint, no model name for a weights file, a damaged folder or weights file, or
            weights that do not fit.
    """
    path = Path(checkpoint) if checkpoint else None
    if path is not None and not path.exists():
        raise ValueError(f'checkpoint not found: {path}')
    if path is not None:
        verify_listed_checkpoint(path)
    if path is not None and path.is_dir():
        _check_model_config(path)
        return create_with_weights(f'local-dir:{path}', path / WEIGHTS_FILE)
    if not model_name:
        raise ValueError('--model is required unless --checkpoint is a model folder (config.json + weights)')
    if not timm.is_model(model_name):
        raise ValueError(f'unknown model {model_name!r} (see zoo list)')
    if path is None:
        raise ValueError(f'--checkpoint is required: {model_name} without weights has a randomly initialised head and '
                         f'body (official weights: zoo list --pretrained; a run of zoo train: RUN/model)')
    kwargs = {} if num_classes is None else dict(num_classes=num_classes)
    return create_with_weights(model_name, path, pretrained_cfg_overlay=dict(file=str(path), **kwargs), **kwargs)


def _check_model_config(folder: Path) -> None:
    """A damaged config.json is one clear error, not a failure inside timm's loader."""
    config = read_config(folder)
    architecture = config.get('architecture')
    if not isinstance(architecture, str) or not timm.is_model(architecture):
        raise ValueError(f'{folder / CONFIG_FILE}: "architecture" must name a registered model, got {architecture!r}')
    for key in ('pretrained_cfg', 'model_args'):
        if not isinstance(config.get(key, {}), dict):
            raise ValueError(f'{folder / CONFIG_FILE}: "{key}" must be a JSON object, got {config[key]!r:.80}')


_READER_ERRORS = (SafetensorError, EOFError, pickle.UnpicklingError)


def create_with_weights(name: str, weights: Path, source: Optional[Path] = None, **kwargs) -> nn.Module:
    """timm.create_model(name, pretrained=True, **kwargs), reading the weights file `weights` (`source`, default
    `weights`, is the file errors name), which may be damaged or another model's. The pretrained-file path never
    unpickles code: timm loads with weights_only.

    Raises:
        ValueError: one line naming the file when it cannot be read (checked again by `read_checkpoint` when
            anything fails: a damaged file surfaces as many kinds of error inside the loaders), a summary of a key
            mismatch (counts and a few names, not torch's list of every key), or a configuration timm cannot build.
    """
    source = source or weights
    try:
        return timm.create_model(name, pretrained=True, **kwargs)
    except (*_READER_ERRORS, TypeError, KeyError, AttributeError, AssertionError, RuntimeError) as err:
        try:
            read_checkpoint(weights)
        except ValueError as damaged:
            raise ValueError(str(damaged).replace(str(weights), str(source), 1)) from None
        if isinstance(err, RuntimeError) and 'Error(s) in loading state_dict' in str(err):
            raise ValueError(f'{source} does not match {name}: {_key_mismatch(str(err))}') from None
        if isinstance(err, (RuntimeError, *_READER_ERRORS)):
            raise
        raise ValueError(f'{name}: the model cannot be built with the configuration given ({type(err).__name__}: '
                         f'{err})') from None


def _key_mismatch(message: str) -> str:
    """torch's load_state_dict error (every key listed) -> counts and a few examples of each kind."""
    parts = []
    for kind in ('Missing key(s)', 'Unexpected key(s)', 'size mismatch'):
        if kind == 'size mismatch':
            names = re.findall(r'size mismatch for ([^:]+):', message)
        else:
            found = re.search(rf'{re.escape(kind)} in state_dict: (.*?)(?:\. \n|\.\s*$|\n\s)', message, re.S)
            names = re.findall(r'"([^"]+)"', found.group(1)) if found else []
        if names:
            more = f' and {len(names) - 4} more' if len(names) > 4 else ''
            parts.append(f'{kind}: {", ".join(names[:4])}{more}')
    return '; '.join(parts) or message.splitlines()[0]


def _evaluate_command(args: argparse.Namespace) -> Dict:
    """`zoo eval` for classification: top-1 / top-5 on an ImageFolder or the shapes validation split, with what was
    measured (model, input size, crop) in the record, as timm's validate.py writes it."""
    if not args.data:
        raise ValueError("--data is required: an ImageFolder root or 'shapes'")
    inference = Inference.from_args(args)
    model = load_model(args.checkpoint, args.model, args.num_classes)
    config = eval_data_config(model, args.img_size, args.crop_pct)
    transform = create_transform(**config, is_training=False)
    if args.data == 'shapes':
        dataset = ShapesClassification(args.shapes_size, img_size=model.pretrained_cfg['input_size'][-1],
                                       num_classes=model.num_classes, split='val', transform=transform)
    else:
        dataset = folder_for_model(args.data, model, transform)
    metrics = evaluate(model, dataset, batch_size=args.batch_size or 128, workers=args.workers, inference=inference)
    return {'model': model.pretrained_cfg.get('architecture') or args.model, 'checkpoint': args.checkpoint,
            **metrics, 'top1_err': round(100 - metrics['top1'], 3), 'top5_err': round(100 - metrics['top5'], 3),
            'param_count': round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
            'img_size': config['input_size'][-1], 'crop_pct': config['crop_pct'],
            'interpolation': config['interpolation'], **inference.describe()}


def _is_timm_model_folder(folder: Path) -> bool:
    """A timm local-dir folder (config.json naming an architecture, safetensors weights), as zoo convert writes."""
    if not (folder / CONFIG_FILE).is_file() or not (folder / WEIGHTS_FILE).is_file():
        return False
    return 'architecture' in read_config(folder)


TASK = Task(name='classification', train=train, evaluate=_evaluate_command,
            recognizes=_is_timm_model_folder, data_paths=_data_paths, phases=True,
            datasets=('shapes', 'imagefolder'))
