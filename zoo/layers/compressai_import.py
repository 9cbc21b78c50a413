"""CompressAI is imported only by what codes images (S2LIC's network, zoo.codecs), never by `import zoo`.

Its import costs about 1.7 s even with torch and timm loaded (its datasets pull in torch_geometric), and it applies
`torch.jit.script` as it loads, which torch >= 2.10 reports as deprecated. Classification, detection and
segmentation never need it; the codec entry points import it inside `quiet_compressai_import()`, which drops that
one notice (the scripted helpers work).
"""
import contextlib
import warnings
from typing import Iterator

__all__ = ['quiet_compressai_import']


@contextlib.contextmanager
def quiet_compressai_import() -> Iterator[None]:
    """Within this block, importing CompressAI (or a module built on it) prints no torch.jit.script notice."""
    with warnings.catch_warnings():
        warnings.filterwarnings('ignore', message='`torch.jit.script` is deprecated', category=FutureWarning)
        yield
