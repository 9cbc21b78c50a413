"""Rate-distortion evaluation: metrics, classic codecs, BD-rate, CompressAI results format, RD plot, evaluate()
over learned-codec checkpoints, and `zoo eval --task compression`."""
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from compressai.models import ScaleHyperprior
from PIL import Image
from skimage import data as skdata
from skimage.metrics import peak_signal_noise_ratio

from zoo import cli
from zoo.codecs import bd_rate as bd
from zoo.codecs import classic, metrics, report
from zoo.codecs.bitstream import compress_image, decompress_image, padded_input
from zoo.codecs.factory import create_codec, load_codec, save_codec

AVAILABLE_CLASSIC = [name for name in classic.CLASSIC_CODECS if classic.classic_unavailable(name) is None]

# model names load_codec rebuilds (8-channel variants through create_codec's N/M overrides); both decode exactly
# what their eval forward reconstructs. OURS stands in for S2LIC, BASELINE is the issue's baseline architecture.
OURS, BASELINE = 'compressai:mbt2018-mean', 'compressai:bmshj2018-hyperprior'


def _photo(height: int, width: int) -> torch.Tensor:
    """A crop of scikit-image's astronaut photo as (3, H, W) uint8: natural content, so codecs behave as on photos."""
    return torch.from_numpy(skdata.astronaut()[100:100 + height, 150:150 + width].copy()).permute(2, 0, 1)


