"""Benchmark `spo prepare` on many caption rows: prompt extraction rows/s and full prepare rows/s.

    .venv/bin/python bench/bench_prepare.py                     # 200k train rows in 8 shards
    .venv/bin/python bench/bench_prepare.py --rows 1000000      # v1-sized metadata
    .venv/bin/python bench/bench_prepare.py --tiny-world        # tiny preset: generation time, score stats

The source is written by this script in the real Pick-a-Pic schema and HF layout: captions drawn from a
large vocabulary (about half the rows repeat an earlier prompt, some with case/whitespace variants, like the
real data), real metadata columns, and a single tiny JPEG repeated in ``jpg_0``/``jpg_1`` -- "captions only":
image decoding is not what is measured, but the schema, the projection and the GX JPEG sample stay real.

Reports:
- prompt extraction: ``extract_prompts`` -- stream the ``caption`` column only, normalise, deduplicate;
- full prepare: ``spo.stages.prepare.run`` -- footers + GX schema suite, metadata read, GX value suites, JPEG
  sample, pair tables, prompt lists, data card -- on train + validation + validation_unique rows;
- peak RSS of the process. The one-off ``import great_expectations`` (seconds) is timed apart.
"""

from __future__ import annotations

import argparse
import io
import json
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

WORDS = (
    "a an the of in on with portrait landscape photo painting drawing render of cat dog fox owl city forest "
    "castle robot dragon ship car tree river mountain girl boy knight wizard astronaut sunset night neon "
    "cyberpunk steampunk watercolor oil detailed highly intricate 4k 8k trending artstation octane cinematic "
    "lighting golden hour fantasy surreal minimalist vintage futuristic cute epic dark bright colorful"
).split()


def make_captions(n: int, rng: np.random.Generator) -> list[str]:
    """~n/2 distinct prompts; repeats sometimes differ only in case or spacing."""
    n_unique = max(1, n // 2)
    lengths = rng.integers(4, 16, n_unique)
    word_ids = rng.integers(0, len(WORDS), lengths.sum())
    uniques, start = [], 0
    for i, length in enumerate(lengths):
        uniques.append(" ".join(WORDS[w] for w in word_ids[start : start + length]) + f" {i}")
        start += length
    picks = np.concatenate([np.arange(n_unique), rng.integers(0, n_unique, n - n_unique)])
    rng.shuffle(picks)
    variant = rng.random(n)
    out = []
    for p, v in zip(picks, variant, strict=True):
        c = uniques[p]
        out.append(c.upper() if v < 0.05 else c.replace(" ", "  ", 1) if v < 0.1 else c)
    return out


def tiny_jpeg() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (120, 30, 200)).save(buf, format="JPEG")
    return buf.getvalue()


def write_split(
    data_dir: Path, split: str, n: int, shards: int, first_id: int, rng: np.random.Generator
) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from spo.data.pickapic import PICKAPIC_SCHEMA

    captions = make_captions(n, rng)
    counts: dict[str, int] = {}
    for c in captions:
        counts[c] = counts.get(c, 0) + 1
    kind = rng.random(n)
    label_0 = np.where(kind < 0.12, 0.5, (kind < 0.56).astype(np.float64))
    ids = np.arange(first_id, first_id + n, dtype=np.int64)
    uid_0 = [f"{i:08d}-0000-4000-8000-000000000000" for i in ids]
    uid_1 = [f"{i:08d}-0000-4000-8000-000000000001" for i in ids]
    best = np.where(label_0 == 1.0, uid_0, np.where(label_0 == 0.0, uid_1, ""))
    jpg = tiny_jpeg()
    bounds = np.linspace(0, n, shards + 1).round().astype(int)
    # Shard by shard, so the generator's own memory stays small next to what prepare uses.
    for i in range(shards):
        lo, hi = int(bounds[i]), int(bounds[i + 1])
        m = hi - lo
        columns = {
            "are_different": rng.random(m) > 0.02,
            "best_image_uid": best[lo:hi],
            "caption": captions[lo:hi],
            "created_at": np.datetime64("2023-04-01", "ns")
            + rng.integers(0, 10**15, m).astype("timedelta64[ns]"),
            "has_label": np.ones(m, bool),
            "image_0_uid": uid_0[lo:hi],
            "image_0_url": [f"https://example.invalid/{u}.png" for u in uid_0[lo:hi]],
            "image_1_uid": uid_1[lo:hi],
            "image_1_url": [f"https://example.invalid/{u}.png" for u in uid_1[lo:hi]],
            "jpg_0": [jpg] * m,
            "jpg_1": [jpg] * m,
            "label_0": label_0[lo:hi],
            "label_1": 1.0 - label_0[lo:hi],
            "model_0": ["sd-2.1"] * m,
            "model_1": ["sdxl"] * m,
            "ranking_id": ids[lo:hi],
            "user_id": rng.integers(1, 50_000, m),
            "num_example_per_prompt": np.array([counts[c] for c in captions[lo:hi]], np.int64),
            "__index_level_0__": np.arange(lo, hi, dtype=np.int64),
        }
        table = pa.table(
            {k: pa.array(columns[k], PICKAPIC_SCHEMA.field(k).type) for k in PICKAPIC_SCHEMA.names}
        )
        pq.write_table(table, data_dir / f"{split}-{i:05d}-of-{shards:05d}.parquet", row_group_size=1000)
        del table, columns


def peak_rss_mb() -> int:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def timed(fn, repeats: int = 1):
    times, result = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return result, times


