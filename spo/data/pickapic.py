"""Pick-a-Pic: schema, streaming reader, pair tables and prompt lists, and the SPM's image stream.

Source (``data.source``)
    Either a local directory in the HF parquet layout (``<root>/data/<split>-*.parquet``; the tiny world,
    or a user's copy) or a hub dataset id (``pickapic-anonymous/pickapic_v1``). A relative local path is
    resolved against the project root (``paths.root``), then the working directory. Hub shards are read
    lazily through ``huggingface_hub.HfFileSystem`` (HTTP range requests: the parquet footer and the
    projected column chunks only, never a whole 300 MB shard), pinned to the commit that ``data.revision``
    resolves to.

Streaming
    Everything reads parquet with column projection, record batch by record batch
    (``ParquetFile.iter_batches(columns=..., batch_size=data.batch_rows)``): prompt extraction reads only
    ``caption``; ``prepare`` reads the metadata columns (no ``jpg_*``, no URLs) -- about 0.3 GB of Arrow
    for v1's 584k train rows, against 204 GB with images.

Image bytes are not copied
    The prepared pair tables (``data/prepared/spm_train``, ``spm_val``) hold metadata and a *reference* to
    the source row -- ``source_file`` (shard path relative to the source root, or the hub path) and
    ``source_row`` (row index inside that shard) -- instead of 2 × ~175 KB of JPEG per pair (204 GB for
    v1). :class:`PairStream` fetches the referenced rows' ``jpg_0``/``jpg_1`` row group by row group while
    training, and checks each row's image uids against the pair table so a changed source cannot silently
    feed the wrong images. The data card records the source root, revision and a fingerprint of every
    shard used (local: size + sha256 of the parquet footer, which holds every row group's offsets, sizes
    and statistics, or of the whole file when it is under 64 MiB; hub: the LFS sha256).

Pair tables (columns in :data:`PAIR_COLUMNS`)
    Only ``has_label`` rows (an unlabeled row carries no preference, and treating it as a tie would teach
    the SPM ties that nobody expressed); ties stay as 0.5/0.5. ``keep_only_different`` drops
    ``are_different = False``; ``limit_examples_per_prompt`` keeps a seeded random choice of at most that
    many pairs per caption; ``max_*_pairs`` caps the table with a seeded sample.
    ``num_example_per_prompt`` is **recomputed on the rows the table keeps** (exact caption match, after
    every filter and cap) and ``weight = 1 / num_example_per_prompt``, so each caption weighs 1 in total;
    the source's own column is kept as ``source_num_example_per_prompt``. Rows are sorted by
    (source_file, source_row) so a reader walks each shard once.

Prompts
    Captions are deduplicated on a normalised key -- unicode NFKC, casefold, whitespace collapsed and
    stripped -- keeping the first spelling seen (with its whitespace collapsed, so one prompt is one line).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import unicodedata
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from spo.errors import DataValidationError, SPOError
from spo.refs import HUB, ModelRef, RefError
from spo.utils import get_logger

if TYPE_CHECKING:
    import pyarrow.parquet as pq
    import torch

log = get_logger(__name__)

# The real schema (shared reference: the pickapic_v1 / v2 dataset cards), in the order of the HF export.
PICKAPIC_SCHEMA = pa.schema(
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
IMAGE_COLUMNS = ("jpg_0", "jpg_1")
URL_COLUMNS = ("image_0_url", "image_1_url")
# What prepare reads and validates row by row: everything but the image bytes and the dead URLs.
METADATA_COLUMNS = tuple(n for n in PICKAPIC_SCHEMA.names if n not in IMAGE_COLUMNS + URL_COLUMNS)

PAIR_COLUMNS = (
    "caption",
    "label_0",
    "label_1",
    "weight",
    "num_example_per_prompt",
    "source_num_example_per_prompt",
    "ranking_id",
    "image_0_uid",
    "image_1_uid",
    "model_0",
    "model_1",
    "user_id",
    "are_different",
    "source_file",
    "source_row",
)

_FULL_HASH_LIMIT = 64 << 20
_WS = re.compile(r"\s+")


# ------------------------------------------------------------------------------------------- source


@dataclass
class ParquetSource:
    """A Pick-a-Pic copy in the HF parquet layout: a local directory or a hub dataset at a fixed commit."""

    ref: str  # as configured (data.source)
    kind: str  # "local" | "hub"
    root: str  # absolute local path, or the hub repo id
    revision: str | None = None  # hub: the resolved commit sha
    _hub_files: dict[str, dict[str, Any]] = field(default_factory=dict, repr=False)
    _fs: Any = field(default=None, repr=False)

    @classmethod
    def open(
        cls, ref: str | Path, revision: str | None = None, root: str | Path | None = None
    ) -> ParquetSource:
        """Resolve ``ref``: an existing directory (relative to ``root``, then the working directory) or a hub id."""
        ref_s = str(ref)
        candidates = [Path(ref_s).expanduser()]
        if root is not None and not Path(ref_s).is_absolute():
            candidates.insert(0, Path(root) / ref_s)
        for cand in candidates:
            if cand.is_dir():
                return cls(ref=ref_s, kind="local", root=str(cand.resolve()))
        hub = _hub_ref(ref_s)
        if hub is not None:
            if hub.revision and revision not in (None, hub.revision):
                raise SPOError(
                    f"data.source {ref_s!r} pins revision {hub.revision!r} but data.revision is {revision!r}"
                )
            return cls._open_hub(hub.repo_id or ref_s, revision or hub.revision)
        tried = ", ".join(str(c) for c in candidates)
        raise SPOError(
            f"data.source {ref_s!r} is neither an existing directory (tried {tried}) nor a hub dataset id "
            "(owner/name). Point data.source at a local copy in the HF layout (a folder holding "
            "data/<split>-*.parquet), e.g. `spo prepare --set data.source=/mnt/pickapic_v1`, or run "
            "`spo synth` first for the tiny world."
        )

    @classmethod
    def _open_hub(cls, repo_id: str, revision: str | None) -> ParquetSource:
        from huggingface_hub import HfApi, constants

        hint = (
            f"Download it first (e.g. `hf download {repo_id} --repo-type dataset "
            f"--local-dir /data/pickapic`) and point data.source at the local copy "
            f"(`--set data.source=/data/pickapic`)"
        )
        if constants.is_offline_mode():
            raise SPOError(f"data.source {repo_id!r} is a hub dataset id, but HF_HUB_OFFLINE is set. {hint}.")
        try:
            api = HfApi()
            sha = api.dataset_info(repo_id, revision=revision).sha
            files = {
                f.path: {
                    "size": f.size,
                    "sha256": (f.lfs or {}).get("sha256") if f.lfs else None,
                    "blob_id": f.blob_id,
                }
                for f in api.list_repo_tree(repo_id, path_in_repo="data", repo_type="dataset", revision=sha)
                if getattr(f, "size", None) is not None and f.path.endswith(".parquet")
            }
        except Exception as exc:  # network, auth, missing repo: all end the same way for the user
            raise SPOError(
                f"cannot list hub dataset {repo_id!r} (revision {revision or 'main'}): {exc}. {hint}."
            ) from exc
        return cls(ref=repo_id, kind="hub", root=repo_id, revision=sha, _hub_files=files)

    # -- files

    def shards(self, split: str) -> list[str]:
        """Shard paths of ``split`` relative to the root, sorted (``data/<split>-*.parquet``)."""
        pattern = re.compile(rf"^(?:data/)?{re.escape(split)}-[^/]*\.parquet$")
        if self.kind == "hub":
            names = [p for p in self._hub_files if pattern.match(p)]
        else:
            root = Path(self.root)
            names = [p.relative_to(root).as_posix() for p in (root / "data").glob(f"{split}-*.parquet")]
            if not names:  # a flat copy without the data/ folder
                names = [p.name for p in root.glob(f"{split}-*.parquet")]
            names = [n for n in names if pattern.match(n)]
        return sorted(names)

    def require_shards(self, split: str) -> list[str]:
        names = self.shards(split)
        if not names:
            where = (
                f"{self.root}/data" if self.kind == "local" else f"hub dataset {self.root}@{self.revision}"
            )
            raise DataValidationError(
                f"no parquet shards for split {split!r} in {where} (expected data/{split}-*.parquet). "
                "Check data.source and the data.*_split names."
            )
        return names

    def parquet_file(self, rel: str) -> pq.ParquetFile:
        import pyarrow.parquet as pq

        try:
            if self.kind == "local":
                return pq.ParquetFile(Path(self.root) / rel)
            if self._fs is None:
                from huggingface_hub import HfFileSystem

                self._fs = HfFileSystem()
            handle = self._fs.open(f"datasets/{self.root}@{self.revision}/{rel}", "rb", block_size=8 << 20)
            return pq.ParquetFile(handle)
        except (OSError, pa.ArrowInvalid) as exc:
            raise DataValidationError(f"cannot read parquet shard {rel} of {self.root}: {exc}") from exc

    def fingerprint(self, rel: str) -> dict[str, Any]:
        """Enough to notice that a shard changed after prepare (see the module docstring)."""
        if self.kind == "hub":
            info = self._hub_files.get(rel, {})
            return {"size": info.get("size"), "sha256": info.get("sha256"), "blob_id": info.get("blob_id")}
        path = Path(self.root) / rel
        size = path.stat().st_size
        if size <= _FULL_HASH_LIMIT:
            from spo.utils import sha256_file

            return {"size": size, "sha256": sha256_file(path)}
        return {"size": size, "footer_sha256": _footer_sha256(path)}

    def describe(self) -> dict[str, Any]:
        return {"ref": self.ref, "kind": self.kind, "root": self.root, "revision": self.revision}


def _hub_ref(ref: str) -> ModelRef | None:
    """``org/name`` or ``org/name@revision`` (spo/refs.py grammar) -> its ModelRef; anything else -> None."""
    try:
        parsed = ModelRef.parse(ref)
    except RefError:
        return None
    return parsed if parsed.kind == HUB else None


def _footer_sha256(path: Path) -> str:
    with open(path, "rb") as f:
        f.seek(-8, os.SEEK_END)
        tail = f.read(8)
        footer_len = int.from_bytes(tail[:4], "little")
        f.seek(-(8 + footer_len), os.SEEK_END)
        return hashlib.sha256(f.read(footer_len + 8)).hexdigest()


def resolve_source(cfg) -> ParquetSource:
    """The configured ``data.source``, relative paths resolved against ``paths.root``."""
    return ParquetSource.open(cfg.data.source, cfg.data.revision, root=cfg.paths.root)


# ------------------------------------------------------------------------------------------ reading


def iter_batches(
    source: ParquetSource, split: str, columns: Iterable[str], batch_rows: int
) -> Iterator[tuple[str, int, pa.RecordBatch]]:
    """(shard, first row of the batch in that shard, batch) over every shard of ``split``, projected."""
    columns = list(columns)
    for rel in source.require_shards(split):
        offset = 0
        pf = source.parquet_file(rel)
        try:
            for batch in pf.iter_batches(columns=columns, batch_size=batch_rows):
                yield rel, offset, batch
                offset += batch.num_rows
        except (OSError, pa.ArrowInvalid, KeyError) as exc:
            raise DataValidationError(f"cannot read columns {columns} of shard {rel}: {exc}") from exc


def read_metadata(
    source: ParquetSource, split: str, batch_rows: int, columns: Iterable[str] = METADATA_COLUMNS
) -> pa.Table:
    """The metadata columns of a whole split (no image bytes) plus ``source_file`` / ``source_row``."""
    from spo.progress import tqdm

    columns = list(columns)
    batches = []
    for rel, offset, batch in tqdm(
        iter_batches(source, split, columns, batch_rows),
        desc=f"read {split}",
        unit="batch",
        leave=False,
        disable=None,
    ):
        n = batch.num_rows
        batches.append(
            batch.append_column("source_file", pa.array([rel] * n, pa.string())).append_column(
                "source_row", pa.array(np.arange(offset, offset + n, dtype=np.int64))
            )
        )
    if not batches:
        fields = [PICKAPIC_SCHEMA.field(c) for c in columns] + [
            pa.field("source_file", pa.string()),
            pa.field("source_row", pa.int64()),
        ]
        return pa.schema(fields).empty_table()
    return pa.Table.from_batches(batches)


def read_rows(
    source: ParquetSource, rel: str, rows: np.ndarray, columns: list[str], pf: pq.ParquetFile | None = None
) -> pa.Table:
    """Rows ``rows`` (any order) of shard ``rel``, reading only the row groups that hold them."""
    pf = pf or source.parquet_file(rel)
    rows = np.asarray(rows, dtype=np.int64)
    md = pf.metadata
    ends = np.cumsum([md.row_group(i).num_rows for i in range(md.num_row_groups)])
    if rows.size and (rows.min() < 0 or rows.max() >= (ends[-1] if len(ends) else 0)):
        raise DataValidationError(
            f"shard {rel} has {int(ends[-1]) if len(ends) else 0} rows but row {int(rows.max())} was requested: "
            "the source changed since `spo prepare`; run it again"
        )
    groups = np.searchsorted(ends, rows, side="right")
    parts, positions = [], []
    for g in np.unique(groups):
        start = 0 if g == 0 else int(ends[g - 1])
        sel = np.nonzero(groups == g)[0]
        parts.append(pf.read_row_group(int(g), columns=columns).take(pa.array(rows[sel] - start)))
        positions.append(sel)
    if not parts:
        return pa.schema([PICKAPIC_SCHEMA.field(c) for c in columns]).empty_table()
    table = pa.concat_tables(parts)
    inverse = np.empty(rows.size, dtype=np.int64)
    inverse[np.concatenate(positions)] = np.arange(rows.size)
    return table.take(pa.array(inverse))


# ------------------------------------------------------------------------------------------ prompts


def normalize_caption(text: str) -> str:
    """The dedup key: NFKC, casefold, whitespace collapsed and stripped."""
    return _WS.sub(" ", unicodedata.normalize("NFKC", text).casefold()).strip()


def clean_caption(text: str) -> str:
    """The spelling written out: as given, with whitespace (newlines included) collapsed and stripped."""
    return _WS.sub(" ", text).strip()


class PromptDeduper:
    """Streaming, order-preserving caption dedup: feed arrays of captions, read ``prompts``."""

    def __init__(self) -> None:
        self._first: dict[str, str] = {}
        self.rows = 0

    def add(self, captions: pa.Array | pa.ChunkedArray | Iterable[str]) -> None:
        import pyarrow.compute as pc

        if isinstance(captions, (pa.Array, pa.ChunkedArray)):
            self.rows += len(captions)
            # Exact duplicates (most of them) are dropped in C++ first; pc.unique keeps first-seen order.
            values = pc.unique(captions.drop_null() if captions.null_count else captions).to_pylist()
        else:
            values = list(captions)
            self.rows += len(values)
        first = self._first
        for text in values:
            if text is None:
                continue
            key = normalize_caption(text)
            if key and key not in first:
                first[key] = clean_caption(text)

    @property
    def prompts(self) -> list[str]:
        return list(self._first.values())


def dedup_prompts(captions: Iterable[str] | pa.Array | pa.ChunkedArray) -> list[str]:
    d = PromptDeduper()
    d.add(captions)
    return d.prompts


def extract_prompts(source: ParquetSource, split: str, batch_rows: int) -> tuple[list[str], int]:
    """Deduplicated captions of a split, reading the ``caption`` column only. Returns (prompts, rows read)."""
    d = PromptDeduper()
    for _rel, _offset, batch in iter_batches(source, split, ["caption"], batch_rows):
        d.add(batch.column(0))
    return d.prompts, d.rows


def sample_prompts(prompts: list[str], n: int, seed: int) -> list[str]:
    """A seeded sample of ``n`` prompts (all of them when fewer), in their original order."""
    if n >= len(prompts):
        return list(prompts)
    idx = np.sort(np.random.default_rng(seed).choice(len(prompts), size=n, replace=False))
    return [prompts[i] for i in idx]


def write_prompts(path: Path, prompts: list[str]) -> None:
    Path(path).write_text("".join(p + "\n" for p in prompts), encoding="utf-8")


def read_prompts(path: str | Path) -> list[str]:
    """One prompt per line (``prompts_train.txt`` / ``prompts_val.txt``); blank lines are skipped."""
    path = Path(path)
    if not path.exists():
        raise SPOError(f"prompt list not found at {path}; run `spo prepare` first")
    return [line for line in path.read_text(encoding="utf-8").split("\n") if line.strip()]


# -------------------------------------------------------------------------------------------- pairs


def _caption_codes(captions: pa.ChunkedArray | pa.Array) -> np.ndarray:
    import pyarrow.compute as pc

    enc = pc.dictionary_encode(captions)
    if isinstance(enc, pa.ChunkedArray):
        enc = enc.combine_chunks() if enc.num_chunks else pa.array([], pa.dictionary(pa.int32(), pa.string()))
    return enc.indices.to_numpy(zero_copy_only=False).astype(np.int64)


def examples_per_caption(captions: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """For each row, how many rows share its exact caption."""
    codes = _caption_codes(captions)
    return np.bincount(codes, minlength=1)[codes] if codes.size else np.zeros(0, np.int64)


def build_pairs(
    meta: pa.Table,
    *,
    keep_only_different: bool = False,
    limit_examples_per_prompt: int | None = None,
    max_pairs: int | None = None,
    seed: int | list[int] = 0,
) -> tuple[pa.Table, dict[str, int]]:
    """Filter a split's metadata into a pair table (see the module docstring); returns (table, counts)."""
    rng = np.random.default_rng(seed)
    counts = {"source_rows": meta.num_rows}

    def col(t: pa.Table, name: str) -> np.ndarray:
        return t.column(name).to_numpy(zero_copy_only=False) if t.num_rows else np.zeros(0, bool)

    table = meta.filter(pa.array(col(meta, "has_label").astype(bool)))
    counts["dropped_unlabeled"] = meta.num_rows - table.num_rows
    n = table.num_rows
    if keep_only_different:
        table = table.filter(pa.array(col(table, "are_different").astype(bool)))
    counts["dropped_identical"] = n - table.num_rows
    n = table.num_rows
    if limit_examples_per_prompt is not None and n:
        codes = _caption_codes(table.column("caption"))
        order = np.lexsort((rng.random(n), codes))  # by caption, random within a caption
        sorted_codes = codes[order]
        starts = np.r_[True, sorted_codes[1:] != sorted_codes[:-1]]
        rank = np.arange(n) - np.maximum.accumulate(np.where(starts, np.arange(n), 0))
        table = table.take(pa.array(np.sort(order[rank < limit_examples_per_prompt])))
    counts["dropped_limit_per_prompt"] = n - table.num_rows
    n = table.num_rows
    if max_pairs is not None and n > max_pairs:
        table = table.take(pa.array(np.sort(rng.choice(n, size=max_pairs, replace=False))))
    counts["dropped_cap"] = n - table.num_rows

    per_caption = examples_per_caption(table.column("caption")).astype(np.int64)
    table = table.rename_columns(
        ["source_num_example_per_prompt" if c == "num_example_per_prompt" else c for c in table.column_names]
    )
    table = table.append_column("num_example_per_prompt", pa.array(per_caption, pa.int64()))
    table = table.append_column("weight", pa.array(1.0 / np.maximum(per_caption, 1), pa.float64()))
    table = table.select(list(PAIR_COLUMNS)).sort_by(
        [("source_file", "ascending"), ("source_row", "ascending")]
    )

    label_0 = col(table, "label_0")
    counts["pairs"] = table.num_rows
    counts["ties"] = int(np.sum(label_0 == 0.5))
    counts["decisive"] = table.num_rows - counts["ties"]
    counts["captions"] = int(len(np.unique(_caption_codes(table.column("caption"))))) if table.num_rows else 0
    return table, counts


