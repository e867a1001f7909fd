"""``spo prepare``: validate the Pick-a-Pic source with Great Expectations and write ``data/prepared/``.

Outputs (user contract; written into a temporary folder and swapped in whole, so a failed run leaves the
previous ``data/prepared/`` untouched):

- ``spm_train/``, ``spm_val/`` -- pair tables (parquet; ``pyarrow.dataset.dataset(path)``), metadata and a
  reference to the source row, no image bytes (see spo/data/pickapic.py);
- ``prompts_train.txt`` -- a seeded sample of ``data.num_train_prompts`` deduplicated train captions;
- ``prompts_val.txt`` -- the deduplicated captions of ``data.prompts_val_split`` (validation_unique);
- ``data_card.json`` -- source (root, revision, shard fingerprints), filters, counts, content hashes.

Filters: the SPM tables keep ``has_label`` rows only (ties stay as 0.5/0.5); ``data.keep_only_different``
applies to both tables, ``data.limit_examples_per_prompt`` to the train table only (it balances training;
validation keeps every judgement), ``data.max_spm_*_pairs`` cap each table with a seeded sample.

The validation report goes to ``reports/data_validation/`` on success and on failure; a failure raises
:class:`~spo.errors.DataValidationError` (exit code 3) with a short summary of what failed.
"""

from __future__ import annotations

import dataclasses
import platform
import time
from pathlib import Path
from typing import Any, ClassVar

import pyarrow as pa

from spo import tracking
from spo.errors import DataValidationError, SPOError
from spo.pipeline_spec import ARTIFACTS, artifact_in, artifact_path
from spo.results import StageResult
from spo.utils import atomic_dir, atomic_write_json, get_logger, hash_tree

log = get_logger(__name__)

# The artifacts inside data/prepared whose content hashes the data card records.
OUTPUTS = ("spm_train_pairs", "spm_val_pairs", "prompts_train", "prompts_val")


@dataclasses.dataclass(kw_only=True)
class PrepareResult(StageResult):
    """What ``spo prepare`` returns (the data card in data/prepared/ holds the rest)."""

    stage: ClassVar[str] = "prepare"
    headline: ClassVar[tuple[str, ...]] = ("spm_train_pairs", "spm_val_pairs", "prompts_train", "prompts_val", "validation")
    output: str
    spm_train_pairs: int
    spm_train_ties: int
    spm_val_pairs: int
    spm_val_ties: int
    prompts_train: int
    prompts_val: int
    validation: str
    seconds: float


def validation_dir(cfg) -> Path:
    return artifact_path(cfg, "data_validation")


def _split_roles(cfg) -> dict[str, str]:
    d = cfg.data
    return {"spm_train": d.train_split, "spm_val": d.val_split, "prompts_val": d.prompts_val_split}


def validate_and_read(cfg, source) -> tuple[dict[str, Any], Any]:
    """Run the GX suites on every split prepare uses; returns ({split: metadata table}, report).

    Raises DataValidationError (after writing the report) when a critical expectation fails.
    """
    from spo.data.expectations import SourceValidator
    from spo.data.pickapic import read_metadata

    d = cfg.data
    metas: dict[str, Any] = {}
    shards: dict[str, list[str]] = {}
    with SourceValidator(
        validation_dir(cfg), jpeg_sample=d.gx_jpeg_sample, seed=d.pair_seed, chunk_rows=d.gx_chunk_rows
    ) as v:
        for split in dict.fromkeys(_split_roles(cfg).values()):
            try:
                shards[split] = source.require_shards(split)
                schemas = {rel: source.parquet_file(rel).schema_arrow for rel in shards[split]}
            except DataValidationError as exc:
                v.add_error(split, str(exc))
                continue
            if not v.check_schema(split, schemas):
                continue
            try:
                meta = read_metadata(source, split, d.batch_rows)
            except DataValidationError as exc:
                v.add_error(split, str(exc))
                continue
            log.info("validating %s: %d rows in %d shard(s)", split, meta.num_rows, len(shards[split]))
            broken = undecodable_columns(meta)
            if broken:
                v.add_error(split, f"column(s) {', '.join(broken)} hold bytes that are not valid UTF-8 text; "
                            "re-export the source with UTF-8 captions (or drop those rows)")
                continue
            try:
                v.check_values(split, meta)
                if split in (d.train_split, d.val_split):  # the prompts split's images are never used
                    v.check_jpegs(split, source, meta)
            except pa.ArrowException as exc:  # a corrupt page or value the checks could not even read
                v.add_error(split, f"unreadable data ({type(exc).__name__}: {str(exc)[:300]})")
                continue
            metas[split] = meta
        report = v.finish(context=f"data.source={d.source}")
    for w in report.warnings:
        log.warning("data validation warning: %s", w.line())
    if not report.success:
        raise DataValidationError(report.summary)
    log.info("%s (report: %s)", report.summary.splitlines()[0], report.report_dir / "index.html")
    return {"tables": metas, "shards": shards}, report


