"""TransNeXt family (zoo/models/transnext.py): tiny configs and parity fixture folders.

The module also registers MoH-ViT (moh_transnext_*), whose facts are in moh.py and are added to these lists.
"""
from . import moh as _moh

# Official structure (window 3, sr 8-4-2-1, ConvGLU, head dim 24), narrow and shallow.
_TRANSNEXT = dict(embed_dims=(24, 48, 72, 96), num_heads=(1, 2, 3, 4), depths=(1, 1, 1, 1))

# (glob on the model name, constructor overrides); the first matching pattern wins.
TINY = [
    ('transnext_*', _TRANSNEXT),
    *_moh.TINY,
]

# Models that also run the expensive checks (torch.export).
REPRESENTATIVES = ['transnext_micro', 'transnext_micro_AAAA', *_moh.REPRESENTATIVES]

# Parameters a plain training step legitimately leaves without gradient: {parameter glob: reason}.
NO_GRADIENT = dict(_moh.NO_GRADIENT)

# Folders of ../shared/fixtures whose model cases and key manifests this family must reproduce.
PARITY_FOLDERS = ['transnext', *_moh.PARITY_FOLDERS]
