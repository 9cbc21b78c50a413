"""Semantic segmentation data: mask folders (ADE20K layout or the shapes export), on-the-fly shapes, joint transforms.

Items are `(image, mask)`: image `(3, H, W)` float normalised, mask `(H, W)` int64 class ids with `ignore_index`
where a pixel has no label (ADE20K's 0 "other" after `reduce_zero_label`, and padding).
"""
import math
import random
from pathlib import Path
from typing import List, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset

from zoo.data.images import load_pil_rgb
from zoo.data.shapes import ShapesConfig, render_sample

__all__ = ['MaskFolder', 'ade20k_folders', 'ShapesSegmentation', 'SegTransform']

_IMAGE_SUFFIXES = ('.jpg', '.jpeg', '.png', '.bmp', '.tif', '.tiff', '.webp')
# ADE20K's folder names per split (ADEChallengeData2016)
_ADE_SPLITS = {'train': 'training', 'val': 'validation'}


def ade20k_folders(root: str, split: str) -> Tuple[Path, Path]:
    """(images dir, annotations dir) of an ADE20K tree: root/images/<training|validation>, root/annotations/<same>."""
    if split not in _ADE_SPLITS:
        raise ValueError(f'split must be one of {sorted(_ADE_SPLITS)}, got {split!r}')
    return Path(root) / 'images' / _ADE_SPLITS[split], Path(root) / 'annotations' / _ADE_SPLITS[split]


class MaskFolder(Dataset):
    """Images in `image_dir`, label PNGs with the same stem in `mask_dir` (ADE20K layout or `export_segmentation`).

    `reduce_zero_label` maps label 0 to `ignore_index` and k to k-1 (ADE20K: 0 is "other", classes are 1..150).

    Raises:
        FileNotFoundError: a folder is missing, holds no image, or an image has no mask.
    """

    def __init__(self, image_dir: str, mask_dir: str, transform=None, reduce_zero_label: bool = False,
                 ignore_index: int = 255):
        image_dir, mask_dir = Path(image_dir), Path(mask_dir)
        for folder in (image_dir, mask_dir):
            if not folder.is_dir():
                raise FileNotFoundError(f'segmentation folder not found: {folder}')
        images = sorted(p for p in image_dir.iterdir() if p.suffix.lower() in _IMAGE_SUFFIXES)
        if not images:
            raise FileNotFoundError(f'no images in {image_dir} ({", ".join(_IMAGE_SUFFIXES)})')
        masks = {p.stem: p for p in mask_dir.iterdir() if p.suffix.lower() == '.png'}
        missing = [p.name for p in images if p.stem not in masks]
        if missing:
            raise FileNotFoundError(f'{len(missing)} images in {image_dir} have no mask PNG in {mask_dir}, '
                                    f'e.g. {missing[0]}')
        self.samples = [(p, masks[p.stem]) for p in images]
        self.transform = transform
        self.reduce_zero_label = reduce_zero_label
        self.ignore_index = ignore_index

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        image_path, mask_path = self.samples[index]
        pixels = np.asarray(load_pil_rgb(image_path))
        with Image.open(mask_path) as mask:
            labels = np.asarray(mask).astype(np.int64)
        if labels.ndim != 2 or labels.shape != pixels.shape[:2]:
            raise ValueError(f'{mask_path}: mask must be a single-channel PNG of the image size '
                             f'{pixels.shape[:2]}, got shape {labels.shape}')
        if self.reduce_zero_label:
            labels = np.where(labels == 0, self.ignore_index, labels - 1)
        return _apply(self.transform, pixels, labels)


class ShapesSegmentation(Dataset):
    """The built-in shapes set rendered in memory: 1..`max_objects` shapes per image, label 0 = background."""

    def __init__(self, num_samples: int = 1000, img_size: int = 64, num_classes: int = 10, max_objects: int = 3,
                 seed: int = 0, split: str = 'train', transform=None):
        self.config = ShapesConfig(num_samples=num_samples, img_size=img_size, num_classes=num_classes,
                                   max_objects=max_objects, seed=seed, split=split)
        self.transform = transform
        self._rendered = {}

    def __len__(self) -> int:
        return self.config.num_samples

    def __getitem__(self, index: int):
        if index not in self._rendered:
            sample = render_sample(self.config, index)
            self._rendered[index] = (sample.image, sample.semantic.astype(np.int64))
        pixels, labels = self._rendered[index]
        return _apply(self.transform, pixels, labels)


