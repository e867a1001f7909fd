"""The training kit: checkpoint manager (fresh runs, lineage, rotation, atomicity), non-finite guard,
seed streams, curve writer, schedules."""

from __future__ import annotations

import json
import logging
import math

import pytest
import torch

from spo.errors import NonFiniteError, SPOError
from spo.training import (
    CheckpointManager,
    CurveWriter,
    NonFiniteGuard,
    RunIdentity,
    seed_stream,
    warmup_schedule,
)
from spo.training.checkpoints import STATE_FILE


def _identity(lr=1e-4, world=1):
    return RunIdentity.new({"spo": {"lr": lr, "k": 4}}, num_processes=world)


def _write_payload(value):
    def write(tmp):
        (tmp / "payload.txt").write_text(str(value))

    return write


def test_save_writes_state_last_and_lists_by_step(tmp_path):
    mgr = CheckpointManager(tmp_path, _identity())
    for step in (2, 10, 4):
        mgr.save(step, {"step": step}, _write_payload(step))
    assert [p.name for p in mgr.list()] == ["checkpoint-2", "checkpoint-4", "checkpoint-10"]
    data = json.loads((tmp_path / "checkpoint-10" / STATE_FILE).read_text())
    assert data["state"] == {"step": 10}
    assert data["meta"]["config_hash"] == mgr.identity.config_hash
    assert data["meta"]["run_id"] == mgr.identity.run_id and data["meta"]["num_processes"] == 1
    # A folder without the state file (a kill mid-write) is never listed, and is swept on the next start.
    (tmp_path / ".checkpoint-12.tmp").mkdir()
    (tmp_path / "checkpoint-14").mkdir()
    assert [p.name for p in mgr.list()][-1] == "checkpoint-10"
    mgr.start("latest")
    assert not (tmp_path / ".checkpoint-12.tmp").exists()


def test_rotation_keeps_the_newest(tmp_path):
    mgr = CheckpointManager(tmp_path, _identity(), keep=2)
    for step in (1, 2, 3, 4):
        mgr.save(step, {})
    assert [p.name for p in mgr.list()] == ["checkpoint-3", "checkpoint-4"]


def test_fresh_run_moves_an_earlier_runs_checkpoints_aside(tmp_path, caplog):
    """The bug: with an old run's checkpoint-80/90/100 on disk, a new run's checkpoint-20 was rotated away
    as soon as it was written, and --resume latest then continued the *old* run."""
    old = CheckpointManager(tmp_path, _identity(), keep=3)
    for step in (80, 90, 100):
        old.save(step, {"who": "old"})
    new = CheckpointManager(tmp_path, _identity(), keep=3)
    with caplog.at_level(logging.WARNING):
        assert new.start(None) is None
    assert "moved 3 checkpoint(s) of an earlier run" in caplog.text
    new.save(20, {"who": "new"})
    assert [p.name for p in new.list()] == ["checkpoint-20"]
    assert sorted(p.name for p in (tmp_path / "previous" / old.identity.run_id).iterdir()) == [
        "checkpoint-100", "checkpoint-80", "checkpoint-90"]
    resumed = CheckpointManager(tmp_path, _identity()).start("latest")
    assert resumed.state == {"who": "new"} and resumed.meta["run_id"] == new.identity.run_id


def test_resume_keeps_the_run_id(tmp_path):
    first = CheckpointManager(tmp_path, _identity())
    first.save(5, {})
    again = CheckpointManager(tmp_path, _identity())
    again.start("latest")
    assert again.identity.run_id == first.identity.run_id


def test_latest_without_checkpoints_starts_fresh(tmp_path):
    assert CheckpointManager(tmp_path / "none", _identity()).start("latest") is None


