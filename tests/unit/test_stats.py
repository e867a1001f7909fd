"""Paired bootstrap statistics against closed-form oracles and constructed samples."""

from __future__ import annotations

import numpy as np
import pytest

from spo.stats import cluster_bootstrap_means, group_means, paired_summary, win_values

KEYS = {"base_mean", "spo_mean", "diff_mean", "diff_ci95", "win_rate", "win_rate_ci95", "n"}


def _clustered_sample(rng, n_prompts, per_prompt, shift, prompt_sd, image_sd):
    """SPO - base = shift + prompt effect + image noise; the prompt effect is shared by a prompt's images."""
    groups = np.repeat(np.arange(n_prompts), per_prompt)
    base = rng.normal(5.0, 1.0, size=n_prompts * per_prompt)
    diff = shift + rng.normal(0, prompt_sd, n_prompts)[groups] + rng.normal(0, image_sd, len(groups))
    return base, base + diff, groups


def test_schema_and_hand_computed_values():
    base = [1.0, 2.0, 3.0, 4.0]
    spo = [2.0, 1.0, 3.0, 6.0]  # diffs 1, -1, 0, 2 -> mean 0.5; wins 1, 0, 0.5, 1 -> 0.625
    out = paired_summary(base, spo, groups=["a", "a", "b", "b"], n_boot=200)
    assert set(out) == KEYS
    assert out["base_mean"] == pytest.approx(2.5)
    assert out["spo_mean"] == pytest.approx(3.0)
    assert out["diff_mean"] == pytest.approx(0.5)
    assert out["win_rate"] == pytest.approx(0.625)
    assert out["n"] == 4
    # Two prompts with mean diffs 0 and 1: every replicate is 0, 0.5 or 1.
    lo, hi = out["diff_ci95"]
    assert 0.0 <= lo <= 0.5 <= hi <= 1.0


def test_known_difference_ci_matches_cluster_standard_error():
    rng = np.random.default_rng(1)
    base, spo, groups = _clustered_sample(
        rng, n_prompts=200, per_prompt=4, shift=0.3, prompt_sd=0.5, image_sd=0.2
    )
    out = paired_summary(base, spo, groups, n_boot=4000, seed=0)
    lo, hi = out["diff_ci95"]
    assert lo < 0.3 < hi and lo > 0  # contains the true shift, excludes 0
    # Oracle: the standard error of the mean of the 200 per-prompt means (the unit that was sampled).
    prompt_means = np.array([(spo - base)[groups == g].mean() for g in range(200)])
    se = prompt_means.std(ddof=1) / np.sqrt(200)
    assert (hi - lo) / 2 == pytest.approx(1.96 * se, rel=0.1)
    # An image-level (iid) interval would be about half as wide here; the cluster one must not be.
    se_iid = (spo - base).std(ddof=1) / np.sqrt(len(base))
    assert (hi - lo) / 2 > 1.5 * 1.96 * se_iid


def test_constant_difference_gives_degenerate_interval():
    base = np.arange(12, dtype=float)
    out = paired_summary(base, base + 0.25, np.repeat(np.arange(3), 4), n_boot=100)
    assert out["diff_ci95"] == pytest.approx([0.25, 0.25])
    assert out["win_rate"] == 1.0 and out["win_rate_ci95"] == [1.0, 1.0]


def test_identical_models_win_half_with_ties():
    base = np.linspace(0, 1, 40)
    out = paired_summary(base, base.copy(), np.repeat(np.arange(10), 4), n_boot=100)
    assert out["diff_mean"] == 0.0 and out["win_rate"] == 0.5
    assert out["win_rate_ci95"] == [0.5, 0.5]


def test_ci_coverage_under_the_null():
    """95 % intervals on many simulated null datasets cover 0 about 95 % of the time."""
    rng = np.random.default_rng(7)
    covered = 0
    reps = 200
    for r in range(reps):
        base, spo, groups = _clustered_sample(
            rng, n_prompts=40, per_prompt=4, shift=0.0, prompt_sd=1.0, image_sd=0.5
        )
        lo, hi = paired_summary(base, spo, groups, n_boot=400, seed=r)["diff_ci95"]
        covered += lo <= 0.0 <= hi
    assert 0.88 <= covered / reps <= 0.99


def test_win_values_and_group_means():
    assert win_values(np.array([1.0, 2.0, 3.0]), np.array([2.0, 2.0, 1.0])).tolist() == [1.0, 0.5, 0.0]
    assert group_means([1.0, 3.0, 10.0], ["b", "b", "a"]).tolist() == [10.0, 2.0]


def test_bootstrap_is_seeded_and_resamples_prompts():
    values = np.array([0.0, 0.0, 1.0, 1.0, 1.0, 1.0])
    groups = np.array([0, 0, 1, 1, 2, 2])
    a = cluster_bootstrap_means(values, groups, 50, seed=3)
    b = cluster_bootstrap_means(values, groups, 50, seed=3)
    np.testing.assert_array_equal(a, b)
    # Whole prompts are drawn: with equal sizes a replicate mean is k/3 for k prompts drawn from {1, 2}.
    assert set(np.round(a * 3, 9)) <= {0.0, 1.0, 2.0, 3.0}


def test_rejects_bad_input():
    with pytest.raises(ValueError, match="NaN"):
        paired_summary([1.0, np.nan], [1.0, 2.0], [0, 1])
    with pytest.raises(ValueError, match="matching"):
        paired_summary([1.0], [1.0, 2.0], [0, 1])
