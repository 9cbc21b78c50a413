"""Recipes: one YAML file per (model, task, dataset), validated against a schema.

A recipe has the top-level sections below. `base:` names a parent recipe (relative to the file) whose
values the child overrides key by key; `overrides` (the command line's `--set a.b=value`) override both.
Every key is checked: an unknown or mistyped key is an error naming the key, the file and the allowed keys.
Keys of `model:` other than `name`, `checkpoint`, `pretrained` and `quality` are constructor arguments of the
model. This module checks the schema (sections, keys, value types, optimizer / scheduler / precision names);
the task of the recipe checks the rest (the model's constructor arguments, its `head`, its own keys):
`zoo.tasks.load_recipe` is the loader that runs both, and what the `zoo` command uses.
"""
import dataclasses
import inspect
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import yaml

__all__ = ['Recipe', 'RecipeError', 'read_recipe_tree', 'recipe_from_dict', 'parse_overrides', 'recipe_to_dict',
           'save_recipe', 'deep_merge', 'timm_constructor_arguments']


class RecipeError(ValueError):
    """A recipe that cannot be used, with the file and key at fault in the message."""


class _Loader(yaml.SafeLoader):
    """Safe YAML loader that also reads `1e-4` as a float (plain YAML 1.1 wants `1.0e-4`)."""


_Loader.add_implicit_resolver(
    'tag:yaml.org,2002:float',
    re.compile(r'^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$|'
               r'^[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?$|^[-+]?\.[0-9_]+(?:[eE][-+]?[0-9]+)?$|'
               r'^[-+]?\.(?:inf|Inf|INF)$|^\.(?:nan|NaN|NAN)$'),
    list('-+0123456789.'))


def _yaml(text: str):
    return yaml.load(text, Loader=_Loader)


@dataclass
class ModelSection:
    name: str = ''
    checkpoint: Optional[str] = None
    pretrained: bool = False
    quality: Optional[Union[int, List[int]]] = None  # compression only: the rate point(s) to train
    kwargs: Dict[str, Any] = field(default_factory=dict)


@dataclass
class DataSection:
    name: str = 'shapes'
    root: Optional[str] = None
    img_size: int = 224
    batch_size: int = 128
    eval_batch_size: Optional[int] = None
    workers: int = 4
    num_classes: Optional[int] = None
    train_size: int = 5000
    val_size: int = 1000
    seed: int = 0
    ann_file: Optional[str] = None
    ignore_index: int = 255
    crop_pct: Optional[float] = None
    interpolation: Optional[str] = None
    mean: Optional[List[float]] = None
    std: Optional[List[float]] = None
    crop_mode: Optional[str] = None  # classification eval: timm's center | squash (resize to a square) | border
    aug_repeats: int = 0  # repeated augmentation (timm's RepeatAugSampler): each image N times per epoch; 0 = off


@dataclass
class OptimSection:
    name: str = 'adamw'
    lr: float = 1e-3
    lr_base_size: Optional[int] = None
    weight_decay: float = 0.05
    layer_decay: Optional[float] = None
    momentum: float = 0.9
    eps: Optional[float] = None
    betas: Optional[List[float]] = None
    # weight decay off for every trainable parameter whose name contains one of these substrings, on for all the
    # others (the mmcv paramwise `custom_keys` rule); unset: timm's rule (1-d tensors and no_weight_decay() names)
    no_decay_names: Optional[List[str]] = None
    aux_lr: float = 1e-3  # compression: Adam lr of the EntropyBottleneck quantiles (CompressAI examples/train.py)


@dataclass
class ScheduleSection:
    epochs: int = 300
    sched: str = 'cosine'
    warmup_epochs: int = 0
    warmup_lr: float = 1e-6
    min_lr: float = 0.0
    cooldown_epochs: int = 0
    decay_rate: float = 0.1
    decay_milestones: Optional[List[int]] = None
    sched_on_updates: bool = False  # step the lr per optimizer update (timm's --sched-on-updates), else per epoch
    warmup_prefix: bool = False  # timm: warm-up epochs come before `epochs`, the decay runs over `epochs` only
    # per-epoch stepping only: epoch e runs at the lr timm gives epoch e - epoch_lag (the DeiT-style main.py steps
    # the scheduler after each epoch with that epoch's index: epoch_lag 1; timm's train.py: 0)
    epoch_lag: int = 0


