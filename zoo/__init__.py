"""attention-zoo: attention-era vision backbones as timm models.

`import zoo` registers every model family with timm, so `timm.create_model("dinat_tiny")` works afterwards.
"""
from . import layers, models
from .models import list_models

__all__ = ['layers', 'models', 'list_models', '__version__']
__version__ = '0.1.0'
