"""attention-zoo: attention-era vision backbones as timm models.

`import zoo` registers every model family with timm, so `timm.create_model("dinat_tiny")` works afterwards.
"""
import warnings

with warnings.catch_warnings():
    # compressai (S2LIC, the codecs) applies torch.jit.script when it is imported, which torch >= 2.10 reports as
    # deprecated on every `zoo` command; the scripted helpers work, so the notice is dropped for this one import
    warnings.filterwarnings('ignore', message='`torch.jit.script` is deprecated', category=FutureWarning)
    import compressai  # noqa: F401

from . import layers, models  # noqa: E402
from .models import list_models  # noqa: E402

__version__ = '0.1.0'
