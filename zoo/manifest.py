"""The checkpoint manifest (checkpoints/manifest.yaml): official weights with reported metrics, and our own; and
the measured model table (benchmarks/model_stats.json: parameters and GMACs at each model's input size).

Loading a file the manifest lists with a sha256 checks that hash first (`verify_listed_checkpoint`), so a
truncated download or a file swapped for another is refused before any weight is read.
"""
import hashlib
import json
from functools import lru_cache
from pathlib import Path
from typing import Dict, Optional, Tuple

import yaml

__all__ = ['MANIFEST_PATH', 'MODEL_STATS_PATH', 'load_manifest', 'model_stats', 'official_entry', 'trained_files',
           'listed_sha256', 'verify_listed_checkpoint', 'ChecksumError']

MANIFEST_PATH = Path(__file__).resolve().parents[1] / 'checkpoints' / 'manifest.yaml'
MODEL_STATS_PATH = Path(__file__).resolve().parents[1] / 'benchmarks' / 'model_stats.json'
_WEIGHTS_FILE = 'model.safetensors'  # the weights file of a model folder (timm's local-dir layout)


class ChecksumError(ValueError):
    """A checkpoint listed in the manifest does not have the listed sha256."""


@lru_cache(maxsize=1)
def load_manifest() -> Dict:
    """The parsed manifest; empty sections when the package is installed without the repository's files."""
    if not MANIFEST_PATH.is_file():
        return {'official': [], 'trained': []}
    return yaml.safe_load(MANIFEST_PATH.read_text())


@lru_cache(maxsize=1)
def model_stats() -> Dict[str, Dict]:
    """{model: {'input_size', 'params_m', 'gmacs'}} measured by benchmarks/model_stats.py; empty when the package is
    installed without the repository's files."""
    if not MODEL_STATS_PATH.is_file():
        return {}
    return json.loads(MODEL_STATS_PATH.read_text())['models']


def official_entry(model: str) -> Optional[Dict]:
    """The manifest entry of `model`'s official checkpoint, or None."""
    return next((e for e in load_manifest()['official'] if e['model'] == model), None)


def _weights_file(path: Path) -> Path:
    """A model folder's weights file, or the path itself."""
    return path / _WEIGHTS_FILE if path.is_dir() else path


def trained_files(entry: Dict) -> Dict[str, str]:
    """{file name in checkpoints/<path>/: sha256} of a trained entry: a model folder's weights file (`sha256`), or
    the files of a codec entry (`files`, one codec file per quality)."""
    if 'files' in entry:
        return dict(entry['files'])
    return {_WEIGHTS_FILE: entry['sha256']} if entry.get('sha256') else {}


def listed_sha256(path: Path) -> Optional[Tuple[str, str]]:
    """(entry name, sha256) of the manifest entry that lists `path`, or None.

    Official entries match by file name (their files live wherever the user keeps them); trained entries by
    location (checkpoints/<path>/<file>), since their folders and files have generic names.
    """
    weights = _weights_file(Path(path)).resolve()
    for entry in load_manifest()['official']:
        if entry.get('sha256') and weights.name == entry['file']:
            return entry['model'], entry['sha256']
    for entry in load_manifest()['trained']:
        for name, digest in trained_files(entry).items():
            if weights == (MANIFEST_PATH.parent / entry['path'] / name).resolve():
                return entry['name'], digest
    return None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(1 << 20), b''):
            digest.update(block)
    return digest.hexdigest()


def verify_listed_checkpoint(path) -> None:
    """Raise ChecksumError when `path` (a file or a model folder) is listed in the manifest with another sha256."""
    listed = listed_sha256(Path(path))
    if listed is None:
        return
    name, expected = listed
    weights = _weights_file(Path(path))
    actual = _sha256(weights)
    if actual != expected:
        raise ChecksumError(
            f'{weights} is listed in {MANIFEST_PATH.name} as {name!r} with sha256 {expected}, but the file '
            f'has sha256 {actual}: it is truncated, corrupt or not the listed checkpoint; refusing to load it')
