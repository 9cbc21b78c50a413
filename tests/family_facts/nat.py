"""Neighborhood-attention family (zoo/models/nat.py): tiny configs and parity fixture folders."""

_NAT = dict(embed_dim=16, depths=(1, 1, 2, 1), num_heads=(1, 2, 2, 4), kernel_size=3)
_DINAT = dict(_NAT, dilations=((1,), (2,), (1, 2), (1,)))
_DINAT_S = dict(embed_dim=16, depths=(1, 1, 2, 1), num_heads=(1, 2, 2, 4), kernel_size=3,
                dilations=((2,), (1,), (1, 2), (1,)))
_ISOTROPIC = dict(embed_dim=32, depth=3, num_heads=2, kernel_size=3)

# (glob on the model name, constructor overrides); the first matching pattern wins.
TINY = [
    ('nat_isotropic_*', _ISOTROPIC),
    ('dinat_isotropic_*', _ISOTROPIC),
    ('vitrpb_*', dict(embed_dim=32, depth=3, num_heads=2)),
    ('dinat_s_*', _DINAT_S),
    ('dinat_*', _DINAT),
    ('nat_*', _NAT),
]

# Models that also run the expensive checks (torch.export).
REPRESENTATIVES = ['nat_mini', 'dinat_s_tiny', 'dinat_isotropic_small', 'vitrpb_small']

# Parameters a plain training step legitimately leaves without gradient: {parameter glob: reason}.
NO_GRADIENT = {}

# Folders of ../shared/fixtures whose model cases and key manifests this family must reproduce.
PARITY_FOLDERS = ['nat', 'dinat']
