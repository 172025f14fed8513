"""ARKV's numbers, in numpy: layer OQ ratios from prefill statistics, heavy-hitter scores."""

from __future__ import annotations

import numpy as np


def oq_ratios(stats: np.ndarray | None, tau: tuple[float, float, float]) -> np.ndarray | None:
    """Per layer rho_l = s_l / max_j s_j with s_l = E^(1/t1) V^(1/t2) K^(1/t3) (ARKV.md);
    None when there is nothing to go on (no statistics, or all scores zero)."""
    if stats is None:
        return None
    st = np.clip(np.asarray(stats, np.float64), 0.0, None)
    s = st[:, 0] ** (1 / tau[0]) * st[:, 1] ** (1 / tau[1]) * st[:, 2] ** (1 / tau[2])
    if not np.isfinite(s).all() or s.max() <= 0:
        return None
    return s / s.max()


def heavy_hitter(mass: np.ndarray, mass_sq: np.ndarray, n: int, gamma: float) -> np.ndarray:
    """hh = mean(p) + gamma * var(p) over n samples (queries x GQA group); var needs n > 1."""
    if n == 0:
        return np.zeros_like(mass, np.float64)
    mean = mass.astype(np.float64) / n
    if n == 1:
        return mean
    var = np.clip(mass_sq.astype(np.float64) / n - mean**2, 0.0, None)
    return mean + gamma * var


def smooth_by_position(score: np.ndarray, pos: np.ndarray, width: int = 5) -> np.ndarray:
    """Moving average over neighbouring tokens in position order, zero padded at the ends
    (the reference's avg_pool1d(kernel=width, padding=width//2)). No token, no score: the
    padded row would be shorter than the kernel, which np.convolve would swap in."""
    if len(score) == 0:
        return np.zeros(0)
    order = np.argsort(pos)
    out = np.empty_like(score, np.float64)
    padded = np.pad(score[order].astype(np.float64), width // 2)  # "same" would grow short rows
    out[order] = np.convolve(padded, np.ones(width) / width, mode="valid")
    return out



def spread_by_position(score: np.ndarray, pos: np.ndarray, width: int) -> np.ndarray:
    """Each token's score becomes the largest within `width` tokens around it, in position order
    (max pooling): the span around a token that is attended to comes along with it."""
    if len(score) == 0:
        return np.zeros(0)
    order = np.argsort(pos)
    padded = np.pad(score[order].astype(np.float64), width // 2)
    out = np.empty_like(score, np.float64)
    out[order] = np.lib.stride_tricks.sliding_window_view(padded, width).max(axis=1)
    return out
