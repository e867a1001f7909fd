"""Great Expectations suites on the Pick-a-Pic source, and the report ``spo prepare`` writes.

Four suites run per split, each on a pandas DataFrame (GX 1.24 fluent API, ephemeral context):

``schema``  -- one row per required column of each distinct shard schema (read from parquet footers, so
    nothing is decoded): every column present, with the real arrow dtype (``large_*``/``*_view`` variants
    count as their plain type). A failure here stops the other suites: they could not be read.
``values``  -- the metadata columns (no image bytes, no URLs), in chunks of ``data.gx_chunk_rows``:
    no nulls; non-blank captions and image uids; labels in {0, 0.5, 1} summing to 1; ``best_image_uid``
    consistent with the labels (image 0's uid when label_0 = 1, image 1's when label_1 = 1, "" for a
    tie or an unlabeled row); the two images of a pair have different uids; num_example_per_prompt >= 1.
    Warning only: num_example_per_prompt equals the recount over the split (real exports may have
    counted over another population; prepare recomputes it anyway).
    Also at least one row, ``ranking_id`` unique and, as a warning, no (image_0_uid, image_1_uid) pair
    judged twice -- within the chunk; ``global`` repeats these on the whole split's ids when it spans
    several chunks.
``jpeg_sample`` -- ``data.gx_jpeg_sample`` rows drawn with a seeded generator: ``jpg_0`` and ``jpg_1``
    decode (decoding all 583k pairs of v1 would take hours). Rows are drawn only from row groups small
    enough to read whole, within a byte budget (:func:`jpeg_sample_rows`); a source with none is reported
    as a warning, not read.

Results go to ``reports/data_validation/`` (swapped in atomically, on success and on failure):
``index.html`` and its pages (GX Data Docs), ``validation_result.json`` (every run's GX result plus the
aggregated failures) and ``summary.txt`` -- the same short text that a :class:`DataValidationError`
carries to the terminal: each failed expectation with its unexpected count and a few offending rows.
"""

from __future__ import annotations

import io
import json
import logging
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from spo.data.pickapic import (
    PICKAPIC_SCHEMA,
    ParquetSource,
    examples_per_caption,
    read_rows,
)
from spo.utils import atomic_write_json, atomic_write_text, get_logger, replace_dir

log = get_logger(__name__)

LABEL_VALUES = [0.0, 0.5, 1.0]
ROW_ID_COLUMNS = ["source_file", "source_row", "ranking_id"]
MAX_EXAMPLES = 5
_TYPE_ALIASES = {
    "large_string": "string",
    "string_view": "string",
    "large_binary": "binary",
    "binary_view": "binary",
}

NOT_NULL_COLUMNS = (
    "caption",
    "label_0",
    "label_1",
    "has_label",
    "are_different",
    "best_image_uid",
    "image_0_uid",
    "image_1_uid",
    "ranking_id",
    "num_example_per_prompt",
)


def _uniqueness() -> list:
    import great_expectations.expectations as gxe

    return [
        gxe.ExpectTableRowCountToBeBetween(min_value=1),
        gxe.ExpectColumnValuesToBeUnique(column="ranking_id"),
        gxe.ExpectCompoundColumnsToBeUnique(column_list=["image_0_uid", "image_1_uid"], severity="warning"),
    ]


