"""The training loop every task runs: run folder, trainer, resume, fit, export and metrics, in one place.

A task builds its data loaders and its `TaskModule` (a LightningModule whose optimizer, timm schedule, finite-loss
checks and logging live here), then calls `fit`. The schedule steps per epoch (timm's train script default) or per
optimizer update (`schedule.sched_on_updates`), and the run lasts the epochs timm's scheduler counts: warm-up
prefix and cool-down included. Run folder layout (`--output DIR`):
    DIR/recipe.yaml                 the resolved recipe the run used
    DIR/checkpoints/last.ckpt       full training state, written atomically at every epoch end (resume from it);
                                    the one before it is kept as last.previous.ckpt, the fallback when last.ckpt is
                                    unreadable
    DIR/checkpoints/best.ckpt       best validation score so far (the task's monitor, max or min)
    DIR/logs/                       CSV metrics (and wandb's offline files when enabled)
    DIR/model/                      the task's artifact: config.json + safetensors weights (zoo.tasks.artifact)
    DIR/metrics.json                final metrics, written when the run ends
"""
import contextlib
import importlib.util
import io
import json
import logging
import math
import os
import re
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import pytorch_lightning as pl
import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO
from pytorch_lightning.callbacks import Callback, ModelCheckpoint, RichProgressBar
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from torchdata.stateful_dataloader import StatefulDataLoader
from torchdata.stateful_dataloader.sampler import StatefulDistributedSampler

from zoo.data.samplers import RepeatAugSampler
from zoo.files import atomic_write_bytes
from zoo.progress import is_quiet
from zoo.recipes import Recipe, save_recipe
from zoo.tasks import artifact

__all__ = ['Monitor', 'TaskModule', 'claim_run_folder', 'start_run', 'training_console', 'RunData', 'fit',
           'build_trainer', 'write_metrics', 'resume_checkpoint', 'check_finite_loss', 'check_finite_batch',
           'create_optimizer', 'create_scheduler',
           'schedule_epochs', 'apply_schedule', 'name_rule_groups', 'backbone_no_weight_decay', 'StaticGradScaler',
           'AtomicCheckpointIO', 'PREVIOUS_LAST']

PREVIOUS_LAST = 'last.previous.ckpt'