def tiny_world_report() -> dict:
    """The tiny preset's world: generation time, hidden-score distribution and the labels' noise ceiling."""
    import pyarrow.parquet as pq

    from spo.config import load_config
    from spo.data.synthetic import decode_jpeg_uint8, toy_aesthetic
    from spo.stages import synth

    with tempfile.TemporaryDirectory(prefix="bench_tiny_world_") as tmp:
        cfg = load_config("tiny", [f"paths.root={tmp}", "tracking.enabled=false"], params_file=None)
        t0 = time.perf_counter()
        synth.run(cfg, force=True)
        seconds = time.perf_counter() - t0
        out: dict = {
            "generate_s": round(seconds, 2),
            "sizes": {k: v for k, v in cfg.synthetic.model_dump().items() if k.endswith("rows")},
        }
        for split in ("train", "validation"):
            t = pq.read_table(sorted((cfg.paths.raw_data / "data").glob(f"{split}-*.parquet")))
            s0 = toy_aesthetic(np.stack([decode_jpeg_uint8(b) for b in t.column("jpg_0").to_pylist()]))
            s1 = toy_aesthetic(np.stack([decode_jpeg_uint8(b) for b in t.column("jpg_1").to_pylist()]))
            diff = np.abs(s0 - s1)
            l0 = t.column("label_0").to_numpy()
            decisive = t.column("has_label").to_numpy(zero_copy_only=False) & (l0 != 0.5)
            out[split] = {
                "score_mean": round(float(np.concatenate([s0, s1]).mean()), 3),
                "score_std": round(float(np.concatenate([s0, s1]).std()), 3),
                "abs_pair_diff_quantiles_10_25_50_75_90": [
                    round(float(q), 3) for q in np.quantile(diff, [0.1, 0.25, 0.5, 0.75, 0.9])
                ],
                "decisive_pairs": int(decisive.sum()),
                # The accuracy of a perfect-knowledge scorer (toy_aesthetic itself): the noise ceiling.
                "toy_aesthetic_accuracy": round(
                    float(np.mean((s0 > s1)[decisive] == (l0[decisive] == 1.0))), 4
                ),
            }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=200_000, help="train rows (default: %(default)s)")
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--val-rows", type=int, default=10_000)
    parser.add_argument(
        "--repeats", type=int, default=3, help="prompt-extraction repeats (best and median reported)"
    )
    parser.add_argument("--batch-rows", type=int, default=8192)
    parser.add_argument("--tiny-world", action="store_true", help="report on the tiny preset's world instead")
    args = parser.parse_args()
    if args.tiny_world:
        print(json.dumps(tiny_world_report(), indent=2))
        return

    from spo.config import load_config
    from spo.data.pickapic import ParquetSource, extract_prompts
    from spo.stages import prepare
    from spo.utils import setup_logging

    setup_logging("WARNING")
    t0 = time.perf_counter()
    import great_expectations  # noqa: F401  -- a one-off import cost, reported apart from prepare's work

    import_s = time.perf_counter() - t0
    with tempfile.TemporaryDirectory(prefix="bench_prepare_") as tmp:
        root = Path(tmp)
        data = root / "src" / "data"
        data.mkdir(parents=True)
        rng = np.random.default_rng(0)
        t0 = time.perf_counter()
        write_split(data, "train", args.rows, args.shards, 0, rng)
        write_split(data, "validation", args.val_rows, 1, 10**8, rng)
        write_split(data, "validation_unique", 500, 1, 2 * 10**8, rng)
        gen_s = time.perf_counter() - t0
        rss_after_generate = peak_rss_mb()
        source_mb = sum(p.stat().st_size for p in data.iterdir()) / 2**20

        source = ParquetSource.open(root / "src")
        (prompts, rows), times = timed(
            lambda: extract_prompts(source, "train", args.batch_rows), args.repeats
        )
        extraction = {
            "rows": rows,
            "unique_prompts": len(prompts),
            "best_s": round(min(times), 3),
            "median_s": round(float(np.median(times)), 3),
            "rows_per_s_best": round(rows / min(times)),
            "rows_per_s_median": round(rows / float(np.median(times))),
        }

        cfg = load_config(
            "tiny",
            [
                f"paths.root={root}",
                "data.source=src",
                f"data.batch_rows={args.batch_rows}",
                "tracking.enabled=false",
            ],
            params_file=None,
        )
        rss_after_extraction = peak_rss_mb()
        summary, (full_s,) = timed(lambda: prepare.run(cfg))
        total_rows = args.rows + args.val_rows + 500
        result = {
            "machine": f"{platform.machine()} {platform.processor() or ''} {__import__('os').cpu_count()} cpus".strip(),
            "python": platform.python_version(),
            "source": {
                "train_rows": args.rows,
                "shards": args.shards,
                "val_rows": args.val_rows,
                "mb": round(source_mb, 1),
            },
            "generate_s": round(gen_s, 1),
            "gx_import_s": round(import_s, 1),
            "prompt_extraction": extraction,
            "full_prepare": {
                "rows": total_rows,
                "seconds": round(full_s, 2),
                "rows_per_s": round(total_rows / full_s),
                "spm_train_pairs": summary["spm_train_pairs"],
                "prompts_train": summary["prompts_train"],
            },
            "peak_rss_mb": {
                "after_generating_the_source": rss_after_generate,
                "after_prompt_extraction": rss_after_extraction,
                "after_full_prepare": peak_rss_mb(),
            },
        }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
