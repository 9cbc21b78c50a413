"""The built-in procedural "shapes" dataset: coloured shapes on textured backgrounds, rendered on the fly.

Every sample is a pure function of (seed, split, index), so any process renders the same data without files.
Each image carries class labels, boxes, instance masks and a semantic mask, so classification, detection and
segmentation all have an embedded default dataset. Classification uses one object per image (its class is
the label); detection and segmentation use several, later shapes occluding earlier ones.
"""
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np
from PIL import Image, ImageDraw
from torch.utils.data import Dataset

__all__ = ['SHAPE_CLASSES', 'ShapesConfig', 'ShapeSample', 'render_sample', 'ShapesClassification',
           'export_coco', 'export_segmentation']

# Silhouettes that stay distinct at 32-64 px (pentagons and hexagons blur into circles there).
SHAPE_CLASSES = ('circle', 'square', 'triangle', 'star', 'cross', 'ellipse', 'semicircle', 'lshape', 'ring',
                 'diamond')
_SPLITS = {'train': 0, 'val': 1, 'test': 2}


@dataclass(frozen=True)
class ShapesConfig:
    """What to render: `num_samples` images of `img_size`^2 with min..max objects from the first `num_classes`."""
    num_samples: int = 5000
    img_size: int = 64
    num_classes: int = 10
    min_objects: int = 1
    max_objects: int = 1
    seed: int = 0
    split: str = 'train'

    def __post_init__(self):
        if not 1 <= self.num_classes <= len(SHAPE_CLASSES):
            raise ValueError(f'shapes has 1 to {len(SHAPE_CLASSES)} classes, got num_classes={self.num_classes}')
        if self.split not in _SPLITS:
            raise ValueError(f'split must be one of {sorted(_SPLITS)}, got {self.split!r}')
        if self.img_size < 16 or self.num_samples < 1 or not 1 <= self.min_objects <= self.max_objects:
            raise ValueError(f'invalid shapes config: {self}')


@dataclass
class ShapeSample:
    image: np.ndarray       # (H, W, 3) uint8
    labels: np.ndarray      # (N,) int64 class ids
    boxes: np.ndarray       # (N, 4) float32 x0, y0, x1, y1 of the visible part, pixels
    masks: np.ndarray       # (N, H, W) bool visible instance masks
    semantic: np.ndarray    # (H, W) uint8: 0 background, class id + 1 elsewhere


def _polygon(kind: str, cx: float, cy: float, radius: float, angle: float) -> List[Tuple[float, float]]:
    """Vertices of a regular-ish polygon shape around (cx, cy)."""
    def ring_points(count, radii):
        return [(cx + r * math.cos(angle + 2 * math.pi * i / count), cy + r * math.sin(angle + 2 * math.pi * i / count))
                for i, r in zip(range(count), radii)]
    if kind == 'square':
        return ring_points(4, [radius] * 4)
    if kind == 'diamond':
        return ring_points(4, [radius, radius * 0.55] * 2)
    if kind == 'triangle':
        return ring_points(3, [radius] * 3)
    if kind == 'star':
        return ring_points(10, [radius, radius * 0.45] * 5)
    if kind == 'cross':
        arm, half = radius, radius * 0.35
        local = [(-half, -arm), (half, -arm), (half, -half), (arm, -half), (arm, half), (half, half), (half, arm),
                 (-half, arm), (-half, half), (-arm, half), (-arm, -half), (-half, -half)]
    elif kind == 'lshape':
        r, bar = radius * 0.8, radius * 0.7
        local = [(-r, -r), (-r + bar, -r), (-r + bar, r - bar), (r, r - bar), (r, r), (-r, r)]
    else:
        raise ValueError(kind)
    cos, sin = math.cos(angle), math.sin(angle)
    return [(cx + x * cos - y * sin, cy + x * sin + y * cos) for x, y in local]


