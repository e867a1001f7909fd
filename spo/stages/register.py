"""``spo register``: the trained LoRA becomes a version of the MLflow model ``spo-<preset>`` (alias ``challenger``).

The version is an MLflow pyfunc model: the LoRA folder (and the evaluation's metrics.json, and for the tiny
preset the base model) as artifacts, ``predict(prompts) -> images`` from base + LoRA, explicit pip
requirements. Version tags carry the evaluation (``eval.<scorer>.<stat>``, read by ``spo promote``) and the
lineage (git commit, dirty flag, DVC hashes of data/prepared, SPM and LoRA, the runs that made them, base
model id).

Idempotent: a version is identified by the DVC md5 of its LoRA folder. Registering the same LoRA again
creates no new version; ``challenger`` is pointed at the existing one and its tags (the evidence the gate
used when it was first registered) are left as they are.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any, ClassVar

from spo import tracking
from spo.errors import SPOError
from spo.pipeline_spec import artifact_path
from spo.results import StageResult
from spo.utils import get_logger, json_digest, require_path

log = get_logger(__name__)

STATS = ("base_mean", "spo_mean", "diff_mean", "win_rate", "n")
INTERVALS = ("diff_ci95", "win_rate_ci95")


@dataclasses.dataclass(kw_only=True)
class RegisterResult(StageResult):
    """What ``spo register`` returns and writes to reports/registry/register.json."""

    stage: ClassVar[str] = "register"
    headline: ClassVar[tuple[str, ...]] = ("model", "version", "created", "alias")
    model: str
    version: str
    created: bool
    alias: str
    uri: str
    lora_md5: str | None
    tracking_uri: str


def summary_path(cfg) -> Path:
    return artifact_path(cfg, "register_record")


def read_eval_metrics(path: Path, primary_metric: str) -> dict[str, dict[str, Any]]:
    """The per-scorer entries of reports/eval/metrics.json, checked for what the gate needs."""
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise SPOError(f"cannot read the evaluation metrics {path}: {exc}. Re-run `spo evaluate`.") from exc
    scorers = {k: v for k, v in raw.items() if isinstance(v, dict) and "diff_mean" in v}
    if primary_metric not in scorers:
        raise SPOError(
            f"{path} has no entry for the primary metric {primary_metric!r} (it has: {', '.join(scorers) or 'none'}). "
            f"Add it to eval.scorers and re-run `spo evaluate`, or set registry.primary_metric to one of those."
        )
    for name, entry in scorers.items():
        ci = entry.get("diff_ci95")
        if not (isinstance(ci, list | tuple) and len(ci) == 2):
            raise SPOError(
                f"{path}: {name}.diff_ci95 must be [low, high], got {ci!r}. Re-run `spo evaluate`."
            )
    return scorers


def metric_tags(scorers: dict[str, dict[str, Any]]) -> dict[str, str]:
    """``eval.<scorer>.<stat>`` tags (intervals split into ``_low``/``_high``)."""
    tags: dict[str, str] = {}
    for name, entry in scorers.items():
        for stat in STATS:
            if entry.get(stat) is not None:
                tags[f"eval.{name}.{stat}"] = (
                    repr(float(entry[stat])) if stat != "n" else str(int(entry[stat]))
                )
        for stat in INTERVALS:
            if entry.get(stat) is not None:
                low, high = entry[stat]
                tags[f"eval.{name}.{stat}_low"] = repr(float(low))
                tags[f"eval.{name}.{stat}_high"] = repr(float(high))
    return tags


def eval_protocol(cfg, base_md5: str | None) -> str:
    """What makes two evaluations comparable: the evaluation settings (less the LoRA), the base model (id
    and content) and the validation prompts."""
    settings = cfg.to_dict()
    payload = {
        "eval": {k: v for k, v in settings["eval"].items() if k != "lora"},
        "model": settings["model"],
        "base_md5": base_md5,
        "prompts_md5": tracking.dvc_md5(artifact_path(cfg, "prompts_val")),
    }
    return json_digest(payload)


def run(cfg) -> RegisterResult:
    lora_dir = require_path(artifact_path(cfg, "lora"), "the SPO LoRA", "Run `spo train` first.")
    require_path(artifact_path(cfg, "lora_weights"), "the LoRA weights", "Run `spo train` first.")
    metrics_path = require_path(
        artifact_path(cfg, "eval_metrics"), "the evaluation metrics", "Run `spo evaluate` first."
    )
    scorers = read_eval_metrics(metrics_path, cfg.registry.primary_metric)
    if not all(
        math.isfinite(float(v))
        for e in scorers.values()
        for k, v in e.items()
        if k in STATS and v is not None
    ):
        raise SPOError(f"{metrics_path} holds non-finite metrics; re-run `spo evaluate` before registering.")

    name = cfg.registered_model_name
    tracking.init_store(cfg)
    lora_md5 = tracking.dvc_md5(lora_dir)
    lineage = tracking.lineage_tags(cfg, "register")
    tags = {
        **lineage,
        "lineage.lora_md5": lora_md5,
        **metric_tags(scorers),
        "eval.primary_metric": cfg.registry.primary_metric,
        "eval.protocol": eval_protocol(cfg, lineage.get("lineage.base_model_md5")),
    }
    primary = scorers[cfg.registry.primary_metric]
    description = (
        f"SPO LoRA ({cfg.preset}, base {cfg.model.pretrained}). {cfg.registry.primary_metric}: "
        f"SPO - base = {primary['diff_mean']:+.4g} (95% CI {primary['diff_ci95'][0]:+.4g} .. "
        f"{primary['diff_ci95'][1]:+.4g}), win rate {primary.get('win_rate', float('nan')):.3f}."
    )
    # Find-or-create by content, transactionally (see tracking.register_lora): an existing version keeps the
    # tags (the evidence the gate used when it was first registered).
    info, created = tracking.register_lora(cfg, lora_dir, {"eval": metrics_path}, tags, description)
    version = info.version
    if created:
        log.info("registered %s v%s", name, version)
    else:
        log.info("LoRA %s is already %s v%s; pointing %r at it", lora_md5, name, version, tracking.CHALLENGER)
    tracking.set_alias(name, tracking.CHALLENGER, version)
    tracking.active().set_tags({"registry.model": name, "registry.version": version})
    summary = RegisterResult(
        model=name,
        version=version,
        created=created,
        alias=tracking.CHALLENGER,
        uri=f"models:/{name}@{tracking.CHALLENGER}",
        lora_md5=lora_md5,
        tracking_uri=tracking.display_uri(cfg),
    )
    summary.write(summary_path(cfg))
    return summary
