"""Multi-phase training: a recipe's `phases` (partial recipes) run in order, each starting from the last one's weights.

Each phase is the recipe without `phases`, deep-merged with the phase's mapping (so a phase overrides only what
changes, e.g. `loss.distill` weights and `trainable`/`frozen` patterns, `optim.lr`, `schedule.epochs`). Phase i
trains in `OUTPUT/phase{i}` and, from the second phase on, its `model.checkpoint` is the previous phase's exported
`model/model.safetensors` (loaded through the family's checkpoint filter).
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


def train_phases(recipe: Recipe, output: str, train_fn: Callable[[Recipe, str], Dict]) -> Dict:
    """Run `train_fn(phase_recipe, OUTPUT/phase{i})` for every phase; returns (and writes to OUTPUT/metrics.json)
    the last phase's metrics plus `phases`, the list of every phase's metrics."""
    out = Path(output)
    results = []
    previous = None
    for i, phase in enumerate(phase_recipes(recipe), start=1):
        if previous is not None:
            phase.model.checkpoint = str(previous / 'model' / 'model.safetensors')
        previous = out / f'phase{i}'
        results.append(train_fn(phase, str(previous)))
    metrics = dict(results[-1], phases=results)
    write_metrics(out, metrics)
    return metrics
