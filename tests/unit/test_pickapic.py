"""Pick-a-Pic reader: pair filters, ties, weights, prompt dedup, image decoding and the SPM pair stream,
each checked against hand-computed expectations."""

from __future__ import annotations

import io
import os
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from spo.config import SyntheticConfig
from spo.data import pickapic as P
from spo.data.synthetic import generate_dataset
from spo.errors import DataValidationError, SPOError

# --------------------------------------------------------------------------------------------- pairs

# (caption, label_0, has_label, are_different); row i lives in shard "a" for i < 6, else "b".
ROWS = [
    ("cat", 1.0, True, True),  # 0
    ("cat", 0.5, True, True),  # 1  tie
    ("cat", 0.0, True, False),  # 2  identical images
    ("dog", 0.5, False, True),  # 3  unlabeled
    ("dog", 0.0, True, True),  # 4
    ("bird", 1.0, True, True),  # 5
    ("cat", 0.0, True, True),  # 6
    ("bird", 0.5, True, False),  # 7  tie, identical images
    ("fish", 0.5, False, True),  # 8  unlabeled: the caption disappears from the pairs
]


def meta_table(rows=ROWS) -> pa.Table:
    n = len(rows)
    return pa.table(
        {
            "caption": [r[0] for r in rows],
            "label_0": [r[1] for r in rows],
            "label_1": [1.0 - r[1] for r in rows],
            "has_label": [r[2] for r in rows],
            "are_different": [r[3] for r in rows],
            "ranking_id": pa.array(range(100, 100 + n), pa.int64()),
            "image_0_uid": [f"u{i}a" for i in range(n)],
            "image_1_uid": [f"u{i}b" for i in range(n)],
            "model_0": ["m"] * n,
            "model_1": ["m"] * n,
            "user_id": pa.array([7] * n, pa.int64()),
            "num_example_per_prompt": pa.array([99] * n, pa.int64()),
            # Shard b listed first and rows out of order: the output must come back sorted.
            "source_file": ["a" if i < 6 else "b" for i in range(n)],
            "source_row": pa.array([i if i < 6 else i - 6 for i in range(n)], pa.int64()),
        }
    ).take(pa.array([8, 7, 6, 5, 4, 3, 2, 1, 0]))


def as_rows(table: pa.Table) -> dict[int, dict]:
    return {r["ranking_id"] - 100: r for r in table.to_pylist()}


def test_default_keeps_labeled_rows_with_ties_and_recounts_per_caption():
    table, counts = P.build_pairs(meta_table())
    rows = as_rows(table)
    assert sorted(rows) == [0, 1, 2, 4, 5, 6, 7]  # 3 and 8 have no label
    # Hand count over the kept rows: cat {0,1,2,6} = 4, dog {4} = 1, bird {5,7} = 2.
    expected_n = {0: 4, 1: 4, 2: 4, 6: 4, 4: 1, 5: 2, 7: 2}
    for i, r in rows.items():
        assert r["num_example_per_prompt"] == expected_n[i]
        assert r["weight"] == pytest.approx(1.0 / expected_n[i])
        assert r["source_num_example_per_prompt"] == 99
    assert (rows[1]["label_0"], rows[1]["label_1"]) == (0.5, 0.5)
    assert (rows[7]["label_0"], rows[7]["label_1"]) == (0.5, 0.5)
    assert counts == {
        "source_rows": 9,
        "dropped_unlabeled": 2,
        "dropped_identical": 0,
        "dropped_limit_per_prompt": 0,
        "dropped_cap": 0,
        "pairs": 7,
        "ties": 2,
        "decisive": 5,
        "captions": 3,
    }
    # Sorted by (source_file, source_row) for sequential reads; exact columns.
    keys = list(
        zip(table.column("source_file").to_pylist(), table.column("source_row").to_pylist(), strict=True)
    )
    assert keys == sorted(keys)
    assert table.column_names == list(P.PAIR_COLUMNS)
    # Each caption weighs 1 in total.
    totals = Counter()
    for r in rows.values():
        totals[r["caption"]] += r["weight"]
    assert all(t == pytest.approx(1.0) for t in totals.values())


def test_keep_only_different_drops_identical_pairs_and_recounts():
    table, counts = P.build_pairs(meta_table(), keep_only_different=True)
    rows = as_rows(table)
    assert sorted(rows) == [0, 1, 4, 5, 6]
    assert {i: r["num_example_per_prompt"] for i, r in rows.items()} == {0: 3, 1: 3, 6: 3, 4: 1, 5: 1}
    assert counts["dropped_identical"] == 2 and counts["ties"] == 1


