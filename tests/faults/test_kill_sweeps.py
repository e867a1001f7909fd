"""Fault injection, part 6: kill -9 sweeps of real training processes (checkpoint writes included).

A run is killed at several points (`checkpoint_every=1`, so most kills land in or next to a checkpoint
write), resumed with `--resume latest` after each kill, and must end bit-identical to an uninterrupted run:
nothing lost, nothing adopted from a half-written checkpoint.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from e2e_helpers import REPO
from spo_standin import BrightnessScorer
from test_train_spo import spo_cfg

from spo.models.lora import read_lora_file
from spo.stages import train_spo

pytestmark = pytest.mark.e2e

ARGS = ("spo.num_epochs=2", "spo.checkpoint_every=1", "spo.train_batch_size=2", "spo.threshold=0.0")

RUN = textwrap.dedent(
    """
    import sys
    sys.path[:0] = [sys.argv[3], sys.argv[4]]
    from pathlib import Path
    from spo_standin import BrightnessScorer
    from test_train_spo import spo_cfg
    from spo.stages import train_spo
    cfg = spo_cfg(Path(sys.argv[1]), Path(sys.argv[2]), *sys.argv[5:])
    train_spo.run(cfg, resume="latest", scorer=BrightnessScorer())
    """
)


def _kill_three_times_then_finish(cmd: list[str], duration: float, seed: int) -> None:
    """Start ``cmd`` (a run that resumes latest) three times, kill -9 each at a random point of a run taking
    about ``duration`` after its imports, then let a fourth finish; at least one kill must land."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(torch.get_num_threads())}
    rng = random.Random(seed)
    kills = 0
    for _ in range(3):
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        # imports take a few seconds; then the run itself (about `duration`)
        time.sleep(4.0 + rng.uniform(0.2, 0.9) * duration)
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            kills += 1
        proc.wait()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert kills >= 1, "no run was interrupted (machine too fast? raise the delays)"


def test_kill_sweep_during_spo_training_ends_bit_identical(tmp_path, tiny_models_root):
    full = spo_cfg(tmp_path / "full", tiny_models_root, *ARGS)
    started = time.monotonic()
    train_spo.run(full, scorer=BrightnessScorer())
    duration = time.monotonic() - started

    root = tmp_path / "killed"
    tests = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, "-c", RUN, str(root), str(tiny_models_root), str(tests / "integration"), str(tests / "e2e"), *ARGS]
    _kill_three_times_then_finish(cmd, duration, seed=1)
    a, _ = read_lora_file(full.paths.lora)
    b, _ = read_lora_file(root / "models" / "spo" / "lora")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (full.paths.reports / "spo_train_curves.csv").read_text() == (
        root / "reports" / "spo_train_curves.csv"
    ).read_text()


SPM_ARGS = ("spm.max_steps=8", "spm.batch_size=8", "spm.checkpoint_every=1", "spm.eval_every=100",
            "spm.warmup_steps=1", "spm.eval_timesteps=[0]", "tracking.enabled=false")

SPM_RUN = textwrap.dedent(
    """
    import sys
    sys.path[:0] = [sys.argv[2]]
    from pathlib import Path
    from spo_test_helpers import make_cfg
    from spo.stages import train_spm
    train_spm.run(make_cfg(Path(sys.argv[1]), *sys.argv[3:]), resume="latest")
    """
)


def test_kill_sweep_during_spm_training_ends_bit_identical(tmp_path, _tiny_project_template):
    import shutil

    from spo_test_helpers import make_cfg

    from spo.models.preference import load_spm
    from spo.stages import train_spm

    full_root, killed_root = tmp_path / "full", tmp_path / "killed"
    for root in (full_root, killed_root):
        shutil.copytree(_tiny_project_template, root, symlinks=True)
    full = make_cfg(full_root, *SPM_ARGS)
    started = time.monotonic()
    train_spm.run(full)
    duration = time.monotonic() - started

    tests = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, "-c", SPM_RUN, str(killed_root), str(tests), *SPM_ARGS]
    _kill_three_times_then_finish(cmd, duration, seed=2)
    a = load_spm(full.paths.spm_model).state_dict()
    b = load_spm(killed_root / "models" / "spm").state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (full.paths.reports / "spm_train_curves.csv").read_text() == (
        killed_root / "reports" / "spm_train_curves.csv"
    ).read_text()


class _Payload:
    """Unpickling this writes a marker file: proof that code from an artifact ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("victim", ["random_states_0.pkl", "optimizer.bin", "model.safetensors"])
def test_a_tampered_spm_checkpoint_is_refused_and_runs_no_code(tmp_path, _tiny_project_template, victim):
    import pickle
    import shutil

    from spo_test_helpers import make_cfg

    from spo.errors import SPOError
    from spo.stages import train_spm

    root = tmp_path / "project"
    shutil.copytree(_tiny_project_template, root, symlinks=True)
    cfg = make_cfg(root, *SPM_ARGS[:1], "spm.max_steps=2", *SPM_ARGS[2:])
    train_spm.run(cfg)
    marker = tmp_path / "payload-ran"
    ckpt = root / "checkpoints" / "spm" / "checkpoint-2"
    (ckpt / victim).write_bytes(pickle.dumps(_Payload(marker)))
    more = make_cfg(root, *SPM_ARGS[:1], "spm.max_steps=3", *SPM_ARGS[2:])
    if victim.startswith("random_states"):
        # accelerate refuses it and carries on (a warning): our draws are keyed by step, not by RNG state.
        assert train_spm.run(more, resume=str(ckpt))["steps"] == 3
    else:
        with pytest.raises(SPOError, match="checkpoint-2"):
            train_spm.run(more, resume=str(ckpt))
    assert not marker.exists()
