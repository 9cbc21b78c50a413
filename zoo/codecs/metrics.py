"""Rate-distortion measurements of image codecs: image metrics, and one RD point of a codec over a set of images.

Conventions follow CompressAI's `compressai.utils.eval_model` so numbers compare with its published tables: metrics
on 8-bit RGB (`psnr-rgb` with peak 255, `ms-ssim-rgb` from pytorch_msssim with data_range 255), bpp from the real
bytes over the original (unpadded) pixel count, every metric averaged over images (mean of per-image PSNR, not PSNR
of the mean MSE).
"""
import math
import time
from typing import Callable, Dict, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
from pytorch_msssim import ms_ssim

from zoo.codecs.bitstream import compress_image, decompress_image, forward_reconstruction

__all__ = ['MS_SSIM_MIN_SIDE', 'METRICS', 'psnr_uint8', 'ms_ssim_uint8', 'bits_per_pixel', 'estimated_bpp',
           'measure', 'rd_point', 'evaluate_codec']

# pytorch_msssim's 5-scale MS-SSIM with an 11-px window asserts min(H, W) > (11 - 1) * 2**4.
MS_SSIM_MIN_SIDE = 161
METRICS = ('bpp', 'psnr-rgb', 'ms-ssim-rgb', 'encoding_time', 'decoding_time')


def _check_pair(a: torch.Tensor, b: torch.Tensor) -> None:
    for name, t in (('a', a), ('b', b)):
        if t.dtype != torch.uint8 or t.ndim != 3 or t.shape[0] != 3:
            raise ValueError(f'{name} must be a (3, H, W) uint8 RGB tensor, got {tuple(t.shape)} {t.dtype}')
    if a.shape != b.shape:
        raise ValueError(f'images differ in size: {tuple(a.shape)} vs {tuple(b.shape)}')


def psnr_uint8(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB (peak 255) of two (3, H, W) uint8 RGB images, MSE over all channels; inf when identical."""
    _check_pair(a, b)
    mse = (a.double() - b.double()).square().mean().item()
    return math.inf if mse == 0 else 10 * math.log10(255 ** 2 / mse)


def ms_ssim_uint8(a: torch.Tensor, b: torch.Tensor) -> Optional[float]:
    """MS-SSIM of two (3, H, W) uint8 RGB images (pytorch_msssim, data_range 255, its default 5 scales).

    Returns None for images whose smaller side is under MS_SSIM_MIN_SIDE (161 px): five dyadic scales of an 11-px
    window do not fit (CompressAI's eval crashes there); averages then skip such images.
    """
    _check_pair(a, b)
    if min(a.shape[1:]) < MS_SSIM_MIN_SIDE:
        return None
    return ms_ssim(a[None].float(), b[None].float(), data_range=255, size_average=True).item()


def bits_per_pixel(num_bytes: int, height: int, width: int) -> float:
    """8 * bytes / (H * W): the real bitstream size over the original image's pixels."""
    return 8.0 * num_bytes / (height * width)


def measure(image: torch.Tensor, encode: Callable[[torch.Tensor], bytes],
            decode: Callable[[bytes], torch.Tensor]) -> Tuple[dict, torch.Tensor]:
    """Encode and decode one (3, H, W) uint8 image, timing each: (per-image record, decoded (3, H, W) uint8)."""
    start = time.perf_counter()
    data = encode(image)
    encoding_time = time.perf_counter() - start
    start = time.perf_counter()
    decoded = decode(data)
    decoding_time = time.perf_counter() - start
    if decoded.shape != image.shape or decoded.dtype != torch.uint8:
        raise RuntimeError(f'decoder returned {tuple(decoded.shape)} {decoded.dtype} for a '
                           f'{tuple(image.shape)} uint8 image')
    record = {'bytes': len(data), 'bpp': bits_per_pixel(len(data), *image.shape[1:]),
              'psnr-rgb': psnr_uint8(image, decoded), 'ms-ssim-rgb': ms_ssim_uint8(image, decoded),
              'encoding_time': encoding_time, 'decoding_time': decoding_time}
    return record, decoded


def _mean(values: Sequence[Optional[float]]) -> Optional[float]:
    """Mean over the values that exist (MS-SSIM is None for small images); None when none does."""
    present = [v for v in values if v is not None]
    return float(np.mean(present)) if present else None


def rd_point(per_image: Dict[str, dict]) -> dict:
    """Per-image records -> one RD point: the METRICS averaged over images, plus the records themselves."""
    point = {metric: _mean([r[metric] for r in per_image.values()]) for metric in METRICS}
    point['per_image'] = per_image
    return point


def estimated_bpp(likelihoods: Dict[str, torch.Tensor], num_pixels: int) -> torch.Tensor:
    """The entropy model's rate estimate: sum(-log2 p) over all latents / pixels (scalar, differentiable)."""
    return sum(torch.log2(p).sum() for p in likelihoods.values()) / -num_pixels


def evaluate_codec(codec, model_name: str, quality: int, images: Mapping[str, torch.Tensor]) -> dict:
    """One RD point of a learned codec through real bitstreams (zoo.codecs.bitstream).

    Args:
        codec: a CompressAI `CompressionModel` (S2LIC or a CompressAI zoo model).
        model_name, quality: written into each bitstream header; decoding checks the name.
        images: {name: (3, H, W) uint8 RGB}.
    Returns:
        the averaged METRICS and 'bpp_estimated' (entropy-model estimate), 'quality', 'per_image' records, and per
        image 'decode_matches_forward' / 'max_abs_diff_vs_forward': whether the decoded pixels equal the eval-mode
        forward reconstruction (`forward_reconstruction`); 'decode_matches_forward' at the top is True when it holds
        for every image. It holds by design for codecs whose forward quantises like compress (S2LIC,
        hyperprior models), not for CompressAI's autoregressive mbt2018/cheng2020, so it is recorded, not enforced.
    """
    per_image = {}
    for key, image in images.items():
        record, decoded = measure(image, lambda x: compress_image(codec, x, model_name, quality),
                                  lambda data: decompress_image(codec, data, model_name))
        # one forward gives the reconstruction decoding should equal and the entropy model's own rate estimate,
        # reported beside the real bpp because the two differ (CompressAI issue #236)
        reconstructed, likelihoods = forward_reconstruction(codec, image)
        difference = (decoded.int() - reconstructed.int()).abs().max().item()
        per_image[key] = dict(record, bpp_estimated=estimated_bpp(likelihoods, image.shape[1] * image.shape[2]).item(),
                              decode_matches_forward=difference == 0, max_abs_diff_vs_forward=difference)
    point = rd_point(per_image)
    point['bpp_estimated'] = _mean([r['bpp_estimated'] for r in per_image.values()])
    point['quality'] = quality
    point['decode_matches_forward'] = all(r['decode_matches_forward'] for r in per_image.values())
    return point
