"""The tasks: classification, detection, segmentation and compression, each a module exposing one `TASK`.

`TASK_NAMES` is the one list of tasks; the `zoo` command and the recipe loader read it through `get_task`, which
imports a task's module only when it is needed (a classification run never imports the detection stack).
"""
import importlib
from pathlib import Path
from typing import Sequence, Union

from zoo.models import read_checkpoint
from zoo.recipes import Recipe, RecipeError, read_recipe_tree, recipe_from_dict
from zoo.tasks.artifact import artifact_metadata
from zoo.tasks.protocol import Task

__all__ = ['TASK_NAMES', 'get_task', 'load_recipe', 'validate_recipe', 'check_paths', 'task_of_artifact']

TASK_NAMES = ('classification', 'detection', 'segmentation', 'compression')


def get_task(name: str) -> Task:
    """The Task object of a task name (ValueError naming the known tasks otherwise)."""
    if name not in TASK_NAMES:
        raise ValueError(f'unknown task {name!r}; tasks: {", ".join(TASK_NAMES)}')
    return importlib.import_module(f'{__name__}.{name}').TASK


def validate_recipe(tree: dict, source: str, check_model: bool = True) -> Recipe:
    """A merged recipe mapping validated by the schema and by its task (see zoo.recipes and Task.validate)."""
    task = tree.get('task', 'classification')
    if task not in TASK_NAMES:
        raise RecipeError(f'{source}: `task` must be one of {", ".join(TASK_NAMES)}, got {task!r}')
    recipe = recipe_from_dict(tree, source)
    get_task(task).validate(recipe, check_model=check_model)
    return recipe


def load_recipe(path: Union[str, Path], overrides: Sequence[str] = (), check_model: bool = True) -> Recipe:
    """Load, merge (`base:` chain, then `--set` overrides) and validate a recipe file: the schema, the model's
    constructor arguments and the task's own rules, everything that can be checked before training starts."""
    tree, source = read_recipe_tree(path, overrides)
    return validate_recipe(tree, source, check_model=check_model)


def check_paths(recipe: Recipe) -> None:
    """Every file and folder the recipe reads exists, and its weights files can be read: model and teacher
    checkpoints and the task's data (of every phase). `zoo train` checks this first (and --dry-run with it), so a
    mistyped path or a damaged file fails before minutes of set-up.

    Raises:
        RecipeError: naming each missing path or unreadable weights file and the key it comes from.
    """
    from zoo.tasks.phases import phase_recipes  # phases import this package
    task = get_task(recipe.task)
    missing, weights = [], []
    for stage in phase_recipes(recipe) if recipe.phases else [recipe]:
        stage_weights = [('model.checkpoint', stage.model.checkpoint),
                         ('loss.distill.checkpoint', (stage.loss.distill or {}).get('checkpoint'))]
        wanted = [*stage_weights, *(('data', path) for path in task.data_paths(stage))]
        missing += [f'{key}: {path}' for key, path in wanted if path and not Path(path).exists()]
        weights += [(key, path) for key, path in stage_weights if path and Path(path).is_file()]
    if missing:
        raise RecipeError(f'{recipe.path}: not found: {"; ".join(dict.fromkeys(missing))}')
    for key, path in dict.fromkeys(weights):
        try:
            read_checkpoint(path)
        except ValueError as err:
            raise RecipeError(f'{recipe.path}: {key}: {err}') from None


def task_of_artifact(folder: Union[str, Path]) -> str:
    """The task that wrote a model folder: from its artifact metadata, else from the layout only one task writes.

    Raises:
        FileNotFoundError: not a folder.
        ValueError: a folder no task recognises, or damaged metadata.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f'model folder not found: {folder}')
    metadata = artifact_metadata(folder)
    if metadata is not None:
        return get_task(metadata['task']).name
    for name in TASK_NAMES:
        if get_task(name).recognizes(folder):
            return name
    raise ValueError(f'{folder} is not a model folder of any task (no config.json with zoo metadata, no codec '
                     f'files); pass --task and a checkpoint the task reads')
