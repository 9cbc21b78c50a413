"""Training transforms beyond timm's factory: torchvision's RandAugment on the image as loaded, then a square resize.

This is the pipeline of the official KDGQA training script (docs/kdgqa.md): `RandAugment()` with torchvision's
defaults (2 operations, each always applied, magnitude 9 on its 0-30 scale), then `Resize((size, size))` (aspect ratio
not kept, no crop), then normalisation. timm's `rand-m9-n2` differs: it runs after the random resized crop and
applies each operation with probability 0.5 at a magnitude on timm's 0-10 scale.
"""
from typing import Sequence

from torchvision import transforms

__all__ = ['randaugment_square_transform', 'INTERPOLATIONS']

INTERPOLATIONS = {'nearest': transforms.InterpolationMode.NEAREST, 'bilinear': transforms.InterpolationMode.BILINEAR,
                  'bicubic': transforms.InterpolationMode.BICUBIC}


def randaugment_square_transform(size: int, num_ops: int, magnitude: int, interpolation: str,
                                 mean: Sequence[float], std: Sequence[float]) -> transforms.Compose:
    """PIL image -> (3, size, size) normalised tensor: torchvision RandAugment(num_ops, magnitude), a resize of both
    sides to `size` with `interpolation` (nearest | bilinear | bicubic), normalisation by mean/std.

    Raises:
        ValueError: an interpolation outside those three (timm's 'random' has no torchvision equivalent here), or a
            magnitude outside torchvision's 0..30.
    """
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f'aug.train_interpolation must be one of {", ".join(INTERPOLATIONS)} with the '
                         f'torchvision_randaugment policy, got {interpolation!r}')
    if not 0 <= magnitude <= 30 or num_ops < 0:
        raise ValueError(f'torchvision RandAugment takes 0 <= aug.randaugment_magnitude <= 30 and a non-negative '
                         f'aug.randaugment_ops, got magnitude {magnitude} and {num_ops} ops')
    return transforms.Compose([
        transforms.RandAugment(num_ops=num_ops, magnitude=magnitude),
        transforms.Resize((size, size), interpolation=INTERPOLATIONS[interpolation]),
        transforms.ToTensor(),
        transforms.Normalize(mean, std),
    ])