def undecodable_columns(table) -> list[str]:
    """String columns whose bytes are not valid UTF-8 (Arrow checks them only when asked to)."""
    broken = []
    for name, column in zip(table.column_names, table.columns, strict=True):
        if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
            try:
                column.validate(full=True)
            except pa.ArrowInvalid:
                broken.append(name)
    return broken


def run(cfg) -> PrepareResult:
    from spo.data.pickapic import (
        PromptDeduper,
        build_pairs,
        dedup_prompts,
        resolve_source,
        sample_prompts,
        write_pairs,
        write_prompts,
    )

    started = time.perf_counter()
    d = cfg.data
    source = resolve_source(cfg)
    log.info(
        "prepare: source %s (%s%s)",
        source.root,
        source.kind,
        f"@{source.revision}" if source.revision else "",
    )
    read, report = validate_and_read(cfg, source)
    metas = read["tables"]
    roles = _split_roles(cfg)

    train_pairs, train_counts = build_pairs(
        metas[roles["spm_train"]],
        keep_only_different=d.keep_only_different,
        limit_examples_per_prompt=d.limit_examples_per_prompt,
        max_pairs=d.max_spm_train_pairs,
        seed=[d.pair_seed, 0],
    )
    val_pairs, val_counts = build_pairs(
        metas[roles["spm_val"]],
        keep_only_different=d.keep_only_different,
        max_pairs=d.max_spm_val_pairs,
        seed=[d.pair_seed, 1],
    )
    if train_pairs.num_rows == 0:
        raise SPOError(
            f"no SPM training pairs left after filtering split {roles['spm_train']!r} ({train_counts}); "
            "relax data.keep_only_different / data.limit_examples_per_prompt or check the source"
        )
    train_captions = PromptDeduper()
    train_captions.add(metas[roles["spm_train"]].column("caption"))
    unique_train = train_captions.prompts
    prompts_train = sample_prompts(unique_train, d.num_train_prompts, d.prompt_seed)
    if len(prompts_train) < d.num_train_prompts:
        log.warning(
            "only %d distinct train captions; prompts_train.txt holds all of them (data.num_train_prompts=%d)",
            len(unique_train),
            d.num_train_prompts,
        )
    prompts_val = dedup_prompts(metas[roles["prompts_val"]].column("caption"))

    used = {split: read["shards"][split] for split in dict.fromkeys(roles.values())}
    card: dict[str, Any] = {
        "source": {
            **source.describe(),
            # Relative to paths.root when inside the project, so the card does not change with the checkout.
            "root": _project_relative(source.root, cfg) if source.kind == "local" else source.root,
            "splits": {
                split: {
                    "rows": metas[split].num_rows,
                    "shards": {rel: source.fingerprint(rel) for rel in rels},
                }
                for split, rels in used.items()
            },
        },
        "roles": roles,
        "filters": {
            "only_has_label": True,
            "keep_only_different": d.keep_only_different,
            "limit_examples_per_prompt": d.limit_examples_per_prompt,
            "limit_applies_to": "spm_train",
            "max_spm_train_pairs": d.max_spm_train_pairs,
            "max_spm_val_pairs": d.max_spm_val_pairs,
            "pair_seed": d.pair_seed,
            "num_train_prompts": d.num_train_prompts,
            "prompt_seed": d.prompt_seed,
            "prompt_normalisation": "NFKC + casefold + collapse whitespace + strip; first spelling kept",
        },
        "definitions": {
            "num_example_per_prompt": "rows of the same table with the exact same caption, after every filter and cap",
            "weight": "1 / num_example_per_prompt",
            "source_num_example_per_prompt": "the source's own column, unchanged",
            "images": "not copied: source_file (relative to source.root) + source_row locate jpg_0/jpg_1",
        },
        "counts": {
            "spm_train": train_counts,
            "spm_val": val_counts,
            "prompts_train": {
                "source_rows": train_captions.rows,
                "unique": len(unique_train),
                "written": len(prompts_train),
            },
            "prompts_val": {"source_rows": metas[roles["prompts_val"]].num_rows, "written": len(prompts_val)},
        },
        "validation": {
            "success": report.success,
            "evaluated_expectations": report.evaluated,
            "warnings": [w.to_dict() for w in report.warnings],
            "report": _project_relative(report.report_dir, cfg),
        },
        "software": {"python": platform.python_version(), **_versions()},
    }

    out = artifact_path(cfg, "prepared")
    with atomic_dir(out) as tmp:  # artifact_in(tmp, name): where the artifact will be once tmp is swapped in
        write_pairs(artifact_in(tmp, "spm_train_pairs"), train_pairs)
        write_pairs(artifact_in(tmp, "spm_val_pairs"), val_pairs)
        write_prompts(artifact_in(tmp, "prompts_train"), prompts_train)
        write_prompts(artifact_in(tmp, "prompts_val"), prompts_val)
        card["outputs"] = {
            ARTIFACTS[name].rel: {"sha256": hash_tree(artifact_in(tmp, name))} for name in OUTPUTS
        }
        atomic_write_json(artifact_in(tmp, "data_card"), card)
    seconds = time.perf_counter() - started

    log.info(
        "prepared %s: spm_train %d pairs (%d ties), spm_val %d pairs (%d ties), %d train prompts, %d val prompts in %.1f s",
        out,
        train_counts["pairs"],
        train_counts["ties"],
        val_counts["pairs"],
        val_counts["ties"],
        len(prompts_train),
        len(prompts_val),
        seconds,
    )
    _log_tracking(cfg, card, out, report)
    return PrepareResult(
        output=str(out),
        spm_train_pairs=train_counts["pairs"],
        spm_train_ties=train_counts["ties"],
        spm_val_pairs=val_counts["pairs"],
        spm_val_ties=val_counts["ties"],
        prompts_train=len(prompts_train),
        prompts_val=len(prompts_val),
        validation="passed" + (f" with {len(report.warnings)} warning(s)" if report.warnings else ""),
        seconds=round(seconds, 2),
    )


