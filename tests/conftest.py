"""Shared test helpers: where the parity fixtures live."""
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def fixtures_path() -> Path:
    """`ZOO_FIXTURES`, else ../shared/fixtures beside the checkout (may not exist)."""
    return Path(os.environ.get('ZOO_FIXTURES', REPO.parent / 'shared' / 'fixtures'))


def fixtures_root() -> Path:
    """The fixtures folder; under CI (CI=true) a missing folder is an error, elsewhere the test skips saying why."""
    root = fixtures_path()
    if not root.is_dir():
        if os.environ.get('CI', '').lower() == 'true':
            raise RuntimeError(f'parity fixtures not found at {root} (set ZOO_FIXTURES); CI must run them')
        pytest.skip(f'parity fixtures not found at {root}; set ZOO_FIXTURES to run the parity tests')
    return root