def _suites() -> dict[str, list]:
    import great_expectations.expectations as gxe

    return {
        "schema": [
            gxe.ExpectColumnValuesToNotBeNull(column="actual_type"),
            gxe.ExpectColumnPairValuesToBeEqual(
                column_A="actual_type", column_B="expected_type", ignore_row_if="either_value_is_missing"
            ),
        ],
        "values": [
            *(gxe.ExpectColumnValuesToNotBeNull(column=c) for c in NOT_NULL_COLUMNS),
            gxe.ExpectColumnValuesToMatchRegex(column="caption", regex=r"\S"),
            gxe.ExpectColumnValuesToMatchRegex(column="image_0_uid", regex=r"\S"),
            gxe.ExpectColumnValuesToMatchRegex(column="image_1_uid", regex=r"\S"),
            gxe.ExpectColumnValuesToBeInSet(column="label_0", value_set=LABEL_VALUES),
            gxe.ExpectColumnValuesToBeInSet(column="label_1", value_set=LABEL_VALUES),
            gxe.ExpectMulticolumnSumToEqual(column_list=["label_0", "label_1"], sum_total=1),
            gxe.ExpectColumnValuesToBeInSet(column="best_image_uid_consistent", value_set=[True]),
            gxe.ExpectColumnValuesToBeInSet(column="image_uids_differ", value_set=[True]),
            gxe.ExpectColumnValuesToBeBetween(column="num_example_per_prompt", min_value=1),
            gxe.ExpectColumnPairValuesToBeEqual(
                column_A="num_example_per_prompt",
                column_B="num_example_per_prompt_recount",
                severity="warning",
            ),
            # Within the chunk; the ``global`` suite repeats these over the whole split when it spans chunks.
            *_uniqueness(),
        ],
        "global": _uniqueness(),
        "jpeg_sample": [
            gxe.ExpectColumnValuesToBeInSet(column="jpg_0_decodable", value_set=[True]),
            gxe.ExpectColumnValuesToBeInSet(column="jpg_1_decodable", value_set=[True]),
        ],
    }


INDEX_COLUMNS = {
    "schema": ["column", "shards"],
    "values": ROW_ID_COLUMNS,
    "global": ROW_ID_COLUMNS,
    "jpeg_sample": ROW_ID_COLUMNS,
}


@dataclass
class Failure:
    split: str
    suite: str
    expectation: str
    target: str  # the column(s) it looks at
    severity: str
    unexpected: int = 0
    elements: int = 0
    examples: list[Any] = field(default_factory=list)
    note: str = ""

    def line(self) -> str:
        head = (
            f"[{self.split}] {self.expectation}({self.target})"
            if self.target
            else f"[{self.split}] {self.expectation}"
        )
        if self.suite == "schema":
            return f"{head}: {self.note}"
        parts = [head + ":"]
        if self.note:
            parts.append(self.note)
        elif self.elements:
            parts.append(f"{self.unexpected} of {self.elements} rows unexpected;")
        if self.examples:
            parts.append("e.g. " + "; ".join(_format_example(e) for e in self.examples[:MAX_EXAMPLES]))
        return " ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        return {
            "split": self.split,
            "suite": self.suite,
            "expectation": self.expectation,
            "target": self.target,
            "severity": self.severity,
            "unexpected_count": self.unexpected,
            "element_count": self.elements,
            "examples": [_jsonable(e) for e in self.examples[:MAX_EXAMPLES]],
            "note": self.note,
        }


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=lambda o: o.item() if hasattr(o, "item") else str(o)))


def _format_example(example: Any) -> str:
    if not isinstance(example, dict):
        return repr(example)
    where = ""
    if "source_file" in example:
        where = f"{example['source_file']} row {example.get('source_row')}"
        if example.get("ranking_id") is not None:
            where += f" (ranking_id {_scalar(example['ranking_id'])})"
    values = {k: v for k, v in example.items() if k not in ROW_ID_COLUMNS}
    shown = ", ".join(f"{k}={_scalar(v)!r}" for k, v in values.items())
    return f"{where}: {shown}" if where else shown


def _scalar(v: Any) -> Any:
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and v != v:
        return None
    return v


@dataclass
class ValidationReport:
    success: bool
    summary: str
    failures: list[Failure]
    warnings: list[Failure]
    report_dir: Path
    evaluated: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "success": self.success,
            "evaluated_expectations": self.evaluated,
            "failures": [f.to_dict() for f in self.failures],
            "warnings": [f.to_dict() for f in self.warnings],
            "report_dir": str(self.report_dir),
        }