@dataclass
class AugSection:
    # 'timm': timm's train transform (random resized crop, flip, auto_augment, colour jitter, random erasing);
    # 'torchvision_randaugment': torchvision's RandAugment(randaugment_ops, randaugment_magnitude) on the image as
    # loaded, then a square resize to data.img_size (no crop, flip or erasing)
    policy: str = 'timm'
    randaugment_ops: int = 2
    randaugment_magnitude: int = 9
    auto_augment: Optional[str] = None
    train_interpolation: str = 'random'
    hflip: float = 0.5
    color_jitter: Optional[float] = 0.4
    scale: List[float] = field(default_factory=lambda: [0.08, 1.0])
    reprob: float = 0.0
    remode: str = 'pixel'
    mixup: float = 0.0
    cutmix: float = 0.0
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5


@dataclass
class LossSection:
    smoothing: float = 0.0
    bce: bool = False
    distill: Optional[Dict[str, Any]] = None
    aux_weight: Optional[float] = None
    lmbda: Optional[float] = None
    metric: str = 'mse'  # compression distortion: mse | ms-ssim


@dataclass
class TrainerSection:
    precision: str = '32-true'
    accelerator: str = 'auto'
    devices: Union[int, str] = 1
    num_nodes: int = 1
    strategy: str = 'auto'
    ema: bool = False
    ema_decay: float = 0.9998
    clip_grad: Optional[float] = None
    accumulate: int = 1
    sync_batchnorm: bool = False  # BatchNorm statistics across processes (DDP); no effect on one device
    grad_checkpointing: bool = False
    seed: int = 42
    val_every: int = 1
    checkpoint_every_steps: Optional[int] = None
    compile: bool = False  # torch.compile the task's model (nn.Module.compile: state-dict keys unchanged)
    channels_last: bool = False  # the task's model and its 4-d inputs in channels-last memory format
    # fp16 with a static loss scale (mmcv's Fp16OptimizerHook(loss_scale=N)): needs precision 16-mixed and a GPU
    loss_scale: Optional[float] = None


@dataclass
class EvalSection:
    mode: str = 'whole'  # segmentation: 'whole' image, or 'slide' (mmseg's sliding-window inference)
    crop_size: Optional[int] = None  # slide window side (default data.img_size)
    stride: Optional[int] = None  # slide step (default two thirds of the window, as mmseg's 512 / 341)


@dataclass
class LoggingSection:
    csv: bool = True
    wandb: bool = False
    wandb_project: str = 'attention-zoo'
    wandb_mode: str = 'offline'
    progress: bool = True


@dataclass
class Recipe:
    task: str = 'classification'
    model: ModelSection = field(default_factory=ModelSection)
    # task-specific head on top of the backbone (detector, decoder): free-form here, validated by its task
    head: Dict[str, Any] = field(default_factory=dict)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    schedule: ScheduleSection = field(default_factory=ScheduleSection)
    aug: AugSection = field(default_factory=AugSection)
    loss: LossSection = field(default_factory=LossSection)
    trainer: TrainerSection = field(default_factory=TrainerSection)
    eval: EvalSection = field(default_factory=EvalSection)
    logging: LoggingSection = field(default_factory=LoggingSection)
    phases: Optional[List[Dict[str, Any]]] = None
    source: Optional[Union[str, List[str]]] = None
    path: Optional[str] = None


_MODEL_RESERVED = ('name', 'checkpoint', 'pretrained', 'quality')


