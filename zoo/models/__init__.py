"""Model families, one module per family; importing this package registers every model with timm.

Every public module in this folder is a family and is imported here, so adding a family is adding its file.
timm records a model's module as the last component of its file name, so a family file must not share its
name with one of timm's own model modules.
"""
import fnmatch
import importlib
import pkgutil
from typing import List

import timm

# checkpoint reading shared by the families' filters and the tasks (public here; the module is private)
from zoo.models._checkpoint import read_checkpoint, read_state_dict, unwrap_state_dict  # noqa: F401

FAMILY_MODULES = tuple(sorted(info.name for info in pkgutil.iter_modules(__path__) if not info.name.startswith('_')))

for _module in FAMILY_MODULES:
    importlib.import_module(f'{__name__}.{_module}')


def list_models(pattern: str = '*') -> List[str]:
    """Names of the models this package registers with timm, optionally filtered by a glob pattern."""
    names = sorted(name for module in FAMILY_MODULES for name in timm.list_models(module=module))
    return [name for name in names if fnmatch.fnmatch(name, pattern)]


def list_codecs(pattern: str = '*') -> List[str]:
    """Names of the registered zoo models that are image codecs (pretrained cfg `task == 'compression'`)."""
    return [name for name in list_models(pattern)
            if getattr(timm.models.get_pretrained_cfg(name), 'task', None) == 'compression']