def _normalise_type(t: pa.DataType) -> str:
    if pa.types.is_dictionary(t):
        t = t.value_type
    s = str(t)
    return _TYPE_ALIASES.get(s, s)


def schema_frame(schemas: dict[str, pa.Schema]):
    """One row per (distinct schema, required column): expected vs actual arrow type, and which shards."""
    import pandas as pd

    groups: dict[str, tuple[pa.Schema, list[str]]] = {}
    for rel, schema in schemas.items():
        groups.setdefault(schema.to_string(show_schema_metadata=False), (schema, []))[1].append(rel)
    rows = []
    for schema, shards in groups.values():
        shown = ", ".join(shards[:3]) + (f" (+{len(shards) - 3} more)" if len(shards) > 3 else "")
        for f in PICKAPIC_SCHEMA:
            idx = schema.get_field_index(f.name)
            rows.append(
                {
                    "column": f.name,
                    "expected_type": _normalise_type(f.type),
                    "actual_type": _normalise_type(schema.field(idx).type) if idx >= 0 else None,
                    "shards": shown,
                }
            )
    return pd.DataFrame(rows, columns=["column", "expected_type", "actual_type", "shards"])


def values_frame(chunk: pa.Table, recount: np.ndarray):
    """The metadata chunk as pandas plus the derived columns the ``values`` suite checks."""
    df = chunk.to_pandas()
    label_0, label_1 = df["label_0"].to_numpy(), df["label_1"].to_numpy()
    uid_0 = df["image_0_uid"].to_numpy(dtype=object)
    uid_1 = df["image_1_uid"].to_numpy(dtype=object)
    best = df["best_image_uid"].to_numpy(dtype=object)
    expected_best = np.where(label_0 == 1.0, uid_0, np.where(label_1 == 1.0, uid_1, ""))
    df["best_image_uid_consistent"] = best == expected_best
    df["image_uids_differ"] = uid_0 != uid_1
    df["num_example_per_prompt_recount"] = recount
    return df


def _decodable(data: bytes | None) -> bool:
    from PIL import Image

    if not data:
        return False
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.convert("RGB").load()
        return True
    except Exception:
        return False



# A parquet reader reads a column chunk whole (one Pick-a-Pic row group holds up to ~1,000 rows of ~0.5 MB of
# JPEG each, often in a single page), so a sampled row costs its row group's image bytes: the sample draws only
# from row groups up to JPEG_GROUP_BYTES and reads at most JPEG_SAMPLE_BYTES in all.
JPEG_GROUP_BYTES = 64 << 20
JPEG_SAMPLE_BYTES = 256 << 20


def jpeg_sample_rows(
    source: ParquetSource, meta: pa.Table, n: int, rng: np.random.Generator,
    group_bytes: int = JPEG_GROUP_BYTES, budget_bytes: int = JPEG_SAMPLE_BYTES,
) -> np.ndarray:
    """Up to ``n`` metadata rows (sorted) drawn at random among the rows whose row groups are small enough,
    such that the row groups they fall in hold at most ``budget_bytes`` of ``jpg_*`` bytes together."""
    files = np.asarray(meta.column("source_file").to_pylist(), dtype=object)
    rows = meta.column("source_row").to_numpy()
    group_key = np.zeros(meta.num_rows, np.int64)  # a global row-group id per metadata row
    cost = np.zeros(meta.num_rows, np.int64)
    next_id = 0
    for rel in sorted(set(files.tolist())):
        md = source.parquet_file(rel).metadata
        image_cols = [j for j in range(md.num_columns) if md.schema.column(j).name in ("jpg_0", "jpg_1")]
        ends = np.cumsum([md.row_group(g).num_rows for g in range(md.num_row_groups)])
        sizes = np.array(
            [sum(md.row_group(g).column(j).total_compressed_size for j in image_cols) for g in range(len(ends))],
            np.int64,
        )
        mask = files == rel
        groups = np.minimum(np.searchsorted(ends, rows[mask], side="right"), len(ends) - 1)
        group_key[mask], cost[mask] = next_id + groups, sizes[groups]
        next_id += len(ends)
    eligible = np.flatnonzero(cost <= min(group_bytes, budget_bytes))
    chosen, groups_read, spent = [], set(), 0
    for i in rng.permutation(eligible):
        g = int(group_key[i])
        if g not in groups_read:
            if spent + cost[i] > budget_bytes:
                continue
            groups_read.add(g)
            spent += int(cost[i])
        chosen.append(int(i))
        if len(chosen) == n:
            break
    return np.sort(np.asarray(chosen, np.int64))


