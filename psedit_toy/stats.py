"""Confidence intervals for the toy world's tables. Pure numpy.

A row of a table is a mean over edits; its 95% interval is the percentile bootstrap: resample the edits with
replacement ``n_boot`` times, take each resample's mean, and report the 2.5th and 97.5th percentiles of those means.
Seeded, so a table is reproducible; the same resampling indices serve every column of a row, so intervals of
columns of one row come from the same resamples.
"""

from __future__ import annotations

import numpy as np

N_BOOT = 2000
LEVEL = 0.95


def resample_indices(n: int, n_boot: int = N_BOOT, seed: int = 0) -> np.ndarray:
    """[n_boot, n] indices of ``n`` items drawn with replacement."""
    return np.random.default_rng([seed, n]).integers(0, n, size=(n_boot, n))


def bootstrap_ci(values, n_boot: int = N_BOOT, level: float = LEVEL, seed: int = 0,
                 indices: np.ndarray | None = None) -> tuple[float, float]:
    """(lo, hi) percentile-bootstrap interval of the mean of ``values`` (NaN, NaN for none; a single value gives
    that value twice)."""
    v = np.asarray([x for x in values if x is not None], dtype=np.float64)
    if v.size == 0:
        return float("nan"), float("nan")
    idx = indices if indices is not None and indices.shape[1] == v.size else resample_indices(v.size, n_boot, seed)
    means = v[idx].mean(axis=1)
    tail = 100 * (1 - level) / 2
    return float(np.percentile(means, tail)), float(np.percentile(means, 100 - tail))


def summarise(rows: list[dict], columns: list[str], seed: int = 0) -> dict:
    """Mean and interval of each column over ``rows``: ``{c: mean, c_lo: ..., c_hi: ...}``. Columns with a value in
    every row share one set of resamples."""
    out = {}
    idx = resample_indices(len(rows), seed=seed) if rows else None
    for c in columns:
        vals = [r.get(c) for r in rows if r.get(c) is not None]
        if not vals:
            out[c] = out[f"{c}_lo"] = out[f"{c}_hi"] = None
            continue
        out[c] = float(np.mean(vals))
        out[f"{c}_lo"], out[f"{c}_hi"] = bootstrap_ci(vals, seed=seed, indices=idx if len(vals) == len(rows) else None)
    return out
