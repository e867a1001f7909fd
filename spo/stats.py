"""Paired statistics for base-vs-SPO evaluation: mean difference and win rate with prompt-level bootstrap CIs.

Images of one prompt are correlated (same caption, often similar compositions), so resampling single images
would make the intervals too narrow. The bootstrap therefore resamples *prompts* (clusters) with
replacement and keeps all of a resampled prompt's image pairs; each replicate's statistic is the mean over
the pairs it contains. Intervals are percentile intervals. A pair is a (prompt, seed): the base image and the
SPO image generated from the same initial noise.

Win rate: the share of pairs where SPO scores higher than the base; an exact tie counts half, so a LoRA that
changes nothing has a win rate of exactly 0.5.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

CI_LEVEL = 0.95


def win_values(base: np.ndarray, spo: np.ndarray) -> np.ndarray:
    """1 where SPO > base, 0.5 on a tie, 0 where SPO < base."""
    return (spo > base).astype(np.float64) + 0.5 * (spo == base)


def _group_codes(groups: Sequence[Any] | np.ndarray) -> tuple[np.ndarray, int]:
    _, codes = np.unique(np.asarray(groups), return_inverse=True)
    return codes.ravel(), int(codes.max()) + 1 if len(codes) else 0


def cluster_bootstrap_means(
    values: np.ndarray, groups: Sequence[Any] | np.ndarray, n_boot: int, seed: int
) -> np.ndarray:
    """``n_boot`` bootstrap replicates of the pair-level mean of ``values``, resampling whole groups."""
    codes, n_groups = _group_codes(groups)
    sums = np.bincount(codes, weights=values, minlength=n_groups)
    counts = np.bincount(codes, minlength=n_groups).astype(np.float64)
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, n_groups, size=(n_boot, n_groups))
    return sums[picks].sum(axis=1) / counts[picks].sum(axis=1)


def percentile_ci(replicates: np.ndarray, level: float = CI_LEVEL) -> list[float]:
    alpha = (1.0 - level) / 2.0
    lo, hi = np.quantile(replicates, [alpha, 1.0 - alpha])
    return [float(lo), float(hi)]


def paired_summary(
    base: Sequence[float] | np.ndarray,
    spo: Sequence[float] | np.ndarray,
    groups: Sequence[Any] | np.ndarray,
    n_boot: int = 2000,
    seed: int = 0,
    level: float = CI_LEVEL,
) -> dict[str, Any]:
    """The per-scorer entry of reports/eval/metrics.json.

    ``base[i]`` and ``spo[i]`` are the scores of pair i, ``groups[i]`` its prompt. Returns ``base_mean``,
    ``spo_mean``, ``diff_mean`` (SPO - base), ``diff_ci95``, ``win_rate``, ``win_rate_ci95`` and ``n`` (pairs).
    """
    base = np.asarray(base, dtype=np.float64)
    spo = np.asarray(spo, dtype=np.float64)
    if base.shape != spo.shape or base.ndim != 1 or len(groups) != len(base):
        raise ValueError(
            f"need matching 1-d inputs; got base {base.shape}, spo {spo.shape}, {len(groups)} groups"
        )
    if len(base) == 0:
        raise ValueError("no pairs to summarise")
    if not (np.isfinite(base).all() and np.isfinite(spo).all()):
        raise ValueError("scores contain NaN or inf")
    diff = spo - base
    wins = win_values(base, spo)
    # The same resampled prompt sets for both statistics (one seed), so their intervals are coherent.
    diff_boot = cluster_bootstrap_means(diff, groups, n_boot, seed)
    win_boot = cluster_bootstrap_means(wins, groups, n_boot, seed)
    return {
        "base_mean": float(base.mean()),
        "spo_mean": float(spo.mean()),
        "diff_mean": float(diff.mean()),
        "diff_ci95": percentile_ci(diff_boot, level),
        "win_rate": float(wins.mean()),
        "win_rate_ci95": percentile_ci(win_boot, level),
        "n": int(len(base)),
    }


def group_means(values: Sequence[float] | np.ndarray, groups: Sequence[Any] | np.ndarray) -> np.ndarray:
    """Mean of ``values`` per group, in sorted group order (per-prompt differences for plots)."""
    codes, n_groups = _group_codes(groups)
    values = np.asarray(values, dtype=np.float64)
    return np.bincount(codes, weights=values, minlength=n_groups) / np.bincount(codes, minlength=n_groups)
