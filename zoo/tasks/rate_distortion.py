"""Rate-distortion evaluation of image codecs: learned codecs (real bitstreams) and Pillow's classic codecs,
measured on the same images in the same run, with Bjøntegaard delta rates, CompressAI-format results and an RD plot.

Conventions follow CompressAI's `compressai.utils.eval_model` so numbers compare with its published tables:
metrics on 8-bit RGB (`psnr-rgb` with peak 255, `ms-ssim-rgb` from pytorch_msssim with data_range 255), bpp from
the real bytes over the original (unpadded) pixel count, every metric averaged over images (mean of per-image PSNR,
not PSNR of the mean MSE), one list entry per quality.
"""
import io
import json
import math
import re
import time
from pathlib import Path
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image, features
from PIL import __version__ as pillow_version
from pytorch_msssim import ms_ssim

from zoo.data.photos import image_files, load_photo, photo_names
from zoo.layers.bitstream import compress_image, decompress_image, load_rgb, padded_input, reconstruct_image

__all__ = ['BUNDLED_PHOTOS', 'psnr_uint8', 'ms_ssim_uint8', 'bits_per_pixel', 'load_images', 'CLASSIC_CODECS',
           'classic_unavailable', 'encode_classic', 'decode_classic', 'evaluate_classic', 'evaluate_codec', 'bd_rate',
           'compressai_results', 'write_compressai_json', 'read_compressai_json', 'COMPRESSAI_KODAK', 'plot_rd',
           'evaluate', 'format_summary']

# `--data photos`: the held-out bundled photos instead of a folder (load_images)
BUNDLED_PHOTOS = 'photos'

# pytorch_msssim's 5-scale MS-SSIM with an 11-px window asserts min(H, W) > (11 - 1) * 2**4.
MS_SSIM_MIN_SIDE = 161


# ---------------------------------------------------------------------------------------------- metrics

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


# ----------------------------------------------------------------------------------------------- images

def _image_to_tensor(image: Image.Image) -> torch.Tensor:
    """PIL RGB image -> (3, H, W) uint8."""
    return torch.from_numpy(np.array(image.convert('RGB'), dtype=np.uint8)).permute(2, 0, 1).contiguous()


def load_images(data_dir: str) -> Dict[str, torch.Tensor]:
    """Every image under `data_dir` (recursive, sorted) as {relative path: (3, H, W) uint8 RGB}.

    Non-RGB files are converted explicitly as the training data is (zoo.layers.bitstream.load_rgb, mode
    'convert'); an unreadable file is an error, since skipping it would silently change the test set.
    `data_dir` 'photos' (when no such folder exists) is the held-out split of the bundled photos
    (zoo.data.photos), keyed '<name>.png' as export_photos writes them.
    """
    root = Path(data_dir)
    if data_dir == BUNDLED_PHOTOS and not root.is_dir():
        return {f'{name}.png': load_photo(name) for name in sorted(photo_names('test'))}  # a folder's order
    return {str(path.relative_to(root)): load_rgb(path, mode='convert') for path in image_files(root)}


# ------------------------------------------------------------------------------------------ classic codecs

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


def _classic_spec(name: str) -> dict:
    if name not in CLASSIC_CODECS:
        raise ValueError(f'unknown classic codec {name!r}; choose from {sorted(CLASSIC_CODECS)}')
    return CLASSIC_CODECS[name]


def classic_unavailable(name: str) -> Optional[str]:
    """None when this Pillow can encode and decode codec `name`, else the reason it cannot."""
    spec = _classic_spec(name)
    if not features.check(spec['feature']):
        return f'this Pillow build has no {spec["format"]} support (PIL.features "{spec["feature"]}")'
    return None


def encode_classic(name: str, image: torch.Tensor, setting: int) -> bytes:
    """(3, H, W) uint8 RGB -> the codec's file bytes at one setting (see CLASSIC_CODECS), in memory."""
    spec = _classic_spec(name)
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


