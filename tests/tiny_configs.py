"""Small constructor overrides per model family, so contract tests run every registered name on a CPU.

They keep each model's structural choices (layer scale, stem, downsampler, dilated layers) and shrink widths
and depths. A family is matched by glob on the model name; the first matching pattern wins.
"""
import fnmatch
from typing import Dict, List, Tuple

import zoo

_NAT = dict(embed_dim=16, depths=(1, 1, 2, 1), num_heads=(1, 2, 2, 4), kernel_size=3)
_DINAT = dict(_NAT, dilations=((1,), (2,), (1, 2), (1,)))
_DINAT_S = dict(embed_dim=16, depths=(1, 1, 2, 1), num_heads=(1, 2, 2, 4), kernel_size=3,
                dilations=((2,), (1,), (1, 2), (1,)))
_ISOTROPIC = dict(embed_dim=32, depth=3, num_heads=2, kernel_size=3)

TINY: List[Tuple[str, Dict]] = [
    ('nat_isotropic_*', _ISOTROPIC),
    ('dinat_isotropic_*', _ISOTROPIC),
    ('vitrpb_*', dict(embed_dim=32, depth=3, num_heads=2)),
    ('dinat_s_*', _DINAT_S),
    ('dinat_*', _DINAT),
    ('nat_*', _NAT),
]

# One model per family for the expensive checks (torch.export).
FAMILY_REPRESENTATIVES = ['nat_mini', 'dinat_s_tiny', 'dinat_isotropic_small', 'vitrpb_small']

# Checks a family cannot pass by design, declared once with the reason: {(family glob, check): reason}.
EXPECTED_EXCEPTIONS: Dict[Tuple[str, str], str] = {}


def tiny_kwargs(name: str) -> Dict:
    for pattern, kwargs in TINY:
        if fnmatch.fnmatch(name, pattern):
            return dict(kwargs)
    raise KeyError(f'no tiny config for {name}: add one to tests/tiny_configs.py')


def exception_for(name: str, check: str):
    """The declared reason `name` cannot pass `check`, or None."""
    for (pattern, declared_check), reason in EXPECTED_EXCEPTIONS.items():
        if declared_check == check and fnmatch.fnmatch(name, pattern):
            return reason
    return None


ALL_MODELS = zoo.list_models()