def write_pairs(path: Path, table: pa.Table) -> None:
    """A pair table as a directory of parquet files (readable with ``pyarrow.dataset.dataset(path)``)."""
    import pyarrow.parquet as pq

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path / "part-00000.parquet", row_group_size=65536)


def read_pairs(path: str | Path, columns: list[str] | None = None) -> pa.Table:
    import pyarrow.dataset as ds

    path = Path(path)
    if not path.exists():
        raise SPOError(f"pair table not found at {path}; run `spo prepare` first")
    return ds.dataset(path, format="parquet").to_table(columns=columns)


# ------------------------------------------------------------------------------------------- images


def decode_image(jpeg_bytes: bytes, resolution: int) -> torch.Tensor:
    """JPEG bytes -> (3, R, R) float in [-1, 1]: RGB, shortest side resized to R (bicubic, antialiased),
    centre crop -- the usual ``Resize(R) + CenterCrop(R)`` of CLIP / SD preprocessing."""
    import torch
    from PIL import Image

    with Image.open(io.BytesIO(jpeg_bytes)) as im:
        img = im.convert("RGB")
    w, h = img.size
    if min(w, h) != resolution:
        scale = resolution / min(w, h)
        # Pillow's BICUBIC widens its kernel when shrinking: this is the antialiased resize.
        img = img.resize(
            (max(resolution, round(w * scale)), max(resolution, round(h * scale))), Image.Resampling.BICUBIC
        )
        w, h = img.size
    left, top = int(round((w - resolution) / 2.0)), int(round((h - resolution) / 2.0))
    if (w, h) != (resolution, resolution):
        img = img.crop((left, top, left + resolution, top + resolution))
    arr = np.asarray(img, dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(127.5).sub_(1.0)


class PairStream:
    """Batches of SPM training pairs with their decoded images, streamed from the source shards.

    The unit of reading is a source row group: each one a process needs is read once (its image columns),
    by one process, so N processes together read the source about once per epoch.

    Epoch plan, deterministic for (seed, epoch, num_processes, ``lanes``) -- never for ``num_workers``:
    the row groups holding pairs are shuffled, and the rows within each; their pairs, in that order, are cut into equal contiguous
    chunks, one per process (the tail of fewer than ``num_processes`` batches is dropped), and each chunk into
    ``lanes`` contiguous lanes; in a lane, pairs are shuffled within blocks of ``shuffle_row_groups`` row
    groups and cut into batches; the process's batch ``t`` is batch ``t // lanes`` of lane ``t % lanes``. A
    lane shares at most its first and last row group with a neighbour, and holds at most one block of JPEG
    bytes (plus < one batch carried over from the previous block), so a process holds the rows of at most
    ``2 * lanes * shuffle_row_groups`` row groups. With ``shuffle=False`` row groups and pairs stay in table order.

    ``iter_epoch`` runs the plan in a :class:`torch.utils.data.DataLoader` with ``num_workers`` processes
    (JPEG decode + resize in the workers, ``prefetch_factor`` batches ahead each): worker ``w`` makes batches
    ``t ≡ w (mod num_workers)``, which the DataLoader returns in ``t`` order, so the order is the same for any
    worker count; ``num_workers`` must divide ``lanes`` so that a worker reads only its own lanes' row groups.
    ``skip_batches`` resumes mid-epoch without reading the skipped row groups.

    An undecodable JPEG fails the run (``on_bad_image="fail"``) or, with ``"skip"``, its pair stays in the
    batch as a masked pair -- grey images, tie labels, weight 0 -- so it adds nothing to the loss or to the
    accuracy while every batch keeps its size, every process its batch count and a resumed run its offsets.
    Skipped pairs are logged with their row ids and kept in ``bad_pairs``; more than ``max_bad_pairs`` fails.
    """

    IMAGE_READ_COLUMNS = ["jpg_0", "jpg_1", "image_0_uid", "image_1_uid"]

    def __init__(
        self,
        pairs_path: str | Path,
        source: str | Path | ParquetSource,
        resolution: int,
        batch_size: int,
        seed: int,
        shuffle: bool = True,
        drop_last: bool = True,
        *,
        num_workers: int = 0,
        prefetch_factor: int = 2,
        lanes: int = 4,
        shuffle_row_groups: int = 2,
        revision: str | None = None,
        root: str | Path | None = None,
        on_bad_image: str = "fail",
        max_bad_pairs: int = 100,
    ) -> None:
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        if lanes < 1 or shuffle_row_groups < 1 or num_workers < 0 or prefetch_factor < 1:
            raise ValueError("lanes, shuffle_row_groups and prefetch_factor must be >= 1, num_workers >= 0")
        if num_workers and lanes % num_workers:
            raise SPOError(
                f"spm.loader.num_workers={num_workers} does not divide spm.loader.lanes={lanes}: each worker "
                "would read every lane's row groups. Choose num_workers among the divisors of lanes."
            )
        self.pairs = read_pairs(pairs_path)
        missing = [
            c
            for c in ("caption", "label_0", "label_1", "weight", "ranking_id", "source_file", "source_row")
            if c not in self.pairs.column_names
        ]
        if missing:
            raise SPOError(f"{pairs_path} lacks columns {missing}; re-run `spo prepare`")
        self.source = (
            source if isinstance(source, ParquetSource) else ParquetSource.open(source, revision, root=root)
        )
        self.resolution = resolution
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.num_workers, self.prefetch_factor = num_workers, prefetch_factor
        self.lanes, self.shuffle_row_groups = lanes, shuffle_row_groups
        self._files = self.pairs.column("source_file").to_pylist()
        self._rows = self.pairs.column("source_row").to_numpy()
        self._units = self._row_group_ids()
        if on_bad_image not in ("fail", "skip"):
            raise ValueError(f"on_bad_image must be 'fail' or 'skip', not {on_bad_image!r}")
        self.on_bad_image, self.max_bad_pairs = on_bad_image, max_bad_pairs
        self.bad_pairs: list[dict[str, Any]] = []  # {"ranking_id", "source_file", "source_row", "error"}
        self.peak_row_groups = 0  # most row groups' rows held at once by one lane reader (this process)

    def _row_group_ids(self) -> np.ndarray:
        """For each pair, the id of its source row group (ordered by shard, then row group)."""
        files = np.asarray(self._files, dtype=object)
        units = np.zeros(len(files), np.int64)
        next_id = 0
        for rel in sorted(set(self._files)):
            md = self.source.parquet_file(rel).metadata
            ends = np.cumsum([md.row_group(g).num_rows for g in range(md.num_row_groups)])
            mask = files == rel
            rows = self._rows[mask]
            if rows.size and (not len(ends) or rows.max() >= ends[-1]):
                raise DataValidationError(
                    f"shard {rel} has {int(ends[-1]) if len(ends) else 0} rows but the pair table refers to row "
                    f"{int(rows.max())}: the source changed since `spo prepare`; run it again"
                )
            units[mask] = next_id + np.searchsorted(ends, rows, side="right")
            next_id += len(ends)
        return units

    def __len__(self) -> int:
        return self.num_batches()

    def num_batches(self, num_processes: int = 1) -> int:
        n = self.pairs.num_rows
        total = n // self.batch_size if self.drop_last else -(-n // self.batch_size)
        return total // num_processes

    def _lane_batches(
        self, epoch: int, process_index: int, num_processes: int
    ) -> list[tuple[list[np.ndarray], np.ndarray]]:
        """Each lane of this process in ``epoch`` (see the class doc): its batches (pair-table row indices)
        and the offsets where its shuffle blocks start in the concatenated batches (with the end)."""
        if not 0 <= process_index < num_processes:
            raise ValueError(f"process_index {process_index} out of range for {num_processes} processes")
        n, bs, lanes = self.pairs.num_rows, self.batch_size, self.lanes
        unit_ids = np.unique(self._units)
        rng = np.random.default_rng([self.seed, epoch])
        position = np.empty(int(unit_ids.max()) + 1 if unit_ids.size else 0, np.int64)
        position[unit_ids] = rng.permutation(unit_ids.size) if self.shuffle else np.arange(unit_ids.size)
        # Rows shuffled within each row group too: a group split between two lanes (or processes) is split
        # at random, not into its first and last rows.
        within = rng.random(n) if self.shuffle else self._rows
        order = np.lexsort((within, position[self._units])) if n else np.arange(0)
        per_process = self.num_batches(num_processes)
        pairs_here = min(per_process * bs, n // num_processes)
        mine = order[process_index * pairs_here : (process_index + 1) * pairs_here]
        counts = [len(range(lane, per_process, lanes)) * bs for lane in range(lanes)]
        if per_process:
            counts[(per_process - 1) % lanes] -= per_process * bs - pairs_here  # a short last batch
        lane_rng = np.random.default_rng([self.seed, epoch, num_processes, process_index, lanes])
        out, start = [], 0
        for count in counts:
            lane = mine[start : start + count].copy()
            start += count
            units = self._units[lane]
            firsts = np.flatnonzero(np.r_[True, units[1:] != units[:-1]]) if lane.size else np.zeros(0, np.int64)
            blocks = np.r_[firsts[:: self.shuffle_row_groups], lane.size].astype(np.int64)
            if self.shuffle:
                for b0, b1 in zip(blocks[:-1], blocks[1:], strict=True):
                    lane_rng.shuffle(lane[b0:b1])
            out.append(([lane[i : i + bs] for i in range(0, lane.size, bs)], blocks))
        return out

    def batch_indices(self, epoch: int, process_index: int = 0, num_processes: int = 1) -> list[np.ndarray]:
        """Pair-table row indices of each batch this process gets in ``epoch``, in the order it gets them."""
        lanes = self._lane_batches(epoch, process_index, num_processes)
        return [lanes[t % self.lanes][0][t // self.lanes] for t in range(self.num_batches(num_processes))]

    def iter_epoch(
        self, epoch: int, skip_batches: int = 0, process_index: int = 0, num_processes: int = 1
    ) -> Iterator[dict[str, Any]]:
        from torch.utils.data import DataLoader

        plan = _epoch_plan_class()(
            self, self._lane_batches(epoch, process_index, num_processes), skip_batches,
            self.num_batches(num_processes),
        )
        loader = (
            DataLoader(plan, batch_size=None, num_workers=self.num_workers, prefetch_factor=self.prefetch_factor)
            if self.num_workers
            else plan
        )
        for batch in loader:
            for i, error in batch.pop("bad_pairs"):
                self._skip(i, error)
            yield batch

    def _read_block(self, idx: np.ndarray, files: dict[str, pq.ParquetFile]) -> dict[int, tuple[bytes, bytes]]:
        """JPEG bytes of pair-table rows ``idx``, row group by row group, checked against the table's uids."""
        out: dict[int, tuple[bytes, bytes]] = {}
        units = self._units[idx]
        for unit in np.unique(units):
            sel = idx[units == unit]
            rel = self._files[int(sel[0])]
            if rel not in files:
                files[rel] = self.source.parquet_file(rel)
            rows = read_rows(self.source, rel, self._rows[sel], self.IMAGE_READ_COLUMNS, pf=files[rel])
            want = self.pairs.take(pa.array(sel)).select(["image_0_uid", "image_1_uid"]).to_pydict()
            got_0, got_1 = rows.column("image_0_uid").to_pylist(), rows.column("image_1_uid").to_pylist()
            j0, j1 = rows.column("jpg_0").to_pylist(), rows.column("jpg_1").to_pylist()
            for k, i in enumerate(sel):
                if (got_0[k], got_1[k]) != (want["image_0_uid"][k], want["image_1_uid"][k]):
                    raise DataValidationError(
                        f"{rel} row {int(self._rows[i])} holds images {got_0[k]}/{got_1[k]}, but the pair table expects "
                        f"{want['image_0_uid'][k]}/{want['image_1_uid'][k]}: the source changed since `spo prepare`; "
                        "run it again"
                    )
                out[int(i)] = (j0[k], j1[k])
        return out

    def _decode(self, i: int, data: bytes) -> torch.Tensor | str:
        """The image, or (skip policy) the reason it cannot be decoded."""
        try:
            return decode_image(data, self.resolution)
        except Exception as exc:
            if self.on_bad_image == "skip":
                return f"{type(exc).__name__}: {exc}"
            raise DataValidationError(
                f"cannot decode the JPEG of {self._where(i)}: {exc}. Set spm.on_bad_image=skip to train without such pairs."
            ) from exc

    def _where(self, i: int) -> str:
        return (
            f"{self._files[i]} row {int(self._rows[i])} (ranking_id {self.pairs.column('ranking_id')[i].as_py()})"
        )

    def _skip(self, i: int, error: str) -> None:
        self.bad_pairs.append({
            "ranking_id": int(self.pairs.column("ranking_id")[i].as_py()),
            "source_file": self._files[i],
            "source_row": int(self._rows[i]),
            "error": error,
        })
        log.warning("skipping the pair at %s: cannot decode its JPEG (%s)", self._where(i), error)
        if len(self.bad_pairs) > self.max_bad_pairs:
            raise DataValidationError(
                f"{len(self.bad_pairs)} pairs with undecodable JPEGs, more than spm.max_bad_pairs="
                f"{self.max_bad_pairs}: the source looks corrupt (first: {self.bad_pairs[0]}). Check it with "
                "`spo prepare`, or raise spm.max_bad_pairs."
            )

    def _make_batch(self, idx: np.ndarray, images: dict[int, tuple[bytes, bytes]]) -> dict[str, Any]:
        """A batch; pairs that cannot be decoded (skip policy) are masked and listed under ``bad_pairs``."""
        import torch

        ids = [int(i) for i in idx]
        n = len(ids)
        decoded = [self._decode(i, images[i][0]) for i in ids] + [self._decode(i, images[i][1]) for i in ids]
        sub = self.pairs.take(pa.array(idx))

        def floats(name: str) -> torch.Tensor:
            return torch.from_numpy(sub.column(name).to_numpy().astype(np.float32))

        batch = {
            "caption": sub.column("caption").to_pylist(),
            "label_0": floats("label_0"),
            "label_1": floats("label_1"),
            "weight": floats("weight"),
            "ranking_id": torch.from_numpy(sub.column("ranking_id").to_numpy().astype(np.int64)),
            "bad_pairs": [],
        }
        for k in range(n):
            errors = [d for d in (decoded[k], decoded[n + k]) if isinstance(d, str)]
            if not errors:
                continue
            batch["bad_pairs"].append((ids[k], "; ".join(errors)))
            grey = torch.zeros(3, self.resolution, self.resolution)
            decoded[k], decoded[n + k] = grey, grey
            batch["label_0"][k] = batch["label_1"][k] = 0.5
            batch["weight"][k] = 0.0
        batch["image_0"], batch["image_1"] = torch.stack(decoded[:n]), torch.stack(decoded[n:])
        return batch


class _LaneReader:
    """One lane's batches in order, reading its pairs' images one shuffle block at a time."""

    def __init__(
        self, stream: PairStream, batches: list[np.ndarray], blocks: np.ndarray, files: dict[str, pq.ParquetFile]
    ):
        self.stream, self.batches, self.blocks, self.files = stream, batches, blocks, files
        self.seq = np.concatenate(batches) if batches else np.zeros(0, np.int64)
        self.ends = np.cumsum([len(b) for b in batches])
        self.loaded_to = 0  # positions [0, loaded_to) of seq have been read (or skipped)
        self.held: dict[int, tuple[bytes, bytes]] = {}

    def batch(self, j: int) -> dict[str, Any]:
        idx = self.batches[j]
        end = int(self.ends[j])
        start = end - len(idx)
        self.loaded_to = max(self.loaded_to, start)  # resumed: the skipped batches are not read
        while self.loaded_to < end:
            block_end = int(self.blocks[np.searchsorted(self.blocks, self.loaded_to, side="right")])
            self.held.update(self.stream._read_block(self.seq[self.loaded_to : block_end], self.files))
            self.loaded_to = block_end
            held_units = np.unique(self.stream._units[np.fromiter(self.held, np.int64, len(self.held))])
            self.stream.peak_row_groups = max(self.stream.peak_row_groups, len(held_units))
        return self.stream._make_batch(idx, {int(i): self.held.pop(int(i)) for i in idx})


_EPOCH_PLAN: type | None = None


def _epoch_plan_class() -> type:
    """The torch IterableDataset of one process's epoch (defined on first use: importing this module must not
    import torch)."""
    global _EPOCH_PLAN
    if _EPOCH_PLAN is not None:
        return _EPOCH_PLAN
    from torch.utils.data import IterableDataset, get_worker_info

    class EpochPlan(IterableDataset):
        """Worker ``w`` of ``W`` makes the batches t ≡ skip + w (mod W), t < total, in order."""

        def __init__(self, stream: PairStream, lanes, skip: int, total: int):
            super().__init__()
            self.stream, self.lanes, self.skip, self.total = stream, lanes, skip, total

        def __iter__(self) -> Iterator[dict[str, Any]]:
            info = get_worker_info()
            worker, workers = (info.id, info.num_workers) if info else (0, 1)
            files: dict[str, pq.ParquetFile] = {}  # opened here: a worker shares no handles with the parent
            readers: dict[int, _LaneReader] = {}
            n_lanes = len(self.lanes)
            for t in range(self.skip + worker, self.total, workers):
                lane = t % n_lanes
                if lane not in readers:
                    readers[lane] = _LaneReader(self.stream, *self.lanes[lane], files)
                yield readers[lane].batch(t // n_lanes)

    _EPOCH_PLAN = EpochPlan
    return EpochPlan


def load_data_card(prepared_dir: str | Path) -> dict[str, Any]:
    path = Path(prepared_dir) / "data_card.json"
    if not path.exists():
        raise SPOError(f"data card not found at {path}; run `spo prepare` first")
    return json.loads(path.read_text())
