"""`spo prepare` end to end: a hand-built source in the real schema, each GX failure case through the CLI
(non-zero exit, readable summary, report written, previous outputs untouched), atomicity, and the tiny
world from `spo synth` through prepare into the SPM's PairStream."""

from __future__ import annotations

import io
import json
import re
import shutil
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
from PIL import Image
from spo_test_helpers import SMALL, make_cfg

from spo import tracking
from spo.cli import main
from spo.data.pickapic import PairStream, read_prompts, resolve_source
from spo.errors import DataValidationError
from spo.utils import hash_tree

# The real schema, written out by hand from shared/reference/pickapic.md (not imported from spo).
REAL_SCHEMA = pa.schema(
    [
        ("are_different", pa.bool_()),
        ("best_image_uid", pa.string()),
        ("caption", pa.string()),
        ("created_at", pa.timestamp("ns")),
        ("has_label", pa.bool_()),
        ("image_0_uid", pa.string()),
        ("image_0_url", pa.string()),
        ("image_1_uid", pa.string()),
        ("image_1_url", pa.string()),
        ("jpg_0", pa.binary()),
        ("jpg_1", pa.binary()),
        ("label_0", pa.float64()),
        ("label_1", pa.float64()),
        ("model_0", pa.string()),
        ("model_1", pa.string()),
        ("ranking_id", pa.int64()),
        ("user_id", pa.int64()),
        ("num_example_per_prompt", pa.int64()),
        ("__index_level_0__", pa.int64()),
    ]
)


def jpeg(color: tuple[int, int, int], size: int = 40) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def row(rid: int, caption: str, label_0: float, has_label: bool = True, are_different: bool = True) -> dict:
    u0, u1 = f"img-{rid}-a", f"img-{rid}-b"
    best = u0 if label_0 == 1.0 else u1 if label_0 == 0.0 else ""
    return {
        "are_different": are_different,
        "best_image_uid": best,
        "caption": caption,
        "created_at": datetime(2023, 5, 1) + timedelta(minutes=rid),
        "has_label": has_label,
        "image_0_uid": u0,
        "image_0_url": f"https://example.invalid/{u0}.png",
        "image_1_uid": u1,
        "image_1_url": f"https://example.invalid/{u1}.png",
        "jpg_0": jpeg((200, 30, 30)),
        "jpg_1": jpeg((30, 30, 200)) if are_different else jpeg((200, 30, 30)),
        "label_0": label_0,
        "label_1": 1.0 - label_0,
        "model_0": "sd-2.1",
        "model_1": "sdxl-beta",
        "ranking_id": rid,
        "user_id": 11,
        "num_example_per_prompt": 0,  # filled in below
        "__index_level_0__": rid,
    }


# Hand-built splits; the expected outputs below are counted by hand from these lines.
TRAIN = [
    row(0, "a red circle", 1.0),
    row(1, "a red circle", 0.5),  # tie
    row(2, "a red circle", 0.0, are_different=False),
    row(3, "A Red  Circle", 1.0),  # another exact caption, same prompt after normalisation
    row(4, "a blue square", 0.0),
    row(5, "a blue square", 0.5, has_label=False),  # no label: not an SPM pair
    row(6, "\uff42\uff49\uff47  star", 1.0),  # fullwidth "big": NFKC -> "big star"
    row(7, "big star", 0.0),
]
VALIDATION = [
    row(100, "v one", 1.0),
    row(101, "v one", 0.0),
    row(102, "v two", 0.5),
    row(103, "v two", 0.5, has_label=False),
]
VALIDATION_UNIQUE = [row(200, "v one", 1.0), row(201, "V  ONE", 0.0), row(202, "v two", 1.0)]


def table(rows: list[dict]) -> pa.Table:
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["caption"]] = counts.get(r["caption"], 0) + 1
    rows = [{**r, "num_example_per_prompt": counts[r["caption"]]} for r in rows]
    return pa.Table.from_pylist(rows, schema=REAL_SCHEMA)