def test_limit_examples_per_prompt_is_a_seeded_choice_within_each_caption():
    chosen = set()
    for seed in range(12):
        table, counts = P.build_pairs(meta_table(), limit_examples_per_prompt=2, seed=seed)
        rows = as_rows(table)
        per_caption = Counter(r["caption"] for r in rows.values())
        assert per_caption == {"cat": 2, "dog": 1, "bird": 2}
        assert all(r["num_example_per_prompt"] == per_caption[r["caption"]] for r in rows.values())
        assert counts["dropped_limit_per_prompt"] == 2  # cat had 4
        cats = frozenset(i for i, r in rows.items() if r["caption"] == "cat")
        assert cats <= {0, 1, 2, 6}
        chosen.add(cats)
        again, _ = P.build_pairs(meta_table(), limit_examples_per_prompt=2, seed=seed)
        assert again.equals(table)
    assert len(chosen) > 1  # the seed matters: not always the first two


def test_max_pairs_caps_with_a_seeded_sample():
    table, counts = P.build_pairs(meta_table(), max_pairs=3, seed=5)
    assert table.num_rows == 3 and counts["dropped_cap"] == 4
    rows = as_rows(table)
    per_caption = Counter(r["caption"] for r in rows.values())
    assert all(r["num_example_per_prompt"] == per_caption[r["caption"]] for r in rows.values())
    assert P.build_pairs(meta_table(), max_pairs=3, seed=5)[0].equals(table)


def test_examples_per_caption_counts_exact_captions():
    got = P.examples_per_caption(pa.chunked_array([["x", "y"], ["x", "X", "x"]]))
    assert got.tolist() == [3, 1, 3, 1, 3]


# ------------------------------------------------------------------------------------------- prompts


def test_dedup_normalises_unicode_case_and_whitespace_and_keeps_the_first_spelling():
    captions = [
        "A Cat",
        "a  cat",
        "\uff41 CAT",  # fullwidth a: NFKC makes it "a"
        "Straße",
        "STRASSE",  # casefold(ß) == "ss"
        "dog\n  running ",
        "Dog running",
        "",
        "   ",
        None,
        "ﬁsh",  # the fi ligature: NFKC -> "fish"
        "fish",
    ]
    assert P.dedup_prompts(pa.array(captions)) == ["A Cat", "Straße", "dog running", "ﬁsh"]
    assert P.dedup_prompts([c for c in captions if c is not None]) == [
        "A Cat",
        "Straße",
        "dog running",
        "ﬁsh",
    ]


def test_streaming_dedup_over_batches_equals_one_pass():
    captions = [f"prompt {i % 7}" if i % 3 else f"PROMPT  {i % 7}" for i in range(50)]
    d = P.PromptDeduper()
    for start in range(0, 50, 8):
        d.add(pa.array(captions[start : start + 8]))
    assert d.prompts == P.dedup_prompts(captions)
    assert d.rows == 50 and len(d.prompts) == 7


def test_sample_prompts_is_seeded_ordered_and_bounded():
    prompts = [f"p{i}" for i in range(100)]
    a = P.sample_prompts(prompts, 10, seed=3)
    assert a == P.sample_prompts(prompts, 10, seed=3)
    assert a != P.sample_prompts(prompts, 10, seed=4)
    assert len(a) == 10 and len(set(a)) == 10
    assert a == sorted(a, key=prompts.index)
    assert P.sample_prompts(prompts, 500, seed=0) == prompts


def test_prompt_files_round_trip(tmp_path):
    prompts = ["a red circle", "ünïcode prompt", "x"]
    P.write_prompts(tmp_path / "p.txt", prompts)
    assert (tmp_path / "p.txt").read_text(encoding="utf-8") == "a red circle\nünïcode prompt\nx\n"
    assert P.read_prompts(tmp_path / "p.txt") == prompts
    with pytest.raises(SPOError, match="spo prepare"):
        P.read_prompts(tmp_path / "missing.txt")


# -------------------------------------------------------------------------------------------- source


