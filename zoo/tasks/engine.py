"""What every task's training shares: the run folder, atomic checkpoints, loggers and the Lightning trainer.

Run folder layout (`--output DIR`):
    DIR/recipe.yaml                 the resolved recipe the run used
    DIR/checkpoints/last.ckpt       full training state, written atomically at every epoch end (resume from it)
    DIR/checkpoints/best.ckpt       best validation score so far
    DIR/logs/                       CSV metrics (and wandb's offline files when enabled)
    DIR/model/                      final weights as model.safetensors + config.json (timm `local-dir:` format)
    DIR/metrics.json                final validation metrics, written when the run ends
"""
import importlib.util
import io
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import pytorch_lightning as pl
import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO
from pytorch_lightning.callbacks import Callback, ModelCheckpoint
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2

from zoo.recipes import Recipe, save_recipe

__all__ = ['AtomicCheckpointIO', 'atomic_write_bytes', 'build_trainer', 'prepare_run_dir', 'write_metrics',
           'check_finite_loss']


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to a temp file beside `path`, fsync it, then rename over `path` (never a half-written file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f'.{path.name}.')
    try:
        with os.fdopen(fd, 'wb') as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoints written to a temp file and renamed, so an interrupted save keeps the last good one."""

    def save_checkpoint(self, checkpoint: Dict[str, Any], path, storage_options: Optional[Any] = None) -> None:
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        atomic_write_bytes(Path(path), buffer.getvalue())


def prepare_run_dir(recipe: Recipe, output: str) -> Path:
    """Create the run folder and record the resolved recipe in it."""
    out = Path(output)
    (out / 'checkpoints').mkdir(parents=True, exist_ok=True)
    save_recipe(recipe, out / 'recipe.yaml')
    return out


def check_finite_loss(loss: torch.Tensor, step: int, epoch: int, run_dir: Optional[Path]) -> None:
    """Stop training with a clear message when the loss is NaN or infinite (checkpoints already written stay)."""
    if not torch.isfinite(loss).all():
        kept = f'; the last good checkpoint is {run_dir / "checkpoints" / "last.ckpt"}' if run_dir else ''
        raise FloatingPointError(f'training loss became {loss.item()} at step {step} (epoch {epoch}); stopping'
                                 f'{kept}. Lower optim.lr, enable trainer.clip_grad, or check the data.')


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


def build_trainer(recipe: Recipe, out: Path, monitor: str, extra_callbacks: List[Callback] = ()) -> pl.Trainer:
    """Lightning trainer configured from the recipe's `trainer`, `schedule` and `logging` sections."""
    t = recipe.trainer
    checkpoints = [
        ModelCheckpoint(dirpath=out / 'checkpoints', filename='best', monitor=monitor, mode='max', save_last=False,
                        enable_version_counter=False),
        ModelCheckpoint(dirpath=out / 'checkpoints', filename='last', every_n_train_steps=t.checkpoint_every_steps,
                        save_on_train_epoch_end=True, enable_version_counter=False),
    ]
    return pl.Trainer(
        max_epochs=recipe.schedule.epochs,
        accelerator=t.accelerator,
        devices=t.devices,
        num_nodes=t.num_nodes,
        strategy=t.strategy,
        precision=t.precision,
        gradient_clip_val=t.clip_grad,
        accumulate_grad_batches=t.accumulate,
        sync_batchnorm=t.sync_batchnorm,
        check_val_every_n_epoch=t.val_every,
        callbacks=[*checkpoints, _Timer(), *extra_callbacks],
        logger=_loggers(recipe, out) or False,
        enable_progress_bar=recipe.logging.progress,
        enable_model_summary=False,
        default_root_dir=str(out),
        plugins=[AtomicCheckpointIO()],
        log_every_n_steps=10,
        num_sanity_val_steps=0,
    )


def write_metrics(out: Path, metrics: Dict[str, float]) -> Path:
    """Write DIR/metrics.json atomically; returns its path."""
    path = out / 'metrics.json'
    atomic_write_bytes(path, (json.dumps(metrics, indent=1, sort_keys=True) + '\n').encode())
    return path


def resume_checkpoint(resume: Optional[str], out: Path) -> Optional[str]:
    """The checkpoint `zoo train --resume` names: 'last' is the run folder's last.ckpt; a missing file is an error."""
    if resume == 'last':
        resume = str(out / 'checkpoints' / 'last.ckpt')
    if resume and not Path(resume).is_file():
        raise FileNotFoundError(f'no checkpoint to resume from at {resume}')
    return resume


def backbone_no_weight_decay(body: torch.nn.Module, prefix: str) -> set:
    """A features_only backbone's own `no_weight_decay()` names (position biases, tokens), as names under `prefix`
    in the task model that holds it (timm's getter wrapper keeps the model as `.model`)."""
    model = getattr(body, 'model', body)
    names = model.no_weight_decay() if hasattr(model, 'no_weight_decay') else ()
    prefix = prefix + 'model.' if model is not body else prefix
    return {prefix + name for name in names}


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


def create_scheduler(optimizer: torch.optim.Optimizer, recipe: Recipe, updates_per_epoch: int):
    """timm's scheduler from the recipe's `schedule`, stepped per update (None for sched 'none')."""
    s = recipe.schedule
    sched_args = dict(decay_milestones=s.decay_milestones) if s.decay_milestones else {}
    scheduler, _ = create_scheduler_v2(
        optimizer, sched=s.sched, num_epochs=s.epochs, warmup_epochs=s.warmup_epochs, warmup_lr=s.warmup_lr,
        min_lr=s.min_lr, cooldown_epochs=s.cooldown_epochs, decay_rate=s.decay_rate, step_on_epochs=False,
        updates_per_epoch=updates_per_epoch, **sched_args)
    return scheduler


class ScheduledModule(pl.LightningModule):
    """A task's LightningModule whose timm scheduler (`self.scheduler`, set in configure_optimizers, None for sched
    'none') steps per update and travels in every checkpoint, so `--resume` continues the same lr curve."""
    scheduler = None
    _scheduler_state = None  # restored by on_load_checkpoint, applied once the scheduler exists

    def on_save_checkpoint(self, checkpoint):
        checkpoint['zoo_scheduler'] = self.scheduler.state_dict() if self.scheduler else None

    def on_load_checkpoint(self, checkpoint):
        self._scheduler_state = checkpoint.get('zoo_scheduler')

    def on_train_start(self):
        if self.scheduler is None:
            return
        if self._scheduler_state:
            self.scheduler.load_state_dict(self._scheduler_state)
        self.scheduler.step_update(self.global_step)
