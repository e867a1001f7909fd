"""Helpers shared by the orchestration tests (imported as a module: tests/ is not a package)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PREFECT_CLI = str(Path(sys.executable).with_name("prefect"))


def project_cfg(root: Path, store_uri: str, *overrides: str):
    """A tiny-preset config rooted at ``root`` that tracks to ``store_uri``."""
    from spo.config import load_config

    return load_config(
        "tiny",
        [f"paths.root={root}", f"tracking.tracking_uri={store_uri}", *overrides],
        params_file=None,
    )


def make_lora(cfg, seed: int) -> Path:
    """A random (gaussian-init) rank-4 LoRA on the tiny base UNet, saved where `spo train` saves it."""
    import torch
    from diffusers import UNet2DConditionModel

    from spo.models.lora import add_lora, save_lora

    unet = UNet2DConditionModel.from_pretrained(cfg.paths.base_model, subfolder="unet")
    torch.manual_seed(seed)
    add_lora(unet, rank=4)
    with torch.no_grad():  # gaussian init leaves lora_B at 0; make the adapter change the output
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    return save_lora(unet, cfg.paths.lora, "sd15")


def write_eval_metrics(cfg, gains: dict[str, tuple[float, float, float]]) -> Path:
    """reports/eval/metrics.json in the evaluation stage's format: ``gains[scorer] = (diff_mean, ci_low, ci_high)``."""
    metrics = {
        name: {
            "base_mean": 1.0,
            "spo_mean": 1.0 + diff,
            "diff_mean": diff,
            "diff_ci95": [low, high],
            "win_rate": 0.5 + diff / 10,
            "win_rate_ci95": [0.4, 0.7],
            "n": 40,
        }
        for name, (diff, low, high) in gains.items()
    }
    metrics["_protocol"] = {"preset": "tiny", "num_prompts": 10}
    path = cfg.paths.eval_reports / "metrics.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(metrics))
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_http(url: str, proc: subprocess.Popen, log: Path, seconds: float, what: str) -> None:
    """Until ``url`` answers 200; fails with the end of ``log`` if ``proc`` exits or time runs out."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        assert proc.poll() is None, f"{what} exited:\n" + log.read_text()[-3000:]
        if time.monotonic() > deadline:
            pytest.fail(f"{what} not up in {seconds:.0f} s:\n" + log.read_text()[-3000:])
        time.sleep(0.5)


def subprocess_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_TRACKING_URI"))}
    env.update(extra)
    return env


# The tiny pipeline shrunk to seconds per stage: it must run, not learn (learning is measured by `make run`
# and the benchmarks). Shared by the Prefect flow test and the DVC test.
PIPELINE_SMALL = [
    "synthetic.train_rows=120",
    "synthetic.validation_rows=40",
    "synthetic.test_rows=10",
    "synthetic.unique_rows=8",
    "synthetic.train_shards=1",
    "data.num_train_prompts=8",
    "data.gx_jpeg_sample=8",
    "data.max_spm_val_pairs=16",
    "base.vae_steps=2",
    "base.unet_steps=2",
    "base.tiny_decoder_steps=2",
    "base.clip_steps=2",
    "base.num_images=32",
    "base.batch_size=8",
    "base.sample_steps=2",
    "spm.max_steps=2",
    "spm.batch_size=4",
    "spm.eval_every=2",
    "spm.checkpoint_every=2",
    "spm.warmup_steps=1",
    "spm.eval_timesteps=[501]",
    "spo.num_prompts=2",
    "spo.num_candidates=2",
    "spo.threshold=0.0",
    "spo.num_steps=3",
    "spo.divert_start_step=1",
    "spo.sample_batch_size=2",
    "spo.train_batch_size=2",
    "spo.num_epochs=1",
    "eval.num_prompts=2",
    "eval.num_images_per_prompt=2",
    "eval.num_steps=2",
    "eval.batch_size=4",
    "eval.bootstrap_samples=100",
    "eval.scorers=[toy_aesthetic,clip]",
    "eval.grid_prompts=2",
    "eval.grid_seeds=1",
    "registry.require_ci_excludes_zero=false",
]


def sh(args: list[str], cwd: Path, env: dict[str, str], check: bool = True) -> subprocess.CompletedProcess:
    """Run a command; on failure, fail the test with the end of its output."""
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    if check and proc.returncode:
        pytest.fail(
            f"{' '.join(args)} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
        )
    return proc
