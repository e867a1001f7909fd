"""The tiny world: real schema, HF layout, determinism, labels that follow the hidden score, toy_aesthetic."""

from __future__ import annotations

import io
import re
from collections import Counter

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from spo.config import SyntheticConfig
from spo.data import synthetic as S

# Transcribed from shared/reference/pickapic.md (the dataset cards), independently of PICKAPIC_SCHEMA.
REAL_COLUMNS = [
    ("are_different", "bool"),
    ("best_image_uid", "string"),
    ("caption", "string"),
    ("created_at", "timestamp[ns]"),
    ("has_label", "bool"),
    ("image_0_uid", "string"),
    ("image_0_url", "string"),
    ("image_1_uid", "string"),
    ("image_1_url", "string"),
    ("jpg_0", "binary"),
    ("jpg_1", "binary"),
    ("label_0", "double"),
    ("label_1", "double"),
    ("model_0", "string"),
    ("model_1", "string"),
    ("ranking_id", "int64"),
    ("user_id", "int64"),
    ("num_example_per_prompt", "int64"),
    ("__index_level_0__", "int64"),
]
SMALL = dict(train_rows=90, validation_rows=30, test_rows=10, unique_rows=8, train_shards=3)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("world")
    cfg = SyntheticConfig(**SMALL)
    summary = S.generate_dataset(out, cfg)
    return out, cfg, summary


def read_split(out, split):
    files = sorted((out / "data").glob(f"{split}-*.parquet"))
    return pq.ParquetFile(files[0]).schema_arrow, [pq.read_table(f) for f in files]


def test_every_shard_has_the_real_schema_column_for_column(world):
    out, _, _ = world
    files = sorted((out / "data").iterdir())
    assert files
    for f in files:
        schema = pq.read_schema(f)
        assert [(fld.name, str(fld.type)) for fld in schema] == REAL_COLUMNS, f.name


def test_hf_layout_splits_and_sizes(world):
    out, cfg, _ = world
    names = sorted(p.name for p in (out / "data").iterdir())
    assert all(re.fullmatch(r"[a-z_]+-\d{5}-of-\d{5}\.parquet", n) for n in names)
    expected_rows = {"train": 90, "validation": 30, "test": 10, "validation_unique": 8, "test_unique": 8}
    for split, rows in expected_rows.items():
        shards = sorted((out / "data").glob(f"{split}-*.parquet"))
        assert len(shards) == (3 if split == "train" else 1)
        assert all(s.name.endswith(f"-of-{len(shards):05d}.parquet") for s in shards)
        assert sum(pq.read_metadata(s).num_rows for s in shards) == rows


def test_same_config_gives_byte_identical_files(world, tmp_path):
    out, cfg, _ = world
    S.generate_dataset(tmp_path / "again", cfg)
    for f in sorted((out / "data").iterdir()):
        assert (tmp_path / "again" / "data" / f.name).read_bytes() == f.read_bytes(), f.name
    S.generate_dataset(tmp_path / "other", cfg.model_copy(update={"seed": 1}))
    first = "train-00000-of-00003.parquet"
    assert (tmp_path / "other" / "data" / first).read_bytes() != (out / "data" / first).read_bytes()


def test_resizing_one_split_leaves_the_others_unchanged(world, tmp_path):
    out, cfg, _ = world
    S.generate_dataset(tmp_path / "more", cfg.model_copy(update={"train_rows": 120}))
    name = "validation-00000-of-00001.parquet"
    assert (tmp_path / "more" / "data" / name).read_bytes() == (out / "data" / name).read_bytes()