def write_source(root: Path, train: pa.Table | None = None) -> None:
    data = root / "data"
    data.mkdir(parents=True, exist_ok=True)
    train = table(TRAIN) if train is None else train
    pq.write_table(train.slice(0, 5), data / "train-00000-of-00002.parquet", row_group_size=2)
    pq.write_table(train.slice(5), data / "train-00001-of-00002.parquet", row_group_size=2)
    pq.write_table(table(VALIDATION), data / "validation-00000-of-00001.parquet")
    pq.write_table(table(VALIDATION_UNIQUE), data / "validation_unique-00000-of-00001.parquet")


def cli_prepare(root: Path, *extra: str) -> int:
    # Tracking off: these tests are about prepare, and an MLflow run per call costs seconds.
    sets = [f"paths.root={root}", *SMALL, "data.source=src", "tracking.enabled=false", *extra]
    return main(
        [
            "prepare",
            "--preset",
            "tiny",
            "--params",
            "/dev/null",
            *sum((["--set", s] for s in sets), []),
        ]
    )


class Recorder(tracking.Tracker):
    def __init__(self):
        self.params, self.metrics, self.artifacts = {}, {}, []

    def log_params(self, params):
        self.params.update(params)

    def log_metrics(self, metrics, step=None):
        self.metrics.update(metrics)

    def log_artifact(self, path, artifact_path=None):
        self.artifacts.append(Path(path).name)


@pytest.fixture(scope="module")
def prepared_project(tmp_path_factory):
    """A hand-built source, prepared once; tests copy it before changing anything."""
    root = tmp_path_factory.mktemp("handbuilt")
    write_source(root / "src")
    recorder = Recorder()
    with tracking.use(recorder):
        from spo.stages import prepare

        summary = prepare.run(make_cfg(root, "data.source=src"))
    return root, summary, recorder


def pairs_by_rid(path: Path) -> dict[int, dict]:
    return {r["ranking_id"]: r for r in ds.dataset(path).to_table().to_pylist()}


def test_hand_built_source_goes_through_prepare(prepared_project):
    root, summary, _ = prepared_project
    out = root / "data" / "prepared"
    train = pairs_by_rid(out / "spm_train")
    assert sorted(train) == [0, 1, 2, 3, 4, 6, 7]  # row 5 has no label
    expected_n = {0: 3, 1: 3, 2: 3, 3: 1, 4: 1, 6: 1, 7: 1}  # exact-caption counts over the kept rows
    for rid, r in train.items():
        assert r["num_example_per_prompt"] == expected_n[rid]
        assert r["weight"] == pytest.approx(1 / expected_n[rid])
        assert (r["label_0"], r["label_1"]) == (TRAIN[rid]["label_0"], TRAIN[rid]["label_1"])
    assert (train[1]["label_0"], train[1]["label_1"]) == (0.5, 0.5)
    # The reference back to the source row, shard by shard.
    assert (train[4]["source_file"], train[4]["source_row"]) == ("data/train-00000-of-00002.parquet", 4)
    assert (train[6]["source_file"], train[6]["source_row"]) == ("data/train-00001-of-00002.parquet", 1)
    assert "jpg_0" not in ds.dataset(out / "spm_train").schema.names

    val = pairs_by_rid(out / "spm_val")
    assert sorted(val) == [100, 101, 102]
    assert {rid: r["num_example_per_prompt"] for rid, r in val.items()} == {100: 2, 101: 2, 102: 1}

    assert read_prompts(out / "prompts_train.txt") == [
        "a red circle",
        "a blue square",
        "\uff42\uff49\uff47 star",
    ]
    assert read_prompts(out / "prompts_val.txt") == ["v one", "v two"]

    card = json.loads((out / "data_card.json").read_text())
    assert card["counts"]["spm_train"] == {
        "source_rows": 8,
        "dropped_unlabeled": 1,
        "dropped_identical": 0,
        "dropped_limit_per_prompt": 0,
        "dropped_cap": 0,
        "pairs": 7,
        "ties": 1,
        "decisive": 6,
        "captions": 5,
    }
    assert card["counts"]["prompts_train"] == {"source_rows": 8, "unique": 3, "written": 3}
    assert card["source"]["root"] == "src"
    assert set(card["source"]["splits"]["train"]["shards"]) == {
        "data/train-00000-of-00002.parquet",
        "data/train-00001-of-00002.parquet",
    }
    for name, entry in card["outputs"].items():
        assert entry["sha256"] == hash_tree(out / name)
    assert summary["spm_train_pairs"] == 7 and summary["spm_val_ties"] == 1


