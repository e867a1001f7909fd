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


def test_kill_sweep_during_spo_training_ends_bit_identical(tmp_path, tiny_models_root):
    full = spo_cfg(tmp_path / "full", tiny_models_root, *ARGS)
    started = time.monotonic()
    train_spo.run(full, scorer=BrightnessScorer())
    duration = time.monotonic() - started

    root = tmp_path / "killed"
    tests = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, "-c", RUN, str(root), str(tiny_models_root), str(tests / "integration"), str(tests / "e2e"), *ARGS]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(torch.get_num_threads())}
    rng = random.Random(1)
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
    assert kills >= 1
    a, _ = read_lora_file(full.paths.lora)
    b, _ = read_lora_file(root / "models" / "spo" / "lora")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (full.paths.reports / "spo_train_curves.csv").read_text() == (
        root / "reports" / "spo_train_curves.csv"
    ).read_text()