def _type_ok(value: Any, annotation: Any) -> bool:
    """Whether a YAML value fits a field annotation (ints are accepted where floats are expected)."""
    origin = typing.get_origin(annotation)
    if annotation is Any:
        return True
    if origin is Union:
        return any(_type_ok(value, arg) for arg in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    if origin in (list, List):
        (inner,) = typing.get_args(annotation) or (Any,)
        return isinstance(value, (list, tuple)) and all(_type_ok(v, inner) for v in value)
    if origin in (dict, Dict):
        return isinstance(value, dict)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, annotation)


def _type_name(annotation: Any) -> str:
    return str(annotation).replace('typing.', '') if not isinstance(annotation, type) else annotation.__name__


def _build_section(cls: type, values: Any, where: str, source: str):
    if not isinstance(values, dict):
        raise RecipeError(f'{source}: `{where}` must be a mapping, got {type(values).__name__}')
    hints = typing.get_type_hints(cls)
    allowed = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        if key not in allowed:
            raise RecipeError(f'{source}: unknown key `{where}.{key}`; allowed keys of `{where}`: {", ".join(allowed)}')
        if not _type_ok(value, hints[key]):
            raise RecipeError(f'{source}: `{where}.{key}` must be {_type_name(hints[key])}, got {value!r}')
        kwargs[key] = value
    return cls(**kwargs)


def _model_section(values: Any, source: str) -> ModelSection:
    if not isinstance(values, dict):
        raise RecipeError(f'{source}: `model` must be a mapping with at least `name`')
    reserved = {k: v for k, v in values.items() if k in _MODEL_RESERVED}
    section = _build_section(ModelSection, reserved, 'model', source)
    section.kwargs = {k: v for k, v in values.items() if k not in _MODEL_RESERVED}
    if not section.name:
        raise RecipeError(f'{source}: `model.name` is required')
    return section


def timm_constructor_arguments(model_name: str) -> Sequence[str]:
    """Keyword arguments accepted by `timm.create_model(model_name, ...)`: the model class's constructor plus timm's."""
    import timm
    import torch

    if not timm.is_model(model_name):
        raise RecipeError(f'unknown model `{model_name}` (see `zoo list`)')
    with torch.device('meta'):
        model_cls = type(timm.create_model(model_name))
    return sorted(_init_arguments(model_cls) | {'features_only', 'out_indices', 'pretrained_cfg_overlay'})


def _init_arguments(cls: type) -> set:
    """Named constructor arguments of `cls`, following `**kwargs` into the base classes' constructors (a variant
    such as DiNATs that only changes defaults forwards the rest to its parent)."""
    names = set()
    for klass in cls.__mro__:
        if '__init__' not in vars(klass) or klass is object:
            continue
        params = inspect.signature(klass.__init__).parameters
        names |= {n for n, p in params.items() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)} - {'self'}
        if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
            break
    return names


def deep_merge(base: Dict, child: Dict) -> Dict:
    merged = dict(base)
    for key, value in child.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _read_tree(path: Path, seen: tuple = ()) -> Dict:
    """The recipe at `path` with its `base:` chain merged in (child wins)."""
    if path in seen:
        raise RecipeError(f'{path}: `base` chain loops back to itself: {" -> ".join(map(str, seen + (path,)))}')
    if not path.is_file():
        raise RecipeError(f'recipe not found: {path}')
    try:
        raw = _yaml(path.read_text(encoding='utf-8')) or {}
    except UnicodeDecodeError as err:
        raise RecipeError(f'{path}: not a text file (recipes are UTF-8 YAML): {err}') from None
    except yaml.YAMLError as err:
        raise RecipeError(f'{path}: not valid YAML: {err}') from None
    if not isinstance(raw, dict):
        raise RecipeError(f'{path}: a recipe must be a mapping of sections, got {type(raw).__name__}')
    base = raw.pop('base', None)
    if base is None:
        return raw
    if not isinstance(base, str):
        raise RecipeError(f'{path}: `base` must be a path to another recipe, got {base!r}')
    return deep_merge(_read_tree((path.parent / base).resolve(), seen + (path,)), raw)