def _project_relative(path: str | Path, cfg) -> str:
    path, root = Path(path).resolve(), Path(cfg.paths.root).resolve()
    return path.relative_to(root).as_posix() if path.is_relative_to(root) else str(path)


def _versions() -> dict[str, str]:
    import pyarrow

    import spo

    return {"spo": getattr(spo, "__version__", "unknown"), "pyarrow": pyarrow.__version__}


def _log_tracking(cfg, card: dict[str, Any], out: Path, report) -> None:
    tracker = tracking.active()
    tracker.log_params(
        {f"data.{k}": v for k, v in cfg.data.model_dump(mode="json").items()}
        | {"data.source_root": card["source"]["root"]}
    )
    metrics: dict[str, float] = {}
    for table in ("spm_train", "spm_val"):
        for key, value in card["counts"][table].items():
            metrics[f"data/{table}_{key}"] = float(value)
    metrics["data/prompts_train"] = float(card["counts"]["prompts_train"]["written"])
    metrics["data/prompts_train_unique"] = float(card["counts"]["prompts_train"]["unique"])
    metrics["data/prompts_val"] = float(card["counts"]["prompts_val"]["written"])
    metrics["data/validation_warnings"] = float(len(report.warnings))
    tracker.log_metrics(metrics)
    tracker.log_artifact(artifact_path(cfg, "data_card"), "data")
    tracker.log_artifact(report.report_dir / "summary.txt", "data/validation")
