"""Progress bars for the long commands (evaluation, rate-distortion sweeps, benchmarks), and the one switch that
silences them (`zoo --quiet` / `zoo COMMAND --quiet`).

Bars go to standard error, so that what a command prints on standard output (its metrics, its JSON) stays clean to
pipe. Training draws Lightning's own bar (the recipe's `logging.progress`), which the same switch turns off.
"""
import contextlib
import sys
from typing import Iterable, Iterator, Optional, TypeVar

from tqdm import tqdm

__all__ = ['track', 'quiet', 'is_quiet']

T = TypeVar('T')
_quiet = False


def is_quiet() -> bool:
    """True inside `quiet()`: commands print only their results."""
    return _quiet


@contextlib.contextmanager
def quiet(enabled: bool = True) -> Iterator[None]:
    """Within this block (when `enabled`) `track` draws nothing."""
    global _quiet
    previous, _quiet = _quiet, enabled or _quiet
    try:
        yield
    finally:
        _quiet = previous


def track(iterable: Iterable[T], description: str, total: Optional[int] = None, unit: str = 'it') -> Iterator[T]:
    """`iterable`, drawing a progress bar on standard error (rate, elapsed and remaining time) unless quiet.

    total: the number of items (default: len(iterable) when it has one); unit: what an item is ('img', 'batch').
    """
    yield from tqdm(iterable, desc=description, total=total, unit=unit, file=sys.stderr, disable=_quiet,
                    dynamic_ncols=True, mininterval=0.5, leave=False)