def parse_overrides(items: Sequence[str]) -> Dict:
    """['a.b=1', 'c=x'] -> {'a': {'b': 1}, 'c': 'x'}; values are parsed as YAML scalars or lists."""
    tree: Dict = {}
    for item in items:
        if '=' not in item:
            raise RecipeError(f'override `{item}` is not of the form section.key=value')
        dotted, text = item.split('=', 1)
        keys = dotted.strip().split('.')
        if not all(keys):
            raise RecipeError(f'override `{item}` has an empty key')
        node = tree
        for key in keys[:-1]:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise RecipeError(f'override `{item}` conflicts with another override of `{key}`')
        node[keys[-1]] = _yaml(text) if text.strip() else None
    return tree


_SECTIONS = {
    'data': DataSection, 'optim': OptimSection, 'schedule': ScheduleSection, 'aug': AugSection,
    'loss': LossSection, 'trainer': TrainerSection, 'eval': EvalSection, 'logging': LoggingSection,
}


# timm's scheduler names (timm.scheduler.create_scheduler_v2) and Lightning's precision strings
SCHEDULERS = ('cosine', 'tanh', 'step', 'constant', 'multistep', 'plateau', 'poly', 'wsd', 'rsqrt', 'none')
PRECISIONS = ('64-true', '32-true', '16-mixed', 'bf16-mixed', '16-true', 'bf16-true', '64', '32', '16', 'bf16')
AUG_POLICIES = ('timm', 'torchvision_randaugment')
CROP_MODES = ('center', 'squash', 'border')  # timm's eval crop modes
EVAL_MODES = ('whole', 'slide')


def _check_names(recipe: Recipe, source: str) -> None:
    """Names that would otherwise fail only once training starts: optimizer, scheduler, precision."""
    from timm.optim import list_optimizers
    optimizers = list_optimizers()
    if recipe.optim.name.lower() not in optimizers:
        close = [name for name in optimizers if name.startswith(recipe.optim.name.lower()[:3])]
        raise RecipeError(f'{source}: `optim.name` {recipe.optim.name!r} is not a timm optimizer'
                          f'{f" (did you mean {close}?)" if close else ""}; see timm.optim.list_optimizers()')
    if recipe.schedule.sched not in SCHEDULERS:
        raise RecipeError(f'{source}: `schedule.sched` must be one of {", ".join(SCHEDULERS)}, got '
                          f'{recipe.schedule.sched!r}')
    if str(recipe.trainer.precision) not in PRECISIONS:
        raise RecipeError(f'{source}: `trainer.precision` must be one of {", ".join(PRECISIONS)}, got '
                          f'{recipe.trainer.precision!r}')
    for where, value, allowed in (('aug.policy', recipe.aug.policy, AUG_POLICIES),
                                  ('data.crop_mode', recipe.data.crop_mode, CROP_MODES + (None,)),
                                  ('eval.mode', recipe.eval.mode, EVAL_MODES)):
        if value not in allowed:
            raise RecipeError(f'{source}: `{where}` must be one of {", ".join(map(str, allowed))}, got {value!r}')
    _check_values(recipe, source)


