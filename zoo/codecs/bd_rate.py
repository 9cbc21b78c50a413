"""Bjøntegaard delta rates between rate-distortion curves."""
import math
from typing import Dict, Optional, Sequence, Tuple

import numpy as np

__all__ = ['BD_MIN_POINTS', 'bd_rate', 'bd_rate_table']

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


def bd_rate_table(curves: Sequence[dict]) -> Tuple[Dict[str, Dict[str, Optional[float]]], Dict[str, str]]:
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
