"""``spo synth``: write the tiny world's Pick-a-Pic-format dataset to ``data/raw/pickapic_tiny``.

The folder is in the HF parquet layout (``data/<split>-<i>-of-<n>.parquet``), so ``spo prepare`` reads it
exactly as it reads a local copy of the real dataset. A ``tiny_world.json`` beside ``data/`` records the
config fingerprint and a content hash: the stage skips when both still match, unless ``force``. Real
presets skip it (leaving a placeholder folder for DVC) unless ``force``.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, ClassVar

from spo import tracking
from spo.pipeline_spec import artifact_in, artifact_path
from spo.results import StageResult
from spo.utils import atomic_dir, atomic_write_json, get_logger, hash_tree, read_json

log = get_logger(__name__)

_OPTIONAL = ("reason", "seconds", "fingerprint", "content_sha256", "splits")


@dataclasses.dataclass(kw_only=True)
class SynthResult(StageResult):
    """What ``spo synth`` returns; the optional fields appear only when set (a skip for a real preset has
    a ``reason``, a generation its ``seconds``, both have the fingerprint of tiny_world.json)."""

    stage: ClassVar[str] = "synth"
    headline: ClassVar[tuple[str, ...]] = ("skipped", "reason", "seconds", "output")
    skipped: bool
    output: str
    reason: str | None = None
    seconds: float | None = None
    fingerprint: str | None = None
    content_sha256: str | None = None
    splits: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in super().to_dict().items() if not (k in _OPTIONAL and v is None)}


# Bump when the generator's output changes for the same config (invalidates existing folders).
GENERATOR_VERSION = 1


def _fingerprint(cfg) -> str:
    return f"v{GENERATOR_VERSION}-{cfg.section_hash('synthetic')}"


def is_up_to_date(cfg) -> bool:
    out = artifact_path(cfg, "raw_data")
    info = artifact_path(cfg, "raw_data_info")
    if not info.exists() or not (out / "data").is_dir():
        return False
    recorded = read_json(info)
    return recorded.get("fingerprint") == _fingerprint(cfg) and recorded.get("content_sha256") == hash_tree(
        out / "data"
    )


def run(cfg, force: bool = False) -> SynthResult:
    from spo.data.synthetic import generate_dataset

    out = artifact_path(cfg, "raw_data")
    if not cfg.is_tiny and not force:
        # Real presets read Pick-a-Pic itself; the folder still exists so that dvc.yaml's outs do.
        reason = f"the tiny world is only for the tiny preset; preset {cfg.preset} reads data.source={cfg.data.source}"
        log.info("%s (use --force to generate it anyway)", reason)
        if not out.exists():
            with atomic_dir(out) as tmp:
                (tmp / "README.txt").write_text(f"Placeholder: {reason}.\n")
        return SynthResult(skipped=True, reason=reason, output=str(out))
    if not force and is_up_to_date(cfg):
        log.info("tiny world at %s is up to date (use --force to regenerate)", out)
        return SynthResult(
            skipped=True, **_brief(read_json(artifact_path(cfg, "raw_data_info"))), output=str(out)
        )

    started = time.perf_counter()
    with atomic_dir(out) as tmp:
        summary = generate_dataset(tmp, cfg.synthetic)
        info = {
            "fingerprint": _fingerprint(cfg),
            "content_sha256": hash_tree(tmp / "data"),
            "synthetic": cfg.synthetic.model_dump(mode="json"),
            **summary,
        }
        atomic_write_json(artifact_in(tmp, "raw_data_info"), info)
    seconds = time.perf_counter() - started
    for split, stats in summary["splits"].items():
        log.info(
            "synth %s: %d pairs, %d captions, %d ties, %d unlabeled, %d identical, %d shard(s)",
            split,
            stats["rows"],
            stats["captions"],
            stats["ties"],
            stats["unlabeled"],
            stats["identical"],
            stats["shards"],
        )
    log.info("wrote the tiny world to %s in %.1f s", out, seconds)
    tracker = tracking.active()
    tracker.log_params({f"synthetic.{k}": v for k, v in cfg.synthetic.model_dump(mode="json").items()})
    tracker.log_metrics(
        {f"synth/{s}_rows": float(v["rows"]) for s, v in summary["splits"].items()}
        | {"synth/seconds": seconds}
    )
    return SynthResult(skipped=False, seconds=round(seconds, 2), **_brief(info), output=str(out))


def _brief(info: dict) -> dict:
    """What the CLI prints: the fingerprint and per-split counts (tiny_world.json has the rest)."""
    return {k: info[k] for k in ("fingerprint", "content_sha256", "splits") if k in info}
