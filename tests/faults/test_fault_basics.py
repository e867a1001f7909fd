"""Fault injection, part 1: the project lock, crash windows of replace_dir, strict JSON reports, config
values that are not finite, byte-deterministic LoRA files, secret redaction."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from spo.config import ConfigError, load_config
from spo.lock import ProjectLocked, project_lock
from spo.utils import atomic_dir, atomic_write_json, recover_dir, redact

# -- the project lock -----------------------------------------------------------------------------------
HOLD = textwrap.dedent(
    """
    import sys, time
    from spo.lock import project_lock
    with project_lock(sys.argv[1], "spo pipeline (test holder)"):
        print("held", flush=True)
        time.sleep(60)
    """
)


def _holder(root: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(root)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_second_holder_is_refused_with_the_holders_name(tmp_path):
    proc = _holder(tmp_path)
    try:
        with pytest.raises(ProjectLocked, match=rf"in use by pid {proc.pid} on .*spo pipeline \(test holder\)"):
            with project_lock(tmp_path, "spo train"):
                pass
    finally:
        proc.kill()
        proc.wait()


def test_lock_of_a_killed_process_is_recovered(tmp_path):
    proc = _holder(tmp_path)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    with project_lock(tmp_path, "spo train"):  # the kernel dropped the dead holder's lock
        pass


def test_lock_is_reentrant_and_inherited_by_children(tmp_path):
    with project_lock(tmp_path, "outer"):
        with project_lock(tmp_path, "inner"):
            pass
        child = subprocess.run(
            [sys.executable, "-c", "import sys; from spo.lock import project_lock\n"
             "with project_lock(sys.argv[1], 'child'): print('ok')", str(tmp_path)],
            capture_output=True, text=True, timeout=60,
        )
        assert child.returncode == 0, child.stderr
        assert child.stdout.strip() == "ok"
    with project_lock(tmp_path, "again"):
        pass


# -- replace_dir crash windows ---------------------------------------------------------------------------
def test_kill_between_the_two_renames_is_repaired(tmp_path, caplog):
    dest = tmp_path / "models" / "spm"
    with atomic_dir(dest) as tmp:
        (tmp / "weights").write_text("v1")
    # The window: dest renamed to .old-*, the new folder not yet in place, then kill -9.
    old = dest.parent / f".{dest.name}.old-deadbeef"
    os.replace(dest, old)
    (dest.parent / f".{dest.name}.tmp-abc").mkdir()
    recover_dir(dest)
    assert (dest / "weights").read_text() == "v1"
    assert sorted(p.name for p in dest.parent.iterdir()) == ["spm"]
    assert "restored" in caplog.text


def test_atomic_dir_sweeps_leftovers_and_keeps_the_new_output(tmp_path):
    dest = tmp_path / "out"
    with atomic_dir(dest) as tmp:
        (tmp / "f").write_text("v1")
    (tmp_path / ".out.old-1234").mkdir()
    (tmp_path / ".out.tmp-zzz").mkdir()
    with atomic_dir(dest) as tmp:
        (tmp / "f").write_text("v2")
    assert (dest / "f").read_text() == "v2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


# -- strict JSON, finite config ---------------------------------------------------------------------------
def test_reports_are_strict_json(tmp_path):
    atomic_write_json(tmp_path / "r.json", {"loss": float("nan"), "nested": [float("inf"), 1.5]})
    text = (tmp_path / "r.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text) == {"loss": None, "nested": [None, 1.5]}


@pytest.mark.parametrize("override", ["spm.lr=.inf", "spo.lr=.nan", "spo.beta=.inf", "eval.cfg_scale=.nan"])
def test_non_finite_config_values_are_rejected(override):
    with pytest.raises(ConfigError, match=override.split("=")[0]):
        load_config("tiny", [override], params_file=None)


# -- deterministic LoRA files ------------------------------------------------------------------------------
WRITE_LORA = textwrap.dedent(
    """
    import sys, torch
    from spo.models.lora import add_lora, save_lora
    from spo.models.tiny import build_tiny_sd15
    pipe = build_tiny_sd15(seed=0)
    torch.manual_seed(0)
    add_lora(pipe.unet, 2)
    save_lora(pipe.unet, sys.argv[1], "sd15")
    """
)


def test_identical_weights_give_identical_lora_bytes_under_any_hash_seed(tmp_path):
    digests = set()
    for seed in ("1", "2", "3"):
        out = tmp_path / f"lora{seed}"
        env = {**os.environ, "PYTHONHASHSEED": seed, "OMP_NUM_THREADS": "1"}
        subprocess.run([sys.executable, "-c", WRITE_LORA, str(out)], check=True, env=env, timeout=300)
        digests.add(hashlib.sha256((out / "pytorch_lora_weights.safetensors").read_bytes()).hexdigest())
    assert len(digests) == 1


# -- secrets ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "text, shown",
    [
        ("https://alice:s3cret@mlflow.example.com/api", "https://***@mlflow.example.com/api"),
        ("postgresql://u:p@db:5432/mlflow", "postgresql://***@db:5432/mlflow"),
        ("https://host/x?token=abc123&run=1", "https://host/x?token=***&run=1"),
        ("sqlite:////tmp/mlflow.db", "sqlite:////tmp/mlflow.db"),
        ("open http://127.0.0.1:5000", "open http://127.0.0.1:5000"),
    ],
)
def test_redact(text, shown):
    assert redact(text) == shown
    assert "s3cret" not in redact(text) and "abc123" not in redact(text)


def test_lock_holder_wait_does_not_block(tmp_path):
    """The refusal is immediate (non-blocking), not a wait."""
    proc = _holder(tmp_path)
    try:
        started = time.monotonic()
        with pytest.raises(ProjectLocked):
            with project_lock(tmp_path):
                pass
        assert time.monotonic() - started < 5
    finally:
        proc.kill()
        proc.wait()