def _apply(transform, pixels: np.ndarray, labels: np.ndarray):
    """(H, W, 3) uint8 + (H, W) int64 -> transform(image (3, H, W) float in [0, 1], mask (H, W) int64)."""
    # copies: the arrays may be read-only views (decoded files) or the dataset's cache, which a transform must not
    # change in place
    image = torch.tensor(pixels).permute(2, 0, 1).float() / 255
    mask = torch.tensor(labels)
    return transform(image, mask) if transform else (image, mask)


class SegTransform:
    """Joint image/mask transform in the mmseg style.

    Training: random rescale of the short side to `crop_size * ratio` (ratio in `ratio_range`), random crop of
    `crop_size` (padded with `ignore_index` where the image is smaller), horizontal flip, normalisation.
    Evaluation: rescale of the short side to `crop_size`, padding to a multiple of `size_divisor`, normalisation;
    padded pixels are ignored by the metric.
    """

    def __init__(self, crop_size: int, mean: Sequence[float], std: Sequence[float], train: bool,
                 ratio_range: Tuple[float, float] = (0.5, 2.0), hflip: float = 0.5, ignore_index: int = 255,
                 size_divisor: int = 32):
        self.crop_size = crop_size
        self.mean = torch.tensor(mean, dtype=torch.float32)[:, None, None]
        self.std = torch.tensor(std, dtype=torch.float32)[:, None, None]
        self.train = train
        self.ratio_range = ratio_range
        self.hflip = hflip
        self.ignore_index = ignore_index
        self.size_divisor = size_divisor

    def __call__(self, image: torch.Tensor, mask: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """image (3, H, W) float in [0, 1], mask (H, W) int64 -> (3, h, w) normalised, (h, w) int64."""
        if self.train:
            short = self.crop_size * random.uniform(*self.ratio_range)
            image, mask = _rescale(image, mask, short)
            image, mask = self._crop(*self._pad(image, mask, self.crop_size, self.crop_size))
            if random.random() < self.hflip:
                image, mask = image.flip(-1), mask.flip(-1)
        else:
            image, mask = _rescale(image, mask, self.crop_size)
            height = math.ceil(image.shape[1] / self.size_divisor) * self.size_divisor
            width = math.ceil(image.shape[2] / self.size_divisor) * self.size_divisor
            image, mask = self._pad(image, mask, height, width)
        return (image - self.mean) / self.std, mask

    def _pad(self, image: torch.Tensor, mask: torch.Tensor, height: int, width: int):
        """Pad bottom/right up to at least (height, width): image with the mean colour (0 after normalising)."""
        pad_h, pad_w = max(height - image.shape[1], 0), max(width - image.shape[2], 0)
        if pad_h or pad_w:
            image = F.pad(image - self.mean, (0, pad_w, 0, pad_h)) + self.mean
            mask = F.pad(mask, (0, pad_w, 0, pad_h), value=self.ignore_index)
        return image, mask

    def _crop(self, image: torch.Tensor, mask: torch.Tensor):
        top = random.randint(0, image.shape[1] - self.crop_size)
        left = random.randint(0, image.shape[2] - self.crop_size)
        window = (slice(top, top + self.crop_size), slice(left, left + self.crop_size))
        return image[(slice(None), *window)], mask[window]


def _rescale(image: torch.Tensor, mask: torch.Tensor, short_side: float):
    """Resize so the short side is `short_side` (bilinear image, nearest mask)."""
    height, width = image.shape[1:]
    scale = short_side / min(height, width)
    size: List[int] = [max(1, round(height * scale)), max(1, round(width * scale))]
    if size == [height, width]:
        return image, mask
    image = F.interpolate(image[None], size=size, mode='bilinear', align_corners=False)[0]
    mask = F.interpolate(mask[None, None].float(), size=size, mode='nearest')[0, 0].long()
    return image, mask
