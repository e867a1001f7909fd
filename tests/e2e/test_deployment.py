"""prefect.yaml deploys to a real `prefect server` (started here) with its weekly schedule and work pool."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import httpx
import pytest
import yaml
from e2e_helpers import REPO

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

PREFECT = str(Path(sys.executable).with_name("prefect"))


def test_deploy_registers_weekly_schedule_in_gpu_pool(prefect_server, tmp_path):
    api, env = prefect_server
    # Deploy from a copy of the project files prefect needs, so the checkout stays untouched.
    project = tmp_path / "project"
    shutil.copytree(REPO / "flows", project / "flows", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "prefect.yaml", project / "prefect.yaml")

    def prefect(*args: str) -> str:
        proc = subprocess.run(
            [PREFECT, "--no-prompt", *args], cwd=project, env=env, capture_output=True, text=True
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr
        return proc.stdout

    for pool in ("gpu", "cpu"):
        prefect("work-pool", "create", pool, "--type", "process")
    prefect("deploy", "--all")

    deployment = httpx.get(f"{api}/deployments/name/spo-pipeline/spo-retrain").json()
    spec = yaml.safe_load((REPO / "prefect.yaml").read_text())["deployments"][0]
    assert deployment["entrypoint"] == "flows/pipeline.py:spo_pipeline"
    assert deployment["work_pool_name"] == "gpu"
    assert deployment["parameters"] == spec["parameters"]
    assert {"preset", "overrides"} <= set(deployment["parameters"])
    assert deployment["global_concurrency_limit"]["limit"] == 1
    # The flow's parameter schema (what the UI offers on "Run with parameters") comes from its signature.
    assert {"preset", "overrides", "params_file", "accelerate_configs"} <= set(
        deployment["parameter_openapi_schema"]["properties"]
    )
    [schedule] = deployment["schedules"]
    assert schedule["active"] and schedule["schedule"]["cron"] == "0 3 * * 1"
    assert schedule["schedule"]["timezone"] == "UTC"
    # Scheduled runs exist on the server, on Mondays at 03:00 UTC, queued for the gpu pool.
    deadline, runs = time.monotonic() + 60, []
    while not runs and time.monotonic() < deadline:
        time.sleep(1)
        runs = httpx.post(
            f"{api}/flow_runs/filter",
            json={"flow_runs": {"deployment_id": {"any_": [deployment["id"]]}}, "limit": 3},
        ).json()
    assert runs, "the server scheduled no runs for the deployment"
    for run in runs:
        assert run["state_type"] == "SCHEDULED" and run["work_pool_name"] == "gpu"
        start = datetime.fromisoformat(run["expected_start_time"].replace("Z", "+00:00"))
        assert (start.weekday(), start.hour, start.minute) == (0, 3, 0)  # Monday 03:00 UTC
