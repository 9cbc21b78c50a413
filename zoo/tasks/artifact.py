"""One format for what every task's training leaves behind: RUN/model/ = config.json + safetensors weights.

config.json holds what the task needs to rebuild its model without the recipe (for classification it is timm's own
config, so the folder also loads with `timm.create_model('local-dir:RUN/model', pretrained=True)`), and under the
key 'zoo' the metadata every task writes:

    {"format": "zoo-artifact", "version": 1, "task": "detection", "model": "nat_mini", "recipe": "<recipe file>",
     "data": {"name": "shapes", "root": null}, "metrics": {...}}

`zoo eval --checkpoint RUN/model` reads the task from it. Folders written before this format have no 'zoo' key;
each task recognises its own older layout (zoo.tasks.task_of_artifact).
"""
import json
import os
from pathlib import Path
from typing import Any, Dict, Optional, Union

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from zoo.files import atomic_write_bytes, default_file_mode
from zoo.recipes import Recipe

__all__ = ['ARTIFACT_FORMAT', 'CONFIG_FILE', 'WEIGHTS_FILE', 'read_config', 'write_config', 'record_training',
           'artifact_metadata', 'save_weights', 'load_weights']

ARTIFACT_FORMAT = 'zoo-artifact'
CONFIG_FILE = 'config.json'
WEIGHTS_FILE = 'model.safetensors'
_KEY = 'zoo'


def read_config(folder: Union[str, Path]) -> Dict[str, Any]:
    """The folder's config.json as a dict.

    Raises:
        FileNotFoundError: no config.json in the folder.
        ValueError: config.json is not valid JSON or not a JSON object (a damaged or foreign file).
    """
    path = Path(folder) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f'{folder} has no {CONFIG_FILE}: not a model folder written by zoo train / convert')
    try:
        config = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f'{path} is damaged: not valid JSON ({err})') from None
    if not isinstance(config, dict):
        raise ValueError(f'{path} is damaged: expected a JSON object, got {type(config).__name__}')
    return config


def write_config(folder: Union[str, Path], config: Dict[str, Any]) -> Path:
    """Write config.json into `folder` atomically; returns its path."""
    path = Path(folder) / CONFIG_FILE
    atomic_write_bytes(path, (json.dumps(config, indent=1) + '\n').encode())
    return path


def artifact_metadata(folder: Union[str, Path]) -> Optional[Dict[str, Any]]:
    """The 'zoo' metadata of a model folder, or None for a folder without it (older layouts, timm folders)."""
    if not (Path(folder) / CONFIG_FILE).is_file():
        return None
    metadata = read_config(folder).get(_KEY)
    if metadata is None:
        return None
    if not isinstance(metadata, dict) or metadata.get('format') != ARTIFACT_FORMAT or 'task' not in metadata:
        raise ValueError(f'{Path(folder) / CONFIG_FILE}: damaged "{_KEY}" metadata (expected format '
                         f'{ARTIFACT_FORMAT!r} with a task), got {metadata!r:.200}')
    return metadata


def record_training(folder: Union[str, Path], recipe: Recipe, metrics: Dict[str, Any]) -> None:
    """Add the training metadata (task, model, recipe, data, metrics) to the folder's config.json, creating it when
    the task's export wrote none; the folder's files get the permissions of the process's umask."""
    folder = Path(folder)
    config = read_config(folder) if (folder / CONFIG_FILE).is_file() else {}
    config[_KEY] = {'format': ARTIFACT_FORMAT, 'version': 1, 'task': recipe.task, 'model': recipe.model.name,
                    'recipe': recipe.path, 'data': {'name': recipe.data.name, 'root': recipe.data.root},
                    'metrics': metrics}
    write_config(folder, config)
    for path in folder.iterdir():  # safetensors' writer creates 0600 files: give them what open() would
        if path.is_file():
            os.chmod(path, default_file_mode())


def save_weights(folder: Union[str, Path], state_dict: Dict[str, torch.Tensor]) -> Path:
    """Write a state dict as folder/model.safetensors, atomically; returns its path."""
    path = Path(folder) / WEIGHTS_FILE
    tensors = {key: value.detach().cpu().contiguous() for key, value in state_dict.items()}
    atomic_write_bytes(path, save(tensors))
    return path


def load_weights(path: Union[str, Path]) -> Dict[str, torch.Tensor]:
    """The tensors of a safetensors file (ValueError naming the file when it is truncated, corrupt or foreign)."""
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise ValueError(f'{path}: not a readable safetensors file (truncated or corrupt?): {err}') from None
