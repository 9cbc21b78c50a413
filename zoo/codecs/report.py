"""The rate-distortion report: learned codecs (real bitstreams), a baseline and Pillow's classic codecs measured on the
same images in the same run, with Bjøntegaard delta rates, CompressAI-format results and an RD plot
(`zoo eval --task compression`).
"""
import json
import math
import re
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from PIL import __version__ as pillow_version

from zoo.codecs.bd_rate import bd_rate_table
from zoo.codecs.classic import CLASSIC_CODECS, classic_spec, classic_unavailable, evaluate_classic
from zoo.codecs.factory import load_codec
from zoo.codecs.metrics import METRICS, evaluate_codec
from zoo.data.images import image_files, load_rgb
from zoo.data.photos import load_held_out_photos
from zoo.progress import track

__all__ = ['BUNDLED_PHOTOS', 'load_images', 'compressai_results', 'write_compressai_json', 'read_compressai_json',
           'COMPRESSAI_KODAK', 'plot_rd', 'evaluate_rate_distortion', 'format_summary']

# `--data photos`: the held-out bundled photos instead of a folder (load_images)
BUNDLED_PHOTOS = 'photos'


def load_images(data_dir: str) -> Dict[str, torch.Tensor]:
    """Every image under `data_dir` (recursive, sorted) as {relative path: (3, H, W) uint8 RGB}.

    Non-RGB files are converted explicitly as the training data is (zoo.data.images.load_rgb, mode 'convert'); an
    unreadable file is an error, since skipping it would silently change the test set. `data_dir` 'photos' (when
    no such folder exists) is the held-out split of the bundled photos (zoo.data.photos).
    """
    root = Path(data_dir)
    if data_dir == BUNDLED_PHOTOS and not root.is_dir():
        return load_held_out_photos()
    return {str(path.relative_to(root)): load_rgb(path, mode='convert') for path in image_files(root)}


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
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)


def _checkpoint_identity(metadata: dict, path: str) -> Tuple[str, int]:
    """(model name, quality) from load_codec's metadata."""
    try:
        return str(metadata['model']), int(metadata['quality'])
    except (KeyError, TypeError, ValueError):
        raise ValueError(f'{path}: checkpoint metadata lacks the model name and quality') from None


def _group_checkpoints(paths: Sequence[str], role: str) -> Dict[str, Dict[int, str]]:
    """Checkpoint files -> {model name: {quality: path}} read from their metadata (load_codec).

    The codecs are loaded here only to read and check their metadata before any measurement starts; evaluation
    loads them again one at a time, so a paper-size model's qualities are never all in memory together.
    """
    groups: Dict[str, Dict[int, str]] = {}
    for path in paths:
        if not Path(path).is_file():
            raise FileNotFoundError(f'{role} checkpoint not found: {path}')
        model, quality = _checkpoint_identity(load_codec(path)[1], path)
        if quality in groups.setdefault(model, {}):
            raise ValueError(f'{groups[model][quality]} and {path} are both {model} at quality {quality}: one '
                             f'checkpoint per quality')
        groups[model][quality] = path
    return groups


def _learned_curve(model: str, by_quality: Dict[int, str], role: str, images: Mapping[str, torch.Tensor]) -> dict:
    """Evaluate one model's checkpoints (one RD point per quality, rising quality) -> curve dict."""
    points = []
    for quality in track(sorted(by_quality), f'{role} {model}', unit='quality'):
        codec = load_codec(by_quality[quality])[0]
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


def _curve_file_name(name: str) -> str:
    """A curve name as a safe file name ('compressai:bmshj2018-hyperprior' -> 'compressai_bmshj2018-hyperprior')."""
    return re.sub(r'[^A-Za-z0-9._-]+', '_', name) + '.json'


def evaluate_rate_distortion(model_names: Sequence[str], checkpoints: Sequence[str], data_dir: str, json_path: str,
             plot_path: Optional[str] = None, anchor: Optional[str] = None,
             classic: Sequence[str] = ('jpeg', 'webp', 'avif', 'jpeg2000'), baseline_checkpoints: Sequence[str] = (),
             classic_settings: Optional[Mapping[str, Sequence[int]]] = None) -> dict:
    """Rate-distortion evaluation of learned codecs, a baseline and classic codecs on the images of `data_dir`.

    Args:
        model_names: the model each curve belongs to; every checkpoint's metadata must name one of them (empty:
            take the names from the metadata).
        checkpoints: zoo codec checkpoints (zoo.codecs.save_codec), one per (model, quality); grouped by
            model into RD curves with one point per quality.
        data_dir: folder of images (see load_images); everything is measured on these images in this run.
        json_path: summary JSON (below); each curve is also written in CompressAI's results format to
            `<json_path stem>_curves/<name>.json`, readable by `python -m compressai.utils.plot`.
        plot_path: RD plot PNG (our curves, baseline, classic codecs, CompressAI's published Kodak points).
        anchor: the curve every BD-rate is reported against ('jpeg', another classic codec or a model name);
            default: JPEG when it is measured, else the baseline, else the first model.
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
        classic_spec(name)
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
    if anchor is None:
        anchor = 'jpeg' if 'jpeg' in measured_classic else [*baselines, *models][0]
    if anchor not in curve_names:
        why = f' ({unavailable[anchor]})' if anchor in unavailable else ''
        raise ValueError(f'anchor {anchor!r} is not among the measured curves {curve_names}{why}')

    curves = [_learned_curve(name, group, 'model', images) for name, group in models.items()]
    curves += [_learned_curve(name, group, 'baseline', images) for name, group in baselines.items()]
    curves += [_classic_curve(name, images, (classic_settings or {}).get(name)) for name in measured_classic]
    pairwise, notes = bd_rate_table(curves)
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
