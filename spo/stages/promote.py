"""``spo promote``: move the ``champion`` alias to the ``challenger`` only if it passes the gate.

The gate, on the primary metric ``m = registry.primary_metric`` (PickScore for real presets, the toy
aesthetic for tiny). Every version was evaluated *paired* against the same base model (same prompts, same
seeds), and its tags hold ``diff_mean`` = mean(score(base+LoRA) - score(base)) with a bootstrap 95% CI.
The challenger beats the champion when both hold:

1. evidence against the base: the challenger's paired CI of ``m`` lies entirely above 0
   (``diff_ci95_low > 0``; skipped when ``registry.require_ci_excludes_zero`` is false);
2. improvement over the champion: ``delta = diff_mean(challenger) - diff_mean(champion) > margin``.
   Comparing the gains over the base rather than raw scores cancels a shift of the base's own scores
   (a re-scaled scorer, a re-trained tiny base); for two evaluations with the same protocol (``eval.protocol``
   tag) it equals the difference of the raw mean scores. With no champion yet the base is the champion
   (its gain is 0), so the first challenger with a positive, significant gain over ``margin`` is promoted.

The decision is recorded as ``promotion.*`` tags on the challenger version. When the champion moves, the
version it leaves gets the alias ``previous-champion`` (one command to roll back). A rejected challenger
leaves ``champion`` untouched; a rejection is a normal outcome, not an error.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import ClassVar

from spo import tracking
from spo.errors import SPOError
from spo.pipeline_spec import artifact_path
from spo.results import StageResult
from spo.utils import get_logger

log = get_logger(__name__)


@dataclass(frozen=True)
class GateResult:
    promote: bool
    reason: str
    delta: float | None  # challenger gain minus champion gain (or minus 0 without a champion)
    ci_low: float | None
    comparable: bool  # same evaluation protocol as the champion (always true without one)


def _stat(tags: dict[str, str], metric: str, stat: str) -> float | None:
    value = tags.get(f"eval.{metric}.{stat}")
    return None if value is None else float(value)


def decide(
    challenger_tags: dict[str, str],
    champion_tags: dict[str, str] | None,
    metric: str,
    margin: float,
    require_ci_excludes_zero: bool,
) -> GateResult:
    """The gate (see module docstring) on the version tags written by ``spo register``."""
    gain = _stat(challenger_tags, metric, "diff_mean")
    ci_low = _stat(challenger_tags, metric, "diff_ci95_low")
    if gain is None or ci_low is None:
        raise SPOError(
            f"the challenger has no evaluation of {metric!r} in its tags; evaluate with that scorer and "
            "register again, or set registry.primary_metric to a scorer it was evaluated with."
        )
    champion_gain = 0.0
    comparable = True
    against = "the base model"
    if champion_tags is not None:
        champion_gain = _stat(champion_tags, metric, "diff_mean")
        if champion_gain is None:
            raise SPOError(
                f"the champion has no evaluation of {metric!r}; promote by hand (spo promote cannot compare) "
                "or change registry.primary_metric."
            )
        comparable = champion_tags.get("eval.protocol") == challenger_tags.get("eval.protocol")
        against = "the champion"
    delta = gain - champion_gain
    if require_ci_excludes_zero and not ci_low > 0:
        reason = f"{metric}: the paired 95% CI vs base includes 0 or is negative (low end {ci_low:+.4g})"
        return GateResult(False, reason, delta, ci_low, comparable)
    if not delta > margin:
        reason = f"{metric}: gain {gain:+.4g} beats {against} ({champion_gain:+.4g}) by {delta:+.4g}, not more than the margin {margin:g}"
        return GateResult(False, reason, delta, ci_low, comparable)
    reason = f"{metric}: gain {gain:+.4g} beats {against} ({champion_gain:+.4g}) by {delta:+.4g} > margin {margin:g}"
    if require_ci_excludes_zero:
        reason += f"; paired CI vs base above 0 (low end {ci_low:+.4g})"
    return GateResult(True, reason, delta, ci_low, comparable)


@dataclass(kw_only=True)
class PromoteResult(StageResult):
    """What ``spo promote`` returns and writes to reports/registry/promote.json."""

    stage: ClassVar[str] = "promote"
    headline: ClassVar[tuple[str, ...]] = ("decision", "champion", "metric", "delta", "ci_low")
    model: str
    challenger: str
    champion_before: str | None
    decision: str
    promoted: bool
    champion: str | None
    metric: str
    reason: str
    delta: float | None
    ci_low: float | None
    comparable: bool


def summary_path(cfg) -> Path:
    return artifact_path(cfg, "promote_record")


def run(cfg) -> PromoteResult:
    name = cfg.registered_model_name
    reg = cfg.registry
    tracking.init_store(cfg)
    challenger = tracking.get_version(name, tracking.CHALLENGER)
    if challenger is None:
        raise SPOError(f"model {name!r} has no {tracking.CHALLENGER!r} version. Run `spo register` first.")
    champion = tracking.get_version(name, tracking.CHAMPION)
    before = champion.version if champion else None

    if champion is not None and champion.version == challenger.version:
        gate = GateResult(False, "the challenger already is the champion", 0.0, None, True)
        decision = "already-champion"
    else:
        gate = decide(
            challenger.tags,
            champion.tags if champion else None,
            reg.primary_metric,
            reg.margin,
            reg.require_ci_excludes_zero,
        )
        decision = "promoted" if gate.promote else "rejected"
        if not gate.comparable:
            log.warning(
                "v%s and champion v%s were evaluated with different protocols; comparing their gains over "
                "the base (see docs/ORCHESTRATION.md)",
                challenger.version,
                before,
            )
    if gate.promote:
        tracking.set_alias(name, tracking.CHAMPION, challenger.version)
        if champion is not None:
            tracking.set_alias(name, tracking.PREVIOUS_CHAMPION, champion.version)
            tracking.set_version_tags(name, champion.version, {"promotion.replaced_by": challenger.version})
    tracking.set_version_tags(
        name,
        challenger.version,
        {
            "promotion.decision": decision,
            "promotion.reason": gate.reason,
            "promotion.metric": reg.primary_metric,
            "promotion.margin": reg.margin,
            "promotion.require_ci_excludes_zero": str(reg.require_ci_excludes_zero).lower(),
            "promotion.champion_before": before or "none",
            "promotion.delta": "n/a" if gate.delta is None else repr(gate.delta),
            "promotion.comparable": str(gate.comparable).lower(),
            "promotion.decided_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        },
    )
    champion_after = challenger.version if gate.promote else before
    log.info(
        "%s v%s: %s (%s); champion is %s",
        name,
        challenger.version,
        decision,
        gate.reason,
        champion_after or "none",
    )
    tracking.active().set_tags({"registry.decision": decision, "registry.champion": champion_after or "none"})
    summary = PromoteResult(
        model=name,
        challenger=challenger.version,
        champion_before=before,
        decision=decision,
        promoted=gate.promote,
        champion=champion_after,
        metric=reg.primary_metric,
        **{k: v for k, v in asdict(gate).items() if k != "promote"},
    )
    summary.write(summary_path(cfg))
    return summary