def _shape_mask(kind: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """(size, size) bool mask of one randomly placed, sized and rotated shape."""
    radius = rng.uniform(0.22, 0.38) * size
    cx, cy = rng.uniform(radius * 0.8, size - radius * 0.8, size=2)
    angle = rng.uniform(0, 2 * math.pi)
    canvas = Image.new('L', (size, size), 0)
    draw = ImageDraw.Draw(canvas)
    if kind in ('circle', 'ring'):
        draw.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill=255)
        if kind == 'ring':
            inner = radius * 0.55
            draw.ellipse([cx - inner, cy - inner, cx + inner, cy + inner], fill=0)
    elif kind == 'semicircle':
        start = math.degrees(angle)
        draw.pieslice([cx - radius, cy - radius, cx + radius, cy + radius], start, start + 180, fill=255)
    elif kind == 'ellipse':
        ellipse = Image.new('L', (size, size), 0)
        ImageDraw.Draw(ellipse).ellipse([cx - radius, cy - radius * 0.5, cx + radius, cy + radius * 0.5], fill=255)
        canvas = ellipse.rotate(math.degrees(angle), center=(cx, cy))
    else:
        draw.polygon(_polygon(kind, cx, cy, radius, angle), fill=255)
    return np.asarray(canvas) > 127


def _background(size: int, rng: np.random.Generator) -> Tuple[np.ndarray, np.ndarray]:
    """(size, size, 3) float texture (a base colour, random stripes or checks, pixel noise) and its base colour."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    base = rng.uniform(0.0, 0.55, size=3)
    freq = rng.uniform(2, 8)
    theta = rng.uniform(0, math.pi)
    if rng.random() < 0.5:
        pattern = np.sin(2 * math.pi * freq * (xx * math.cos(theta) + yy * math.sin(theta)))
    else:
        pattern = np.sign(np.sin(2 * math.pi * freq * xx) * np.sin(2 * math.pi * freq * yy))
    tint = rng.uniform(-0.08, 0.08, size=3)
    texture = base + pattern[..., None] * tint + rng.normal(0, 0.02, size=(size, size, 3))
    return texture, base


_LUMA = np.array([0.299, 0.587, 0.114])


def _contrasting_colour(base: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A random RGB colour at least 0.3 brighter (luma) than the background's base colour.

    One contrast polarity (shapes brighter than their background) keeps the task about shape rather than
    about colour pairs, so small models learn it within a few epochs.
    """
    while True:
        colour = rng.uniform(0, 1, size=3)
        if colour @ _LUMA >= base @ _LUMA + 0.3:
            return colour


def render_sample(config: ShapesConfig, index: int) -> ShapeSample:
    """The sample `index` of the split described by `config` (deterministic)."""
    if not 0 <= index < config.num_samples:
        raise IndexError(f'index {index} out of range for {config.num_samples} samples')
    rng = np.random.default_rng([config.seed, _SPLITS[config.split], index])
    size = config.img_size
    image, base = _background(size, rng)
    count = int(rng.integers(config.min_objects, config.max_objects + 1))
    labels, masks = [], []
    for _ in range(count):
        label = int(rng.integers(config.num_classes))
        mask = _shape_mask(SHAPE_CLASSES[label], size, rng)
        colour = _contrasting_colour(base, rng)
        shade = 1 + 0.25 * (np.mgrid[0:size, 0:size][0] / size - 0.5)[..., None]
        image = np.where(mask[..., None], np.clip(colour * shade, 0, 1), image)
        masks = [m & ~mask for m in masks]
        labels.append(label)
        masks.append(mask)
    keep = [i for i, m in enumerate(masks) if m.sum() >= 4]
    labels = np.array([labels[i] for i in keep], dtype=np.int64)
    masks = np.stack([masks[i] for i in keep]) if keep else np.zeros((0, size, size), dtype=bool)
    semantic = np.zeros((size, size), dtype=np.uint8)
    for label, mask in zip(labels, masks):
        semantic[mask] = label + 1
    return ShapeSample(
        image=(np.clip(image, 0, 1) * 255).round().astype(np.uint8),
        labels=labels,
        boxes=np.array([_box(m) for m in masks], dtype=np.float32).reshape(-1, 4),
        masks=masks,
        semantic=semantic,
    )


