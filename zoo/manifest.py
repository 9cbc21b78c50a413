"""The checkpoint manifest (checkpoints/manifest.yaml): official weights with reported metrics, and our own."""
from functools import lru_cache
from pathlib import Path
from typing import Dict, Optional

import yaml

__all__ = ['MANIFEST_PATH', 'load_manifest', 'official_entry']

MANIFEST_PATH = Path(__file__).resolve().parents[1] / 'checkpoints' / 'manifest.yaml'


@lru_cache(maxsize=1)
def load_manifest() -> Dict:
    """The parsed manifest; empty sections when the package is installed without the repository's files."""
    if not MANIFEST_PATH.is_file():
        return {'official': [], 'trained': []}
    return yaml.safe_load(MANIFEST_PATH.read_text())


def official_entry(model: str) -> Optional[Dict]:
    """The manifest entry of `model`'s official checkpoint, or None."""
    return next((e for e in load_manifest()['official'] if e['model'] == model), None)
