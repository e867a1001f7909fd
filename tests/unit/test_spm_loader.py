"""The SPM data path: row-group sharding over processes, lanes and DataLoader workers, checked against
hand-computed counts, the source bytes (a counting file wrapper) and images decoded here with PIL."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from test_jpeg_sample import CountingSource, write_shard

from spo.data import pickapic as P

BS, LANES, BLOCK = 4, 2, 2
# 103 pairs: shards of 40, 40, 23 rows in row groups of 5 rows (21 row groups).
SHARDS = [(0, 40), (40, 40), (80, 23)]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("loader")
    for k, (first, n) in enumerate(SHARDS):
        write_shard(root / f"src/data/train-{k:05d}-of-00003.parquet", n, 5, 2_000, first_id=first)
    src = CountingSource(ref=str(root / "src"), kind="local", root=str(root / "src"))
    src.counter = [0]
    pairs, _ = P.build_pairs(P.read_metadata(src, "train", batch_rows=64))
    P.write_pairs(root / "pairs", pairs)
    return root, src


def stream(world, **kw) -> P.PairStream:
    root, src = world
    args = dict(resolution=16, batch_size=BS, seed=5, lanes=LANES, shuffle_row_groups=BLOCK)
    args.update(kw)
    return P.PairStream(root / "pairs", src, **args)


def ids(batches) -> list[list[int]]:
    return [b["ranking_id"].tolist() for b in batches]


def source_image(world, rid: int) -> torch.Tensor:
    """Image 0 of ranking id ``rid`` straight from its shard (ranking ids are global row numbers here)."""
    root, _ = world
    k = next(i for i, (first, n) in enumerate(SHARDS) if first <= rid < first + n)
    table = pq.read_table(root / f"src/data/train-{k:05d}-of-00003.parquet", columns=["jpg_0"])
    data = table.column("jpg_0")[rid - SHARDS[k][0]].as_py()
    arr = np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).copy()
    return torch.from_numpy(arr).permute(2, 0, 1).float() / 127.5 - 1.0


# Pairs used per epoch, by hand: 103 // 4 = 25 batches; per process 25 // N batches of 4.
USED = {1: 100, 2: 96, 3: 96}


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("processes", [1, 2, 3])
def test_every_pair_once_per_epoch_across_processes_and_workers(world, processes, workers):
    s = stream(world, num_workers=workers)
    per_process = [ids(s.iter_epoch(1, process_index=p, num_processes=processes)) for p in range(processes)]
    assert {len(b) for b in per_process} == {25 // processes}
    flat = [rid for batches in per_process for batch in batches for rid in batch]
    assert len(flat) == len(set(flat)) == USED[processes] and set(flat) <= set(range(103))
    # The images are the referenced rows' images.
    first = next(iter(s.iter_epoch(1, process_index=processes - 1, num_processes=processes)))
    for k in (0, BS - 1):
        assert torch.allclose(first["image_0"][k], source_image(world, int(first["ranking_id"][k])))


@pytest.mark.parametrize("workers", [0, 2])
def test_one_process_without_drop_last_sees_every_pair_exactly_once(world, workers):
    s = stream(world, num_workers=workers, drop_last=False)
    flat = [rid for batch in ids(s.iter_epoch(0)) for rid in batch]
    assert sorted(flat) == list(range(103))


def test_order_is_the_same_for_any_worker_count_and_resumes(world):
    runs = {w: list(stream(world, num_workers=w).iter_epoch(2, process_index=1, num_processes=2)) for w in (0, 1, 2)}
    assert ids(runs[0]) == ids(runs[1]) == ids(runs[2])
    assert all(torch.equal(a["image_1"], b["image_1"]) for a, b in zip(runs[0], runs[2], strict=True))
    resumed = stream(world, num_workers=2).iter_epoch(2, skip_batches=3, process_index=1, num_processes=2)
    assert ids(resumed) == ids(runs[0])[3:]
    assert ids(runs[0]) == [b.tolist() for b in stream(world).batch_indices(2, 1, 2)]  # the plan, as read
    # Another epoch or seed is another order over the same pairs.
    other = ids(stream(world).iter_epoch(3, process_index=1, num_processes=2))
    assert other != ids(runs[0])


def _group_bytes(src, rel: str, g: int) -> int:
    md = pq.ParquetFile(Path(src.root) / rel).metadata
    names = set(P.PairStream.IMAGE_READ_COLUMNS)
    return sum(md.row_group(g).column(j).total_compressed_size for j in range(md.num_columns)
               if md.schema.column(j).name in names)


def test_each_process_reads_only_the_row_groups_it_consumes(world):
    _, src = world
    s = stream(world)
    footers = 0
    for rel in {r for r in s._files}:
        src.counter[0] = 0
        src.parquet_file(rel).metadata  # noqa: B018 - what opening a shard costs
        footers += src.counter[0]
    for processes in (1, 3):
        total_groups = 0
        for p in range(processes):
            used = np.concatenate(s.batch_indices(0, p, processes))
            groups = {(s._files[i], int(s._rows[i]) // 5) for i in used}  # 5 rows per row group
            total_groups += len(groups)
            src.counter[0] = 0
            list(s.iter_epoch(0, process_index=p, num_processes=processes))
            # Whole row groups of its own pairs, read once each (lanes may share a boundary group).
            allowed = sum(_group_bytes(src, rel, g) for rel, g in groups) + footers
            assert src.counter[0] <= allowed + LANES * max(_group_bytes(src, rel, g) for rel, g in groups)
            assert src.counter[0] >= sum(_group_bytes(src, rel, g) for rel, g in groups)
        # Row groups shared between neighbours: at most one per lane boundary (processes x lanes - 1).
        assert total_groups <= 21 + processes * LANES - 1


def test_memory_holds_at_most_two_blocks_of_row_groups_per_lane(world):
    for block in (1, 2, 3):
        s = stream(world, shuffle_row_groups=block, lanes=1)
        list(s.iter_epoch(0))
        assert 1 <= s.peak_row_groups <= 2 * block
        s = stream(world, shuffle_row_groups=block, lanes=1, batch_size=1)  # no batch spans two blocks' rows
        list(s.iter_epoch(0))
        assert s.peak_row_groups <= block


def test_workers_must_divide_lanes(world):
    with pytest.raises(P.SPOError, match="divide spm.loader.lanes=2"):
        stream(world, num_workers=3)


def test_loader_settings_come_from_the_config_and_are_checked(tmp_path):
    from spo_test_helpers import make_cfg

    from spo.config import ConfigError

    cfg = make_cfg(tmp_path, "spm.loader.num_workers=4", "spm.loader.lanes=8", "spm.loader.shuffle_row_groups=3")
    assert cfg.spm.loader.model_dump() == {"num_workers": 4, "prefetch_factor": 2, "lanes": 8, "shuffle_row_groups": 3}
    with pytest.raises(ConfigError, match="must divide lanes"):
        make_cfg(tmp_path, "spm.loader.num_workers=3")