def test_rows_are_internally_consistent(world):
    out, _, _ = world
    for split in S.SPLITS:
        _, tables = read_split(out, split)
        rows = [r for t in tables for r in t.to_pylist()]
        counts = Counter(r["caption"] for r in rows)
        for r in rows:
            assert r["label_0"] + r["label_1"] == 1.0
            assert r["label_0"] in (0.0, 0.5, 1.0)
            if r["label_0"] == 0.5:
                assert r["best_image_uid"] == ""
            else:
                assert r["has_label"]
                assert r["best_image_uid"] == (r["image_0_uid"] if r["label_0"] == 1.0 else r["image_1_uid"])
            if not r["has_label"]:
                assert r["label_0"] == 0.5
            assert r["image_0_uid"] != r["image_1_uid"]
            assert (r["jpg_0"] == r["jpg_1"]) == (not r["are_different"])
            assert r["num_example_per_prompt"] == counts[r["caption"]]
            assert set(r["caption"].split()) <= set(S.VOCABULARY)
            img = Image.open(io.BytesIO(r["jpg_0"]))
            assert img.format == "JPEG" and img.size == (32, 32)
        assert len({r["ranking_id"] for r in rows}) == len(rows)
        if split.endswith("_unique"):
            assert max(counts.values()) == 1
    _, tables = read_split(out, "train")
    per_row = [r["num_example_per_prompt"] for t in tables for r in t.to_pylist()]
    assert len(set(per_row)) > 2  # unequal groups, so per-example weights matter


def test_a_captions_pairs_are_spread_over_shards(world):
    out, _, _ = world
    _, tables = read_split(out, "train")
    shard_of = {}
    spread = 0
    for i, t in enumerate(tables):
        for c in t.column("caption").to_pylist():
            if c in shard_of and shard_of[c] != i:
                spread += 1
            shard_of[c] = i
    assert spread > 0


def _labels_vs_score(cfg: SyntheticConfig) -> tuple[float, int]:
    table, _ = S.generate_split("validation", 300, cfg, 1)
    s0 = S.toy_aesthetic(np.stack([S.decode_jpeg_uint8(b) for b in table.column("jpg_0").to_pylist()]))
    s1 = S.toy_aesthetic(np.stack([S.decode_jpeg_uint8(b) for b in table.column("jpg_1").to_pylist()]))
    l0 = table.column("label_0").to_numpy()
    decisive = l0 != 0.5
    return float(np.mean((s0 > s1)[decisive] == (l0[decisive] == 1.0))), int(decisive.sum())


def test_labels_follow_the_hidden_score_and_label_noise():
    clean = SyntheticConfig(
        label_noise=0.0,
        label_temperature=0.01,
        tie_fraction=0.0,
        unlabeled_fraction=0.0,
        identical_fraction=0.0,
    )
    agree, n = _labels_vs_score(clean)
    assert n == 300 and agree > 0.97
    coin = clean.model_copy(update={"label_noise": 0.5})
    agree_noisy, _ = _labels_vs_score(coin)
    assert 0.35 < agree_noisy < 0.65


def test_tie_and_unlabeled_shares_are_close_to_the_config():
    cfg = SyntheticConfig(tie_fraction=0.2, unlabeled_fraction=0.1)
    table, stats = S.generate_split("train", 600, cfg, 0)
    has_label = table.column("has_label").to_numpy(zero_copy_only=False)
    tie = (table.column("label_0").to_numpy() == 0.5) & has_label
    assert abs(tie.mean() - 0.2) < 0.05
    assert abs((~has_label).mean() - 0.1) < 0.04
    assert stats["ties"] == int(tie.sum()) and stats["unlabeled"] == int((~has_label).sum())


def test_the_two_images_of_a_pair_differ_substantially():
    table, stats = S.generate_split("train", 300, SyntheticConfig(identical_fraction=0.0), 0)
    s0 = S.toy_aesthetic(np.stack([S.decode_jpeg_uint8(b) for b in table.column("jpg_0").to_pylist()]))
    s1 = S.toy_aesthetic(np.stack([S.decode_jpeg_uint8(b) for b in table.column("jpg_1").to_pylist()]))
    scores = np.concatenate([s0, s1])
    assert abs(scores.mean()) < 0.5 and 0.5 < scores.std() < 2.0  # roughly unit scale
    assert np.median(np.abs(s0 - s1)) > 0.5


# -------------------------------------------------------------------------------- toy_aesthetic oracle


def _luma(rgb):
    return 0.299 * rgb[..., 0] + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 2]


def test_toy_aesthetic_on_a_flat_image_is_chroma_minus_offset():
    img = np.zeros((1, 16, 16, 3), np.uint8)
    img[...] = (200, 50, 100)
    expected = 3.5 * (200 - 50) / 255.0 - 1.0  # no contrast, no grain
    assert S.toy_aesthetic(img)[0] == pytest.approx(expected, abs=1e-5)


