"""Per-family test facts, gathered from tests/family_facts/<family>.py (one file per zoo/models family).

Each family file defines TINY (glob -> small constructor overrides that keep the model's structural choices),
REPRESENTATIVES (models that also run the expensive checks), NO_GRADIENT ({parameter glob: reason} for parameters
a plain training step legitimately leaves without gradient; they must be frozen, so DDP and optimizers skip them)
and PARITY_FOLDERS (fixture folders it must reproduce).
"""
import fnmatch
import importlib
from pathlib import Path
from typing import Dict, List, Tuple

import timm

import zoo
from zoo.models import FAMILY_MODULES

_FAMILY_DIR = Path(__file__).resolve().parent / 'family_facts'


def _family_facts(module: str):
    if not (_FAMILY_DIR / f'{module}.py').is_file():
        raise FileNotFoundError(f'zoo/models/{module}.py has no tests/family_facts/{module}.py with its test facts')
    return importlib.import_module(f'family_facts.{module}')


_FAMILIES = {module: _family_facts(module) for module in FAMILY_MODULES}

TINY: List[Tuple[str, Dict]] = [entry for family in _FAMILIES.values() for entry in family.TINY]
FAMILY_REPRESENTATIVES: List[str] = [name for family in _FAMILIES.values() for name in family.REPRESENTATIVES]
PARITY_FOLDERS: List[str] = [folder for family in _FAMILIES.values() for folder in family.PARITY_FOLDERS]


def tiny_kwargs(name: str) -> Dict:
    for pattern, kwargs in TINY:
        if fnmatch.fnmatch(name, pattern):
            return dict(kwargs)
    raise KeyError(f'no tiny config for {name}: add one to its tests/family_facts/<family>.py')


def no_gradient(name: str) -> Dict[str, str]:
    """{parameter glob: reason} of the family that registers model `name` (its tests/family_facts NO_GRADIENT)."""
    family = next(m for m in FAMILY_MODULES if name in timm.list_models(module=m))
    return dict(_FAMILIES[family].NO_GRADIENT)


# codecs (zoo.models.list_codecs) have their own tests; the classifier contract covers the rest
ALL_MODELS = [name for name in zoo.list_models() if name not in set(zoo.models.list_codecs())]