def _box(mask: np.ndarray) -> Tuple[float, float, float, float]:
    rows, cols = np.nonzero(mask)
    return float(cols.min()), float(rows.min()), float(cols.max() + 1), float(rows.max() + 1)


class ShapesClassification(Dataset):
    """Classification view: one shape per image, label = its class. Items are (transformed PIL image, label).

    Rendered images are kept in memory (img_size^2 * 3 bytes each) so later epochs skip the rendering.
    """

    def __init__(self, num_samples: int = 5000, img_size: int = 64, num_classes: int = 10, seed: int = 0,
                 split: str = 'train', transform=None):
        self.config = ShapesConfig(num_samples=num_samples, img_size=img_size, num_classes=num_classes, seed=seed,
                                   split=split)
        self.transform = transform
        self.classes = list(SHAPE_CLASSES[:num_classes])
        self._rendered: Dict[int, Tuple[np.ndarray, int]] = {}

    def __len__(self) -> int:
        return self.config.num_samples

    def __getitem__(self, index: int):
        if index not in self._rendered:
            sample = render_sample(self.config, index)
            self._rendered[index] = (sample.image, int(sample.labels[0]))
        pixels, label = self._rendered[index]
        image = Image.fromarray(pixels)
        return (self.transform(image) if self.transform else image), label


def _rle(mask: np.ndarray) -> dict:
    """Uncompressed COCO run-length encoding (column-major, starting with a background run)."""
    flat = np.asfortranarray(mask).ravel(order='F').astype(np.uint8)
    changes = np.flatnonzero(np.diff(np.concatenate([[0], flat, [1 - flat[-1]]])))
    counts = np.diff(np.concatenate([[0], changes])).tolist()
    return {'size': list(mask.shape), 'counts': counts}


def export_coco(config: ShapesConfig, out_dir: str, image_dir: str = 'images') -> Path:
    """Write the split as PNG images plus a COCO instances json (boxes xywh, RLE masks); returns the json path."""
    out = Path(out_dir)
    (out / image_dir).mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for index in range(config.num_samples):
        sample = render_sample(config, index)
        name = f'{config.split}_{index:06d}.png'
        Image.fromarray(sample.image).save(out / image_dir / name)
        images.append({'id': index, 'file_name': name, 'height': config.img_size, 'width': config.img_size})
        for label, box, mask in zip(sample.labels, sample.boxes, sample.masks):
            x0, y0, x1, y1 = box.tolist()
            annotations.append({'id': len(annotations) + 1, 'image_id': index, 'category_id': int(label) + 1,
                                'bbox': [x0, y0, x1 - x0, y1 - y0], 'area': float(mask.sum()), 'iscrowd': 0,
                                'segmentation': _rle(mask)})
    categories = [{'id': i + 1, 'name': name} for i, name in enumerate(SHAPE_CLASSES[:config.num_classes])]
    path = out / f'instances_{config.split}.json'
    path.write_text(json.dumps({'images': images, 'annotations': annotations, 'categories': categories}))
    return path


def export_segmentation(config: ShapesConfig, out_dir: str) -> Path:
    """Write images/ and masks/ folders (masks: PNG, 0 background, class id + 1); returns out_dir."""
    out = Path(out_dir)
    for sub in ('images', 'masks'):
        (out / sub).mkdir(parents=True, exist_ok=True)
    for index in range(config.num_samples):
        sample = render_sample(config, index)
        name = f'{config.split}_{index:06d}.png'
        Image.fromarray(sample.image).save(out / 'images' / name)
        Image.fromarray(sample.semantic).save(out / 'masks' / name)
    return out