def test_source_resolves_relative_to_root_and_lists_split_shards(tmp_path):
    data = tmp_path / "proj" / "raw" / "data"
    data.mkdir(parents=True)
    for name in [
        "validation-00000-of-00001.parquet",
        "validation_unique-00000-of-00001.parquet",
        "train-00001-of-00002.parquet",
        "train-00000-of-00002.parquet",
    ]:
        pq.write_table(pa.table({"caption": ["x"]}), data / name)
    src = P.ParquetSource.open("raw", root=tmp_path / "proj")
    assert src.kind == "local" and src.root == str((tmp_path / "proj" / "raw").resolve())
    assert src.shards("train") == ["data/train-00000-of-00002.parquet", "data/train-00001-of-00002.parquet"]
    assert src.shards("validation") == ["data/validation-00000-of-00001.parquet"]
    with pytest.raises(DataValidationError, match="no parquet shards for split 'test'"):
        src.require_shards("test")
    fp = src.fingerprint("data/train-00000-of-00002.parquet")
    assert fp["size"] == os.path.getsize(data / "train-00000-of-00002.parquet") and len(fp["sha256"]) == 64


def test_hub_id_offline_and_missing_dir_give_clear_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    with pytest.raises(SPOError, match="HF_HUB_OFFLINE.*data.source"):
        P.ParquetSource.open("pickapic-anonymous/pickapic_v1")
    with pytest.raises(SPOError, match="neither an existing directory"):
        P.ParquetSource.open("./no/such/dir", root=tmp_path)


def test_footer_fingerprint_changes_when_a_large_file_changes(tmp_path):
    path = tmp_path / "x.parquet"
    pq.write_table(pa.table({"v": list(range(1000))}), path)
    before = P._footer_sha256(path)
    pq.write_table(pa.table({"v": list(range(1, 1001))}), path)
    assert P._footer_sha256(path) != before  # statistics differ


def test_read_rows_fetches_any_rows_from_the_right_row_groups(tmp_path):
    path = tmp_path / "s.parquet"
    pq.write_table(pa.table({"v": list(range(10)), "w": [str(i) for i in range(10)]}), path, row_group_size=3)
    src = P.ParquetSource(ref=str(tmp_path), kind="local", root=str(tmp_path))
    got = P.read_rows(src, "s.parquet", np.array([7, 0, 4, 9]), ["v", "w"])
    assert got.column("v").to_pylist() == [7, 0, 4, 9] and got.column("w").to_pylist() == ["7", "0", "4", "9"]
    with pytest.raises(DataValidationError, match="source changed"):
        P.read_rows(src, "s.parquet", np.array([10]), ["v"])


# -------------------------------------------------------------------------------------------- images


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")  # lossless, so values are exact
    return buf.getvalue()


def test_decode_image_centre_crops_the_long_side():
    img = np.zeros((32, 64, 3), np.uint8)  # H=32, W=64: no resize at R=32, crop columns 16..47
    img[:, :32] = (255, 0, 0)
    img[:, 32:] = (0, 0, 255)
    out = P.decode_image(_png(img), 32)
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32
    red = torch.tensor([1.0, -1.0, -1.0]).view(3, 1, 1)
    blue = torch.tensor([-1.0, -1.0, 1.0]).view(3, 1, 1)
    assert torch.equal(out[:, :, :16], red.expand(3, 32, 16))
    assert torch.equal(out[:, :, 16:], blue.expand(3, 32, 16))


def test_decode_image_resizes_with_antialiasing_and_converts_to_rgb():
    checker = (np.indices((128, 128)).sum(0) % 2 * 255).astype(np.uint8)  # 1-px checkerboard, gray mode
    out = P.decode_image(_png(checker), 32)
    assert out.shape == (3, 32, 32)
    # An antialiased 4x shrink averages the checkerboard to mid-gray; a nearest/no-AA resize would not.
    assert out.mean().abs() < 0.02 and out.std() < 0.05
    rgba = np.zeros((48, 40, 4), np.uint8)
    rgba[..., 1] = 255
    rgba[..., 3] = 255
    out = P.decode_image(_png(rgba), 16)  # shortest side 40 -> 16, then a centre crop of 16 x 16
    assert out.shape == (3, 16, 16)
    assert torch.allclose(out[1], torch.ones(16, 16), atol=1e-6) and torch.allclose(
        out[0], -torch.ones(16, 16), atol=1e-6
    )


# ---------------------------------------------------------------------------------------- PairStream


