"""The checkpoint manifest (checkpoints/manifest.yaml): official weights with reported metrics, and our own.

Loading a file the manifest lists with a sha256 checks that hash first (`verify_listed_checkpoint`), so a
truncated download or a file swapped for another is refused before any weight is read.
"""
import hashlib
from functools import lru_cache
from pathlib import Path
from typing import Dict, Optional

import yaml

__all__ = ['MANIFEST_PATH', 'load_manifest', 'official_entry', 'listed_sha256', 'verify_listed_checkpoint',
           'ChecksumError']

MANIFEST_PATH = Path(__file__).resolve().parents[1] / 'checkpoints' / 'manifest.yaml'
_WEIGHTS_FILE = 'model.safetensors'  # the weights file of a model folder (timm's local-dir layout)


class ChecksumError(ValueError):
    """A checkpoint listed in the manifest does not have the listed sha256."""


@lru_cache(maxsize=1)
def load_manifest() -> Dict:
    """The parsed manifest; empty sections when the package is installed without the repository's files."""
    if not MANIFEST_PATH.is_file():
        return {'official': [], 'trained': []}
    return yaml.safe_load(MANIFEST_PATH.read_text())


def official_entry(model: str) -> Optional[Dict]:
    """The manifest entry of `model`'s official checkpoint, or None."""
    return next((e for e in load_manifest()['official'] if e['model'] == model), None)


def _weights_file(path: Path) -> Path:
    """A model folder's weights file, or the path itself."""
    return path / _WEIGHTS_FILE if path.is_dir() else path


def listed_sha256(path: Path) -> Optional[Dict]:
    """The manifest entry that lists `path` with a sha256, or None.

    Official entries match by file name (their files live wherever the user keeps them); trained entries by
    location (checkpoints/<path>/model.safetensors), since their folders have generic names.
    """
    weights = _weights_file(Path(path)).resolve()
    for entry in load_manifest()['official']:
        if entry.get('sha256') and weights.name == entry['file']:
            return entry
    for entry in load_manifest()['trained']:
        if entry.get('sha256') and weights == (MANIFEST_PATH.parent / entry['path'] / _WEIGHTS_FILE).resolve():
            return entry
    return None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(1 << 20), b''):
            digest.update(block)
    return digest.hexdigest()


def verify_listed_checkpoint(path) -> None:
    """Raise ChecksumError when `path` (a file or a model folder) is listed in the manifest with another sha256."""
    entry = listed_sha256(Path(path))
    if entry is None:
        return
    weights = _weights_file(Path(path))
    actual = _sha256(weights)
    if actual != entry['sha256']:
        name = entry.get('name') or entry.get('model')
        raise ChecksumError(
            f'{weights} is listed in {MANIFEST_PATH.name} as {name!r} with sha256 {entry["sha256"]}, but the file '
            f'has sha256 {actual}: it is truncated, corrupt or not the listed checkpoint; refusing to load it')
