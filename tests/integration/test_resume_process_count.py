"""Resuming a checkpoint on another process count, with 2 real CPU processes (torchrun + gloo).

SPO stores its data position in prompts of all processes, so its checkpoints resume on any count: the
oracle is the hand-counted comparisons of one epoch (each prompt gives exactly 3 with these settings, so a
skipped or repeated prompt changes the count) and the optimizer steps that follow from the pairs per step.
The SPM's stream position is per process: a checkpoint on another count is refused, naming both counts.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
from spo_test_helpers import SMALL, make_cfg
from test_train_spo import SMALL_SPO, spo_cfg

from spo.errors import SPOError
from spo.stages import train_spm, train_spo
from spo.training.checkpoints import CheckpointManager

pytestmark = pytest.mark.slow

# 8 prompts, 1 sampled per process per iteration; 3 branching steps, k=2, threshold 0: 3 pairs per prompt.
# One pair per process per optimizer step, so 3 steps per iteration on 1 or 2 processes; a checkpoint each.
SPO_OVERRIDES = [
    "spo.threshold=0.0",
    "spo.sample_batch_size=1",
    "spo.train_batch_size=1",
    "spo.checkpoint_every=3",
    "spo.checkpoints_total_limit=30",
]
COMPARISONS_PER_PROMPT = 3
# Validation on clean images only: the refusal is under test, not the accuracy.
SPM_OVERRIDES = [
    "spm.max_steps=2",
    "spm.batch_size=4",
    "spm.checkpoint_every=1",
    "spm.eval_every=2",
    "spm.eval_timesteps=[0]",
]


def _torchrun(args: list[str], sets: list[str]) -> subprocess.CompletedProcess:
    """``spo <args>`` on 2 CPU processes, the launch the README documents for CPU hosts."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port)]
    cmd += ["-m", "spo.cli", *args, "--preset", "tiny", "--params", os.devnull]
    for item in sets:
        cmd += ["--set", item]
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)


def _summary(cfg) -> dict:
    return json.loads((cfg.paths.reports / "spo_train.json").read_text())


def test_spo_resumes_1_to_2_and_2_to_1_processes_without_skipping_or_repeating_prompts(
    tmp_path, tiny_models_root
):
    from spo.models.preference import TimeConditionedCLIP, save_spm

    cfg = spo_cfg(tmp_path, tiny_models_root, *SPO_OVERRIDES)
    prompts = len(cfg.paths.prepared.joinpath("prompts_train.txt").read_text().split("\n")) - 1
    assert prompts == 8
    save_spm(
        TimeConditionedCLIP.from_clip(str(tiny_models_root / "models" / "base" / "clip"), time_embed_dim=16),
        cfg.paths.spm_model,
    )
    ckpts = cfg.paths.checkpoints / "spo"

    # 1 process, uninterrupted: 8 iterations of 1 prompt, 3 steps each, a checkpoint after each iteration.
    full = train_spo.run(cfg)
    assert full["comparisons"] == prompts * COMPARISONS_PER_PROMPT and full["optimizer_steps"] == 24

    # 1 -> 2: from checkpoint-12 (4 prompts done) 2 iterations of 2 prompts (3 steps of 2 pairs each).
    sets = [f"paths.root={tmp_path}", f"model.pretrained={cfg.model.pretrained}", *SMALL_SPO, *SPO_OVERRIDES]
    proc = _torchrun(["train", "--resume", str(ckpts / "checkpoint-12")], sets)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = _summary(cfg)
    assert two["num_processes"] == 2 and two["resumed_from"].endswith("checkpoint-12")
    assert two["comparisons"] == two["pairs_kept"] == prompts * COMPARISONS_PER_PROMPT
    assert two["optimizer_steps"] == 12 + 2 * 3 and two["pairs_trained"] == 24 and two["pairs_skipped"] == 0
    assert CheckpointManager.read_meta(ckpts / "checkpoint-15")["num_processes"] == 2

    # 2 -> 1: from the 2-process checkpoint-15 (6 prompts done) 2 iterations of 1 prompt.
    one = train_spo.run(cfg, resume=str(ckpts / "checkpoint-15"))
    assert one["num_processes"] == 1 and one["resumed_from"].endswith("checkpoint-15")
    assert one["comparisons"] == one["pairs_kept"] == prompts * COMPARISONS_PER_PROMPT
    assert one["optimizer_steps"] == 15 + 2 * 3 and one["pairs_trained"] == 24 and one["pairs_skipped"] == 0


def test_spm_checkpoint_on_another_process_count_is_refused_naming_both(tiny_project):
    cfg = make_cfg(tiny_project.paths.root, *SPM_OVERRIDES)
    ckpts = cfg.paths.checkpoints / "spm"
    sets = [f"paths.root={cfg.paths.root}", *SMALL, *SPM_OVERRIDES]

    # 1 -> 2: refused before anything is trained or moved.
    train_spm.run(cfg)
    one_proc = sorted(p.name for p in ckpts.glob("checkpoint-*"))
    assert one_proc == ["checkpoint-1", "checkpoint-2"]
    model_files = {p.name: p.read_bytes() for p in cfg.paths.spm_model.iterdir() if p.is_file()}
    proc = _torchrun(["train-spm", "--resume", str(ckpts / "checkpoint-1")], sets)
    assert proc.returncode != 0
    assert "was written by 1 process(es) but this run has 2" in proc.stderr, proc.stderr[-3000:]
    assert "--num_processes 1" in proc.stderr
    assert sorted(p.name for p in ckpts.glob("checkpoint-*")) == one_proc
    assert {p.name: p.read_bytes() for p in cfg.paths.spm_model.iterdir() if p.is_file()} == model_files

    # 2 -> 1: a 2-process run's checkpoint, resumed (latest) on 1 process.
    proc = _torchrun(["train-spm"], sets)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert CheckpointManager.read_meta(ckpts / "checkpoint-2")["num_processes"] == 2
    with pytest.raises(SPOError, match=r"written by 2 process\(es\) but this run has 1.*--num_processes 2"):
        train_spm.run(cfg, resume="latest")