@pytest.fixture(scope="module")
def stream_world(tmp_path_factory):
    """A small tiny-world source plus a pair table built from it (no GX needed here)."""
    root = tmp_path_factory.mktemp("stream")
    generate_dataset(
        root / "src",
        SyntheticConfig(train_rows=70, validation_rows=4, test_rows=2, unique_rows=2, train_shards=3),
    )
    src = P.ParquetSource.open(root / "src")
    meta = P.read_metadata(src, "train", batch_rows=16)
    pairs, _ = P.build_pairs(meta)
    P.write_pairs(root / "pairs", pairs)
    return root, src, pairs


def _stream(root, src, **kw):
    args = dict(resolution=32, batch_size=8, seed=3, lanes=2, shuffle_row_groups=1)
    args.update(kw)
    return P.PairStream(root / "pairs", src, **args)


def test_pair_stream_epochs_are_deterministic_permutations(stream_world):
    root, src, pairs = stream_world
    s = _stream(root, src, drop_last=False)
    n = pairs.num_rows
    assert len(s) == -(-n // 8)
    e0 = np.concatenate(s.batch_indices(0))
    assert sorted(e0.tolist()) == list(range(n))
    assert np.array_equal(e0, np.concatenate(_stream(root, src, drop_last=False).batch_indices(0)))
    assert not np.array_equal(e0, np.concatenate(s.batch_indices(1)))
    assert len(_stream(root, src).batch_indices(0)) == n // 8 == len(_stream(root, src))
    one_lane = np.concatenate(_stream(root, src, shuffle=False, drop_last=False, lanes=1).batch_indices(0))
    assert one_lane.tolist() == list(range(n))
    # Two lanes, 70 pairs in 9 batches: lane 0 takes batches 0, 2, .., 8 (the last one short: 4 x 8 + 6 = 38
    # pairs, rows 0-37), lane 1 batches 1, 3, 5, 7 (rows 38-69); the batches alternate between them.
    assert n == 70
    two = _stream(root, src, shuffle=False, drop_last=False).batch_indices(0)
    assert [int(b[0]) for b in two] == [0, 38, 8, 46, 16, 54, 24, 62, 32] and len(two[-1]) == 6


def test_pair_stream_batches_carry_the_right_images_and_labels(stream_world):
    root, src, pairs = stream_world
    s = _stream(root, src)
    batches = list(s.iter_epoch(0))
    assert len(batches) == len(s)
    by_rid = {r["ranking_id"]: r for r in pairs.to_pylist()}
    b = batches[1]
    assert b["image_0"].shape == (8, 3, 32, 32) and b["image_1"].shape == (8, 3, 32, 32)
    assert b["ranking_id"].dtype == torch.long and b["label_0"].dtype == torch.float32
    for k in range(8):
        row = by_rid[int(b["ranking_id"][k])]
        assert b["caption"][k] == row["caption"]
        assert float(b["label_0"][k]) == row["label_0"] and float(b["weight"][k]) == pytest.approx(
            row["weight"]
        )
        # Oracle: read the referenced source row directly and decode it.
        source_row = (
            pq.read_table(os.path.join(src.root, row["source_file"]))
            .slice(row["source_row"], 1)
            .to_pylist()[0]
        )
        assert source_row["image_0_uid"] == row["image_0_uid"]
        expected = torch.from_numpy(
            np.asarray(Image.open(io.BytesIO(source_row["jpg_1"])).convert("RGB")).copy()
        )
        assert torch.allclose(b["image_1"][k], expected.permute(2, 0, 1).float() / 127.5 - 1.0)


def test_pair_stream_resume_and_process_sharding(stream_world):
    root, src, _ = stream_world
    s = _stream(root, src)
    full = [b["ranking_id"].tolist() for b in s.iter_epoch(2)]
    resumed = [b["ranking_id"].tolist() for b in s.iter_epoch(2, skip_batches=3)]
    assert resumed == full[3:]
    shards = [
        [b["ranking_id"].tolist() for b in s.iter_epoch(2, process_index=p, num_processes=3)]
        for p in range(3)
    ]
    assert len({len(x) for x in shards}) == 1 and len(shards[0]) == len(full) // 3 == s.num_batches(3)
    flat = [rid for shard in shards for batch in shard for rid in batch]
    assert len(flat) == len(set(flat))
    assert set(flat) <= {rid for batch in full for rid in batch}


def test_pair_stream_refuses_a_source_that_changed(stream_world, tmp_path):
    root, src, pairs = stream_world
    uids = pairs.column("image_0_uid").to_pylist()
    uids[0] = "not-the-same-image"
    P.write_pairs(
        tmp_path / "pairs",
        pairs.set_column(pairs.schema.get_field_index("image_0_uid"), "image_0_uid", pa.array(uids)),
    )
    s = P.PairStream(tmp_path / "pairs", src, resolution=32, batch_size=len(uids), seed=0, shuffle=False)
    with pytest.raises(DataValidationError, match="source changed"):
        next(iter(s.iter_epoch(0)))


def _corrupt_jpegs(src, pairs, dest, ranks: list[int]):
    """A copy of ``src`` where jpg_0 of the source rows of pair-table rows ``ranks`` holds truncated bytes."""
    import shutil

    shutil.copytree(src.root, dest)
    rows = pairs.take(pa.array(ranks)).select(["source_file", "source_row"]).to_pylist()
    for rel in {r["source_file"] for r in rows}:
        t = pq.read_table(dest / rel)
        jpg = t.column("jpg_0").to_pylist()
        for r in rows:
            if r["source_file"] == rel:
                jpg[r["source_row"]] = jpg[r["source_row"]][:40]  # a JPEG header with no scan data
        t = t.set_column(t.schema.get_field_index("jpg_0"), "jpg_0", pa.array(jpg, type=pa.binary()))
        pq.write_table(t, dest / rel)
    return P.ParquetSource.open(dest)


def test_an_undecodable_jpeg_fails_by_default_naming_its_row(stream_world, tmp_path):
    root, src, pairs = stream_world
    bad = _corrupt_jpegs(src, pairs, tmp_path / "src", [5])
    rid = pairs.column("ranking_id")[5].as_py()
    s = _stream(root, bad, shuffle=False)
    with pytest.raises(DataValidationError, match=rf"ranking_id {rid}\).*on_bad_image=skip"):
        list(s.iter_epoch(0))


def test_skipped_pairs_are_masked_and_keep_every_batch_and_offset(stream_world, tmp_path):
    root, src, pairs = stream_world
    bad_rows = [1, 5, 12]
    bad = _corrupt_jpegs(src, pairs, tmp_path / "src", bad_rows)
    bad_rids = {pairs.column("ranking_id")[i].as_py() for i in bad_rows}
    clean = list(_stream(root, src).iter_epoch(1))
    s = _stream(root, bad, on_bad_image="skip", max_bad_pairs=3)
    skipped = list(s.iter_epoch(1))
    # Same batches, same pairs, same order: only the bad pairs are masked (weight 0, tie, grey images).
    assert [b["ranking_id"].tolist() for b in skipped] == [b["ranking_id"].tolist() for b in clean]
    seen = set()
    for b_clean, b in zip(clean, skipped, strict=True):
        for k, rid in enumerate(b["ranking_id"].tolist()):
            if rid in bad_rids:
                seen.add(rid)
                assert float(b["weight"][k]) == 0 and float(b["label_0"][k]) == float(b["label_1"][k]) == 0.5
                assert torch.count_nonzero(b["image_0"][k]) == 0 and torch.count_nonzero(b["image_1"][k]) == 0
            else:
                assert torch.equal(b["image_0"][k], b_clean["image_0"][k])
                assert float(b["weight"][k]) == float(b_clean["weight"][k])
    in_epoch = {rid for b in clean for rid in b["ranking_id"].tolist()} & bad_rids
    assert seen == in_epoch and {p["ranking_id"] for p in s.bad_pairs} == in_epoch
    assert all("source_row" in p and p["error"] for p in s.bad_pairs)
    # A masked pair adds nothing to the SPM loss: the loss equals the loss of the good pairs alone.
    from spo.losses import spm_loss

    b = next(b for b in skipped if float(b["weight"].min()) == 0)
    keep = b["weight"] > 0
    s0, s1 = torch.randn(len(keep)), torch.randn(len(keep))
    full = spm_loss(s0, s1, b["label_0"], b["label_1"], b["weight"])
    assert torch.allclose(full, spm_loss(s0[keep], s1[keep], b["label_0"][keep], b["label_1"][keep], b["weight"][keep]))
    # The cap counts pairs, not images, and is enforced.
    with pytest.raises(DataValidationError, match="max_bad_pairs=1"):
        list(_stream(root, bad, on_bad_image="skip", max_bad_pairs=1, shuffle=False, drop_last=False).iter_epoch(0))