@dataclass(frozen=True)
class Monitor:
    """The validation metric that picks best.ckpt, and whether higher ('max') or lower ('min') is better."""
    name: str
    mode: str = 'max'

    def __post_init__(self):
        if self.mode not in ('max', 'min'):
            raise ValueError(f"monitor mode must be 'max' or 'min', got {self.mode!r}")


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoints written to a temp file and renamed, so an interrupted save keeps the last good one; the
    last.ckpt being replaced is kept as last.previous.ckpt, so a last.ckpt damaged later still leaves a good one."""

    def save_checkpoint(self, checkpoint: Dict[str, Any], path, storage_options: Optional[Any] = None) -> None:
        path = Path(path)
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        if path.name == 'last.ckpt' and path.is_file():
            os.replace(path, path.with_name(PREVIOUS_LAST))
        atomic_write_bytes(path, buffer.getvalue())


# What a run writes into its folder (the layout above; multi-phase recipes add phase1/, phase2/, ...).
RUN_ENTRIES = ('recipe.yaml', 'metrics.json', 'checkpoints', 'model', 'logs')


def _run_entries(out: Path) -> List[Path]:
    return [path for path in sorted(out.iterdir()) if path.name in RUN_ENTRIES or re.fullmatch(r'phase\d+', path.name)]


def claim_run_folder(output: str, resume: Optional[str], overwrite: bool) -> None:
    """Make `output` ready for a new run without losing an old one by accident (what `zoo train` calls first).

    A folder that holds a run is refused unless the run is resumed (`--resume`) or replaced (`--overwrite`, which
    deletes that run's files and folders, nothing else).

    Raises:
        ValueError: both flags, an output path that is a file, or a run that neither flag covers.
    """
    out = Path(output)
    if resume and overwrite:
        raise ValueError('--resume continues the run in the output folder and --overwrite replaces it: pass one')
    if out.exists() and not out.is_dir():
        raise ValueError(f'--output {out} is a file, not a folder')
    if resume or not out.is_dir():
        return
    entries = _run_entries(out)
    if entries and not overwrite:
        raise ValueError(f'{out} already holds a run ({", ".join(e.name for e in entries)}): pass --resume to '
                         f'continue it, --overwrite to replace it, or choose another --output')
    for entry in entries:
        shutil.rmtree(entry) if entry.is_dir() else entry.unlink()


def start_run(recipe: Recipe, output: str) -> Path:
    """Create the run folder, record the resolved recipe in it and seed every generator (before any data is built,
    so that the shapes data, crops and initial weights are the same on every run of the recipe)."""
    out = Path(output)
    (out / 'checkpoints').mkdir(parents=True, exist_ok=True)
    save_recipe(recipe, out / 'recipe.yaml')
    pl.seed_everything(recipe.trainer.seed, workers=True, verbose=False)
    return out


def check_finite_loss(loss: torch.Tensor, step: int, epoch: int, batch_idx: int, run_dir: Optional[Path]) -> None:
    """Stop training with a clear message when the loss is NaN or infinite (checkpoints already written stay)."""
    if not torch.isfinite(loss).all():
        kept = f'; the last good checkpoint is {run_dir / "checkpoints" / "last.ckpt"}' if run_dir else ''
        raise FloatingPointError(f'training loss became {loss.item()} at step {step} (epoch {epoch}, batch '
                                 f'{batch_idx}); stopping{kept}. Lower optim.lr, enable trainer.clip_grad, or check '
                                 f'the data.')


def check_finite_batch(tensor: torch.Tensor, step: int, epoch: int, batch_idx: int) -> None:
    """Stop with a message naming the batch when an input tensor holds NaN or infinite values (a corrupt sample
    would otherwise turn every weight into NaN one step later)."""
    if tensor.is_floating_point() and not torch.isfinite(tensor).all():
        raise FloatingPointError(f'batch {batch_idx} of epoch {epoch} (step {step}) holds NaN or infinite input '
                                 f'values; stopping. Check the data (a corrupt image, a bad transform).')


class _Timer(Callback):
    """Seconds spent in fit, for metrics.json."""

    def on_fit_start(self, trainer, pl_module):
        self.start = time.perf_counter()

    def on_fit_end(self, trainer, pl_module):
        pl_module.fit_seconds = time.perf_counter() - self.start


def _loggers(recipe: Recipe, out: Path) -> List:
    loggers = []
    if recipe.logging.csv:
        loggers.append(pl.loggers.CSVLogger(str(out), name='logs', version=''))
    if recipe.logging.wandb:
        if importlib.util.find_spec('wandb') is None:
            raise ValueError("logging.wandb is true but wandb is not installed: pip install 'attention-zoo[wandb]' "
                             '(or set logging.wandb=false)')
        os.environ.setdefault('WANDB_MODE', recipe.logging.wandb_mode)
        loggers.append(pl.loggers.WandbLogger(project=recipe.logging.wandb_project, save_dir=str(out / 'logs'),
                                              name=out.name))
    return loggers


# Third-party messages a training run prints that say nothing about the run: deprecations inside torchdata and
# Lightning (not our calls) and Lightning's advertisement. Matched by message; everything else still shows.
_HARMLESS_WARNINGS = ("'set_vital' is deprecated", r'`isinstance\(treespec, LeafSpec\)` is deprecated')
_LIGHTNING_CONSOLE = 'pytorch_lightning.utilities.rank_zero'


def _drop_advertisement(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith('\N{ELECTRIC LIGHT BULB} Tip:')


@contextlib.contextmanager
def training_console() -> Iterator[None]:
    """What a training run prints: without known-harmless third-party warnings and tips; under `zoo --quiet` also
    without Lightning's device summary (its progress bar is turned off in build_trainer)."""
    console = logging.getLogger(_LIGHTNING_CONSOLE)
    level = console.level
    console.addFilter(_drop_advertisement)
    if is_quiet():
        console.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            for message in _HARMLESS_WARNINGS:
                warnings.filterwarnings('ignore', message=message)
            yield
    finally:
        console.removeFilter(_drop_advertisement)
        console.setLevel(level)


class StaticGradScaler(torch.amp.GradScaler):
    """A GradScaler whose scale never changes (mmcv's static `loss_scale`): a step whose gradients overflow is still
    skipped, but the scale is neither halved nor grown."""

    def __init__(self, loss_scale: float, device: str = 'cuda'):
        super().__init__(device, init_scale=loss_scale)
        self.loss_scale = loss_scale

    def update(self, new_scale=None) -> None:
        super().update(self.loss_scale)


def _precision(recipe: Recipe) -> Dict[str, Any]:
    """Trainer arguments for the recipe's precision: Lightning's string, or with `trainer.loss_scale` fp16 autocast
    with a static loss scale (CUDA only: on a CPU there is no fp16 autocast to scale, so the run refuses to start
    rather than silently training in another precision)."""
    t = recipe.trainer
    if t.loss_scale is None:
        return dict(precision=t.precision, plugins=[])
    if t.accelerator not in ('auto', 'gpu', 'cuda') or not torch.cuda.is_available():
        raise ValueError(f'trainer.loss_scale={t.loss_scale} (fp16 with a static loss scale) needs a CUDA GPU; on '
                         f'this machine set trainer.loss_scale=null and trainer.precision=32-true (or bf16-mixed)')
    from pytorch_lightning.plugins.precision import MixedPrecision
    return dict(precision=None, plugins=[MixedPrecision('16-mixed', 'cuda', scaler=StaticGradScaler(t.loss_scale))])


def build_trainer(recipe: Recipe, out: Path, monitor: Monitor, lightning_clips: bool = True,
                  batches_per_epoch: Optional[int] = None) -> pl.Trainer:
    """Lightning trainer configured from the recipe's `trainer`, `schedule` and `logging` sections.

    lightning_clips: whether Lightning applies trainer.clip_grad; a module under manual optimization clips its own
    gradients (Lightning refuses a Trainer-level clip value there).
    batches_per_epoch: training batches per epoch, when known: per-step losses are logged at least once an epoch.
    """
    t = recipe.trainer
    precision = _precision(recipe)
    progress = recipe.logging.progress and not is_quiet()
    checkpoints = [
        ModelCheckpoint(dirpath=out / 'checkpoints', filename='best', monitor=monitor.name, mode=monitor.mode,
                        save_last=False, enable_version_counter=False),
        ModelCheckpoint(dirpath=out / 'checkpoints', filename='last', every_n_train_steps=t.checkpoint_every_steps,
                        save_on_train_epoch_end=True, enable_version_counter=False),
    ]
    return pl.Trainer(
        max_epochs=schedule_epochs(recipe),
        accelerator=t.accelerator,
        devices=t.devices,
        num_nodes=t.num_nodes,
        strategy=t.strategy,
        precision=precision['precision'],
        gradient_clip_val=t.clip_grad if lightning_clips else None,
        accumulate_grad_batches=t.accumulate,
        sync_batchnorm=t.sync_batchnorm,
        check_val_every_n_epoch=t.val_every,
        # the bar goes to standard error: standard output keeps only what zoo train prints (the final metrics)
        callbacks=[*checkpoints, _Timer(), *([RichProgressBar(console_kwargs={'stderr': True})] if progress else [])],
        logger=_loggers(recipe, out) or False,
        enable_progress_bar=progress,
        enable_model_summary=False,
        default_root_dir=str(out),
        plugins=[AtomicCheckpointIO(), *precision['plugins']],
        use_distributed_sampler=False,  # RunData shards the data itself, with a seeded, resumable order
        log_every_n_steps=max(1, min(10, batches_per_epoch or 10)),
        num_sanity_val_steps=0,
    )


def write_metrics(out: Path, metrics: Dict[str, Any]) -> Path:
    """Write DIR/metrics.json atomically; returns its path."""
    path = Path(out) / 'metrics.json'
    atomic_write_bytes(path, (json.dumps(metrics, indent=1, sort_keys=True) + '\n').encode())
    return path


def _readable_checkpoint(path: Path) -> Optional[str]:
    """None when `path` loads as a Lightning checkpoint (tensors only), else why not."""
    try:
        state = torch.load(str(path), map_location='cpu', weights_only=True, mmap=True)
    except Exception as err:  # torch raises RuntimeError, EOFError, pickle and zip errors for damaged files
        return f'{type(err).__name__}: {err}'
    if not isinstance(state, dict) or 'state_dict' not in state:
        return 'not a Lightning checkpoint (no state_dict)'
    return None


def resume_checkpoint(resume: Optional[str], out: Path) -> Optional[str]:
    """The checkpoint `zoo train --resume` continues from, checked before training starts.

    'last' is the run folder's last.ckpt; when that file is damaged (truncated, corrupt) the previous one,
    last.previous.ckpt, is used with a warning. A missing or damaged checkpoint with no fallback is an error.
    """
    if not resume:
        return None
    path = Path(out) / 'checkpoints' / 'last.ckpt' if resume == 'last' else Path(resume)
    if not path.is_file():
        raise FileNotFoundError(f'no checkpoint to resume from at {path}')
    problem = _readable_checkpoint(path)
    if problem is None:
        return str(path)
    previous = path.with_name(PREVIOUS_LAST)
    if resume == 'last' and previous.is_file() and _readable_checkpoint(previous) is None:
        warnings.warn(f'{path} is unreadable ({problem}); resuming from the previous checkpoint {previous} instead '
                      f'(up to one epoch of training is repeated)', stacklevel=2)
        return str(previous)
    raise ValueError(f'cannot resume from {path}: the checkpoint is unreadable ({problem}) and no good previous '
                     f'checkpoint exists')


def backbone_no_weight_decay(body: torch.nn.Module, prefix: str) -> set:
    """A features_only backbone's own `no_weight_decay()` names (position biases, tokens), as names under `prefix`
    in the task model that holds it (timm's getter wrapper keeps the model as `.model`)."""
    model = getattr(body, 'model', body)
    names = model.no_weight_decay() if hasattr(model, 'no_weight_decay') else ()
    prefix = prefix + 'model.' if model is not body else prefix
    return {prefix + name for name in names}


def name_rule_groups(named: List[Tuple[str, torch.nn.Parameter]], no_decay_names: List[str],
                     weight_decay: float) -> List[Dict]:
    """Two parameter groups of the (name, parameter) pairs `named`: weight decay 0 for names containing any of
    `no_decay_names` (substrings, the mmcv `custom_keys` rule: `norm` catches every norm layer named so, while conv
    and linear biases stay decayed), `weight_decay` for the rest. A substring matching no parameter is a ValueError
    (a typo would otherwise silently decay what it meant to exempt)."""
    unused = [key for key in no_decay_names if not any(key in name for name, _ in named)]
    if unused:
        raise ValueError(f'optim.no_decay_names {unused} match no trainable parameter')
    exempt = [p for name, p in named if any(key in name for key in no_decay_names)]
    decayed = [p for name, p in named if not any(key in name for key in no_decay_names)]
    return [{'params': decayed, 'weight_decay': weight_decay}, {'params': exempt, 'weight_decay': 0.0}]


def create_optimizer(params, recipe: Recipe, world_size: int, **overrides) -> torch.optim.Optimizer:
    """timm's optimizer from the recipe's `optim` (`params`: a model or parameter groups); the lr is scaled linearly
    to the global batch when `optim.lr_base_size` is set. `overrides` replace create_optimizer_v2 arguments."""
    o = recipe.optim
    lr = o.lr
    if o.lr_base_size:
        lr = o.lr * recipe.data.batch_size * recipe.trainer.accumulate * world_size / o.lr_base_size
    extra = {k: v for k, v in (('eps', o.eps), ('betas', tuple(o.betas) if o.betas else None)) if v is not None}
    kwargs = dict(opt=o.name, lr=lr, weight_decay=o.weight_decay, momentum=o.momentum, **extra)
    return create_optimizer_v2(params, **{**kwargs, **overrides})


def _timm_scheduler(optimizer: torch.optim.Optimizer, recipe: Recipe, per_epoch: bool, updates_per_epoch: int):
    """(scheduler, total epochs) of timm's create_scheduler_v2 for the recipe's `schedule`."""
    s = recipe.schedule
    sched_args = dict(decay_milestones=s.decay_milestones) if s.decay_milestones else {}
    return create_scheduler_v2(
        optimizer, sched=s.sched, num_epochs=s.epochs, warmup_epochs=s.warmup_epochs, warmup_lr=s.warmup_lr,
        warmup_prefix=s.warmup_prefix, min_lr=s.min_lr, cooldown_epochs=s.cooldown_epochs, decay_rate=s.decay_rate,
        step_on_epochs=per_epoch, updates_per_epoch=updates_per_epoch, **sched_args)


def create_scheduler(optimizer: torch.optim.Optimizer, recipe: Recipe, updates_per_epoch: int):
    """timm's scheduler from the recipe's `schedule`, in epochs or, with `schedule.sched_on_updates`, in optimizer
    updates (None for sched 'none'); `apply_schedule` steps it."""
    per_epoch = not recipe.schedule.sched_on_updates
    return _timm_scheduler(optimizer, recipe, per_epoch, max(1, updates_per_epoch))[0]


def schedule_epochs(recipe: Recipe) -> int:
    """Epochs the run trains: what timm's scheduler counts for the schedule (`epochs`, plus the warm-up with
    `warmup_prefix`, plus `cooldown_epochs` at min_lr for the cycle schedules: cosine, tanh, poly)."""
    dummy = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=recipe.optim.lr)
    return int(_timm_scheduler(dummy, recipe, per_epoch=True, updates_per_epoch=1)[1])


