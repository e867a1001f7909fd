"""SPM data path: read amplification, pairs/s and peak RSS of one rank, the old inline PairStream vs the
row-group-sharded DataLoader pipeline (spo/data/pickapic.py).

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_spm_loader.py [--rows 2000 --group-rows 5 --dir /tmp/...]

The source is written in the real Pick-a-Pic layout (PICKAPIC_SCHEMA, data/train-*.parquet, every row labelled
as in v1 train) with ~280 KB JPEGs (a pool of 640 px images, each row's bytes made unique by a trailing pad
that decoders ignore). Each configuration runs in its own process: rank 0 of N reads one whole epoch (a
rank's reading does not depend on the other ranks, so no collective is needed). Bytes read are counted by a
file wrapper under every parquet reader (workers included); "used" is the jpg_0 + jpg_1 bytes of the pairs
the rank trained on. Read amplification = read / used.
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing as mp
import os
import resource
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from spo.data import pickapic as P

READ = mp.Value("q", 0)  # bytes handed out by every CountingFile, in this process and its forked workers


class CountingFile(io.RawIOBase):
    def __init__(self, path: Path):
        self._f = open(path, "rb")  # noqa: SIM115 - lives as long as its ParquetFile

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
        with READ.get_lock():
            READ.value += k
        return k


class CountingSource(P.ParquetSource):
    def parquet_file(self, rel: str) -> pq.ParquetFile:
        return pq.ParquetFile(CountingFile(Path(self.root) / rel))


# ------------------------------------------------------------------------------------------- source


def _jpeg_pool(n: int, size: int, target: int) -> list[bytes]:
    from PIL import Image

    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        y, x = np.mgrid[0:size, 0:size] / size
        base = np.stack([np.sin(x * rng.uniform(2, 9)), np.cos(y * rng.uniform(2, 9)), x * y], -1)
        noise = rng.normal(0, 1, (size, size, 3))
        quality, data = 92, b""
        for amp in np.linspace(10, 120, 12):  # more noise until the JPEG reaches the target size
            img = np.clip(127 + 100 * base + amp * noise, 0, 255).astype(np.uint8)
            buf = io.BytesIO()
            Image.fromarray(img).save(buf, format="JPEG", quality=quality)
            data = buf.getvalue()
            if len(data) >= target:
                break
        out.append(data)
    return out


def write_source(root: Path, rows: int, shards: int, group_rows: int) -> dict[str, float]:
    pool = _jpeg_pool(8, 640, 270_000)
    rng = np.random.default_rng(1)
    per = -(-rows // shards)
    for k in range(shards):
        ids = list(range(k * per, min(rows, (k + 1) * per)))
        n = len(ids)
        jpgs = [[pool[(i * 2 + s) % len(pool)] + rng.bytes(4096) for i in ids] for s in (0, 1)]
        label = rng.choice([0.0, 0.5, 1.0], n)
        table = pa.table(
            {
                "are_different": [True] * n,
                "best_image_uid": ["" if lab == 0.5 else f"u{i}{'a' if lab == 1 else 'b'}" for i, lab in zip(ids, label, strict=True)],
                "caption": [f"prompt {i % 997}" for i in ids],
                "created_at": [datetime(2023, 5, 1)] * n,
                "has_label": [True] * n,
                "image_0_uid": [f"u{i}a" for i in ids],
                "image_0_url": [""] * n,
                "image_1_uid": [f"u{i}b" for i in ids],
                "image_1_url": [""] * n,
                "jpg_0": jpgs[0],
                "jpg_1": jpgs[1],
                "label_0": label,
                "label_1": 1.0 - label,
                "model_0": ["a"] * n,
                "model_1": ["b"] * n,
                "ranking_id": ids,
                "user_id": [1] * n,
                "num_example_per_prompt": [1] * n,
                "__index_level_0__": ids,
            },
            schema=P.PICKAPIC_SCHEMA,
        )
        (root / "data").mkdir(parents=True, exist_ok=True)
        pq.write_table(table, root / f"data/train-{k:05d}-of-{shards:05d}.parquet", row_group_size=group_rows,
                       use_dictionary=["caption", "model_0", "model_1"], compression="snappy")
    src = P.ParquetSource.open(root)
    pairs, _ = P.build_pairs(P.read_metadata(src, "train", batch_rows=4096))
    P.write_pairs(root / "pairs", pairs)
    sizes = [len(b) for b in pool]
    return {"jpeg_kb_mean": float(np.mean(sizes)) / 1e3, "bytes": sum(f.stat().st_size for f in (root / "data").iterdir())}


# ---------------------------------------------------------------------------- the old PairStream


class OldPairStream:
    """The inline PairStream this change replaced (same algorithm, abridged): 2,048-row windows of the global
    batch list, each rank reading the row groups of its rows of the window, 4 decode threads."""

    def __init__(self, pairs_path, source, resolution, batch_size, seed, buffer_rows=2048, decode_workers=4):
        self.pairs, self.source = P.read_pairs(pairs_path), source
        self.resolution, self.batch_size, self.seed = resolution, batch_size, seed
        self.window_batches = max(1, buffer_rows // batch_size)
        self.decode_workers = decode_workers
        self._files = self.pairs.column("source_file").to_pylist()
        self._file_codes = P._caption_codes(self.pairs.column("source_file"))
        self._rows = self.pairs.column("source_row").to_numpy()
        self._open: dict[str, pq.ParquetFile] = {}

    def _epoch_order(self, epoch):
        n = self.pairs.num_rows
        rng = np.random.default_rng([self.seed, epoch])
        by_file = np.argsort(self._file_codes, kind="stable")
        bounds = np.flatnonzero(np.r_[True, np.diff(self._file_codes[by_file]) != 0, True])
        groups = [by_file[bounds[i] : bounds[i + 1]] for i in range(len(bounds) - 1)]
        order = np.concatenate([rng.permutation(groups[g]) for g in rng.permutation(len(groups))])
        window = self.window_batches * self.batch_size
        for start in range(0, n, window):
            rng.shuffle(order[start : start + window])
        return order

    def iter_epoch(self, epoch, process_index=0, num_processes=1):
        order, bs = self._epoch_order(epoch), self.batch_size
        total = len(order) // bs
        mine = list(range(process_index, total, num_processes))[: total // num_processes]
        batches = [order[b * bs : (b + 1) * bs] for b in mine]
        window_of = [g // self.window_batches for g in mine]
        with ThreadPoolExecutor(max_workers=self.decode_workers) as pool:
            start = 0
            while start < len(batches):
                end = start
                while end < len(batches) and window_of[end] == window_of[start]:
                    end += 1
                images = self._read_images(np.concatenate(batches[start:end]))
                for idx in batches[start:end]:
                    jobs = [images[int(i)][0] for i in idx] + [images[int(i)][1] for i in idx]
                    decoded = list(pool.map(lambda b: P.decode_image(b, self.resolution), jobs))
                    yield {"ranking_id": self.pairs.column("ranking_id").take(pa.array(idx)), "n": len(decoded)}
                start = end

    def _read_images(self, idx):
        out = {}
        codes = self._file_codes[idx]
        for code in np.unique(codes):
            sel = idx[codes == code]
            rel = self._files[int(sel[0])]
            pf = self._open.setdefault(rel, self.source.parquet_file(rel))
            rows = P.read_rows(self.source, rel, self._rows[sel], ["jpg_0", "jpg_1"], pf=pf)
            for k, i in enumerate(sel):
                out[int(i)] = (rows.column("jpg_0")[k].as_py(), rows.column("jpg_1")[k].as_py())
        return out


# --------------------------------------------------------------------------------------------- runs


def used_bytes(root: Path, ranking_ids: list[int]) -> int:
    """jpg_0 + jpg_1 bytes of the given pairs, read with pyarrow straight from the source (the oracle)."""
    sizes = {}
    for f in sorted((root / "data").iterdir()):
        t = pq.read_table(f, columns=["ranking_id", "jpg_0", "jpg_1"])
        import pyarrow.compute as pc

        total = pc.add(pc.binary_length(t.column("jpg_0")), pc.binary_length(t.column("jpg_1")))
        sizes.update(zip(t.column("ranking_id").to_pylist(), total.to_pylist(), strict=True))
    return sum(sizes[r] for r in ranking_ids)


def one(args) -> dict:
    root = Path(args.dir)
    src = CountingSource(ref=str(root), kind="local", root=str(root))
    if args.impl == "old":
        stream = OldPairStream(root / "pairs", src, args.resolution, args.batch_size, seed=0)
    else:
        stream = P.PairStream(root / "pairs", src, args.resolution, args.batch_size, seed=0,
                              num_workers=args.workers, lanes=args.lanes, shuffle_row_groups=args.block)
    READ.value = 0  # the footers read to plan the epoch count too: zeroed only after the constructor
    start = time.perf_counter()
    ids = []
    for batch in stream.iter_epoch(0, process_index=0, num_processes=args.ranks):
        rid = batch["ranking_id"]
        ids.extend(rid.tolist() if hasattr(rid, "tolist") else rid.to_pylist())
    wall = time.perf_counter() - start
    read = READ.value
    used = used_bytes(root, ids)
    self_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    child_rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return {"impl": args.impl, "ranks": args.ranks, "workers": args.workers, "pairs": len(ids),
            "read_MB": read / 1e6, "used_MB": used / 1e6, "amplification": read / used,
            "pairs_per_s": len(ids) / wall, "wall_s": wall, "rss_MB": self_rss, "worker_rss_MB": child_rss}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", default="/tmp/spo-bench-spm-loader")
    ap.add_argument("--rows", type=int, default=2000)
    ap.add_argument("--shards", type=int, default=8)
    ap.add_argument("--group-rows", type=int, default=5)
    ap.add_argument("--resolution", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lanes", type=int, default=4)
    ap.add_argument("--block", type=int, default=2)
    ap.add_argument("--configs", default="old:1:0,old:8:0,new:1:0,new:1:2,new:1:4,new:8:0,new:8:2,new:8:4")
    ap.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--impl", default="new", help=argparse.SUPPRESS)
    ap.add_argument("--ranks", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--workers", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one(args)))
        return
    root = Path(args.dir)
    if not (root / "pairs").exists():
        t = time.perf_counter()
        info = write_source(root, args.rows, args.shards, args.group_rows)
        print(f"wrote {args.rows} rows, {info['bytes'] / 1e9:.2f} GB, mean JPEG {info['jpeg_kb_mean']:.0f} kB "
              f"({time.perf_counter() - t:.0f} s)", flush=True)
    md = pq.ParquetFile(next((root / "data").iterdir())).metadata
    print(f"row groups of {md.row_group(0).num_rows} rows ({md.row_group(0).total_byte_size / 1e6:.1f} MB), "
          f"resolution {args.resolution}, batch {args.batch_size}, lanes {args.lanes}, block {args.block}")
    print("| impl | ranks | workers | pairs (rank 0) | read MB | used MB | read amplification | pairs/s | peak RSS main / workers MB |")
    print("|---|---|---|---|---|---|---|---|---|")
    base = [sys.executable, __file__, "--one", "--dir", str(root), "--resolution", str(args.resolution),
            "--batch-size", str(args.batch_size), "--lanes", str(args.lanes), "--block", str(args.block)]
    for cfg in args.configs.split(","):
        impl, ranks, workers = cfg.split(":")
        out = subprocess.run([*base, "--impl", impl, "--ranks", ranks, "--workers", workers],
                             capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        if out.returncode:
            print(f"| {impl} | {ranks} | {workers} | failed: {out.stderr.strip().splitlines()[-1]} |", flush=True)
            continue
        r = json.loads(out.stdout.strip().splitlines()[-1])
        old_workers = "4 threads" if impl == "old" else workers
        print(f"| {impl} | {ranks} | {old_workers} | {r['pairs']} | {r['read_MB']:.0f} | {r['used_MB']:.0f} | "
              f"**{r['amplification']:.2f}×** | {r['pairs_per_s']:.1f} | {r['rss_MB']:.0f} / {r['worker_rss_MB']:.0f} |",
              flush=True)


if __name__ == "__main__":
    main()
