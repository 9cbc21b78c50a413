"""Multi-phase training: a recipe's `phases` (partial recipes) run in order, each starting from the last one's weights.

Each phase is the recipe without `phases`, deep-merged with the phase's mapping (so a phase overrides only what
changes, e.g. `loss.distill` weights and `trainable`/`frozen` patterns, `optim.lr`, `schedule.epochs`). Phase i
trains in `OUTPUT/phase{i}`. From the second phase on, training continues one student: the phase starts from every
weight the previous phase's last checkpoint holds (`phase{i-1}/checkpoints/last.ckpt`: the raw model, its EMA copy
and the teacher), as the official Sparsifiner code carries one model and one EMA through both of its phases; only
the optimizer, the schedule and the epoch count start afresh. Such a phase's `model.checkpoint` is therefore unset
(the previous phase's weights replace whatever it would load). The exported `model/` of a phase is its evaluation
model (the EMA copy when trainer.ema is on), as in any run.
"""
from pathlib import Path
from typing import Callable, Dict, List

from zoo.recipes import Recipe, deep_merge, recipe_to_dict
from zoo.tasks import validate_recipe
from zoo.tasks.engine import write_metrics

__all__ = ['phase_recipes', 'train_phases']


def phase_recipes(recipe: Recipe) -> List[Recipe]:
    """The validated recipe of every phase, in order (ValueError when the recipe has no phases)."""
    if not recipe.phases:
        raise ValueError(f'{recipe.path}: the recipe has no `phases`')
    base = recipe_to_dict(recipe)
    base.pop('phases')
    return [validate_recipe(deep_merge(base, phase), f'{recipe.path} (phase {i})')
            for i, phase in enumerate(recipe.phases, start=1)]


def train_phases(recipe: Recipe, output: str, train_fn: Callable[..., Dict]) -> Dict:
    """Run `train_fn(phase_recipe, OUTPUT/phase{i}, start_from=CKPT)` for every phase, CKPT being the previous
    phase's last checkpoint (None for the first); returns (and writes to OUTPUT/metrics.json) the last phase's
    metrics plus `phases`, the list of every phase's metrics."""
    out = Path(output)
    results = []
    start_from = None
    for i, phase in enumerate(phase_recipes(recipe), start=1):
        if start_from is not None:
            phase.model.checkpoint = None
        folder = out / f'phase{i}'
        results.append(train_fn(phase, str(folder), start_from=start_from))
        start_from = str(folder / 'checkpoints' / 'last.ckpt')
    metrics = dict(results[-1], phases=results)
    write_metrics(out, metrics)
    return metrics