def apply_schedule(scheduler, recipe: Recipe, epoch: int, update: int) -> None:
    """Set the lr for training epoch `epoch` after `update` optimizer updates: per update, or per epoch (the lr of
    epoch - schedule.epoch_lag, never before epoch 0). No-op for sched 'none'."""
    if scheduler is None:
        return
    if recipe.schedule.sched_on_updates:
        scheduler.step_update(update)
    else:
        scheduler.step(max(epoch - recipe.schedule.epoch_lag, 0))


class TaskModule(pl.LightningModule):
    """The base of every task's LightningModule: the recipe's optimizer over `parameter_groups()`, a timm schedule
    stepped per epoch or per update whose state travels in every checkpoint (so `--resume` continues the same lr
    curve), and the training-loss checks and logging every task shares.

    Subclasses may override `parameter_groups()` (a module or a list of parameter groups; default: every trainable
    parameter) and return create_optimizer overrides from `optimizer_overrides()` (layer decay, a zero default weight
    decay, ...). With `optim.no_decay_names` those parameters are regrouped by that name rule instead. A task's
    network is its `model` attribute (what trainer.compile and trainer.channels_last act on).
    """
    scheduler = None
    _scheduler_state = None  # restored by on_load_checkpoint, applied once the scheduler exists

    def __init__(self, recipe: Recipe, run_dir: Optional[Path] = None):
        super().__init__()
        self.recipe = recipe
        self.run_dir = run_dir
        self.fit_seconds = 0.0

    def parameter_groups(self):
        """What the main optimizer trains: by default every trainable parameter of the module (frozen ones, an EMA
        copy or a teacher, are left out); tasks return a model (timm's weight-decay and layer-decay rules) or their
        own parameter groups."""
        return [p for p in self.parameters() if p.requires_grad]

    def _named(self, groups) -> List[Tuple[str, torch.nn.Parameter]]:
        """(name in this module, parameter) of the trainable parameters `parameter_groups()` returned (a module, a
        list of parameters or of parameter groups)."""
        if isinstance(groups, torch.nn.Module):
            chosen = list(groups.parameters())
        else:
            chosen = [p for g in groups for p in (g['params'] if isinstance(g, dict) else [g])]
        ids = {id(p) for p in chosen if p.requires_grad}
        return [(name, p) for name, p in self.named_parameters() if id(p) in ids]

    def optimizer_overrides(self) -> Dict[str, Any]:
        return {}

    def updates_per_epoch(self) -> int:
        """Optimizer updates per epoch on each process (1 without a trainer). Counted from the run's RunData, not
        from Lightning's estimated_stepping_batches: asking that here would build the training loader before a
        resumed run restores its position, and the run would replay the epoch from its start."""
        data = getattr(self._trainer, 'datamodule', None)
        if not isinstance(data, RunData):
            return 1
        return max(1, math.ceil(data.batches_per_epoch(self.trainer.world_size) / self.recipe.trainer.accumulate))

    def create_main_optimizer(self) -> torch.optim.Optimizer:
        """The recipe's optimizer over parameter_groups(), with the schedule attached as `self.scheduler`."""
        world_size = self.trainer.world_size if self._trainer is not None else 1
        o = self.recipe.optim
        groups = self.parameter_groups()
        if o.no_decay_names is not None:
            groups = name_rule_groups(self._named(groups), o.no_decay_names, o.weight_decay)
        optimizer = create_optimizer(groups, self.recipe, world_size, **self.optimizer_overrides())
        self.scheduler = create_scheduler(optimizer, self.recipe, self.updates_per_epoch())
        self.step_scheduler()
        return optimizer

    def configure_optimizers(self):
        return self.create_main_optimizer()

    def step_scheduler(self) -> None:
        """The lr for the coming update (the same all epoch long when the schedule steps per epoch)."""
        apply_schedule(self.scheduler, self.recipe, self.current_epoch, self.global_step)

    def on_train_epoch_start(self):
        self.step_scheduler()

    def on_train_batch_end(self, outputs, batch, batch_idx):
        self.step_scheduler()

    def prepare_model(self) -> None:
        """trainer.channels_last and trainer.compile, applied to the task's `model` before training."""
        t = self.recipe.trainer
        if not (t.channels_last or t.compile):
            return
        model = getattr(self, 'model', None)
        if not isinstance(model, torch.nn.Module):
            raise ValueError(f'trainer.compile / trainer.channels_last need the task module to keep its network as '
                             f'`.model`; {type(self).__name__} has none')
        if t.channels_last:
            model.to(memory_format=torch.channels_last)
            model.register_forward_pre_hook(_channels_last_inputs)
        if t.compile:
            model.compile()  # in place: parameter names, checkpoints and the EMA copy stay as they are

    def load_phase_state(self, checkpoint: str) -> None:
        """Start from an earlier run's Lightning checkpoint: every weight of this module (the model and, where the
        task keeps them, its EMA copy and frozen teacher) as that run left them; optimizer, schedule and epoch count
        start afresh. Both modules must have the same structure (the phases of one recipe)."""
        state = torch.load(checkpoint, map_location='cpu', weights_only=True)
        try:
            self.load_state_dict(state['state_dict'])
        except RuntimeError as err:
            raise ValueError(f'{checkpoint}: the weights of the previous phase do not fit this one: {err}') from None

    def check_batch_finite(self, tensor: torch.Tensor, batch_idx: int) -> None:
        check_finite_batch(tensor, self.global_step, self.current_epoch, batch_idx)

    def log_training_loss(self, loss: torch.Tensor, batch_idx: int, batch_size: int,
                          parts: Optional[Dict[str, torch.Tensor]] = None) -> None:
        """Stop on a non-finite loss, then log it (and its parts) per step and per epoch, with the current lr."""
        check_finite_loss(loss.detach(), self.global_step, self.current_epoch, batch_idx, self.run_dir)
        self.log('train_loss', loss.detach(), prog_bar=True, on_step=True, on_epoch=True, batch_size=batch_size)
        if parts:
            self.log_dict({f'train_{name}': value.detach() if torch.is_tensor(value) else value
                           for name, value in parts.items()}, on_step=True, on_epoch=True, batch_size=batch_size)
        self.log('lr', self.trainer.optimizers[0].param_groups[0]['lr'], on_step=True, on_epoch=False,
                 batch_size=batch_size)

    def on_save_checkpoint(self, checkpoint):
        checkpoint['zoo_scheduler'] = self.scheduler.state_dict() if self.scheduler else None

    def on_load_checkpoint(self, checkpoint):
        self._scheduler_state = checkpoint.get('zoo_scheduler')

    def on_train_start(self):
        if self.scheduler is None:
            return
        if self._scheduler_state:
            self.scheduler.load_state_dict(self._scheduler_state)
        self.step_scheduler()


