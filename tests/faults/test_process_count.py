"""The process count: a launch that did not join its processes is stopped; the count reaches the stage
cache key and the MLflow runs."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap

import pytest
import torch
from e2e_helpers import project_cfg

from spo.errors import SPOError
from spo.training.launch import check_world_size, checked_accelerator

FIX = "ACCELERATE_USE_CPU=true"


@pytest.mark.parametrize(
    ("env", "seen", "refused"),
    [
        ({}, 1, False),  # not launched: one process
        ({"WORLD_SIZE": "1"}, 1, False),
        ({"WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"}, 2, False),  # joined
        ({"WORLD_SIZE": "16", "LOCAL_WORLD_SIZE": "8"}, 16, False),  # 2 nodes of 8
        ({"WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"}, 1, True),  # --multi_gpu on a CPU host
        ({"LOCAL_WORLD_SIZE": "4"}, 1, True),
        ({"WORLD_SIZE": "16", "LOCAL_WORLD_SIZE": "8"}, 8, True),
    ],
)
def test_world_size_check(env, seen, refused):
    if not refused:
        check_world_size(seen, env)
        return
    launched = env.get("WORLD_SIZE") or env["LOCAL_WORLD_SIZE"]
    with pytest.raises(SPOError, match=rf"started {launched} processes .* accelerate sees {seen}.*{FIX}"):
        check_world_size(seen, env)


def test_stages_in_one_process_may_differ_in_mixed_precision():
    # a flow runs train-spm (no mixed precision) then train (bf16) in one process; accelerate's
    # process-wide state refused the second Accelerator
    first = checked_accelerator(cpu=True, mixed_precision="no")
    assert first.mixed_precision == "no"
    second = checked_accelerator(cpu=True, mixed_precision="bf16")
    assert second.mixed_precision == "bf16"
    with second.autocast():
        assert torch.is_autocast_enabled("cpu")
    third = checked_accelerator(cpu=True, mixed_precision="no")
    assert third.mixed_precision == "no"


def test_every_trainer_accelerator_refuses_an_unjoined_launch(tmp_path):
    """The three trainers' Accelerators, built in one process that a launcher would have started as rank 0
    of 2 (WORLD_SIZE=2, no process group): each stops with the fix."""
    script = textwrap.dedent(
        f"""
        from spo.config import load_config
        from spo.errors import SPOError
        from spo import dpo_trainer, spm_training, spo_trainer

        cfg = load_config("tiny", ["paths.root={tmp_path}"], params_file=None)
        makers = {{
            "spo": lambda: spo_trainer.make_accelerator(cfg),
            "dpo": lambda: dpo_trainer.make_accelerator(cfg),
            "spm": lambda: spm_training.make_accelerator(cfg, cfg.paths.checkpoints / "spm"),
        }}
        for name, make in makers.items():
            try:
                make()
                print(name, "STARTED")
            except SPOError as exc:
                print(name, "REFUSED", exc)
        """
    )
    env = {k: v for k, v in os.environ.items() if k not in ("ACCELERATE_USE_CPU", "RANK", "LOCAL_RANK")}
    env.update(WORLD_SIZE="2", LOCAL_WORLD_SIZE="2", OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = dict(line.split(" ", 1) for line in proc.stdout.splitlines() if line.split(" ")[0] in {"spo", "dpo", "spm"})
    assert sorted(lines) == ["dpo", "spm", "spo"]
    for name, line in lines.items():
        assert line.startswith("REFUSED") and "started 2 processes" in line and "sees 1" in line, (name, line)
        assert FIX in line


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU host --multi_gpu really joins the processes")
def test_multi_gpu_launch_on_a_cpu_host_stops_both_processes(tmp_path, tiny_models_root):
    """The trap itself: `accelerate launch --multi_gpu --num_processes 2` on a CPU host starts two
    single-process trainers; both stop at trainer start, before writing anything."""
    from test_train_spo import SMALL_SPO, spo_cfg

    cfg = spo_cfg(tmp_path, tiny_models_root)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    cmd += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", port]
    cmd += ["-m", "spo.cli", "train", "--preset", "tiny", "--params", os.devnull]
    for item in [f"paths.root={tmp_path}", f"model.pretrained={cfg.model.pretrained}", *SMALL_SPO]:
        cmd += ["--set", item]
    env = {k: v for k, v in os.environ.items() if k != "ACCELERATE_USE_CPU"}
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0
    refusals = [line for line in proc.stderr.splitlines() if "started 2 processes (WORLD_SIZE=2)" in line]
    assert len(refusals) == 2, proc.stderr[-3000:]  # both processes
    assert all("accelerate sees 1" in line and FIX in line for line in refusals)
    assert not (cfg.paths.checkpoints / "spo").exists() and not cfg.paths.lora.exists()


# -- the cache key and the MLflow runs ------------------------------------------------------------------
ACCELERATE_YAML = """\
# {comment}
compute_environment: LOCAL_MACHINE
distributed_type: {kind}
{extra}mixed_precision: bf16
num_machines: 1
num_processes: {n}
"""


def test_cache_key_follows_the_accelerate_config(tmp_path):
    from flows.pipeline import STAGE_BY_NAME, cache_key

    cfg = project_cfg(tmp_path, "sqlite:///unused.db")
    spm = STAGE_BY_NAME["train_spm"]

    def config(name, n, comment="8 GPUs", kind="MULTI_GPU", extra=""):
        path = tmp_path / name
        path.write_text(ACCELERATE_YAML.format(comment=comment, kind=kind, extra=extra, n=n))
        return path

    in_process = cache_key(spm, cfg)
    assert cache_key(spm, cfg, None) == in_process
    eight, two = cache_key(spm, cfg, config("a.yaml", 8)), cache_key(spm, cfg, config("b.yaml", 2))
    assert len({in_process, eight, two}) == 3
    assert cache_key(spm, cfg, config("c.yaml", 8, comment="reworded")) == eight  # comments do not count
    assert cache_key(spm, cfg, config("d.yaml", 8, kind="DEEPSPEED")) != eight
    # The DeepSpeed JSON it names counts by content (accelerate reads it from the working directory).
    ds = tmp_path / "ds.json"
    ds.write_text('{"zero_optimization": {"stage": 2}}')
    zero = config("e.yaml", 8, kind="DEEPSPEED", extra=f"deepspeed_config:\n  deepspeed_config_file: {ds}\n")
    before = cache_key(spm, cfg, zero)
    ds.write_text('{"zero_optimization": {"stage": 3}}')
    assert cache_key(spm, cfg, zero) != before


@pytest.mark.e2e
@pytest.mark.parametrize(("world", "expected"), [(None, "1"), ("2", "2")])
def test_stage_runs_are_tagged_with_the_process_count(tmp_path, monkeypatch, world, expected):
    from mlflow import MlflowClient

    from spo import tracking

    cfg = project_cfg(tmp_path, f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setenv("RANK", "0")
    if world is None:
        monkeypatch.delenv("WORLD_SIZE", raising=False)
    else:
        monkeypatch.setenv("WORLD_SIZE", world)
    with tracking.stage_tracker(cfg, "train_spm") as run:
        pass
    tracking_uri = tracking.tracking_uri(cfg)
    assert MlflowClient(tracking_uri).get_run(run.run_id).data.tags["spo.num_processes"] == expected
