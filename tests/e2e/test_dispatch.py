"""Dispatched mode for real: a `prefect server`, two process work pools (`cpu`, `gpu`) with one
`prefect worker` each, and prefect.yaml's spo-retrain-dispatched / spo-stage-gpu deployments. The pipeline's
flow run is taken by the cpu worker; its GPU stages become spo-stage flow runs taken by the gpu worker."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time

import httpx
import pytest
from e2e_helpers import PIPELINE_SMALL, PREFECT_CLI, REPO

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

GPU_STAGES = {"train_spm", "train_spo", "evaluate"}


def _flow_runs(api: str, **filters) -> list[dict]:
    return httpx.post(f"{api}/flow_runs/filter", json={"flow_runs": filters, "limit": 50}).json()


def test_gpu_stages_run_on_the_gpu_pool_and_the_rest_on_the_cpu_pool(prefect_server, tmp_path, dvc_clone):
    api, env = prefect_server
    env = {**env, "PREFECT_WORKER_QUERY_SECONDS": "1", "HF_HUB_OFFLINE": "1", "DO_NOT_TRACK": "true"}
    code = tmp_path / "code"  # what `prefect deploy` records as the workers' working directory
    shutil.copytree(REPO / "flows", code / "flows", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "prefect.yaml", code / "prefect.yaml")
    root = tmp_path / "shared"  # the project root both pools' workers see (a shared volume)
    for world in ("data/raw/pickapic_tiny", "models/base"):
        shutil.copytree(dvc_clone[0] / world, root / world)

    def prefect(*args: str) -> str:
        proc = subprocess.run([PREFECT_CLI, "--no-prompt", *args], cwd=code, env=env, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        return proc.stdout

    for pool in ("cpu", "gpu"):
        prefect("work-pool", "create", pool, "--type", "process")
    prefect("deploy", "--name", "spo-retrain-dispatched", "--name", "spo-stage-gpu")
    workers = []
    for pool in ("cpu", "gpu"):
        log = (tmp_path / f"worker-{pool}.log").open("w")
        workers.append(
            (
                subprocess.Popen(
                    [PREFECT_CLI, "worker", "start", "--pool", pool, "--limit", "1"],
                    cwd=code, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                ),
                log,
            )
        )
    try:
        deployment = httpx.get(f"{api}/deployments/name/spo-pipeline/spo-retrain-dispatched").json()
        assert deployment["work_pool_name"] == "cpu"
        store = f"sqlite:///{root / 'mlflow' / 'mlflow.db'}"
        parameters = {
            "preset": "tiny",
            "overrides": [f"paths.root={root}", f"tracking.tracking_uri={store}", *PIPELINE_SMALL],
            "params_file": None,
        }
        run = httpx.post(
            f"{api}/deployments/{deployment['id']}/create_flow_run", json={"parameters": parameters}
        ).json()
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            state = httpx.get(f"{api}/flow_runs/{run['id']}").json()
            if state["state_type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
                break
            time.sleep(2)
        logs = _logs(api, run["id"])[-6000:] + "".join(
            (tmp_path / f"worker-{p}.log").read_text()[-3000:] for p in ("cpu", "gpu")
        )
        assert state["state_type"] == "COMPLETED", f"{state['state_type']}: {state['state']['message']}\n{logs}"
        assert state["work_pool_name"] == "cpu"

        children = _flow_runs(api, parent_flow_run_id={"any_": [run["id"]]})
        stage_runs = {r["name"]: r for r in children if r["deployment_id"] != deployment["id"]}
        assert set(stage_runs) == GPU_STAGES, sorted(stage_runs)
        for name, child in stage_runs.items():
            assert child["state_type"] == "COMPLETED", name
            assert child["work_pool_name"] == "gpu", name
            assert child["parameters"]["stage"] == name
            assert child["parameters"]["config"]["paths"]["root"] == str(root)
        assert "dispatched to deployment spo-stage/spo-stage-gpu" in _logs(api, run["id"])
        # The GPU worker ran the stage: its own flow run's logs carry the stage's lines.
        assert "train-spm" in _logs(api, stage_runs["train_spm"]["id"]) or "SPM accuracy" in _logs(
            api, stage_runs["train_spm"]["id"]
        )

        summary = json.loads((root / "reports" / "pipeline_summary.json").read_text())
        assert not any(s["cached"] for name, s in summary["stages"].items() if name in GPU_STAGES)
        assert summary["registry"]["version"]
        assert (root / "models" / "spo" / "lora").exists()

        # MLflow: the GPU stages' runs nest under the pipeline's parent run.
        import mlflow

        client = mlflow.MlflowClient(tracking_uri=store)
        parent_id = summary["mlflow"]["run_id"]
        nested = client.search_runs(
            [client.get_run(parent_id).info.experiment_id],
            filter_string=f"tags.mlflow.parentRunId = '{parent_id}'",
        )
        names = {r.data.tags.get("mlflow.runName", "").split(" ")[0] for r in nested}
        assert GPU_STAGES <= names, names
    finally:
        for proc, log in workers:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
            log.close()


def _logs(api: str, flow_run_id: str) -> str:
    logs = httpx.post(
        f"{api}/logs/filter", json={"logs": {"flow_run_id": {"any_": [flow_run_id]}}, "limit": 200}
    ).json()
    return "\n".join(entry["message"] for entry in logs)


def test_a_stage_flow_refuses_registry_stages_and_unknown_names():
    from flows.pipeline import spo_stage
    from spo.config import load_config
    from spo.errors import SPOError

    cfg = load_config("tiny", [], params_file=None).to_dict()
    for name in ("register", "no_such_stage"):
        with pytest.raises(SPOError, match="spo-stage runs one of"):
            spo_stage.fn(name, cfg)


def test_the_cli_needs_a_server_for_dispatch_and_well_formed_accelerate_options(monkeypatch, capsys):
    from spo import cli

    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    assert cli.main(["pipeline", "--params", "/dev/null", "--gpu-deployment", "spo-stage/spo-stage-gpu"]) != 0
    assert "PREFECT_API_URL" in capsys.readouterr().err
    assert cli.main(["pipeline", "--params", "/dev/null", "--accelerate", "train_spo"]) != 0
    assert "STAGE=FILE" in capsys.readouterr().err

