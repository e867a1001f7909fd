"""Scoring of paired images and the statistics glue of the evaluation (the numbers behind reports/eval/).

:func:`preflight_scorers` checks every scorer before any image is drawn; :func:`pair_table` lists the
(base, SPO) image files of each pair; :func:`score_pairs` scores the PNGs as saved (uint8, like any user's
image); :func:`summarise` adds the score columns and computes per scorer the base and SPO means, the paired
mean difference with a prompt-level bootstrap 95 % CI and the win rate (ties count half) with its CI
(spo/stats.py); :func:`log_to_tracker` logs them to the active tracker.
"""

from __future__ import annotations

import gc
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from spo import tracking
from spo.errors import MissingExtraError, ModelLoadError, NonFiniteError
from spo.generation import IMAGE_DIR_LABELS, ImageCache, Job
from spo.utils import get_logger

log = get_logger(__name__)


def preflight_scorers(cfg) -> dict[str, str]:
    """Check every requested scorer before generating; returns the skipped ones (eval.skip_unavailable)."""
    from spo.rewards import check_scorer

    skipped: dict[str, str] = {}
    for name in cfg.eval.scorers:
        try:
            check_scorer(name, cfg)
        except (MissingExtraError, ModelLoadError) as exc:
            if not cfg.eval.skip_unavailable:
                raise
            log.warning("skipping scorer %s (eval.skip_unavailable=true): %s", name, exc)
            skipped[name] = str(exc)
    return skipped


def pair_table(jobs: Sequence[Job], caches: dict[str, ImageCache]):
    """One row per pair: the job's fields and the two image files."""
    import pandas as pd

    table = pd.DataFrame([asdict(j) for j in jobs])
    for side, cache in caches.items():
        table[f"{side}_file"] = [str(cache.path(j)) for j in jobs]
    return table


def score_files(
    scorer, paths: Sequence[Path], prompts: Sequence[str], batch_size: int, desc: str
) -> np.ndarray:
    from PIL import Image

    from spo.progress import tqdm

    out = []
    for i in tqdm(range(0, len(paths), batch_size), desc=desc, unit="batch", leave=False):
        images = []
        for p in paths[i : i + batch_size]:
            with Image.open(p) as im:
                images.append(im.convert("RGB"))
        out.append(scorer(images, list(prompts[i : i + batch_size])).numpy().astype(np.float64))
    return np.concatenate(out)


def score_pairs(
    cfg, names: Sequence[str], table, device
) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], dict[str, str]]:
    """Scores of the base and SPO images of every pair by each scorer; (scores, skipped scorer -> reason)."""
    from spo.rewards import get_scorer

    scores: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    skipped: dict[str, str] = {}
    prompts = table["prompt"].tolist()
    for name in names:
        try:
            scorer = get_scorer(name, cfg, device)
        except (MissingExtraError, ModelLoadError) as exc:
            if not cfg.eval.skip_unavailable:
                raise
            log.warning("skipping scorer %s (eval.skip_unavailable=true): %s", name, exc)
            skipped[name] = str(exc)
            continue
        pair = tuple(
            score_files(
                scorer, table[f"{side}_file"].tolist(), prompts, cfg.eval.batch_size, f"{name} {side}"
            )
            for side in IMAGE_DIR_LABELS
        )
        for side, values in zip(IMAGE_DIR_LABELS, pair, strict=True):
            if not np.isfinite(values).all():
                raise NonFiniteError(
                    f"scorer {name} returned NaN/inf for {int((~np.isfinite(values)).sum())} {side} images"
                )
        scores[name] = pair  # type: ignore[assignment]
        del scorer
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return scores, skipped


def summarise(cfg, table, scores: dict[str, tuple[np.ndarray, np.ndarray]]) -> dict[str, Any]:
    """Add the score columns to ``table``; the per-scorer metrics.json entries."""
    from spo.stats import paired_summary

    metrics: dict[str, Any] = {}
    for name, (base_scores, spo_scores) in scores.items():
        table[f"{name}_base"] = base_scores
        table[f"{name}_spo"] = spo_scores
        metrics[name] = paired_summary(
            base_scores,
            spo_scores,
            table["prompt_index"].to_numpy(),
            cfg.eval.bootstrap_samples,
            cfg.eval.seed,
        )
    return metrics


def log_to_tracker(metrics: dict[str, Any]) -> None:
    """The evaluation protocol as params, every scorer's means, differences and CIs as metrics."""
    tracker = tracking.active()
    info = metrics["_protocol"]
    # A prefix of its own: the stage's tracker already logged the config's eval.* keys, and MLflow refuses to
    # log a param twice with another value (eval.resolution: null there, the resolved 32 here).
    tracker.log_params({f"eval_protocol.{k}": v for k, v in info.items() if not isinstance(v, (list, dict))})
    flat: dict[str, float] = {}
    for name, m in metrics.items():
        if name.startswith("_"):
            continue
        for key in ("base_mean", "spo_mean", "diff_mean", "win_rate"):
            flat[f"eval/{name}/{key}"] = m[key]
        flat[f"eval/{name}/diff_ci95_low"], flat[f"eval/{name}/diff_ci95_high"] = m["diff_ci95"]
        flat[f"eval/{name}/win_rate_ci95_low"], flat[f"eval/{name}/win_rate_ci95_high"] = m["win_rate_ci95"]
    # The report files are attached by the stage's tracker (spo.tracking.stage_reports).
    tracker.log_metrics(flat)