def test_toy_aesthetic_on_two_halves_matches_the_formula():
    a, b = np.array([255, 0, 0], np.float64), np.array([0, 0, 255], np.float64)
    img = np.zeros((16, 16, 3), np.uint8)
    img[:, :8] = a
    img[:, 8:] = b
    chroma = 1.0  # both colours have max - min = 255
    # The 3x3-smoothed luma: columns 0..6 are Ya, column 7 is (2 Ya + Yb) / 3, column 8 (Ya + 2 Yb) / 3,
    # columns 9..15 Yb; its std over the 16 columns (rows are identical).
    ya, yb = _luma(a / 255), _luma(b / 255)
    smoothed = np.array([ya] * 7 + [(2 * ya + yb) / 3, (ya + 2 * yb) / 3] + [yb] * 7)
    contrast = smoothed.std()
    grain = 0.0  # only the two boundary columns have a non-zero residual; the median ignores them
    expected = 3.5 * chroma + 14 * contrast - 16 * grain - 1.0
    assert S.toy_aesthetic(img[None])[0] == pytest.approx(expected, abs=1e-5)


def test_toy_aesthetic_grain_term_matches_a_hand_computed_median():
    rng = np.random.default_rng(0)
    y = np.clip(0.5 + 0.05 * rng.standard_normal((12, 12)), 0, 1)
    img = np.repeat(y[..., None], 3, axis=2)  # gray: chroma 0
    padded = np.pad(y, 1, mode="edge")
    local = sum(padded[i : i + 12, j : j + 12] for i in range(3) for j in range(3)) / 9
    expected = 14 * local.std() - 16 * np.median(np.abs(y - local)) - 1.0
    got = S.toy_aesthetic(torch.from_numpy(img).permute(2, 0, 1)[None].float() * 2 - 1)
    # torch.median returns the lower middle value for an even count; numpy averages the two.
    lower = np.sort(np.abs(y - local).ravel())[(144 - 1) // 2]
    expected_lower = 14 * local.std() - 16 * lower - 1.0
    assert float(got[0]) == pytest.approx(expected_lower, abs=1e-4)
    assert abs(float(got[0]) - expected) < 0.05


def test_toy_aesthetic_accepts_tensor_numpy_and_pil_alike():
    rng = np.random.default_rng(1)
    imgs = rng.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    from_np = S.toy_aesthetic(imgs)
    from_pil = S.toy_aesthetic([Image.fromarray(i) for i in imgs])
    tensor = torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    from_torch = S.toy_aesthetic(tensor)
    assert isinstance(from_np, np.ndarray) and isinstance(from_torch, torch.Tensor)
    assert from_np.shape == (3,) and from_torch.shape == (3,)
    np.testing.assert_allclose(from_np, from_pil)
    np.testing.assert_allclose(from_np, from_torch.numpy(), atol=1e-5)


def test_toy_aesthetic_prefers_vivid_contrasty_clean_renderings():
    scene = S.Scene("large", "red", "circle", "blue", "center")
    content = S.render_content(scene, 32)
    rng = lambda: np.random.default_rng(0)  # noqa: E731
    best = S.apply_style(content, S.Style(1.0, 1.0, 0.0), rng())
    dull = S.apply_style(content, S.Style(0.0, 1.0, 0.0), rng())
    flat = S.apply_style(content, S.Style(1.0, 0.0, 0.0), rng())
    noisy = S.apply_style(content, S.Style(1.0, 1.0, 1.0), rng())
    s = S.toy_aesthetic(np.stack([best, dull, flat, noisy]))
    assert s[0] > s[1] + 0.5 and s[0] > s[2] + 0.3 and s[0] > s[3] + 0.3


def test_vocabulary_covers_every_caption_word_and_nothing_is_twice():
    assert len(set(S.VOCABULARY)) == len(S.VOCABULARY)
    rng = np.random.default_rng(0)
    words = {w for _ in range(500) for w in S.random_scene(rng).caption.split()}
    assert words <= set(S.VOCABULARY)