class SourceValidator:
    """Runs the suites and collects their results; :meth:`finish` writes the report and returns it.

    Use as a context manager: on an exception before :meth:`finish` the temporary report is discarded and
    the previous ``report_dir`` stays as it was.
    """

    def __init__(
        self, report_dir: str | Path, *, jpeg_sample: int = 64, seed: int = 0, chunk_rows: int = 250_000
    ):
        import great_expectations as gx
        from great_expectations.data_context.types.base import ProgressBarsConfig

        # GX's filesystem store wants an absolute base_directory (paths.root is "." under `make run`).
        self.report_dir = Path(report_dir).resolve()
        self.report_dir.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.report_dir.name}.tmp-", dir=self.report_dir.parent))
        self.jpeg_sample = jpeg_sample
        self.seed = seed
        self.chunk_rows = chunk_rows
        self._gx = gx
        # GX announces the default docs site's temp dir at INFO; we delete that site right away.
        logging.getLogger("great_expectations.data_context.types.base").setLevel(logging.WARNING)
        ctx = gx.get_context(mode="ephemeral")
        ctx.variables.progress_bars = ProgressBarsConfig(globally=False)
        for site, site_cfg in list(ctx.list_data_docs_sites().items()):  # the default site's stray temp dir
            ctx.delete_data_docs_site(site)
            stray = site_cfg.get("store_backend", {}).get("base_directory")
            if stray and Path(stray).is_dir() and Path(stray).parent == Path(tempfile.gettempdir()):
                shutil.rmtree(stray, ignore_errors=True)
        ctx.add_data_docs_site(
            "spo",
            {
                "class_name": "SiteBuilder",
                "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
                "store_backend": {
                    "class_name": "TupleFilesystemStoreBackend",
                    "base_directory": str(self.tmp),
                },
            },
        )
        self.ctx = ctx
        self.datasource = ctx.data_sources.add_pandas(name="pickapic")
        self.suites = {
            name: ctx.suites.add(gx.ExpectationSuite(name=name, expectations=exps))
            for name, exps in _suites().items()
        }
        self._checkpoints: dict[tuple[str, str], Any] = {}
        self._failures: dict[tuple, Failure] = {}
        self._runs: list[dict[str, Any]] = []
        self._evaluated = 0

    def __enter__(self) -> SourceValidator:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.tmp.exists():
            shutil.rmtree(self.tmp, ignore_errors=True)

    # -- running

    def _checkpoint(self, split: str, suite: str):
        key = (split, suite)
        if key not in self._checkpoints:
            gx = self._gx
            name = f"{split}__{suite}"
            batch = self.datasource.add_dataframe_asset(name=name).add_batch_definition_whole_dataframe("all")
            vd = self.ctx.validation_definitions.add(
                gx.ValidationDefinition(name=name, data=batch, suite=self.suites[suite])
            )
            self._checkpoints[key] = self.ctx.checkpoints.add(
                gx.Checkpoint(
                    name=name,
                    validation_definitions=[vd],
                    # Data Docs are built once in finish(): rebuilding the site after every run costs ~1 s.
                    actions=[],
                    result_format={
                        "result_format": "SUMMARY",
                        "unexpected_index_column_names": INDEX_COLUMNS[suite],
                        # The schema suite lists every missing or mistyped column, not just the first few.
                        "partial_unexpected_count": len(PICKAPIC_SCHEMA) * 2
                        if suite == "schema"
                        else MAX_EXAMPLES,
                    },
                )
            )
        return self._checkpoints[key]

    def run_suite(self, split: str, suite: str, df, label: str) -> bool:
        from great_expectations.core.run_identifier import RunIdentifier

        result = self._checkpoint(split, suite).run(
            batch_parameters={"dataframe": df}, run_id=RunIdentifier(run_name=f"{split}-{label}")
        )
        suite_result = next(iter(result.run_results.values()))
        self._runs.append(
            {"split": split, "suite": suite, "run": label, "result": suite_result.to_json_dict()}
        )
        ok = True
        for r in suite_result.results:
            self._evaluated += 1
            if r.success:
                continue
            severity = getattr(r.expectation_config.severity, "value", str(r.expectation_config.severity))
            ok = ok and severity != "critical"
            self._record(split, suite, r, severity, len(df))
        return ok

    def _record(self, split: str, suite: str, r, severity: str, rows: int) -> None:
        cfg = r.expectation_config
        kwargs = cfg.kwargs
        target = kwargs.get("column") or ", ".join(
            kwargs.get("column_list") or [c for c in (kwargs.get("column_A"), kwargs.get("column_B")) if c]
        )
        key = (split, suite, cfg.type, target)
        fail = self._failures.setdefault(key, Failure(split, suite, cfg.type, target, severity))
        res = r.result or {}
        info = r.exception_info or {}
        if info.get("raised_exception"):
            fail.note = f"could not be evaluated: {str(info.get('exception_message')).splitlines()[0]}"
            return
        fail.unexpected += int(res.get("unexpected_count") or 0)
        fail.elements += int(res.get("element_count") or rows)
        examples = res.get("partial_unexpected_index_list") or res.get("partial_unexpected_list") or []
        fail.examples.extend(examples[: MAX_EXAMPLES - len(fail.examples)])
        if suite == "schema":
            fail.note = _schema_note(cfg.type, examples)
        elif "observed_value" in res and not res.get("unexpected_count"):
            fail.note = f"observed {res['observed_value']!r}"

    def add_error(self, split: str, message: str) -> None:
        """A problem found outside GX (no shards, an unreadable file): reported like a failed expectation."""
        self._failures[(split, "read", message)] = Failure(
            split, "read", "readable_source", "", "critical", note=message
        )

    # -- suites

    def check_schema(self, split: str, schemas: dict[str, pa.Schema]) -> bool:
        return self.run_suite(split, "schema", schema_frame(schemas), "schema")

    def check_values(self, split: str, meta: pa.Table) -> bool:
        from spo.progress import tqdm

        recount = examples_per_caption(meta.column("caption"))
        ok = True
        starts = list(range(0, meta.num_rows, self.chunk_rows)) or [0]
        for i, start in enumerate(
            tqdm(starts, desc=f"validate {split}", leave=False, disable=None if len(starts) > 2 else True)
        ):
            chunk = meta.slice(start, self.chunk_rows)
            ok &= self.run_suite(
                split, "values", values_frame(chunk, recount[start : start + chunk.num_rows]), f"chunk-{i}"
            )
        if len(starts) > 1:
            ids = meta.select(
                ["ranking_id", "image_0_uid", "image_1_uid", "source_file", "source_row"]
            ).to_pandas()
            ok &= self.run_suite(split, "global", ids, "global")
        return ok

    def check_jpegs(self, split: str, source: ParquetSource, meta: pa.Table) -> bool:
        import pandas as pd

        n = min(self.jpeg_sample, meta.num_rows)
        if n == 0:
            return True
        # One seeded stream per split name, so adding a split does not change another's sample.
        rng = np.random.default_rng([self.seed, *split.encode()])
        picks = jpeg_sample_rows(source, meta, n, rng)
        if picks.size == 0:
            self._failures[(split, "jpeg_sample", "skipped")] = Failure(
                split, "jpeg_sample", "jpeg_sample_skipped", "jpg_0, jpg_1", "warning",
                note=f"not checked: every row group holds more than {JPEG_GROUP_BYTES >> 20} MiB of image bytes, "
                "and a parquet reader cannot read less than a row group; decodability is checked while "
                "training (spm.on_bad_image)",
            )
            return True
        sample = meta.take(pa.array(picks)).select(ROW_ID_COLUMNS)
        files = sample.column("source_file").to_pylist()
        rows = sample.column("source_row").to_numpy()
        ok0, ok1 = np.zeros(picks.size, bool), np.zeros(picks.size, bool)
        for rel in sorted(set(files)):
            sel = np.array([f == rel for f in files])
            got = read_rows(source, rel, rows[sel], ["jpg_0", "jpg_1"])
            ok0[sel] = [_decodable(b) for b in got.column("jpg_0").to_pylist()]
            ok1[sel] = [_decodable(b) for b in got.column("jpg_1").to_pylist()]
        df = sample.to_pandas()
        df["jpg_0_decodable"] = pd.Series(ok0, dtype=bool)
        df["jpg_1_decodable"] = pd.Series(ok1, dtype=bool)
        return self.run_suite(split, "jpeg_sample", df, "jpeg-sample")

    # -- report

    def finish(self, context: str = "") -> ValidationReport:
        """Write the report (Data Docs, JSON, summary) into ``report_dir`` and return it."""
        failures = [f for f in self._failures.values() if f.severity == "critical"]
        warnings = [f for f in self._failures.values() if f.severity != "critical"]
        summary = _summary(failures, warnings, self._evaluated, self.report_dir, context)
        report = ValidationReport(
            success=not failures,
            summary=summary,
            failures=failures,
            warnings=warnings,
            report_dir=self.report_dir,
            evaluated=self._evaluated,
        )
        self.ctx.build_data_docs(site_names=["spo"])
        atomic_write_json(self.tmp / "validation_result.json", {**report.to_dict(), "runs": self._runs})
        atomic_write_text(self.tmp / "summary.txt", summary + "\n")
        replace_dir(self.tmp, self.report_dir)
        return report