def _channels_last_inputs(module: torch.nn.Module, args: tuple) -> tuple:
    """Forward pre-hook: 4-d tensor arguments in channels-last memory format (values unchanged)."""
    return tuple(a.contiguous(memory_format=torch.channels_last) if torch.is_tensor(a) and a.ndim == 4 else a
                 for a in args)


class RunData(pl.LightningDataModule):
    """The data of a run: the loaders are built once the trainer knows its processes (rank, world size).

    The training loader is stateful (torchdata's StatefulDataLoader: its position goes into every checkpoint, so
    `--resume` from a mid-epoch checkpoint continues with the next unseen batch) over a distributed sampler of our
    own (a plain shuffle on one process) seeded with trainer.seed: every epoch's order is a function of the seed and
    the epoch only, so a resumed job, single- or multi-process, sees what an uninterrupted one would have seen.
    With `data.aug_repeats` it is the repeated-augmentation sampler (zoo.data.samplers), equally resumable.
    Incomplete batches are dropped. Validation is sharded over the processes in order (the tasks reduce their
    metrics over the shards).
    """

    def __init__(self, recipe: Recipe, train_set: Dataset, val_set: Dataset, collate_fn: Optional[Callable] = None,
                 val_batch_size: Optional[int] = None, val_workers: Optional[int] = None):
        super().__init__()
        self.recipe, self.train_set, self.val_set, self.collate_fn = recipe, train_set, val_set, collate_fn
        self.val_batch_size = val_batch_size or recipe.data.eval_batch_size or recipe.data.batch_size
        self.val_workers = recipe.data.workers if val_workers is None else val_workers

    def batches_per_epoch(self, world_size: int) -> int:
        """Training batches each of `world_size` processes draws per epoch (the sampler pads the data to a multiple of
        the process count; incomplete batches are dropped)."""
        return len(self._train_sampler(num_replicas=world_size, rank=0)) // self.recipe.data.batch_size

    def _processes(self) -> Dict[str, int]:
        trainer = self.trainer  # set by Lightning before it asks for the loaders
        return dict(num_replicas=trainer.world_size if trainer else 1, rank=trainer.global_rank if trainer else 0)

    def _train_sampler(self, num_replicas: int, rank: int) -> StatefulDistributedSampler:
        seed, repeats = self.recipe.trainer.seed, self.recipe.data.aug_repeats
        if repeats:
            return RepeatAugSampler(self.train_set, repeats, num_replicas=num_replicas, rank=rank, seed=seed)
        return StatefulDistributedSampler(self.train_set, shuffle=True, seed=seed, num_replicas=num_replicas,
                                          rank=rank)

    def train_dataloader(self) -> StatefulDataLoader:
        d = self.recipe.data
        sampler = self._train_sampler(**self._processes())
        return StatefulDataLoader(self.train_set, batch_size=d.batch_size, sampler=sampler, drop_last=True,
                                  num_workers=d.workers, persistent_workers=d.workers > 0, collate_fn=self.collate_fn,
                                  pin_memory=torch.cuda.is_available())

    def val_dataloader(self) -> DataLoader:
        sampler = DistributedSampler(self.val_set, shuffle=False, **self._processes())
        return DataLoader(self.val_set, batch_size=self.val_batch_size, sampler=sampler, num_workers=self.val_workers,
                          persistent_workers=self.val_workers > 0, collate_fn=self.collate_fn,
                          pin_memory=torch.cuda.is_available())


