"""Per-family test facts, gathered from tests/families/<family>.py (one file per zoo/models family).

Each family file defines TINY (glob -> small constructor overrides that keep the model's structural choices),
REPRESENTATIVES (models that also run the expensive checks), EXCEPTIONS ({(glob, check): reason} for checks the
family cannot pass by design) and PARITY_FOLDERS (fixture folders it must reproduce).
"""
import fnmatch
import importlib
from pathlib import Path
from typing import Dict, List, Tuple

import zoo
from zoo.models import FAMILY_MODULES

_FAMILY_DIR = Path(__file__).resolve().parent / 'families'


def _family_facts(module: str):
    if not (_FAMILY_DIR / f'{module}.py').is_file():
        raise FileNotFoundError(f'zoo/models/{module}.py has no tests/families/{module}.py with its test facts')
    return importlib.import_module(f'families.{module}')


_FAMILIES = [_family_facts(module) for module in FAMILY_MODULES]

TINY: List[Tuple[str, Dict]] = [entry for family in _FAMILIES for entry in family.TINY]
FAMILY_REPRESENTATIVES: List[str] = [name for family in _FAMILIES for name in family.REPRESENTATIVES]
EXPECTED_EXCEPTIONS: Dict[Tuple[str, str], str] = {k: v for family in _FAMILIES for k, v in family.EXCEPTIONS.items()}
PARITY_FOLDERS: List[str] = [folder for family in _FAMILIES for folder in family.PARITY_FOLDERS]


def tiny_kwargs(name: str) -> Dict:
    for pattern, kwargs in TINY:
        if fnmatch.fnmatch(name, pattern):
            return dict(kwargs)
    raise KeyError(f'no tiny config for {name}: add one to its tests/families/<family>.py')


def exception_for(name: str, check: str):
    """The declared reason `name` cannot pass `check`, or None."""
    for (pattern, declared_check), reason in EXPECTED_EXCEPTIONS.items():
        if declared_check == check and fnmatch.fnmatch(name, pattern):
            return reason
    return None


# codecs (zoo.models.list_codecs) have their own tests; the classifier contract covers the rest
ALL_MODELS = [name for name in zoo.list_models() if name not in set(zoo.models.list_codecs())]
