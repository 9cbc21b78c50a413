"""The one image loader of every task: image files as 8-bit RGB tensors, with explicit conversions.

Pillow narrows some formats silently (a 48-bit PNG reads as 8-bit 'RGB' through its raw mode, 16-bit grayscale as
mode 'I' whose values `convert('RGB')` clips to 255); `load_rgb` keeps the top 8 bits of 16-bit samples instead,
composites transparency onto white and replicates grayscale, or, in strict mode, refuses anything that is not
already 8-bit RGB.
"""
from pathlib import Path
from typing import List, Union

import numpy as np
import torch
from PIL import Image

__all__ = ['IMAGE_EXTENSIONS', 'load_rgb', 'load_pil_rgb', 'image_files']

IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.ppm', '.pgm', '.bmp', '.tif', '.tiff', '.webp')


def _is_16_bit(image: Image.Image) -> bool:
    """Whether Pillow reads more than 8 bits per sample (16-bit grayscale modes, or a 48-bit PNG whose raw mode
    Pillow silently narrows to 8-bit 'RGB')."""
    if image.mode in ('I', 'F') or image.mode.startswith('I;16'):
        return True
    return any(isinstance(tile.args, str) and ';16' in tile.args for tile in getattr(image, 'tile', ()))


def _convert_to_rgb(image: Image.Image) -> Image.Image:
    """Explicit conversions: transparency is composited onto white, 16-bit samples keep their top 8 bits,
    grayscale is replicated to three channels, CMYK/YCbCr/palette go through Pillow's colour conversion."""
    if image.mode in ('I', 'I;16', 'I;16B', 'I;16L'):
        image = Image.fromarray((np.asarray(image, dtype=np.uint32) >> 8).clip(0, 255).astype(np.uint8))
    elif image.mode == 'F':
        image = Image.fromarray(np.asarray(image).clip(0, 255).astype(np.uint8))
    if image.mode in ('RGBA', 'LA', 'PA') or (image.mode == 'P' and 'transparency' in image.info):
        rgba = image.convert('RGBA')
        background = Image.new('RGBA', rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert('RGB')
    return image.convert('RGB')


def load_pil_rgb(path: Union[str, Path], mode: str = 'convert') -> Image.Image:
    """Read an image file as an 8-bit RGB PIL image (for torchvision / timm transforms).

    mode 'strict' accepts only 8-bit RGB files and raises ValueError naming the file's mode otherwise
    (grayscale, RGBA, CMYK, palette, 16-bit); 'convert' converts those explicitly (see `_convert_to_rgb`).

    Raises:
        ValueError: an unreadable or (strict mode) non-RGB file, naming the file.
    """
    if mode not in ('strict', 'convert'):
        raise ValueError(f"mode must be 'strict' or 'convert', got {mode!r}")
    try:
        with Image.open(path) as image:
            sixteen_bit = _is_16_bit(image)
            if mode == 'strict' and (image.mode != 'RGB' or sixteen_bit):
                kind = f'{image.mode}, 16-bit' if sixteen_bit else image.mode
                raise ValueError(f'{path}: not an 8-bit RGB image (Pillow mode {kind}); RGB only, or load it with '
                                 f'mode="convert" to convert it explicitly')
            rgb = image.convert('RGB') if image.mode == 'RGB' else _convert_to_rgb(image)
            rgb.load()
            return rgb
    except (OSError, Image.DecompressionBombError) as err:
        raise ValueError(f'cannot read image {path}: {err}') from None


def load_rgb(path: Union[str, Path], mode: str = 'strict') -> torch.Tensor:
    """Read an image file as (3, H, W) uint8 RGB (modes as in `load_pil_rgb`)."""
    array = np.asarray(load_pil_rgb(path, mode), dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()


def image_files(folder: Union[str, Path]) -> List[Path]:
    """Image files (IMAGE_EXTENSIONS) under `folder`, recursively, sorted; FileNotFoundError when there are none."""
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f'image folder not found: {root}')
    files = sorted(p for p in root.rglob('*') if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise FileNotFoundError(f'no images ({", ".join(IMAGE_EXTENSIONS)}) under {root}')
    return files