def test_prepare_logs_counts_and_the_data_card(prepared_project):
    _, _, recorder = prepared_project
    assert recorder.metrics["data/spm_train_pairs"] == 7.0
    assert recorder.metrics["data/spm_train_ties"] == 1.0
    assert recorder.params["data.keep_only_different"] is False
    assert "data_card.json" in recorder.artifacts and "summary.txt" in recorder.artifacts


def test_validation_report_is_written_on_success(prepared_project):
    root, _, _ = prepared_project
    report = root / "reports" / "data_validation"
    result = json.loads((report / "validation_result.json").read_text())
    assert result["success"] is True and result["failures"] == []
    assert {r["suite"] for r in result["runs"]} == {"schema", "values", "jpeg_sample"}
    assert (report / "index.html").exists()


def test_filters_through_the_cli(prepared_project, tmp_path, capfd):
    root = tmp_path / "p"
    shutil.copytree(prepared_project[0], root)
    assert cli_prepare(root, "data.keep_only_different=true", "data.limit_examples_per_prompt=1") == 0
    train = pairs_by_rid(root / "data" / "prepared" / "spm_train")
    # keep_only_different drops row 2; then one of rows {0, 1} stays for "a red circle".
    assert len(train) == 5 and len({0, 1} & set(train)) == 1 and {3, 4, 6, 7} <= set(train)
    # The stage ends with one summary line carrying the counts just checked.
    assert re.search(r"prepare finished in [0-9.]+ s: spm_train_pairs=5, ", capfd.readouterr().err)
    assert all(r["num_example_per_prompt"] == 1 and r["weight"] == 1.0 for r in train.values())


def _drop_column(t: pa.Table) -> pa.Table:
    return t.drop_columns(["label_0"])


def _set(t: pa.Table, column: str, index: int, value) -> pa.Table:
    values = t.column(column).to_pylist()
    values[index] = value
    return t.set_column(
        t.schema.get_field_index(column), column, pa.array(values, t.schema.field(column).type)
    )


FAILURES = {
    # case: (corrupt the train table, text the summary must contain)
    "missing column": (_drop_column, ["missing column(s) label_0", "train-0000"]),
    "label out of range": (
        lambda t: _set(_set(t, "label_0", 4, 2.0), "label_1", 4, -1.0),
        ["expect_column_values_to_be_in_set(label_0)", "1 of 8 rows", "ranking_id 4"],
    ),
    "labels not summing to 1": (
        lambda t: _set(t, "label_1", 0, 1.0),
        ["expect_multicolumn_sum_to_equal(label_0, label_1)", "ranking_id 0"],
    ),
    "corrupt jpeg": (
        lambda t: _set(t, "jpg_1", 6, b"\xff\xd8\xff\xe0 this is not a jpeg"),
        ["expect_column_values_to_be_in_set(jpg_1_decodable)", "ranking_id 6"],
    ),
    "empty caption": (
        lambda t: _set(t, "caption", 3, "   "),
        ["expect_column_values_to_match_regex(caption)", "ranking_id 3"],
    ),
}