def test_latest_refuses_another_configs_checkpoints(tmp_path):
    CheckpointManager(tmp_path, _identity(lr=1e-4)).save(3, {})
    with pytest.raises(SPOError, match=r"different config \(spo.lr: 0.0001 -> 0.0002\)"):
        CheckpointManager(tmp_path, _identity(lr=2e-4)).start("latest")


def test_resume_warning_fires_only_on_a_real_config_change(tmp_path, caplog):
    CheckpointManager(tmp_path, _identity(lr=1e-4)).save(3, {})
    path = tmp_path / "checkpoint-3"
    with caplog.at_level(logging.WARNING):
        CheckpointManager(tmp_path, _identity(lr=1e-4)).start(path)
    assert "different config" not in caplog.text
    with caplog.at_level(logging.WARNING):
        CheckpointManager(tmp_path, _identity(lr=3e-4)).start(path)
    assert "different config" in caplog.text and "spo.lr: 0.0001 -> 0.0003" in caplog.text


def test_explicit_path_must_be_a_checkpoint(tmp_path):
    with pytest.raises(SPOError, match="not a checkpoint.*Start without --resume"):
        CheckpointManager(tmp_path, _identity()).start(tmp_path)


def test_process_count_change_is_refused_unless_elastic(tmp_path):
    CheckpointManager(tmp_path, _identity(world=1)).save(3, {})
    with pytest.raises(SPOError, match="written by 1 process.*this run has 2"):
        CheckpointManager(tmp_path, _identity(world=2)).start("latest")
    assert CheckpointManager(tmp_path, _identity(world=2), elastic=True).start("latest") is not None


def test_non_finite_state_is_never_written(tmp_path):
    mgr = CheckpointManager(tmp_path, _identity())
    assert mgr.save(1, {}, _write_payload(1), finite=False) is None
    assert mgr.list() == [] and not any(tmp_path.iterdir())


def test_guard_skips_counts_and_aborts():
    guard = NonFiniteGuard(3, "spo", "Lower spo.lr.")
    assert guard.ok(True)
    assert not guard.ok(False) and not guard.ok(False)
    assert guard.ok(True) and guard.in_a_row == 0 and guard.skipped == 2
    guard.ok(False), guard.ok(False)
    with pytest.raises(NonFiniteError, match="3 optimizer steps in a row.*Lower spo.lr"):
        guard.ok(False)


def test_seed_streams_depend_only_on_their_position():
    assert seed_stream(42, 1, 2, 0) == seed_stream(42, 1, 2, 0)
    assert len({seed_stream(42, e, i, p) for e in range(3) for i in range(3) for p in range(3)}) == 27
    # Independent of what else was drawn: the stream is a pure function of its key.
    import numpy as np

    assert seed_stream(7, 3) == int(np.random.SeedSequence([7, 3]).generate_state(1)[0])


def test_curve_writer_fixed_columns_and_no_nan(tmp_path):
    w = CurveWriter(["step", "loss"])
    w.append({"step": 1, "loss": 0.5, "other": 3})
    w.append({"step": 2, "loss": float("nan")})
    w.write(tmp_path / "c.csv")
    assert (tmp_path / "c.csv").read_text() == "step,loss\n1,0.5\n2,\n"


def test_schedules_match_their_closed_forms():
    const = warmup_schedule("constant", 0)
    assert [const(s) for s in range(3)] == [1.0, 1.0, 1.0]
    # torch's LambdaLR with diffusers' constant_with_warmup shape: step/warmup ramps.
    lin = warmup_schedule("linear", 4, 10)
    assert lin(0) == pytest.approx(1 / 5) and lin(4) == pytest.approx(1.0) and lin(10) == 0.0
    cos = warmup_schedule("cosine", 2, 12)
    assert cos(0) == 0.5 and cos(2) == pytest.approx(1.0) and cos(7) == pytest.approx(0.5 * (1 + math.cos(math.pi / 2)))
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lin)
    seen = []
    for _ in range(6):
        seen.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert seen == pytest.approx([lin(s) for s in range(6)])
