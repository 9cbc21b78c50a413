"""Shared test helpers: where the parity fixtures live; the Triton interpreter when there is no GPU."""
import importlib
import os
from pathlib import Path

import pytest
import torch

# Triton reads TRITON_INTERPRET when its library and kernels are defined, i.e. on first import (timm
# imports it), so it is set here, before any test module imports zoo. Without a GPU the Triton kernels
# then run on CPU tensors in the interpreter and are tested against the reference.
if not torch.cuda.is_available():
    os.environ.setdefault('TRITON_INTERPRET', '1')

REPO = Path(__file__).resolve().parents[1]

# Half precisions a Triton kernel test runs in: bf16 only on a GPU, since the Triton interpreter's tl.dot multiplies
# bf16 bit patterns as integers.
TRITON_HALF_DTYPES = [
    torch.float16,
    pytest.param(torch.bfloat16, marks=pytest.mark.skipif(
        not torch.cuda.is_available(),
        reason="the Triton interpreter's tl.dot multiplies bf16 bit patterns as integers")),
]


def fixtures_path() -> Path:
    """`ZOO_FIXTURES`, else ../shared/fixtures beside the checkout (may not exist)."""
    return Path(os.environ.get('ZOO_FIXTURES', REPO.parent / 'shared' / 'fixtures'))


def fixtures_root() -> Path:
    """The fixtures folder; under CI (CI=true) a missing folder is an error, elsewhere the test skips saying why."""
    root = fixtures_path()
    if not root.is_dir():
        if _under_ci():
            raise RuntimeError(f'parity fixtures not found at {root} (set ZOO_FIXTURES); CI must run them')
        pytest.skip(f'parity fixtures not found at {root}; set ZOO_FIXTURES to run the parity tests')
    return root


def _under_ci() -> bool:
    return os.environ.get('CI', '').lower() == 'true'


def require(module: str, install: str):
    """The optional dependency `module`: imported; without it the test skips saying how to install it, except
    under CI (CI=true), which installs every extra and so fails instead of silently testing less."""
    if _under_ci():
        return importlib.import_module(module)
    return pytest.importorskip(module, reason=f'{module} is not installed ({install})')