@pytest.mark.parametrize("case", list(FAILURES))
def test_each_validation_failure_exits_non_zero_and_keeps_previous_outputs(
    case, prepared_project, tmp_path, capsys
):
    root = tmp_path / "p"
    shutil.copytree(prepared_project[0], root)
    prepared = root / "data" / "prepared"
    before = hash_tree(prepared)
    corrupt, expected_text = FAILURES[case]
    t = corrupt(table(TRAIN))
    pq.write_table(t.slice(5), root / "src" / "data" / "train-00001-of-00002.parquet")
    pq.write_table(t.slice(0, 5), root / "src" / "data" / "train-00000-of-00002.parquet")
    capsys.readouterr()

    assert cli_prepare(root) == DataValidationError.exit_code != 0
    err = capsys.readouterr().err
    assert "failed validation" in err and "Traceback" not in err
    for text in expected_text:
        assert text in err, f"{text!r} not in:\n{err}"
    assert hash_tree(prepared) == before
    assert not [p for p in root.glob("data/.prepared.tmp-*")]
    report = root / "reports" / "data_validation"
    result = json.loads((report / "validation_result.json").read_text())
    assert result["success"] is False and result["failures"]
    assert (report / "index.html").exists() and (report / "summary.txt").read_text().strip() in err


def test_a_crash_while_writing_leaves_previous_outputs(prepared_project, tmp_path, monkeypatch):
    root = tmp_path / "p"
    shutil.copytree(prepared_project[0], root)
    prepared = root / "data" / "prepared"
    before = hash_tree(prepared)
    import spo.data.pickapic as pickapic

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(pickapic, "write_prompts", boom)
    from spo.stages import prepare

    with pytest.raises(RuntimeError, match="disk full"):
        prepare.run(make_cfg(root, "data.source=src", "data.num_train_prompts=2"))
    assert hash_tree(prepared) == before
    assert sorted(p.name for p in (root / "data").iterdir()) == ["prepared"]  # no temp folder left behind


def test_no_source_gives_a_clear_error(tmp_path, capsys):
    assert cli_prepare(tmp_path) != 0
    err = capsys.readouterr().err
    assert "data.source" in err and "spo synth" in err and "Traceback" not in err


# ------------------------------------------------------------------------------- synth -> prepare


@pytest.fixture(scope="module")
def tiny_world(tmp_path_factory):
    from spo.stages import prepare, synth

    root = tmp_path_factory.mktemp("tiny")
    cfg = make_cfg(root)
    first = synth.run(cfg)
    prepare.run(cfg)
    return cfg, first


def test_synth_skips_when_up_to_date_and_regenerates_when_changed(tiny_world):
    from spo.stages import synth

    cfg, first = tiny_world
    assert first["skipped"] is False
    assert synth.run(cfg)["skipped"] is True
    shard = cfg.paths.raw_data / "data" / "validation-00000-of-00001.parquet"
    original = shard.read_bytes()
    shard.write_bytes(original[:-10])  # a damaged file is not "up to date"
    assert synth.run(cfg)["skipped"] is False
    assert shard.read_bytes() == original
    assert synth.run(cfg, force=True)["skipped"] is False


def test_synth_leaves_a_placeholder_for_real_presets(tmp_path):
    from spo.config import load_config
    from spo.stages import synth

    cfg = load_config("sd15", [f"paths.root={tmp_path}"], params_file=None)
    result = synth.run(cfg)
    assert result["skipped"] is True and "tiny preset" in result["reason"]
    assert [p.name for p in cfg.paths.raw_data.iterdir()] == ["README.txt"]


def test_tiny_world_prepares_and_streams_into_spm_batches(tiny_world):
    cfg, _ = tiny_world
    out = cfg.paths.prepared
    train = ds.dataset(out / "spm_train").to_table()
    card = json.loads((out / "data_card.json").read_text())
    assert train.num_rows == card["counts"]["spm_train"]["pairs"] > 200
    assert len(read_prompts(out / "prompts_train.txt")) == cfg.data.num_train_prompts
    assert len(read_prompts(out / "prompts_val.txt")) == cfg.synthetic.unique_rows
    stream = PairStream(out / "spm_train", resolve_source(cfg), resolution=32, batch_size=16, seed=0)
    batch = next(iter(stream.iter_epoch(0)))
    assert batch["image_0"].shape == (16, 3, 32, 32)
    assert batch["image_0"].min() >= -1 and batch["image_0"].max() <= 1
    labels = np.stack([batch["label_0"].numpy(), batch["label_1"].numpy()])
    assert np.allclose(labels.sum(0), 1.0)
