"""Fixtures for the orchestration tests: real MLflow stores (SQLite in tmp), real Prefect servers, real DVC.

Nothing here touches ~/.prefect, ./mlflow or the environment of other tests: stores are passed through the
config (``tracking.tracking_uri``) or the environment of a subprocess.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from e2e_helpers import (
    PIPELINE_SMALL,
    PREFECT_CLI,
    REPO,
    free_port,
    project_cfg,
    sh,
    subprocess_env,
    wait_for_http,
)


@pytest.fixture(scope="module")
def store_uri(tmp_path_factory) -> str:
    """A fresh SQLite tracking + registry store shared by one test module."""
    root = tmp_path_factory.mktemp("mlflow")
    return f"sqlite:///{root / 'mlflow.db'}"


@pytest.fixture
def registry_project(tmp_path, tiny_models_root, store_uri):
    """A project with the random tiny base model and its own registered-model name in the module's store."""
    root = tmp_path / "project"
    (root / "models").mkdir(parents=True)
    shutil.copytree(tiny_models_root / "models" / "base", root / "models" / "base")
    return project_cfg(root, store_uri, f"registry.model_name=spo-test-{uuid.uuid4().hex[:8]}")


@pytest.fixture(scope="session")
def prefect_harness(tmp_path_factory):
    """One temporary Prefect server (and result store) for every flow run of the session."""
    from prefect.settings import PREFECT_RESULTS_LOCAL_STORAGE_PATH, temporary_settings
    from prefect.testing.utilities import prefect_test_harness

    storage = tmp_path_factory.mktemp("prefect_results")
    with (
        temporary_settings({PREFECT_RESULTS_LOCAL_STORAGE_PATH: storage}),
        prefect_test_harness(server_startup_timeout=120),
    ):
        yield


@pytest.fixture(scope="session")
def dvc_clone(tmp_path_factory):
    """A git clone of the working tree (committed or not) with small params, after one `dvc repro`.

    Session-scoped: the DVC tests inspect it, and the flow test starts from its tiny world (synth + base)
    instead of pretraining the base model a second time.
    """
    clone = tmp_path_factory.mktemp("dvc_clone")
    venv_bin = str(Path(sys.executable).parent)
    env = subprocess_env(
        PATH=f"{venv_bin}{os.pathsep}{os.environ['PATH']}", HF_HUB_OFFLINE="1", DVC_NO_ANALYTICS="1"
    )
    files = sh(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], REPO, env).stdout
    for rel in filter(None, files.split("\0")):
        src = REPO / rel
        if src.is_file() and not rel.startswith("tests/"):
            (clone / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, clone / rel)
    config = [
        "spo",
        "config",
        "--preset",
        "tiny",
        "--params",
        "/dev/null",
        *[f"--set={o}" for o in PIPELINE_SMALL],
    ]
    (clone / "params.yaml").write_text(sh(config, clone, env).stdout)
    git = ["git", "-c", "user.name=spo-test", "-c", "user.email=spo-test@example.invalid"]
    sh(["git", "init", "-q"], clone, env)
    sh([*git, "add", "-A"], clone, env)
    sh([*git, "commit", "-qm", "spo"], clone, env)
    first = sh(["dvc", "repro"], clone, env)
    return clone, env, first.stdout + first.stderr


@pytest.fixture
def prefect_server(tmp_path):
    """`prefect server start` on a free port with its own PREFECT_HOME; yields (api_url, env)."""
    port = free_port()
    env = subprocess_env(
        PREFECT_HOME=str(tmp_path / "prefect_home"),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS="1",  # schedule runs now, not within the minute
    )
    log = (tmp_path / "server.log").open("w")
    server = subprocess.Popen(
        [PREFECT_CLI, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    api = f"http://127.0.0.1:{port}/api"
    try:
        wait_for_http(f"{api}/health", server, tmp_path / "server.log", 180, "prefect server")
        yield api, {**env, "PREFECT_API_URL": api}
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
        log.close()
