"""Fault injection, part 2: the registry under kill -9 and under concurrency, and a tampered model store.

Real SQLite store, real `spo register` processes, real signals. Each test names what it injects and what
must hold afterwards: one complete version per LoRA content, aliases on it, no run left RUNNING, and no
code from the store executed.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from e2e_helpers import REPO, make_lora, project_cfg, write_eval_metrics
from mlflow import MlflowClient

from spo import tracking
from spo.errors import SPOError

pytestmark = pytest.mark.e2e

REQUIRED_TAGS = ("lineage.lora_md5", "eval.primary_metric", "eval.protocol", "eval.toy_aesthetic.diff_mean", tracking.CODE_TAG)


@pytest.fixture
def project(tmp_path, tiny_models_root):
    root = tmp_path / "project"
    (root / "models").mkdir(parents=True)
    shutil.copytree(tiny_models_root / "models" / "base", root / "models" / "base")
    store = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    overrides = [f"registry.model_name=spo-fault-{uuid.uuid4().hex[:6]}", "registry.primary_metric=toy_aesthetic"]
    cfg = project_cfg(root, store, *overrides)
    make_lora(cfg, seed=1)
    write_eval_metrics(cfg, {"toy_aesthetic": (0.3, 0.1, 0.5)})
    cfg._cli = [  # type: ignore[attr-defined]  -- the same config for `spo register` subprocesses
        sys.executable, "-m", "spo.cli", "register", "--preset", "tiny", "--params", "/dev/null",
        "--set", f"paths.root={root}", "--set", f"tracking.tracking_uri={store}",
        *[a for o in overrides for a in ("--set", o)],
    ]
    return cfg


def _env():
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_TRACKING_URI"))}
    return {**env, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def _check_registry(cfg) -> list[tracking.VersionInfo]:
    tracking.init_store(cfg)
    versions = tracking.list_versions(cfg.registered_model_name)
    for v in versions:
        missing = [t for t in REQUIRED_TAGS if t not in v.tags]
        assert not missing, f"v{v.version} is missing tags {missing}"
    md5s = [v.tags["lineage.lora_md5"] for v in versions]
    assert len(md5s) == len(set(md5s)), f"two versions of one LoRA: {md5s}"
    return versions


def test_kill_sweep_during_register_leaves_nothing_half_done(project, tmp_path):
    """kill -9 at several points of `spo register`; then one clean run: exactly one complete version with
    the alias, and no run of a killed process left RUNNING."""
    # Kill points are fractions of one uninterrupted register (timed on a copy with its own store), so
    # they land inside registrations however fast the machine is.
    probe = tmp_path / "probe"
    shutil.copytree(project.paths.root, probe)
    probe_cli = [
        a.replace(str(project.paths.root), str(probe)).replace(str(tmp_path / "store"), str(tmp_path / "probe_store"))
        for a in project._cli
    ]
    started = time.monotonic()
    timed = subprocess.run(probe_cli, env=_env(), capture_output=True, text=True, timeout=600)
    assert timed.returncode == 0, timed.stderr[-3000:]
    duration = time.monotonic() - started
    rng = random.Random(0)
    kills = 0
    for delay in sorted(rng.uniform(0.35, 0.95) * duration for _ in range(4)):
        proc = subprocess.Popen(project._cli, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(delay)
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            kills += 1
        proc.wait()
        _check_registry(project)  # after every kill: nothing half-tagged is visible
    assert kills >= 2, "the sweep should interrupt registrations (machine too fast? raise the delays)"
    done = subprocess.run(project._cli, env=_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    versions = _check_registry(project)
    assert len(versions) == 1 and tracking.CHALLENGER in versions[0].aliases
    # The next start marked the killed processes' runs KILLED.
    client = MlflowClient()
    exp = client.get_experiment_by_name(project.tracking.experiment)
    running = client.search_runs([exp.experiment_id], filter_string="attributes.status = 'RUNNING'")
    assert running == []


def test_two_concurrent_registers_make_one_version(project, tmp_path):
    """Two projects (two checkouts, the same LoRA bytes) registering into one store at the same moment.
    (In one project directory the project lock refuses the second outright: tests/faults/test_pipeline_faults.py.)"""
    other = tmp_path / "other_checkout"
    shutil.copytree(project.paths.root, other)
    cli_other = [a.replace(str(project.paths.root), str(other)) for a in project._cli]
    procs = [
        subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for cmd in (project._cli, cli_other)
    ]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[-1500:] for o in outs]
    versions = _check_registry(project)
    assert len(versions) == 1 and tracking.CHALLENGER in versions[0].aliases


def test_a_tampered_model_code_file_is_refused_and_never_runs(project, tmp_path):
    from spo.stages import register

    result = register.run(project)
    uri = f"models:/{project.registered_model_name}/{result['version']}"
    tracking.init_store(project)
    # The store's copy of the model code, edited to leave a mark when executed.
    mv = MlflowClient().get_model_version(project.registered_model_name, result["version"])
    local = Path(tracking.mlflow_artifact_dir(mv.source))
    code_files = list(local.rglob("serving.py"))
    assert code_files, f"no model code file under {local}"
    marker = tmp_path / "PAYLOAD_RAN"
    for f in code_files:
        f.write_text(f"open({str(marker)!r}, 'w').write('x')\n" + f.read_text())
    with pytest.raises(SPOError, match="refusing to load"):
        tracking.load_model(uri, project)
    assert not marker.exists()


def test_a_pickled_model_is_refused(project, tmp_path):
    """A version whose MLmodel points at a pickled PythonModel (what older spo wrote) is never loaded."""
    import mlflow

    from spo.stages import register

    result = register.run(project)
    mv = MlflowClient().get_model_version(project.registered_model_name, result["version"])
    mlmodel = Path(tracking.mlflow_artifact_dir(mv.source)) / "MLmodel"
    text = mlmodel.read_text().replace("mlflow.pyfunc.loaders.code_model", "mlflow.pyfunc.model")
    mlmodel.write_text(text)
    with pytest.raises(SPOError, match="not a models-from-code"):
        tracking.load_model(f"models:/{project.registered_model_name}/{result['version']}", project)
    assert mlflow  # the real MLflow was used throughout