def fit(module: TaskModule, recipe: Recipe, out: Path, data: RunData, monitor: Monitor, resume: Optional[str],
        export: Callable[[Path], Optional[Dict[str, Any]]],
        summarize: Callable[[pl.Trainer], Dict[str, Any]]) -> Dict[str, Any]:
    """Train `module` on `data` and finish the run folder; returns the final metrics.

    A training set smaller than one batch is refused before training (incomplete batches are dropped, so every
    epoch would be empty). After training, `summarize(trainer)` (every process) gives the metrics and, on the
    global-zero process only, `export(out / 'model')` writes the task's artifact and may return more metrics; the
    artifact's config.json then records the task, recipe and metrics, and metrics.json is written.
    """
    if len(data.train_set) < recipe.data.batch_size:
        raise ValueError(f'the training set makes no full batch: data.batch_size={recipe.data.batch_size} is larger '
                         f'than the {len(data.train_set)} training samples (incomplete batches are dropped); lower '
                         f'data.batch_size or add data')
    resume = resume_checkpoint(resume, out)
    module.prepare_model()
    with training_console():
        trainer = build_trainer(recipe, out, monitor, lightning_clips=module.automatic_optimization,
                                batches_per_epoch=data.batches_per_epoch(world_size=1))
        trainer.fit(module, datamodule=data, ckpt_path=resume, weights_only=True)  # never unpickle objects
        metrics = dict(summarize(trainer), epochs=trainer.current_epoch, seconds=round(module.fit_seconds, 1))
    if trainer.is_global_zero:
        folder = out / 'model'
        metrics.update(export(folder) or {})
        artifact.record_training(folder, recipe, metrics)
        write_metrics(out, metrics)
    return metrics
