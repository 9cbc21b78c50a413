"""COCO-json instance datasets (boxes + masks) for detection, and the built-in shapes set in that format.

Items are what torchvision detectors take: an image tensor (3, H, W) float in [0, 1] and a target dict with
`boxes` (N, 4) float xyxy pixels, `labels` (N,) int64 in 1..K (0 is the detectors' background), `masks`
(N, H, W) uint8 and `image_id`. COCO category ids (any integers) map to 1..K in sorted order; `label_to_cat`
maps back for COCO evaluation.
"""
import contextlib
import io
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from torch.utils.data import Dataset

from zoo.data.images import load_pil_rgb
from zoo.data.shapes import ShapesConfig, export_coco

__all__ = ['CocoInstances', 'shapes_coco', 'detection_collate']


class CocoInstances(Dataset):
    """Images of `image_dir` with the instances of the COCO json `ann_file` (crowd regions dropped).

    `hflip` (training) flips each image with probability 0.5, boxes and masks with it.
    """

    def __init__(self, ann_file: str, image_dir: str, hflip: bool = False):
        if not Path(ann_file).is_file():
            raise FileNotFoundError(f'COCO annotation file not found: {ann_file}')
        if not Path(image_dir).is_dir():
            raise FileNotFoundError(f'COCO image folder not found: {image_dir}')
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress lines
            self.coco = COCO(str(ann_file))
        self.image_dir = Path(image_dir)
        self.hflip = hflip
        self.ids: List[int] = sorted(self.coco.getImgIds())
        cat_ids = sorted(self.coco.getCatIds())
        if not cat_ids:
            raise ValueError(f'{ann_file} has no categories')
        self.cat_to_label = {cat: i + 1 for i, cat in enumerate(cat_ids)}
        self.label_to_cat = {label: cat for cat, label in self.cat_to_label.items()}
        self.classes = [self.coco.cats[cat]['name'] for cat in cat_ids]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.ids)

    def _annotations(self, image_id: int, height: int, width: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(boxes (N, 4) xyxy, labels (N,), masks (N, H, W) uint8) of the non-crowd, non-empty instances."""
        boxes, labels, masks = [], [], []
        for ann in self.coco.loadAnns(self.coco.getAnnIds(imgIds=image_id, iscrowd=False)):
            x, y, w, h = ann['bbox']
            if w <= 0 or h <= 0:
                continue  # degenerate boxes make the detectors' box coders produce inf
            boxes.append([x, y, x + w, y + h])
            labels.append(self.cat_to_label[ann['category_id']])
            masks.append(self._mask(ann, height, width))
        return (np.array(boxes, dtype=np.float32).reshape(-1, 4), np.array(labels, dtype=np.int64),
                np.stack(masks) if masks else np.zeros((0, height, width), dtype=np.uint8))

    @staticmethod
    def _mask(ann: Dict, height: int, width: int) -> np.ndarray:
        """(H, W) uint8 mask of a polygon / RLE segmentation, or the filled box when there is none."""
        seg = ann.get('segmentation')
        if not seg:
            x, y, w, h = (int(round(v)) for v in ann['bbox'])
            mask = np.zeros((height, width), dtype=np.uint8)
            mask[y:y + h, x:x + w] = 1
            return mask
        if isinstance(seg, list):
            rle = mask_utils.merge(mask_utils.frPyObjects(seg, height, width))
        elif isinstance(seg['counts'], list):
            rle = mask_utils.frPyObjects(seg, height, width)
        else:
            rle = seg
        return mask_utils.decode(rle).astype(np.uint8)

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        image_id = self.ids[index]
        info = self.coco.imgs[image_id]
        path = self.image_dir / info['file_name']
        pixels = np.array(load_pil_rgb(path))
        height, width = pixels.shape[:2]
        boxes, labels, masks = self._annotations(image_id, height, width)
        if self.hflip and torch.rand(()) < 0.5:
            pixels, masks = pixels[:, ::-1], masks[:, :, ::-1]
            boxes = np.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], axis=1)
        image = torch.from_numpy(np.ascontiguousarray(pixels)).permute(2, 0, 1).float().div_(255)
        target = {'boxes': torch.from_numpy(np.ascontiguousarray(boxes)), 'labels': torch.from_numpy(labels),
                  'masks': torch.from_numpy(np.ascontiguousarray(masks)), 'image_id': torch.tensor(image_id)}
        return image, target


def shapes_coco(root: str, split: str, num_samples: int, img_size: int, num_classes: int = 10, seed: int = 0,
                min_objects: int = 1, max_objects: int = 3) -> Tuple[str, str]:
    """Export (once) a shapes split as COCO json + PNGs under `root`; returns (ann_file, image_dir).

    The folder name carries every setting, so a change of settings never reuses stale files.
    """
    config = ShapesConfig(num_samples=num_samples, img_size=img_size, num_classes=num_classes, seed=seed,
                          split=split, min_objects=min_objects, max_objects=max_objects)
    name = f'shapes_{split}_n{num_samples}_s{img_size}_c{num_classes}_seed{seed}_o{min_objects}-{max_objects}'
    folder = Path(root) / name
    ann_file = folder / f'instances_{split}.json'
    if not ann_file.is_file():  # export_coco writes the json last, so its presence means a complete export
        export_coco(config, str(folder))
    return str(ann_file), str(folder / 'images')


def detection_collate(batch: List) -> Tuple[List[torch.Tensor], List[Dict[str, torch.Tensor]]]:
    """Detectors take lists (images differ in size): [(image, target), ...] -> ([images], [targets])."""
    images, targets = zip(*batch)
    return list(images), list(targets)