def _check_values(recipe: Recipe, source: str) -> None:
    """Settings that only make sense together, or only within a range."""
    s, t = recipe.schedule, recipe.trainer
    for where, value in (('data.aug_repeats', recipe.data.aug_repeats), ('schedule.epoch_lag', s.epoch_lag)):
        if value < 0:
            raise RecipeError(f'{source}: `{where}` must be >= 0, got {value}')
    if s.epoch_lag and s.sched_on_updates:
        raise RecipeError(f'{source}: `schedule.epoch_lag` applies to per-epoch stepping; it cannot be combined '
                          f'with schedule.sched_on_updates=true')
    if t.loss_scale is not None and (t.loss_scale <= 0 or str(t.precision) not in ('16-mixed', '16')):
        raise RecipeError(f'{source}: `trainer.loss_scale` is a positive static fp16 loss scale and needs '
                          f'trainer.precision=16-mixed, got loss_scale={t.loss_scale!r} with precision {t.precision!r}')
    for where, value in (('eval.crop_size', recipe.eval.crop_size), ('eval.stride', recipe.eval.stride)):
        if value is not None and value <= 0:
            raise RecipeError(f'{source}: `{where}` must be a positive number of pixels, got {value}')
    a = recipe.aug
    timm_only = {'aug.auto_augment': a.auto_augment, 'aug.hflip': a.hflip or None,
                 'aug.color_jitter': a.color_jitter or None, 'aug.reprob': a.reprob or None}
    clashing = [key for key, value in timm_only.items() if value is not None]
    if a.policy == 'torchvision_randaugment' and clashing:
        raise RecipeError(f'{source}: aug.policy torchvision_randaugment is RandAugment then a square resize only; '
                          f'{", ".join(clashing)} belong to the timm policy: set them to 0 / null')
    if recipe.optim.no_decay_names is not None and recipe.optim.layer_decay:
        raise RecipeError(f'{source}: `optim.no_decay_names` and `optim.layer_decay` cannot be combined (layer decay '
                          f'builds its own parameter groups)')


def recipe_from_dict(tree: Dict, source: str) -> Recipe:
    """Build the Recipe of a merged recipe mapping, checking the schema: keys, value types and names."""
    allowed = [f.name for f in dataclasses.fields(Recipe) if f.name != 'path'] + ['base']
    for key in tree:
        if key not in allowed:
            raise RecipeError(f'{source}: unknown top-level key `{key}`; allowed: {", ".join(allowed)}')
    task = tree.get('task', 'classification')
    if not isinstance(task, str):
        raise RecipeError(f'{source}: `task` must be a task name, got {task!r}')
    if 'model' not in tree:
        raise RecipeError(f'{source}: the `model` section (with `name`) is required')
    model = _model_section(tree['model'], source)
    sections = {name: _build_section(cls, tree.get(name) or {}, name, source) for name, cls in _SECTIONS.items()}
    phases = tree.get('phases')
    if phases is not None and not (isinstance(phases, list) and all(isinstance(p, dict) for p in phases)):
        raise RecipeError(f'{source}: `phases` must be a list of partial recipes (mappings)')
    head = tree.get('head') or {}
    if not isinstance(head, dict):
        raise RecipeError(f'{source}: `head` must be a mapping (the task head: detector or decoder settings)')
    source_field = tree.get('source')
    if source_field is not None and not _type_ok(source_field, Union[str, List[str]]):
        raise RecipeError(f'{source}: `source` must be a string or a list of strings')
    recipe = Recipe(task=task, model=model, head=head, phases=phases, source=source_field, path=source, **sections)
    _check_names(recipe, source)
    return recipe


def read_recipe_tree(path: Union[str, Path], overrides: Sequence[str] = ()) -> Tuple[Dict, str]:
    """(merged mapping, source name) of a recipe file: its `base:` chain merged in, then the `--set` overrides."""
    path = Path(path).resolve()
    return deep_merge(_read_tree(path), parse_overrides(overrides)), str(path)


def recipe_to_dict(recipe: Recipe) -> Dict:
    """The resolved recipe as plain data, in the file format (model kwargs inline)."""
    out = dataclasses.asdict(recipe)
    model = out.pop('model')
    quality = {'quality': model['quality']} if model['quality'] is not None else {}
    out['model'] = {'name': model['name'], 'checkpoint': model['checkpoint'], 'pretrained': model['pretrained'],
                    **quality, **model['kwargs']}
    out.pop('path')
    order = ['task', 'source', 'model', 'head', *(_SECTIONS), 'phases']
    return {key: out[key] for key in order if out.get(key) not in (None, {})}


def save_recipe(recipe: Recipe, path: Union[str, Path]) -> None:
    """Write the resolved recipe (what the run actually used) as YAML."""
    Path(path).write_text(yaml.safe_dump(recipe_to_dict(recipe), sort_keys=False))
