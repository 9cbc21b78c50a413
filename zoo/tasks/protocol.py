"""What a task is to the rest of the zoo: one `Task` object per task module, found through zoo.tasks.get_task.

The `zoo` command and the recipe loader know tasks only through these objects: `zoo train` calls `train`, `zoo eval`
calls `evaluate` (each task's own flags are declared in zoo.tasks.inference), the recipe loader calls `check_recipe` and
`model_arguments`, and `zoo eval --checkpoint DIR` finds the task of a model folder through the artifact metadata
or `recognizes` (folders written before the metadata existed).
"""
import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Sequence

from zoo.recipes import Recipe, RecipeError, timm_constructor_arguments

__all__ = ['Task', 'no_recipe_checks', 'no_data_paths', 'data_root']


def no_recipe_checks(recipe: Recipe) -> None:
    """check_recipe of a task without rules of its own."""


def _no_legacy_layout(folder: Path) -> bool:
    return False


def data_root(recipe: Recipe, layout: str) -> Path:
    """data.root of a recipe whose data reads files under it; `layout` says what that folder holds (for the error).

    Raises:
        RecipeError: data.root is not set.
    """
    if not recipe.data.root:
        raise RecipeError(f'{recipe.path}: data.root is required for data.name={recipe.data.name} ({layout})')
    return Path(recipe.data.root)


def no_data_paths(recipe: Recipe) -> Sequence[Path]:
    """data_paths of a task whose data needs nothing on disk (built-in sets)."""
    return ()


@dataclass(frozen=True)
class Task:
    """A task's entry points.

    name: the recipe's `task` value.
    train: (recipe, output folder, resume) -> final metrics (writes the run folder, zoo.tasks.engine).
    evaluate: (parsed `zoo eval` arguments) -> metrics, or None when the task printed and wrote its own report.
    check_recipe: raises RecipeError for a recipe the task cannot run (its `head`, its own keys), before anything
        is built.
    model_arguments: model name -> the constructor arguments a recipe's `model:` section may set.
    recognizes: whether a folder without artifact metadata is this task's (layouts of older versions).
    data_paths: the files and folders the recipe's data reads (checked before training and by --dry-run); raises
        RecipeError when the recipe lacks what its data needs (e.g. data.root).
    datasets: the `data.name` values the task reads (empty: not checked here).
    phases: whether recipes of this task may have `phases`.
    quality: whether recipes of this task may set `model.quality` (the rate point of a codec).
    """
    name: str
    train: Callable[[Recipe, str, Optional[str]], Dict[str, Any]]
    evaluate: Callable[[argparse.Namespace], Optional[Dict[str, Any]]]
    check_recipe: Callable[[Recipe], None] = no_recipe_checks
    model_arguments: Callable[[str], Sequence[str]] = timm_constructor_arguments
    recognizes: Callable[[Path], bool] = _no_legacy_layout
    data_paths: Callable[[Recipe], Sequence[Path]] = no_data_paths
    datasets: Sequence[str] = ()
    phases: bool = False
    quality: bool = False

    def validate(self, recipe: Recipe, check_model: bool = True) -> None:
        """Every check of a recipe of this task: the shared keys' task rules, the model's constructor arguments
        (check_model) and the task's own check_recipe."""
        source = recipe.path
        if recipe.phases and not self.phases:
            raise RecipeError(f'{source}: {self.name} recipes do not support `phases`')
        if self.datasets and recipe.data.name not in self.datasets:
            raise RecipeError(f'{source}: data.name must be one of {", ".join(self.datasets)} for {self.name}, got '
                              f'{recipe.data.name!r}')
        if recipe.model.quality is not None and not self.quality:
            raise RecipeError(f'{source}: `model.quality` is only for compression recipes (task: {self.name})')
        if check_model:
            try:
                allowed = self.model_arguments(recipe.model.name)
            except (RecipeError, ValueError) as err:
                raise RecipeError(f'{source}: {err}') from None
            unknown = [key for key in recipe.model.kwargs if key not in allowed]
            if unknown:
                raise RecipeError(f'{source}: unknown key `model.{unknown[0]}` for {recipe.model.name}; allowed: '
                                  f'name, checkpoint, pretrained, {", ".join(allowed)}')
        self.check_recipe(recipe)
