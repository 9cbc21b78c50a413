"""Natural photos bundled in the scikit-image wheel (no download) and random-crop training data over image folders.

The photos have a FIXED split, chosen once and never changed, so held-out numbers stay comparable:

    test  (held out; never used for training): astronaut 512x512, coffee 600x400, chelsea 451x300 (width x height;
          lossless PNGs, each side > 160 px so MS-SSIM is defined)
    train: rocket 640x427, motorcycle_left / motorcycle_right 741x500 (a stereo pair, kept together in train so
          that no near-duplicate of a training image is tested), hubble_deep_field 1000x872, retina 1411x1411,
          immunohistochemistry 512x512

The JPEG-sourced training photos (rocket, hubble_deep_field, retina) carry mild JPEG artefacts; that is accepted
for a quickstart training set. Grayscale (camera, moon, ...) and RGBA (horse, logo) images and the synthetic
colour wheel are excluded; the pooch-downloaded ones (eagle, lily, ...) are not available offline.
"""
import random
from pathlib import Path
from typing import Dict, List, Sequence, Union

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from zoo.data.images import load_rgb

__all__ = ['PHOTOS', 'photo_names', 'photo_path', 'load_photo', 'load_held_out_photos', 'export_photos',
           'RandomCropDataset']

# name -> (file in skimage.data.data_dir, split)
PHOTOS: Dict[str, tuple] = {
    'astronaut': ('astronaut.png', 'test'),
    'coffee': ('coffee.png', 'test'),
    'chelsea': ('chelsea.png', 'test'),
    'rocket': ('rocket.jpg', 'train'),
    'motorcycle_left': ('motorcycle_left.png', 'train'),
    'motorcycle_right': ('motorcycle_right.png', 'train'),
    'hubble_deep_field': ('hubble_deep_field.jpg', 'train'),
    'retina': ('retina.jpg', 'train'),
    'immunohistochemistry': ('ihc.png', 'train'),
}
SPLITS = ('train', 'test')


def photo_names(split: str) -> List[str]:
    """Names of the bundled photos in `split` ('train' or 'test'), in a fixed order."""
    if split not in SPLITS:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    return [name for name, (_, photo_split) in PHOTOS.items() if photo_split == split]


def photo_path(name: str) -> Path:
    """The file of a bundled photo inside the installed scikit-image package."""
    import skimage.data
    if name not in PHOTOS:
        raise ValueError(f'unknown photo {name!r}; available: {", ".join(PHOTOS)}')
    path = Path(skimage.data.data_dir) / PHOTOS[name][0]
    if not path.is_file():
        raise FileNotFoundError(f'{path} is missing from the scikit-image installation')
    return path


def load_photo(name: str) -> torch.Tensor:
    """A bundled photo as (3, H, W) uint8 RGB."""
    return load_rgb(photo_path(name), mode='strict')


def load_held_out_photos() -> Dict[str, torch.Tensor]:
    """The held-out ('test') photos as {'<name>.png': (3, H, W) uint8}, keyed as export_photos writes them."""
    return {f'{name}.png': load_photo(name) for name in sorted(photo_names('test'))}


def export_photos(split: str, out_dir: Union[str, Path]) -> List[Path]:
    """Write the `split` photos as lossless RGB PNGs `<name>.png` into `out_dir` (e.g. for `zoo eval --data DIR`);
    returns their paths."""
    from PIL import Image
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in photo_names(split):
        path = out / f'{name}.png'
        Image.fromarray(load_photo(name).permute(1, 2, 0).numpy()).save(path)
        paths.append(path)
    return paths


class RandomCropDataset(Dataset):
    """`length` random `crop_size`^2 crops with random horizontal and vertical flips, cycling over `files`.

    Item i is a crop of image i % len(files): (3, crop_size, crop_size) float in [0, 1]. Images smaller than the
    crop are reflect-padded (replicate where reflection cannot reach). Files that are not 8-bit RGB are converted
    explicitly (load_rgb mode 'convert'). With `cache`, decoded images stay in memory (for small sets such as the
    bundled photos). Randomness comes from Python's `random`, seeded per worker by Lightning's seed_everything.
    """

    def __init__(self, files: Sequence[Union[str, Path]], crop_size: int, length: int, cache: bool = False):
        if not files:
            raise ValueError('RandomCropDataset needs at least one image file')
        if crop_size < 1 or length < 1:
            raise ValueError(f'crop_size and length must be positive, got {crop_size} and {length}')
        self.files = [Path(f) for f in files]
        self.crop_size = crop_size
        self.length = length
        self._cache: Dict[Path, torch.Tensor] = {} if cache else None

    def __len__(self) -> int:
        return self.length

    def _image(self, path: Path) -> torch.Tensor:
        if self._cache is None:
            return load_rgb(path, mode='convert')
        if path not in self._cache:
            self._cache[path] = load_rgb(path, mode='convert')
        return self._cache[path]

    def _pad_to_crop(self, image: torch.Tensor) -> torch.Tensor:
        """(3, H, W) uint8 -> (3, >= crop, >= crop) float in [0, 1]."""
        x = image.float().div(255)
        pad_h, pad_w = max(0, self.crop_size - x.shape[1]), max(0, self.crop_size - x.shape[2])
        if pad_h or pad_w:
            can_reflect = pad_h < x.shape[1] and pad_w < x.shape[2]
            x = F.pad(x[None], (0, pad_w, 0, pad_h), mode='reflect' if can_reflect else 'replicate')[0]
        return x

    def __getitem__(self, index: int) -> torch.Tensor:
        x = self._pad_to_crop(self._image(self.files[index % len(self.files)]))
        top = random.randint(0, x.shape[1] - self.crop_size)
        left = random.randint(0, x.shape[2] - self.crop_size)
        crop = x[:, top:top + self.crop_size, left:left + self.crop_size]
        if random.random() < 0.5:
            crop = crop.flip(2)
        if random.random() < 0.5:
            crop = crop.flip(1)
        return crop.contiguous()
