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


def measured(metrics: dict) -> dict:
    """The measurement in an evaluation record: without its timings (seconds, images/s) and the run's settings
    (checkpoint, device, precision), which differ between two evaluations of the same model and data."""
    run = ('seconds', 'images_per_second', 'checkpoint', 'device', 'amp', 'channels_last')
    return {key: value for key, value in metrics.items() if key not in run}


@pytest.fixture
def one_thread():
    """One torch thread for the test: the CI machine is shared, and oversubscribed threads make small ops crawl
    (several times slower); used by the modules that build many small models."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
