"""zoo.codecs.bd_rate against the maintained `bjontegaard` package (FAU Erlangen, the cubic and PCHIP methods)."""
import json

import numpy as np
import pytest

from conftest import REPO, require
from zoo.codecs.bd_rate import bd_rate
from zoo.manifest import load_manifest

CURVES = REPO / 'checkpoints' / 's2lic_tiny_photos' / 'rd_curves'


def _bjontegaard_bd_rate(anchor, test, method):
    """The package's BD-rate (%) of `test` against `anchor`, each (rates, PSNRs); points sorted by rate for it."""
    bjontegaard = require('bjontegaard', "pip install -e '.[test]'")
    (anchor_rates, anchor_psnrs), (test_rates, test_psnrs) = (
        (np.asarray(rates)[np.argsort(rates)], np.asarray(psnrs)[np.argsort(rates)]) for rates, psnrs in (anchor, test))
    return bjontegaard.bd_rate(anchor_rates, anchor_psnrs, test_rates, test_psnrs, method,
                               require_matching_points=False, min_overlap=0)


def _random_curve(rng, points):
    """(rates, PSNRs) in shuffled order: rising with log-rate like a codec's, over about 0.1-1.5 bpp, so that two
    such curves overlap in PSNR."""
    rates = np.geomspace(0.1, 1.5, points) * rng.uniform(0.85, 1.15, points)
    psnrs = 26 + rng.uniform(3, 5) * np.log2(rates / 0.1) + rng.uniform(-1, 1)
    order = rng.permutation(points)
    return rates[order].tolist(), psnrs[order].tolist()


@pytest.mark.parametrize('method,points', [('cubic', 4), ('cubic', 6), ('pchip', 3), ('pchip', 5)])
def test_random_curves_match_bjontegaard(method, points):
    rng = np.random.default_rng(points)
    for _ in range(20):
        anchor, test = _random_curve(rng, points), _random_curve(rng, points + rng.integers(0, 3))
        expected = _bjontegaard_bd_rate(anchor, test, method)  # the cubic fit is ill-conditioned: equal to ~1e-9
        assert bd_rate(anchor, test, method) == pytest.approx(expected, rel=1e-7, abs=1e-7)


def test_shipped_codec_bd_rates_match_bjontegaard():
    """The BD-rates the manifest publishes for the trained S2LIC codec (3 points: PCHIP) are the package's too."""
    entry = next(e for e in load_manifest()['trained'] if e['name'] == 's2lic_tiny_photos')
    curves = {c['name']: c['results'] for c in (json.loads(p.read_text()) for p in CURVES.glob('*.json'))}
    ours = curves.pop('s2lic_tiny')
    assert sorted(curves) == sorted(entry['bd_rate'])
    for name, reference in curves.items():
        anchor, test = (reference['bpp'], reference['psnr-rgb']), (ours['bpp'], ours['psnr-rgb'])
        assert round(_bjontegaard_bd_rate(anchor, test, 'pchip'), 2) == entry['bd_rate'][name], name
        assert bd_rate(anchor, test, 'pchip') == pytest.approx(_bjontegaard_bd_rate(anchor, test, 'pchip'), abs=1e-9)


def test_curves_without_overlap_have_no_bd_rate_in_either():
    anchor, test = ([0.1, 0.2, 0.4], [30.0, 32.0, 34.0]), ([0.5, 0.8, 1.2], [35.0, 36.0, 37.0])
    with pytest.warns(UserWarning, match='do not overlap'):
        assert np.isnan(_bjontegaard_bd_rate(anchor, test, 'pchip'))
    with pytest.raises(ValueError, match='PSNR ranges do not overlap'):
        bd_rate(anchor, test, 'pchip')