def _measure(image: torch.Tensor, encode: Callable[[torch.Tensor], bytes],
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


METRICS = ('bpp', 'psnr-rgb', 'ms-ssim-rgb', 'encoding_time', 'decoding_time')


def _point(per_image: Dict[str, dict]) -> dict:
    """Per-image records -> one RD point: the METRICS averaged over images, plus the records themselves."""
    point = {metric: _mean([r[metric] for r in per_image.values()]) for metric in METRICS}
    point['per_image'] = per_image
    return point


def evaluate_classic(name: str, images: Mapping[str, torch.Tensor],
                     settings: Optional[Sequence[int]] = None) -> List[dict]:
    """One RD point per setting of classic codec `name` (default sweep in CLASSIC_CODECS) over `images`
    ({name: (3, H, W) uint8}); each point holds 'setting', the averaged METRICS and 'per_image'."""
    reason = classic_unavailable(name)
    if reason:
        raise RuntimeError(f'{name} is unavailable: {reason}')
    points = []
    for setting in settings or _classic_spec(name)['settings']:
        per_image = {key: _measure(image, lambda x: encode_classic(name, x, setting), decode_classic)[0]
                     for key, image in images.items()}
        points.append(dict(setting=setting, **_point(per_image)))
    return points


# ----------------------------------------------------------------------------------------- learned codecs

def estimated_bpp(likelihoods: Dict[str, torch.Tensor], num_pixels: int) -> torch.Tensor:
    """The entropy model's rate estimate: sum(-log2 p) over all latents / pixels (scalar, differentiable)."""
    return sum(torch.log2(p).sum() for p in likelihoods.values()) / -num_pixels


def _estimated_bpp(codec, image: torch.Tensor) -> float:
    """The rate the entropy model predicts for (3, H, W) uint8 in the eval-mode forward, reported beside the real
    bpp because the two differ (CompressAI issue #236)."""
    was_training = codec.training
    codec.eval()
    try:
        with torch.inference_mode():
            likelihoods = codec(padded_input(codec, image))['likelihoods']
    finally:
        codec.train(was_training)
    return estimated_bpp(likelihoods, image.shape[1] * image.shape[2]).item()


def evaluate_codec(codec, model_name: str, quality: int, images: Mapping[str, torch.Tensor]) -> dict:
    """One RD point of a learned codec through real bitstreams (zoo.layers.bitstream).

    Args:
        codec: a CompressAI `CompressionModel` (S2LIC or a CompressAI zoo model).
        model_name, quality: written into each bitstream header; decoding checks the name.
        images: {name: (3, H, W) uint8 RGB}.
    Returns:
        the averaged METRICS and 'bpp_estimated' (entropy-model estimate), 'quality', 'per_image' records, and per
        image 'decode_matches_forward' / 'max_abs_diff_vs_forward': whether the decoded pixels equal
        `reconstruct_image` (the eval-mode forward reconstruction); 'decode_matches_forward' at the top is True when
        it holds for every image. It holds by design for codecs whose forward quantises like compress (S2LIC,
        hyperprior models), not for CompressAI's autoregressive mbt2018/cheng2020, so it is recorded, not enforced.
    """
    per_image = {}
    for key, image in images.items():
        record, decoded = _measure(image, lambda x: compress_image(codec, x, model_name, quality),
                                   lambda data: decompress_image(codec, data, model_name))
        difference = (decoded.int() - reconstruct_image(codec, image).int()).abs().max().item()
        per_image[key] = dict(record, bpp_estimated=_estimated_bpp(codec, image),
                              decode_matches_forward=difference == 0, max_abs_diff_vs_forward=difference)
    point = _point(per_image)
    point['bpp_estimated'] = _mean([r['bpp_estimated'] for r in per_image.values()])
    point['quality'] = quality
    point['decode_matches_forward'] = all(r['decode_matches_forward'] for r in per_image.values())
    return point


# --------------------------------------------------------------------------------------------- BD-rate

BD_MIN_POINTS = {'cubic': 4, 'pchip': 3}


def _rd_curve(label: str, curve: Tuple[Sequence[float], Sequence[float]], method: str) -> Tuple[np.ndarray, ...]:
    """(rates, psnrs) -> (log rates, psnrs) as float arrays sorted by rate, after checking them."""
    rates, psnrs = (np.asarray(v, dtype=np.float64) for v in curve)
    if rates.ndim != 1 or rates.shape != psnrs.shape:
        raise ValueError(f'{label}: rates and PSNRs must be 1-D sequences of one length, got {rates.shape} and '
                         f'{psnrs.shape}')
    if len(rates) < BD_MIN_POINTS[method]:
        raise ValueError(f'{label}: {method} BD-rate needs at least {BD_MIN_POINTS[method]} RD points, '
                         f'got {len(rates)}')
    if not (np.all(np.isfinite(rates)) and np.all(np.isfinite(psnrs)) and np.all(rates > 0)):
        raise ValueError(f'{label}: rates must be finite and > 0 and PSNRs finite, got {rates.tolist()} / '
                         f'{psnrs.tolist()}')
    order = np.argsort(rates)
    rates, psnrs = rates[order], psnrs[order]
    if np.any(np.diff(rates) <= 0) or np.any(np.diff(psnrs) <= 0):
        raise ValueError(f'{label}: PSNR must rise strictly with rate (a monotonic RD curve), got bpp '
                         f'{np.round(rates, 4).tolist()} -> dB {np.round(psnrs, 3).tolist()}')
    return np.log(rates), psnrs


def _integral_of_log_rate(log_rates: np.ndarray, psnrs: np.ndarray, low: float, high: float, method: str) -> float:
    """Integral over PSNR in [low, high] of log-rate interpolated as a function of PSNR."""
    if method == 'cubic':
        antiderivative = np.polyint(np.polyfit(psnrs, log_rates, 3))
        return float(np.polyval(antiderivative, high) - np.polyval(antiderivative, low))
    from scipy.interpolate import PchipInterpolator
    return float(PchipInterpolator(psnrs, log_rates).integrate(low, high))


def bd_rate(anchor: Tuple[Sequence[float], Sequence[float]], test: Tuple[Sequence[float], Sequence[float]],
            method: str = 'cubic') -> float:
    """Bjøntegaard delta rate (%) of `test` against `anchor`, each (rates, PSNRs); negative = test needs fewer bits.

    Method (Bjøntegaard, VCEG-M33, 2001): for each curve fit log(rate) as a function of PSNR, integrate both fits
    over the PSNR interval where the curves overlap, take the mean difference of log-rates d and report
    (exp(d) - 1) * 100. method='cubic' is the original least-squares cubic polynomial (needs >= 4 points);
    method='pchip' interpolates with a monotone piecewise cubic (scipy's PchipInterpolator), which does not
    overshoot between points and works from 3 points.

    Raises:
        ValueError: too few points, non-finite or non-positive rates, a curve whose PSNR does not rise strictly
            with rate, or PSNR ranges that do not overlap.
    """
    if method not in BD_MIN_POINTS:
        raise ValueError(f'unknown BD-rate method {method!r}; choose from {sorted(BD_MIN_POINTS)}')
    anchor_log_rates, anchor_psnrs = _rd_curve('anchor', anchor, method)
    test_log_rates, test_psnrs = _rd_curve('test', test, method)
    low, high = max(anchor_psnrs[0], test_psnrs[0]), min(anchor_psnrs[-1], test_psnrs[-1])
    if low >= high:
        raise ValueError(f'PSNR ranges do not overlap: anchor {anchor_psnrs[0]:.2f}-{anchor_psnrs[-1]:.2f} dB, test '
                         f'{test_psnrs[0]:.2f}-{test_psnrs[-1]:.2f} dB')
    mean_difference = (_integral_of_log_rate(test_log_rates, test_psnrs, low, high, method)
                       - _integral_of_log_rate(anchor_log_rates, anchor_psnrs, low, high, method)) / (high - low)
    return (math.exp(mean_difference) - 1) * 100


# ------------------------------------------------------------------------------------- results (JSON)

def compressai_results(name: str, description: str, points: Sequence[dict]) -> dict:
    """RD points (dicts with METRICS) -> CompressAI's results format, as `compressai.utils.eval_model` writes it:
    {"name", "description", "results": {"psnr-rgb": [...], "ms-ssim-rgb": [...], "bpp": [...],
    "encoding_time": [...], "decoding_time": [...]}}, one list entry per point."""
    return {'name': name, 'description': description,
            'results': {metric: [p[metric] for p in points] for metric in METRICS}}


def write_compressai_json(results: dict, path: str) -> None:
    """Write one CompressAI-format results dict (see compressai_results) to `path`."""
    Path(path).write_text(json.dumps(results, indent=2) + '\n')


def read_compressai_json(path: str) -> dict:
    """Read a CompressAI-format results file, checking its layout (name, description, equal-length lists)."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f'cannot read results file {path}: {err}') from None
    results = data.get('results') if isinstance(data, dict) else None
    if not isinstance(results, dict) or 'bpp' not in results or not isinstance(data.get('name'), str):
        raise ValueError(f'{path} is not in CompressAI results format ({{"name", "description", "results": '
                         f'{{"bpp": [...], ...}}}})')
    lengths = {key: len(values) for key, values in results.items() if isinstance(values, list)}
    if len(lengths) != len(results) or len(set(lengths.values())) != 1:
        raise ValueError(f'{path}: every entry of "results" must be a list of one length, got {lengths}')
    return data


# CompressAI's published Kodak results for its pretrained MSE models (CPU inference through the ans coder), copied
# from github.com/InterDigitalInc/CompressAI results/image/kodak/compressai-<model>_mse_cpu.json at commit
# 128f00397509b9882aaaeea49f43f1714da083b4, rounded to 4 decimals; those files name the metrics "psnr"/"ms-ssim".
# They are measured on the 24 Kodak images, not on the images of an evaluate() run: reference only, never BD-rated.
COMPRESSAI_KODAK: Dict[str, dict] = {
    'bmshj2018-hyperprior': {
        'bpp': [0.1313, 0.2089, 0.3199, 0.4784, 0.6687, 0.9388, 1.2592, 1.6602],
        'psnr-rgb': [27.5815, 29.1967, 30.9722, 32.8382, 34.5262, 36.7434, 38.5839, 40.5569],
        'ms-ssim-rgb': [0.9174, 0.9421, 0.9611, 0.9749, 0.9836, 0.9893, 0.9929, 0.9955]},
    'mbt2018': {
        'bpp': [0.1105, 0.1870, 0.2877, 0.4323, 0.6388, 0.8853, 1.2004, 1.5874],
        'psnr-rgb': [28.0889, 29.6453, 31.3624, 33.0856, 35.0936, 36.9886, 38.9332, 40.6404],
        'ms-ssim-rgb': [0.9207, 0.9432, 0.9628, 0.9752, 0.9836, 0.9892, 0.9929, 0.9953]},
    'cheng2020-anchor': {
        'bpp': [0.1196, 0.1838, 0.2710, 0.4174, 0.5945, 0.8057],
        'psnr-rgb': [28.5823, 29.9685, 31.3426, 33.3897, 35.1181, 36.7045],
        'ms-ssim-rgb': [0.9236, 0.9465, 0.9629, 0.9758, 0.9841, 0.9893]},
}
COMPRESSAI_KODAK_SOURCE = ('InterDigitalInc/CompressAI results/image/kodak/compressai-<model>_mse_cpu.json @ 128f003 '
                           '(24 Kodak images, not the evaluated images)')


# ------------------------------------------------------------------------------------------------- plot

_STYLES = {'model': dict(linestyle='-', marker='o', linewidth=2), 'baseline': dict(linestyle='--', marker='s'),
           'classic': dict(linestyle=':', marker='^'),
           'reference': dict(linestyle='-.', linewidth=1, alpha=0.6)}


def _ms_ssim_db(values: Sequence[Optional[float]]) -> List[Optional[float]]:
    """MS-SSIM -> -10 log10(1 - MS-SSIM) dB, the scale CompressAI plots it on."""
    return [None if v is None else -10 * math.log10(max(1 - v, 1e-12)) for v in values]


def plot_rd(curves: Sequence[dict], path: str, title: str = '', references: Mapping[str, dict] = COMPRESSAI_KODAK,
            reference_note: str = COMPRESSAI_KODAK_SOURCE) -> None:
    """RD plot (PNG): PSNR-RGB and MS-SSIM (dB) against bpp.

    Args:
        curves: CompressAI-format results dicts with a 'role' ('model' | 'baseline' | 'classic').
        references: {name: {'bpp', 'psnr-rgb', 'ms-ssim-rgb'}} published points drawn thin and grey-toned,
            labelled with `reference_note`'s caveat; the x range stays on the measured curves.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    figure = Figure(figsize=(13, 5.5))
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, 2)
    measured_bpp = [b for c in curves for b in c['results']['bpp']]
    for axis, metric, label in ((axes[0], 'psnr-rgb', 'PSNR-RGB [dB]'), (axes[1], 'ms-ssim-rgb', 'MS-SSIM-RGB [dB]')):
        convert = _ms_ssim_db if metric == 'ms-ssim-rgb' else list
        for curve in curves:
            ys = convert(curve['results'][metric])
            xs = [x for x, y in zip(curve['results']['bpp'], ys) if y is not None]
            if xs:
                axis.plot(xs, [y for y in ys if y is not None], label=curve['name'], **_STYLES[curve['role']])
        for (name, points), marker in zip(references.items(), '.x+*dv'):
            axis.plot(points['bpp'], convert(points[metric]), label=f'{name} (CompressAI published, Kodak)',
                      color='0.5', **dict(_STYLES['reference'], marker=marker))
        if measured_bpp:
            axis.set_xlim(0, max(measured_bpp) * 1.05)
        axis.set_xlabel('bit-rate [bpp]')
        axis.set_ylabel(label)
        axis.grid(True, alpha=0.3)
        axis.legend(fontsize=7)
    figure.suptitle(f'{title}\ngrey: {reference_note}' if references else title, fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


# -------------------------------------------------------------------------------------------- evaluate

def _checkpoint_identity(metadata: dict, path: str) -> Tuple[str, int]:
    """(model name, quality) from load_codec's metadata."""
    try:
        return str(metadata['model']), int(metadata['quality'])
    except (KeyError, TypeError, ValueError):
        raise ValueError(f'{path}: checkpoint metadata lacks the model name and quality') from None


def _load_codec(path: str):
    """zoo.tasks.compression.load_codec(path) -> (codec, metadata), imported late because that module re-exports
    this one's evaluate."""
    from zoo.tasks.compression import load_codec
    return load_codec(path)


def _group_checkpoints(paths: Sequence[str], role: str) -> Dict[str, Dict[int, str]]:
    """Checkpoint files -> {model name: {quality: path}} read from their metadata (load_codec).

    The codecs are loaded here only to read and check their metadata before any measurement starts; evaluation
    loads them again one at a time, so a paper-size model's qualities are never all in memory together.
    """
    groups: Dict[str, Dict[int, str]] = {}
    for path in paths:
        if not Path(path).is_file():
            raise FileNotFoundError(f'{role} checkpoint not found: {path}')
        model, quality = _checkpoint_identity(_load_codec(path)[1], path)
        if quality in groups.setdefault(model, {}):
            raise ValueError(f'{groups[model][quality]} and {path} are both {model} at quality {quality}: one '
                             f'checkpoint per quality')
        groups[model][quality] = path
    return groups


def _learned_curve(model: str, by_quality: Dict[int, str], role: str, images: Mapping[str, torch.Tensor]) -> dict:
    """Evaluate one model's checkpoints (one RD point per quality, rising quality) -> curve dict."""
    points = []
    for quality in sorted(by_quality):
        codec = _load_codec(by_quality[quality])[0]
        points.append(dict(evaluate_codec(codec, model, quality, images), checkpoint=str(by_quality[quality])))
    curve = compressai_results(model, f'Inference (ans), zoo bitstreams, {len(images)} images', points)
    curve.update(role=role, quality=[p['quality'] for p in points], checkpoint=[p['checkpoint'] for p in points],
                 bpp_estimated=[p['bpp_estimated'] for p in points],
                 decode_matches_forward=[p['decode_matches_forward'] for p in points],
                 per_image=[p['per_image'] for p in points])
    return curve


def _classic_curve(name: str, images: Mapping[str, torch.Tensor], settings: Optional[Sequence[int]]) -> dict:
    """Evaluate one classic codec over its setting sweep -> curve dict."""
    points = evaluate_classic(name, images, settings)
    spec = CLASSIC_CODECS[name]
    curve = compressai_results(name, f'Pillow {pillow_version} {spec["format"]}, setting = {spec["setting"]}, '
                                     f'{len(images)} images', points)
    curve.update(role='classic', setting=[p['setting'] for p in points], per_image=[p['per_image'] for p in points])
    return curve


def _bd_table(curves: Sequence[dict]) -> Tuple[Dict[str, Dict[str, Optional[float]]], Dict[str, str]]:
    """PSNR BD-rate of every curve against every other: ({test: {reference: % or None}}, {pair: why None}).

    Uses the cubic method when both curves have >= 4 points, else PCHIP (a learned codec may ship 3 qualities).
    """
    table: Dict[str, Dict[str, Optional[float]]] = {}
    notes = {}
    for test in curves:
        table[test['name']] = {}
        for reference in curves:
            if reference is test:
                continue
            pair = f'{test["name"]} vs {reference["name"]}'
            short = min(len(test['results']['bpp']), len(reference['results']['bpp']))
            method = 'cubic' if short >= BD_MIN_POINTS['cubic'] else 'pchip'
            try:
                value = bd_rate((reference['results']['bpp'], reference['results']['psnr-rgb']),
                                (test['results']['bpp'], test['results']['psnr-rgb']), method)
            except ValueError as err:
                value = None
                notes[pair] = str(err)
            else:
                if method != 'cubic':
                    notes[pair] = f'{method} (a curve has fewer than {BD_MIN_POINTS["cubic"]} points)'
            table[test['name']][reference['name']] = value
    return table, notes


def _curve_file_name(name: str) -> str:
    """A curve name as a safe file name ('compressai:bmshj2018-hyperprior' -> 'compressai_bmshj2018-hyperprior')."""
    return re.sub(r'[^A-Za-z0-9._-]+', '_', name) + '.json'


def evaluate(model_names: Sequence[str], checkpoints: Sequence[str], data_dir: str, json_path: str,
             plot_path: Optional[str] = None, anchor: str = 'jpeg',
             classic: Sequence[str] = ('jpeg', 'webp', 'avif', 'jpeg2000'), baseline_checkpoints: Sequence[str] = (),
             classic_settings: Optional[Mapping[str, Sequence[int]]] = None) -> dict:
    """Rate-distortion evaluation of learned codecs, a baseline and classic codecs on the images of `data_dir`.

    Args:
        model_names: the model each curve belongs to; every checkpoint's metadata must name one of them (empty:
            take the names from the metadata).
        checkpoints: zoo codec checkpoints (zoo.tasks.compression.save_codec), one per (model, quality); grouped by
            model into RD curves with one point per quality.
        data_dir: folder of images (see load_images); everything is measured on these images in this run.
        json_path: summary JSON (below); each curve is also written in CompressAI's results format to
            `<json_path stem>_curves/<name>.json`, readable by `python -m compressai.utils.plot`.
        plot_path: RD plot PNG (our curves, baseline, classic codecs, CompressAI's published Kodak points).
        anchor: the curve every BD-rate is reported against ('jpeg', another classic codec or a model name).
        classic: Pillow codecs to measure; those this Pillow lacks are listed under 'unavailable'.
        baseline_checkpoints: checkpoints of a baseline codec (e.g. compressai:bmshj2018-hyperprior trained with the
            same recipe), evaluated like `checkpoints`.
        classic_settings: {codec: settings} to replace a classic codec's default sweep.
    Returns (and writes to json_path) a dict with 'images', 'environment', 'curves' (CompressAI-format dicts plus
    'role', qualities or settings, per-image records), 'unavailable', 'anchor', 'bd_rate' ({curve: % vs anchor}),
    'bd_rate_pairwise' ({test: {reference: %}}), 'bd_rate_notes' and 'reference' (the published Kodak points).
    """
    images = load_images(data_dir)
    for name in classic:
        _classic_spec(name)
    if not checkpoints:
        raise ValueError('no checkpoint to evaluate: pass one checkpoint per quality')
    models = _group_checkpoints(checkpoints, 'model')
    baselines = _group_checkpoints(baseline_checkpoints, 'baseline')
    strangers = sorted(set(models) - set(model_names)) if model_names else []
    if strangers:
        raise ValueError(f'checkpoints of {strangers} were given but the models are {list(model_names)}')
    missing = sorted(set(model_names) - set(models))
    if missing:
        raise ValueError(f'no checkpoint of model(s) {missing}')
    clash = sorted(set(models) & set(baselines))
    if clash:
        raise ValueError(f'{clash} appear both as model and as baseline checkpoints')
    unavailable = {name: reason for name in classic if (reason := classic_unavailable(name))}
    measured_classic = [name for name in classic if name not in unavailable]
    curve_names = [*models, *baselines, *measured_classic]
    if anchor not in curve_names:
        why = f' ({unavailable[anchor]})' if anchor in unavailable else ''
        raise ValueError(f'anchor {anchor!r} is not among the measured curves {curve_names}{why}')

    curves = [_learned_curve(name, group, 'model', images) for name, group in models.items()]
    curves += [_learned_curve(name, group, 'baseline', images) for name, group in baselines.items()]
    curves += [_classic_curve(name, images, (classic_settings or {}).get(name)) for name in measured_classic]
    pairwise, notes = _bd_table(curves)
    summary = {
        'images': {'folder': str(data_dir), 'names': list(images),
                   'sizes': [list(image.shape[1:]) for image in images.values()]},
        'environment': {'torch': torch.__version__, 'pillow': pillow_version, 'threads': torch.get_num_threads()},
        'anchor': anchor, 'metric': 'psnr-rgb',
        'bd_rate': {c['name']: pairwise[c['name']][anchor] for c in curves if c['name'] != anchor},
        'bd_rate_pairwise': pairwise, 'bd_rate_notes': notes,
        'unavailable': unavailable, 'curves': curves,
        'reference': {'source': COMPRESSAI_KODAK_SOURCE, 'curves': COMPRESSAI_KODAK},
    }
    json_file = Path(json_path)
    json_file.parent.mkdir(parents=True, exist_ok=True)
    json_file.write_text(json.dumps(summary, indent=1) + '\n')
    curves_dir = json_file.with_name(f'{json_file.stem}_curves')
    curves_dir.mkdir(exist_ok=True)
    for curve in curves:
        write_compressai_json({k: curve[k] for k in ('name', 'description', 'results')},
                              str(curves_dir / _curve_file_name(curve['name'])))
    if plot_path:
        plot_rd(curves, plot_path, title=f'{len(images)} images from {data_dir}')
    return summary


def format_summary(summary: dict) -> str:
    """evaluate()'s summary -> a text table: per curve its role, bpp and PSNR range, BD-rate vs the anchor."""
    anchor = summary['anchor']
    rows = [('curve', 'role', 'points', 'bpp', 'PSNR-RGB [dB]', f'BD-rate vs {anchor}')]
    for curve in summary['curves']:
        bpp, psnr = curve['results']['bpp'], curve['results']['psnr-rgb']
        bd = summary['bd_rate'].get(curve['name'])
        rows.append((curve['name'], curve['role'], str(len(bpp)), f'{min(bpp):.3f}-{max(bpp):.3f}',
                     f'{min(psnr):.2f}-{max(psnr):.2f}',
                     'anchor' if curve['name'] == anchor else '-' if bd is None else f'{bd:+.1f}%'))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ['  '.join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
    lines += [f'{name}: unavailable ({reason})' for name, reason in summary['unavailable'].items()]
    lines += [f'BD-rate {pair}: {note}' for pair, note in summary['bd_rate_notes'].items()
              if pair.endswith(f' vs {anchor}')]
    return '\n'.join(lines)
