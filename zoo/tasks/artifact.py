"""One format for what every task's training leaves behind: RUN/model/ = config.json + safetensors weights.

config.json holds what the task needs to rebuild its model without the recipe (for classification it is timm's own
config, so the folder also loads with `timm.create_model('local-dir:RUN/model', pretrained=True)`), and under the
key 'zoo' the metadata every task writes:

    {"format": "zoo-artifact", "version": 1, "task": "detection", "model": "nat_mini", "recipe": "<recipe file>",
     "data": {"name": "shapes", "root": null, "dataset": "shapes"}, "metrics": {...},
     "base": {"model": "nat_mini", "weights": null, "pretrained_cfg": {...}}}

`base` records where training started: the registered model, the weights it was initialised from (a file,
'pretrained', or null for a random initialisation) and the provenance fields of the base model's cfg (tag, licence,
paper, weight location; the exported cfg for classification, the registered one for the other tasks). A
classification folder's timm `pretrained_cfg` then describes the trained model, not its base: its tag names the
recipe and dataset (`nat_mini.quickstart_shapes`), its description the data, recipe and final metrics, and it
carries no licence, paper or hub id of the base weights.

`zoo eval --checkpoint RUN/model` reads the task from it. Folders written before this format have no 'zoo' key;
each task recognises its own older layout (zoo.tasks.task_of_artifact).
"""
import json
import os
import re
from pathlib import Path
from typing import Any, Dict, Optional, Union

import timm
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from zoo.files import atomic_write_bytes, default_file_mode
from zoo.recipes import Recipe

__all__ = ['ARTIFACT_FORMAT', 'CONFIG_FILE', 'WEIGHTS_FILE', 'read_config', 'write_config', 'record_training',
           'artifact_metadata', 'dataset_name', 'trained_tag', 'save_weights', 'load_weights']

ARTIFACT_FORMAT = 'zoo-artifact'
CONFIG_FILE = 'config.json'
WEIGHTS_FILE = 'model.safetensors'
_KEY = 'zoo'
# pretrained_cfg fields that describe where a cfg's weights come from: they move to the `base` record on training
_PROVENANCE_FIELDS = ('tag', 'license', 'description', 'origin_url', 'paper_name', 'paper_ids', 'notes', 'url',
                      'hf_hub_id', 'hf_hub_filename')
# data.name values that say only "a folder": the folder's own name says which dataset it is
_FOLDER_DATASETS = ('imagefolder', 'folder')


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


def dataset_name(recipe: Recipe) -> str:
    """The dataset a recipe trains on: `data.name`, or the root folder's name for a generic folder dataset."""
    if recipe.data.name in _FOLDER_DATASETS and recipe.data.root:
        return Path(recipe.data.root).resolve().name
    return recipe.data.name


def trained_tag(recipe: Recipe) -> str:
    """timm pretrained tag of a model trained with `recipe`: the recipe's file name without the model's name, then
    the dataset unless the file name already ends with it (quickstart.yaml on shapes -> 'quickstart_shapes')."""
    stem = Path(recipe.path).stem if recipe.path else 'zoo'
    stem = stem[len(recipe.model.name) + 1:] if stem.startswith(f'{recipe.model.name}_') else stem
    dataset = dataset_name(recipe)
    tag = stem if stem.endswith(dataset) else f'{stem}_{dataset}'
    return re.sub(r'[^a-z0-9_]+', '_', tag.lower()).strip('_')


def _describe_metrics(metrics: Dict[str, Any]) -> str:
    """'val_top1=92.2, val_top5=99.6, ...' of the numeric metrics."""
    numbers = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    return ', '.join(f'{key}={value:.4g}' for key, value in numbers.items())


def _registered_cfg(model: str) -> Dict[str, Any]:
    """The registered default pretrained cfg of `model` as a dict (empty for a name timm does not know)."""
    cfg = timm.models.get_pretrained_cfg(model)
    return cfg.to_dict() if cfg is not None else {}


def _base_record(recipe: Recipe, pretrained_cfg: Dict[str, Any]) -> Dict[str, Any]:
    """Where training started: model name, initial weights (file, 'pretrained' or None) and the base cfg's
    provenance fields."""
    weights = recipe.model.checkpoint or ('pretrained' if recipe.model.pretrained else None)
    provenance = {key: pretrained_cfg[key] for key in _PROVENANCE_FIELDS if pretrained_cfg.get(key) is not None}
    return {'model': recipe.model.name, 'weights': weights, 'pretrained_cfg': provenance}


def _trained_pretrained_cfg(pretrained_cfg: Dict[str, Any], recipe: Recipe, metrics: Dict[str, Any]) -> Dict:
    """The exported pretrained_cfg with the base weights' provenance replaced by what the trained model is."""
    cfg = {key: value for key, value in pretrained_cfg.items() if key not in _PROVENANCE_FIELDS}
    cfg['tag'] = trained_tag(recipe)
    cfg['description'] = (f'{recipe.model.name} trained with attention-zoo on {dataset_name(recipe)} '
                          f'(recipe {Path(recipe.path).name if recipe.path else "given in code"}); final metrics: '
                          f'{_describe_metrics(metrics) or "none recorded"}')
    return cfg


def record_training(folder: Union[str, Path], recipe: Recipe, metrics: Dict[str, Any]) -> None:
    """Add the training metadata (task, model, recipe, data, metrics, base) to the folder's config.json, creating it
    when the task's export wrote none, and make a timm `pretrained_cfg` in it describe the trained model (module
    docstring); the folder's files get the permissions of the process's umask."""
    folder = Path(folder)
    config = read_config(folder) if (folder / CONFIG_FILE).is_file() else {}
    base_cfg = config.get('pretrained_cfg') or _registered_cfg(recipe.model.name)
    config[_KEY] = {'format': ARTIFACT_FORMAT, 'version': 1, 'task': recipe.task, 'model': recipe.model.name,
                    'recipe': recipe.path,
                    'data': {'name': recipe.data.name, 'root': recipe.data.root, 'dataset': dataset_name(recipe)},
                    'metrics': metrics, 'base': _base_record(recipe, base_cfg)}
    if 'pretrained_cfg' in config:
        config['pretrained_cfg'] = _trained_pretrained_cfg(config['pretrained_cfg'], recipe, metrics)
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
