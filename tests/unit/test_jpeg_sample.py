"""prepare's JPEG check reads bounded slices of the source: counted with a real file wrapper around the
parquet files (every byte the parquet reader pulls goes through it)."""

from __future__ import annotations

import io
from datetime import datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from spo.data import expectations as E
from spo.data import pickapic as P


class CountingFile(io.RawIOBase):
    """A read-only file that counts the bytes handed out."""

    def __init__(self, path: Path, counter: list[int]):
        self._f, self._counter = open(path, "rb"), counter  # noqa: SIM115 - closed with the reader

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._f.seek(offset, whence)

    def tell(self) -> int:
        return self._f.tell()

    def readinto(self, buf) -> int:
        k = self._f.readinto(buf)
        self._counter[0] += k
        return k

    def close(self) -> None:
        self._f.close()
        super().close()


class CountingSource(P.ParquetSource):
    """A local source whose shards are read through :class:`CountingFile`."""

    counter: list[int]

    def parquet_file(self, rel: str) -> pq.ParquetFile:
        return pq.ParquetFile(CountingFile(Path(self.root) / rel, self.counter))


def _jpeg(rng: np.random.Generator, pad: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(buf, format="JPEG")
    return buf.getvalue() + rng.bytes(pad)  # decoders stop at the end-of-image marker: padding = size


def write_shard(path: Path, n: int, row_group_rows: int, pad: int, first_id: int = 0) -> None:
    rng = np.random.default_rng(first_id)
    ids = list(range(first_id, first_id + n))
    cols = {
        "are_different": [True] * n,
        "best_image_uid": [f"u{i}a" for i in ids],
        "caption": [f"caption {i % 7}" for i in ids],
        "created_at": [datetime(2023, 5, 1)] * n,
        "has_label": [True] * n,
        "image_0_uid": [f"u{i}a" for i in ids],
        "image_0_url": [""] * n,
        "image_1_uid": [f"u{i}b" for i in ids],
        "image_1_url": [""] * n,
        "jpg_0": [_jpeg(rng, pad) for _ in ids],
        "jpg_1": [_jpeg(rng, pad) for _ in ids],
        "label_0": [1.0] * n,
        "label_1": [0.0] * n,
        "model_0": ["a"] * n,
        "model_1": ["b"] * n,
        "ranking_id": ids,
        "user_id": [1] * n,
        "num_example_per_prompt": [1] * n,
        "__index_level_0__": ids,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(cols, schema=P.PICKAPIC_SCHEMA), path, row_group_size=row_group_rows)


def _source(root: Path) -> CountingSource:
    src = CountingSource(ref=str(root), kind="local", root=str(root))
    src.counter = [0]
    return src


def test_sample_reads_only_small_row_groups_within_the_budget(tmp_path):
    # Shard a: one 8 MB row group (the HF layout with one row group per shard); shard b: 20 row groups of
    # 0.4 MB each (2 rows x 2 images x 100 kB).
    write_shard(tmp_path / "data/train-00000-of-00002.parquet", 40, 40, 100_000)
    write_shard(tmp_path / "data/train-00001-of-00002.parquet", 40, 2, 100_000, first_id=40)
    src = _source(tmp_path)
    meta = P.read_metadata(src, "train", batch_rows=64)
    picks = E.jpeg_sample_rows(src, meta, 64, np.random.default_rng(0), group_bytes=1 << 20, budget_bytes=2 << 20)
    files = meta.take(pa.array(picks)).column("source_file").to_pylist()
    rows = meta.take(pa.array(picks)).column("source_row").to_numpy()
    # Only shard b qualifies, and 2 MB buy 5 of its 0.4 MB row groups: at most 10 rows.
    assert set(files) == {"data/train-00001-of-00002.parquet"}
    assert 0 < len(picks) <= 10 and len(set((rows // 2).tolist())) <= 5
    src.counter[0] = 0
    got = P.read_rows(src, files[0], rows, ["jpg_0", "jpg_1"])
    assert got.num_rows == len(picks)
    assert src.counter[0] <= (2 << 20) + (64 << 10)  # the budget plus the footer


def test_a_one_row_group_source_is_not_read_but_reported(tmp_path):
    # 70 MB of image bytes in a single row group: above JPEG_GROUP_BYTES, so the check reads footers only.
    write_shard(tmp_path / "data/validation-00000-of-00001.parquet", 70, 70, 500_000)
    src = _source(tmp_path)
    meta = P.read_metadata(src, "validation", batch_rows=64)
    src.counter[0] = 0
    with E.SourceValidator(tmp_path / "report", jpeg_sample=8) as v:
        assert v.check_jpegs("validation", src, meta)
        report = v.finish()
    assert src.counter[0] < 1 << 20
    assert report.success and any("not checked" in w.line() for w in report.warnings)