def _schema_note(expectation: str, examples: list[dict]) -> str:
    if expectation == "expect_column_values_to_not_be_null":
        by_shards: dict[str, list[str]] = {}
        for e in examples:
            by_shards.setdefault(e.get("shards", "?"), []).append(e.get("column", "?"))
        return "; ".join(
            f"missing column(s) {', '.join(cols)} in {shards}" for shards, cols in by_shards.items()
        )
    if expectation == "expect_column_pair_values_to_be_equal":
        return "; ".join(
            f"column {e.get('column')} is {e.get('actual_type')} (expected {e.get('expected_type')}) in {e.get('shards')}"
            for e in examples
        )
    return "schema mismatch"


def _summary(
    failures: list[Failure], warnings: list[Failure], evaluated: int, report_dir: Path, context: str
) -> str:
    where = f" ({context})" if context else ""
    if not failures:
        head = f"source data passed validation{where}: {evaluated} expectation results"
        if warnings:
            head += f", {len(warnings)} warning(s):"
            return "\n".join([head, *("  - " + w.line() for w in warnings)])
        return head
    lines = [f"source data failed validation{where}: {len(failures)} failed expectation(s):"]
    lines += ["  - " + f.line() for f in failures]
    if warnings:
        lines.append(f"  and {len(warnings)} warning(s):")
        lines += ["  - " + w.line() for w in warnings]
    lines.append(
        f"Report: {report_dir / 'index.html'} (Data Docs), {report_dir / 'validation_result.json'}. "
        "Fix the source or point data.source at a clean copy, then run `spo prepare` again; "
        "the previous data/prepared/ was left untouched."
    )
    return "\n".join(lines)
