"""Model families, one module per family; importing this package registers every model with timm."""
import fnmatch
from typing import List

import timm

from . import nat

# timm records a model's module as the last component of its file name; these are the zoo's.
FAMILY_MODULES = ('nat',)


def list_models(pattern: str = '*') -> List[str]:
    """Names of the models this package registers with timm, optionally filtered by a glob pattern."""
    names = sorted(name for module in FAMILY_MODULES for name in timm.list_models(module=module))
    return [name for name in names if fnmatch.fnmatch(name, pattern)]
