"""ARKV's numbers, in numpy: layer OQ ratios from prefill statistics, heavy-hitter scores."""

from __future__ import annotations

from typing import Any

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
    mean = mass.astype(np.float64)
    mean /= n
    if n == 1:
        return mean
    hh = mass_sq.astype(np.float64)  # in place from here: the arrays are (rows x heads) large
    hh /= n
    hh -= mean * mean
    np.maximum(hh, 0.0, out=hh)
    hh *= gamma
    hh += mean
    return hh


def token_peaks(layers: list[Any], pos_max: int, sinks: int, window: int) -> np.ndarray:
    """Per position 0..pos_max, the sharpest look any KV head gave it, as a share of the
    sharpest of all: per (layer, head, row), sum(p^2) / sum(p) over the queries that attended
    to it (their mean attention, weighted by attention: close to the largest p any one of them
    gave it, in [0, 1] in every head), the largest over every layer and head; the sinks and the
    window count 0. Layers: anything with `pos`, `mass` and `mass_sq` (rows x heads), as
    LayerView."""
    peaks = np.zeros(pos_max + 1)
    for lv in layers:
        pos = lv.pos
        mass = np.asarray(lv.mass, np.float64)
        sharp = np.divide(lv.mass_sq, mass, out=np.zeros_like(mass), where=mass > 0)
        sharp[(pos < sinks) | (pos > pos_max - window)] = 0.0
        for h in range(pos.shape[1]):  # a position once per head: a plain gather and scatter
            peaks[pos[:, h]] = np.maximum(peaks[pos[:, h]], sharp[:, h])
    top = peaks.max(initial=0.0)
    return peaks / top if top > 0 else peaks


def share_of_max(x: np.ndarray, among: np.ndarray) -> np.ndarray:
    """Each column (KV head) of the float array x divided by its largest value among the rows
    marked in `among`, in place; a column without a positive one is left as it is."""
    top = np.where(among, x, 0.0).max(axis=0, initial=0.0)
    x /= np.where(top > 0, top, 1.0)
    return x


def smooth_by_position(score: np.ndarray, pos: np.ndarray, width: int = 5) -> np.ndarray:
    """Moving average over neighbouring tokens in position order, zero padded at the ends
    (the reference's avg_pool1d(kernel=width, padding=width//2)), per column (KV head)."""
    return _pool_by_position(score, pos, width, np.add) / width


def spread_by_position(score: np.ndarray, pos: np.ndarray, width: int) -> np.ndarray:
    """Each token's score becomes the largest within `width` tokens around it, in position order
    (max pooling), per column (KV head): the span around a token that is attended to comes
    along with it."""
    return _pool_by_position(score, pos, width, np.maximum)


def _pool_by_position(score: np.ndarray, pos: np.ndarray, width: int,
                      combine: np.ufunc) -> np.ndarray:
    """`combine` folded over the `width` rows around each row taken in position order (zero
    padded), along axis 0: rows, or rows x KV heads at once. No row, no score."""
    score = np.asarray(score, np.float64)
    n, half = len(score), width // 2
    if n == 0:
        return np.zeros(score.shape)
    flat = by_position(pos.reshape(n, -1))  # (head, row in position order) -> flat index
    padded = np.zeros((len(flat), n + 2 * half))
    padded[:, half:half + n] = score.reshape(-1).take(flat)
    acc = padded[:, :n].copy()
    for k in range(1, width):
        combine(acc, padded[:, k:k + n], out=acc)
    out = np.empty(score.size)
    out[flat] = acc
    return out.reshape(score.shape)


def by_position(pos: np.ndarray) -> np.ndarray:
    """For (rows, heads) positions, each head's rows in position order as flat indices into a
    (rows, heads) array: shape (heads, rows). Positions unique within a head and not far
    sparser than the rows take a counting sort (a grid by position), others np.argsort."""
    n, n_head = pos.shape
    heads = np.arange(n_head)
    span = int(pos.max(initial=-1)) + 1
    if n and pos.min() >= 0 and span <= 4 * n + 1024:
        grid = np.full(n_head * span, -1, np.intp)
        grid[(pos + heads * span).ravel()] = np.arange(n * n_head)
        taken = grid[grid >= 0]
        if len(taken) == n * n_head:  # no position twice in a head
            return taken.reshape(n_head, n)
    return np.argsort(pos.T, axis=1) * n_head + heads[:, None]