def _noisy(image: torch.Tensor, sigma: float, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(image.shape, generator=generator) * sigma
    return (image.float() + noise).round().clamp(0, 255).to(torch.uint8)


# ----------------------------------------------------------------------------------------------- metrics

def test_psnr_matches_numpy_and_scikit_image():
    image = _photo(40, 56)
    noisy = _noisy(image, 6.0)
    a, b = image.numpy().astype(np.float64), noisy.numpy().astype(np.float64)
    by_hand = 10 * np.log10(255.0 ** 2 / np.mean((a - b) ** 2))
    assert metrics.psnr_uint8(image, noisy) == pytest.approx(by_hand, abs=1e-9)
    assert metrics.psnr_uint8(image, noisy) == pytest.approx(
        peak_signal_noise_ratio(image.numpy(), noisy.numpy(), data_range=255), abs=1e-9)
    assert metrics.psnr_uint8(image, image) == math.inf


def test_ms_ssim_matches_compressai_eval_and_guards_small_images():
    from compressai.utils.eval_model.__main__ import compute_metrics
    image = _photo(176, 192)
    noisy = _noisy(image, 10.0)
    expected = compute_metrics(image[None].float() / 255, noisy[None].float() / 255)
    assert metrics.ms_ssim_uint8(image, noisy) == pytest.approx(expected['ms-ssim-rgb'], abs=1e-6)
    assert metrics.psnr_uint8(image, noisy) == pytest.approx(expected['psnr-rgb'], abs=1e-4)
    assert metrics.ms_ssim_uint8(image, image) == pytest.approx(1.0, abs=1e-6)
    assert metrics.ms_ssim_uint8(image[:, :160], noisy[:, :160]) is None  # 160 px: too small for 5 scales


@pytest.mark.parametrize('bad', [torch.zeros(3, 8, 8), torch.zeros(4, 8, 8, dtype=torch.uint8),
                                 torch.zeros(8, 8, dtype=torch.uint8), torch.zeros(3, 8, 9, dtype=torch.uint8)])
def test_metrics_refuse_wrong_inputs(bad):
    with pytest.raises(ValueError):
        metrics.psnr_uint8(torch.zeros(3, 8, 8, dtype=torch.uint8), bad)
    with pytest.raises(ValueError):
        metrics.ms_ssim_uint8(torch.zeros(3, 8, 8, dtype=torch.uint8), bad)


def test_bits_per_pixel_counts_original_pixels():
    assert metrics.bits_per_pixel(100, 10, 20) == 8 * 100 / 200


# ----------------------------------------------------------------------------------------------- BD-rate

# A linear curve PSNR = 24 + 4 * ln(bpp); linear fits exactly with both methods, so results are exact.
ANCHOR_BPP = [0.1, 0.2, 0.4, 0.8, 1.6]
ANCHOR_PSNR = [24 + 4 * math.log(r) + 10 for r in ANCHOR_BPP]


@pytest.mark.parametrize('method', ['cubic', 'pchip'])
def test_bd_rate_of_identical_curves_is_zero(method):
    assert bd.bd_rate((ANCHOR_BPP, ANCHOR_PSNR), (ANCHOR_BPP, ANCHOR_PSNR), method) == pytest.approx(0, abs=1e-9)


@pytest.mark.parametrize('method', ['cubic', 'pchip'])
def test_bd_rate_of_rates_scaled_by_point_nine_is_minus_ten_percent(method):
    psnr = [30.1, 32.0, 33.2, 35.9, 37.0]  # any monotonic curve: scaling rates shifts log-rate by ln 0.9
    test = ([0.9 * r for r in ANCHOR_BPP], psnr)
    assert bd.bd_rate((ANCHOR_BPP, psnr), test, method) == pytest.approx(-10.0, abs=1e-9)


@pytest.mark.parametrize('method', ['cubic', 'pchip'])
def test_bd_rate_of_a_psnr_shift_follows_the_slope(method):
    """PSNR = a + b ln R shifted up by d dB needs ln R - d / b: BD-rate = exp(-d / b) - 1."""
    shift, slope = 0.5, 4.0
    test = (ANCHOR_BPP, [p + shift for p in ANCHOR_PSNR])
    expected = (math.exp(-shift / slope) - 1) * 100
    assert bd.bd_rate((ANCHOR_BPP, ANCHOR_PSNR), test, method) == pytest.approx(expected, abs=1e-9)
    assert bd.bd_rate(test, (ANCHOR_BPP, ANCHOR_PSNR), method) == pytest.approx(
        (math.exp(shift / slope) - 1) * 100, abs=1e-9)


def test_bd_rate_ignores_point_order():
    order = [3, 0, 4, 1, 2]
    shuffled = ([ANCHOR_BPP[i] for i in order], [ANCHOR_PSNR[i] + 0.3 for i in order])
    ordered = (ANCHOR_BPP, [p + 0.3 for p in ANCHOR_PSNR])
    assert bd.bd_rate((ANCHOR_BPP, ANCHOR_PSNR), shuffled) == bd.bd_rate((ANCHOR_BPP, ANCHOR_PSNR), ordered)


def test_bd_rate_reproduces_s2lic_vs_compressai_vtm():
    """docs/s2lic.md §6: S2LIC's Kodak points (read off the paper figure) against the first 6 points of
    CompressAI's results/image/kodak/vtm.json (commit 128f003) give -9.9 % (cubic; PCHIP within 0.3 %)."""
    vtm_bpp = [0.04824490017361111, 0.11249542236328125, 0.24581654866536465, 0.4905454847547744,
               0.8748101128472224, 1.43084971110026]
    vtm_psnr = [26.14484539430146, 28.493021754424603, 31.199873720014093, 34.26153257289846, 37.419793158067485,
                40.42444421698711]
    s2lic = ([0.112, 0.189, 0.318, 0.378, 0.617, 0.832], [29.14, 30.74, 32.66, 33.44, 35.83, 37.50])
    assert bd.bd_rate((vtm_bpp, vtm_psnr), s2lic) == pytest.approx(-9.9, abs=0.05)
    assert bd.bd_rate((vtm_bpp, vtm_psnr), s2lic, 'pchip') == pytest.approx(-9.9, abs=0.3)


@pytest.mark.parametrize('anchor, test, match', [
    ((ANCHOR_BPP[:3], ANCHOR_PSNR[:3]), (ANCHOR_BPP, ANCHOR_PSNR), 'at least 4'),
    ((ANCHOR_BPP, ANCHOR_PSNR[:4]), (ANCHOR_BPP, ANCHOR_PSNR), 'one length'),
    ((ANCHOR_BPP, ANCHOR_PSNR), (ANCHOR_BPP, [30, 29, 31, 32, 33]), 'rise strictly'),
    ((ANCHOR_BPP, ANCHOR_PSNR), ([0.1, 0.2, 0.2, 0.4, 0.5], [30, 31, 32, 33, 34]), 'rise strictly'),
    ((ANCHOR_BPP, ANCHOR_PSNR), ([0.0, 0.2, 0.3, 0.4, 0.5], [30, 31, 32, 33, 34]), '> 0'),
    ((ANCHOR_BPP, ANCHOR_PSNR), (ANCHOR_BPP, [p + 50 for p in ANCHOR_PSNR]), 'do not overlap'),
])
def test_bd_rate_validates_its_curves(anchor, test, match):
    with pytest.raises(ValueError, match=match):
        bd.bd_rate(anchor, test)


def test_bd_rate_pchip_takes_three_points_and_unknown_method_fails():
    three = (ANCHOR_BPP[1:4], ANCHOR_PSNR[1:4])
    assert bd.bd_rate((ANCHOR_BPP, ANCHOR_PSNR), three, 'pchip') == pytest.approx(0, abs=1e-9)
    with pytest.raises(ValueError, match='unknown BD-rate method'):
        bd.bd_rate((ANCHOR_BPP, ANCHOR_PSNR), three, 'spline')


def test_data_photos_is_the_exported_held_out_split(tmp_path, monkeypatch):
    from zoo.data.photos import export_photos
    bundled = report.load_images('photos')
    exported = report.load_images(str(export_photos('test', tmp_path / 'photos')[0].parent))
    assert list(bundled) == list(exported) == ['astronaut.png', 'chelsea.png', 'coffee.png']
    assert all(torch.equal(bundled[name], exported[name]) for name in bundled)
    monkeypatch.chdir(tmp_path)  # a folder named photos is a folder, not the bundled set
    (tmp_path / 'photos' / 'coffee.png').unlink()
    assert list(report.load_images('photos')) == ['astronaut.png', 'chelsea.png']


# ------------------------------------------------------------------------------------------ classic codecs

@pytest.mark.parametrize('name', AVAILABLE_CLASSIC)
def test_classic_codec_bytes_decode_and_bpp_rises_with_quality(name):
    image = _photo(96, 128)
    sweep = classic.CLASSIC_CODECS[name]['settings']
    settings = [sweep[0], sweep[len(sweep) // 2], sweep[-1]]
    points = classic.evaluate_classic(name, {'crop': image}, settings)
    bpp = [p['bpp'] for p in points]
    psnr = [p['psnr-rgb'] for p in points]
    assert bpp == sorted(bpp) and len(set(bpp)) == 3 and psnr == sorted(psnr)
    data = classic.encode_classic(name, image, settings[-1])
    decoded = classic.decode_classic(data)
    assert decoded.shape == image.shape and decoded.dtype == torch.uint8
    assert points[-1]['bpp'] == pytest.approx(8 * len(data) / (96 * 128))
    assert points[-1]['psnr-rgb'] == pytest.approx(metrics.psnr_uint8(image, decoded))
    assert points[-1]['ms-ssim-rgb'] is None  # 96 px side: MS-SSIM not defined


def test_expected_classic_codecs_are_available_here():
    """Pillow 13 wheels ship all four (docs/compression.md §8); the other tests cover only what is available."""
    assert AVAILABLE_CLASSIC == ['jpeg', 'webp', 'avif', 'jpeg2000']


def test_classic_codec_lacking_in_pillow_is_reported(monkeypatch):
    monkeypatch.setattr(classic.features, 'check', lambda feature: feature != 'avif')
    assert 'no AVIF support' in classic.classic_unavailable('avif')
    assert classic.classic_unavailable('jpeg') is None
    with pytest.raises(RuntimeError, match='avif is unavailable'):
        classic.evaluate_classic('avif', {'crop': _photo(32, 32)})
    with pytest.raises(ValueError, match='unknown classic codec'):
        classic.classic_unavailable('bpg')


# --------------------------------------------------------------------------------------- results and plot

def test_results_json_round_trip_and_compressai_reads_it(tmp_path):
    from compressai.utils.plot.__main__ import parse_json_file
    points = [dict(bpp=0.1 * (i + 1), **{'psnr-rgb': 30.0 + i, 'ms-ssim-rgb': 0.9 + 0.01 * i,
                                          'encoding_time': 0.01, 'decoding_time': 0.02}) for i in range(4)]
    results = report.compressai_results('mycodec', 'Inference (ans)', points)
    path = tmp_path / 'mycodec.json'
    report.write_compressai_json(results, str(path))
    assert report.read_compressai_json(str(path)) == results
    parsed = parse_json_file(path, 'psnr')
    assert parsed['name'] == 'mycodec' and parsed['xs'] == [p['bpp'] for p in points]
    assert parsed['ys'] == [p['psnr-rgb'] for p in points]
    assert parse_json_file(path, 'ms-ssim')['ys'][0] == pytest.approx(-10 * math.log10(1 - 0.9))


@pytest.mark.parametrize('text, match', [('{"name": "x"', 'cannot read'), ('[1, 2]', 'not in CompressAI'),
                                         ('{"name": "x", "results": {"bpp": [1], "psnr-rgb": [1, 2]}}', 'one length')])
def test_read_compressai_json_refuses_bad_files(tmp_path, text, match):
    path = tmp_path / 'bad.json'
    path.write_text(text)
    with pytest.raises(ValueError, match=match):
        report.read_compressai_json(str(path))


def test_plot_is_written(tmp_path):
    points = [dict(bpp=b, **{'psnr-rgb': p, 'ms-ssim-rgb': None, 'encoding_time': 0, 'decoding_time': 0})
              for b, p in [(0.2, 30), (0.5, 33)]]
    curve = report.compressai_results('ours', 'd', points)
    curve['role'] = 'model'
    path = tmp_path / 'rd.png'
    report.plot_rd([curve], str(path), title='test')
    with Image.open(path) as image:
        assert image.format == 'PNG' and image.width > 500


# ---------------------------------------------------------------------------------------- learned codecs

def test_evaluate_codec_measures_real_bitstreams():
    torch.manual_seed(0)
    codec = ScaleHyperprior(N=8, M=8)  # random init; its eval forward quantises like compress()
    images = {'a': _photo(64, 48), 'b': _photo(40, 72)}
    point = metrics.evaluate_codec(codec, OURS, 3, images)
    for name, image in images.items():
        data = compress_image(codec, image, OURS, 3)
        decoded = decompress_image(codec, data, OURS)
        record = point['per_image'][name]
        assert record['bytes'] == len(data)
        assert record['bpp'] == pytest.approx(8 * len(data) / (image.shape[1] * image.shape[2]))
        assert record['psnr-rgb'] == pytest.approx(metrics.psnr_uint8(image, decoded))
        assert record['decode_matches_forward'] and record['max_abs_diff_vs_forward'] == 0
        assert record['encoding_time'] > 0 and record['decoding_time'] > 0
        likelihoods = codec.eval()(padded_input(codec, image))['likelihoods']
        estimate = sum(-torch.log2(p).sum() for p in likelihoods.values()) / (image.shape[1] * image.shape[2])
        assert record['bpp_estimated'] == pytest.approx(estimate.item(), rel=1e-5)
    assert point['quality'] == 3 and point['decode_matches_forward']
    assert point['bpp'] == pytest.approx(np.mean([r['bpp'] for r in point['per_image'].values()]))
    assert point['psnr-rgb'] == pytest.approx(np.mean([r['psnr-rgb'] for r in point['per_image'].values()]))
    assert point['ms-ssim-rgb'] is None


def test_evaluate_codec_records_a_decode_that_differs_from_forward(monkeypatch):
    """CompressAI's autoregressive models decode other pixels than their forward: recorded, not raised."""
    torch.manual_seed(0)
    codec = ScaleHyperprior(N=8, M=8)
    image = _photo(32, 32)
    decoded = decompress_image(codec, compress_image(codec, image, OURS, 1), OURS)
    shifted = decoded.clone()
    shifted[0, 3, 5] = (int(decoded[0, 3, 5]) + 7) % 256
    forward = metrics.forward_reconstruction
    monkeypatch.setattr(metrics, 'forward_reconstruction', lambda codec, image: (shifted, forward(codec, image)[1]))
    point = metrics.evaluate_codec(codec, OURS, 1, {'a': image})
    assert not point['decode_matches_forward']
    assert point['per_image']['a']['max_abs_diff_vs_forward'] == abs(int(shifted[0, 3, 5]) - int(decoded[0, 3, 5]))


class _Checkpoints:
    """Codec checkpoints written by zoo.codecs.save_codec: 8-channel CompressAI models (random init,
    a seed per checkpoint) under the model names that load_codec rebuilds them from."""

    def __init__(self, folder):
        self.folder = folder

    def add(self, model: str, quality: int, seed: int) -> str:
        torch.manual_seed(seed)
        codec = create_codec(model, quality, N=8, M=8)
        path = self.folder / f'{model.replace(":", "_")}_q{quality}_s{seed}.safetensors'
        save_codec(codec, path, model, quality, {'kwargs': {'N': 8, 'M': 8}})
        return str(path)


@pytest.fixture
def checkpoints(tmp_path):
    folder = tmp_path / 'checkpoints'
    folder.mkdir()
    return _Checkpoints(folder)


@pytest.fixture
def image_dir(tmp_path):
    folder = tmp_path / 'images'
    (folder / 'sub').mkdir(parents=True)
    Image.fromarray(_photo(64, 48).permute(1, 2, 0).numpy()).save(folder / 'a.png')
    Image.fromarray(_photo(40, 72).permute(1, 2, 0).numpy()).save(folder / 'sub' / 'b.png')
    return folder


SETTINGS = {'jpeg': (10, 30, 60, 90), 'webp': (10, 30, 60, 90), 'avif': (20, 40, 60, 80),
            'jpeg2000': (96, 48, 24, 12)}


def test_evaluate_writes_results_curves_bd_rates_and_plot(tmp_path, image_dir, checkpoints):
    from compressai.utils.plot.__main__ import parse_json_file
    ours = [checkpoints.add(OURS, q, seed=q) for q in (1, 2, 3)]
    baseline = [checkpoints.add(BASELINE, q, seed=10 + q) for q in (1, 2)]
    json_path, plot_path = tmp_path / 'out' / 'rd.json', tmp_path / 'out' / 'rd.png'
    summary = report.evaluate_rate_distortion([OURS], ours, str(image_dir), str(json_path), str(plot_path),
                                              anchor='jpeg', classic=('jpeg', 'webp'), baseline_checkpoints=baseline,
                                              classic_settings=SETTINGS)
    assert json.loads(json_path.read_text()) == json.loads(json.dumps(summary))
    assert summary['images']['names'] == ['a.png', 'sub/b.png']
    by_name = {c['name']: c for c in summary['curves']}
    assert list(by_name) == [OURS, BASELINE, 'jpeg', 'webp']
    assert [by_name[n]['role'] for n in by_name] == ['model', 'baseline', 'classic', 'classic']
    assert by_name[OURS]['quality'] == [1, 2, 3]
    assert all(by_name[OURS]['decode_matches_forward'])
    assert by_name['jpeg']['setting'] == list(SETTINGS['jpeg'])

    # the curve's point at quality 2 is exactly evaluate_codec on the same codec and images
    codec = load_codec(ours[1])[0]
    images = {'a.png': _photo(64, 48), 'sub/b.png': _photo(40, 72)}
    point = metrics.evaluate_codec(codec, OURS, 2, images)
    assert by_name[OURS]['results']['bpp'][1] == pytest.approx(point['bpp'])
    assert by_name[OURS]['results']['psnr-rgb'][1] == pytest.approx(point['psnr-rgb'])

    # BD-rates: vs the anchor, pairwise, each either a number that bd_rate reproduces or None with a reason
    jpeg, webp = by_name['jpeg']['results'], by_name['webp']['results']
    assert summary['bd_rate']['webp'] == pytest.approx(
        bd.bd_rate((jpeg['bpp'], jpeg['psnr-rgb']), (webp['bpp'], webp['psnr-rgb'])))
    assert set(summary['bd_rate']) == {OURS, BASELINE, 'webp'}
    for test, row in summary['bd_rate_pairwise'].items():
        for reference, value in row.items():
            assert value is not None or f'{test} vs {reference}' in summary['bd_rate_notes']
    assert summary['bd_rate'][BASELINE] is None  # 2 qualities: too few points
    assert 'at least 3' in summary['bd_rate_notes']['compressai:bmshj2018-hyperprior vs jpeg']
    ours_vs_jpeg = summary['bd_rate_notes'][f'{OURS} vs jpeg']  # 3 qualities: PCHIP, or why not
    assert ours_vs_jpeg.startswith('pchip') == (summary['bd_rate'][OURS] is not None)

    curve_files = sorted(p.name for p in (tmp_path / 'out' / 'rd_curves').iterdir())
    assert curve_files == ['compressai_bmshj2018-hyperprior.json', 'compressai_mbt2018-mean.json', 'jpeg.json',
                           'webp.json']
    parsed = parse_json_file(tmp_path / 'out' / 'rd_curves' / 'compressai_mbt2018-mean.json', 'psnr')
    assert parsed['xs'] == by_name[OURS]['results']['bpp']
    with Image.open(plot_path) as image:
        assert image.format == 'PNG'
    assert OURS in report.format_summary(summary)


def test_evaluate_reports_an_unavailable_classic_codec(tmp_path, image_dir, checkpoints, monkeypatch):
    monkeypatch.setattr(classic.features, 'check', lambda feature: feature != 'avif')
    ours = [checkpoints.add(OURS, 1, seed=0)]
    summary = report.evaluate_rate_distortion([], ours, str(image_dir), str(tmp_path / 'rd.json'),
                                              classic=('jpeg', 'avif'), classic_settings=SETTINGS)
    assert 'no AVIF support' in summary['unavailable']['avif']
    assert [c['name'] for c in summary['curves']] == [OURS, 'jpeg']
    assert summary['bd_rate'][OURS] is None  # one point: no BD-rate, with the reason
    assert 'at least 3' in summary['bd_rate_notes'][f'{OURS} vs jpeg']
    with pytest.raises(ValueError, match='anchor .avif. is not among the measured curves'):
        report.evaluate_rate_distortion([], ours, str(image_dir), str(tmp_path / 'rd.json'), anchor='avif',
                                        classic=('jpeg', 'avif'))


def test_evaluate_refuses_inconsistent_checkpoints(tmp_path, image_dir, checkpoints):
    a1, a1_again = checkpoints.add(OURS, 1, 0), checkpoints.add(OURS, 1, 1)
    b1 = checkpoints.add(BASELINE, 1, 2)
    json_path = str(tmp_path / 'rd.json')
    with pytest.raises(ValueError, match=f'both {OURS} at quality 1'):
        report.evaluate_rate_distortion([], [a1, a1_again], str(image_dir), json_path)
    with pytest.raises(ValueError, match=re.escape(f"checkpoints of ['{BASELINE}'] were given")):
        report.evaluate_rate_distortion([OURS], [a1, b1], str(image_dir), json_path)
    with pytest.raises(ValueError, match=re.escape("no checkpoint of model(s) ['s2lic_tiny']")):
        report.evaluate_rate_distortion([OURS, 's2lic_tiny'], [a1], str(image_dir), json_path)
    with pytest.raises(ValueError, match='both as model and as baseline'):
        report.evaluate_rate_distortion([], [a1], str(image_dir), json_path, baseline_checkpoints=[a1])
    with pytest.raises(FileNotFoundError, match='checkpoint not found'):
        report.evaluate_rate_distortion([], [str(tmp_path / 'missing.safetensors')], str(image_dir), json_path)
    with pytest.raises(ValueError, match='unknown classic codec'):
        report.evaluate_rate_distortion([], [a1], str(image_dir), json_path, classic=('jpeg', 'bpg'))
    empty = tmp_path / 'empty'
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match='no images'):
        report.evaluate_rate_distortion([], [a1], str(empty), json_path)


# --------------------------------------------------------------------------------------------------- CLI

def test_cli_eval_compression(tmp_path, image_dir, checkpoints, capsys):
    ours = [checkpoints.add(OURS, q, seed=q) for q in (1, 2, 3)]
    json_path, plot_path = tmp_path / 'rd.json', tmp_path / 'rd.png'
    argv = ['eval', '--task', 'compression', '--model', OURS, '--checkpoint', *ours[:2],
            '--checkpoint', ours[2], '--data', str(image_dir), '--json', str(json_path), '--plot', str(plot_path),
            '--classic', 'jpeg', 'webp', '--anchor', 'webp']
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert 'BD-rate vs webp' in out and OURS in out
    summary = json.loads(json_path.read_text())
    assert summary['anchor'] == 'webp' and summary['curves'][0]['quality'] == [1, 2, 3]
    assert plot_path.is_file()


@pytest.mark.parametrize('extra, match', [
    ([], '--checkpoint FILE'),
    (['--checkpoint', 'CKPT'], '--data DIR'),
    (['--checkpoint', 'CKPT', '--data', 'DATA'], '--json OUT'),
    (['--checkpoint', 'missing.safetensors', '--data', 'DATA', '--json', 'OUT'], 'checkpoint not found'),
    (['--checkpoint', 'CKPT', '--data', 'missing_dir', '--json', 'OUT'], 'image folder not found'),
    (['--checkpoint', 'CKPT', '--data', 'DATA', '--json', 'OUT', '--anchor', 'heic'], "anchor 'heic'"),
])
def test_cli_eval_compression_errors(tmp_path, image_dir, checkpoints, capsys, extra, match):
    checkpoint = checkpoints.add(OURS, 1, 0)
    replace = {'CKPT': checkpoint, 'DATA': str(image_dir), 'OUT': str(tmp_path / 'rd.json')}
    argv = ['eval', '--task', 'compression', *[replace.get(a, a) for a in extra]]
    assert cli.main(argv) == 2
    assert match in capsys.readouterr().err


def test_cli_without_classic_codecs_needs_no_anchor(tmp_path, image_dir, checkpoints, capsys):
    """`--classic` with no value measures no Pillow codec; the BD-rates then refer to the baseline by default
    (it used to fail asking for --anchor), and a folder of codec files is read as its files."""
    folder = tmp_path / 'ours'
    folder.mkdir()
    for q in (1, 2):
        (folder / f'codec_q{q}.safetensors').write_bytes(Path(checkpoints.add(OURS, q, seed=q)).read_bytes())
    baseline = [checkpoints.add(BASELINE, q, seed=10 + q) for q in (1, 2)]
    argv = ['eval', '--checkpoint', str(folder), '--baseline-checkpoint', *baseline, '--data', str(image_dir),
            '--json', str(tmp_path / 'rd.json'), '--classic']
    assert cli.main(argv) == 0, capsys.readouterr().err
    summary = json.loads((tmp_path / 'rd.json').read_text())
    assert summary['anchor'] == BASELINE and set(summary['bd_rate']) == {OURS}


def test_cli_other_tasks_take_one_model():
    assert cli.main(['eval', '--model', 'a', '--model', 'b', '--data', 'shapes']) == 2
