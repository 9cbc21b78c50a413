"""Classic image codecs through Pillow (JPEG, WebP, AVIF, JPEG 2000), measured like the learned ones."""
import io
from typing import Dict, List, Mapping, Optional, Sequence

import numpy as np
import torch
from PIL import Image, features

from zoo.codecs.metrics import measure, rd_point
from zoo.progress import track

__all__ = ['CLASSIC_CODECS', 'classic_spec', 'classic_unavailable', 'encode_classic', 'decode_classic',
           'evaluate_classic']

# name -> (Pillow format, Pillow feature, default setting sweep, save options for a setting, what a setting means).
# The sweeps span about 0.1-2 bpp on photos with 7-9 points: enough for cubic BD-rates, and few because MS-SSIM
# costs ~0.5 s per 512x512 image on a CPU. WebP starts at quality 0: on the held-out photos its quality 5 is already
# 28.5 dB at 0.23 bpp, so without it a low-rate codec's curve would not overlap WebP's for a BD-rate.
# JPEG 2000 has no quality knob in Pillow: its setting is the target compression ratio of OpenJPEG's
# 'rates' mode (raw 24-bit size / coded size, so bpp ~ 24 / ratio), lossy 9/7 wavelet, raw codestream.
CLASSIC_CODECS: Dict[str, dict] = {
    'jpeg': dict(format='JPEG', feature='jpg', settings=(5, 10, 20, 30, 45, 60, 75, 90),
                 options=lambda q: dict(quality=q, subsampling='4:2:0'), setting='quality (4:2:0)'),
    'webp': dict(format='WEBP', feature='webp', settings=(0, 5, 10, 20, 30, 45, 60, 75, 90),
                 options=lambda q: dict(quality=q, method=4), setting='quality (lossy, method 4)'),
    'avif': dict(format='AVIF', feature='avif', settings=(10, 25, 40, 50, 60, 70, 85),
                 options=lambda q: dict(quality=q, speed=6, subsampling='4:2:0'), setting='quality (4:2:0, speed 6)'),
    'jpeg2000': dict(format='JPEG2000', feature='jpg_2000', settings=(240, 120, 80, 48, 32, 24, 16, 12),
                     options=lambda r: dict(quality_mode='rates', quality_layers=[r], irreversible=True, no_jp2=True),
                     setting='compression ratio (OpenJPEG rates mode, 9/7 wavelet)'),
}


def classic_spec(name: str) -> dict:
    if name not in CLASSIC_CODECS:
        raise ValueError(f'unknown classic codec {name!r}; choose from {sorted(CLASSIC_CODECS)}')
    return CLASSIC_CODECS[name]


def classic_unavailable(name: str) -> Optional[str]:
    """None when this Pillow can encode and decode codec `name`, else the reason it cannot."""
    spec = classic_spec(name)
    if not features.check(spec['feature']):
        return f'this Pillow build has no {spec["format"]} support (PIL.features "{spec["feature"]}")'
    return None


def encode_classic(name: str, image: torch.Tensor, setting: int) -> bytes:
    """(3, H, W) uint8 RGB -> the codec's file bytes at one setting (see CLASSIC_CODECS), in memory."""
    spec = classic_spec(name)
    if image.dtype != torch.uint8 or image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f'image must be a (3, H, W) uint8 RGB tensor, got {tuple(image.shape)} {image.dtype}')
    buffer = io.BytesIO()
    Image.fromarray(image.permute(1, 2, 0).numpy()).save(buffer, format=spec['format'], **spec['options'](setting))
    return buffer.getvalue()


def decode_classic(data: bytes) -> torch.Tensor:
    """Bytes of any Pillow-readable image -> (3, H, W) uint8 RGB."""
    with Image.open(io.BytesIO(data)) as image:
        image.load()
        return _image_to_tensor(image)


def _image_to_tensor(image: Image.Image) -> torch.Tensor:
    """PIL RGB image -> (3, H, W) uint8."""
    return torch.from_numpy(np.array(image.convert('RGB'), dtype=np.uint8)).permute(2, 0, 1).contiguous()


def evaluate_classic(name: str, images: Mapping[str, torch.Tensor],
                     settings: Optional[Sequence[int]] = None) -> List[dict]:
    """One RD point per setting of classic codec `name` (default sweep in CLASSIC_CODECS) over `images`
    ({name: (3, H, W) uint8}); each point holds 'setting', the averaged METRICS and 'per_image'."""
    reason = classic_unavailable(name)
    if reason:
        raise RuntimeError(f'{name} is unavailable: {reason}')
    points = []
    for setting in track(settings or classic_spec(name)['settings'], name, unit='setting'):
        per_image = {key: measure(image, lambda x: encode_classic(name, x, setting), decode_classic)[0]
                     for key, image in images.items()}
        points.append(dict(setting=setting, **rd_point(per_image)))
    return points
