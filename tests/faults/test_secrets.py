"""Secrets: credentials in URLs never reach the log, MLflow params/tags/artifacts or report files."""

from __future__ import annotations

import json
import logging

from mlflow import MlflowClient

from spo import tracking
from spo.config import load_config

SECRET = "s3cr3t-t0ken"


def test_credentials_are_redacted_in_params_artifacts_and_commands(tmp_path, caplog):
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = load_config(
        "tiny",
        [f"paths.root={tmp_path}", f"tracking.tracking_uri={store}", "tracking.log_system_metrics=false",
         f"eval.lora=https://alice:{SECRET}@models.example.com/lora?token={SECRET}"],
        params_file=None,
    )
    with caplog.at_level(logging.INFO), tracking.stage_tracker(cfg, "synth") as tracker:
        tracker.set_tags({"note": f"pulled from https://bob:{SECRET}@git.example.com/repo"})
        run_id = tracker.run_id
    run = MlflowClient().get_run(run_id)
    dumped = json.dumps({"params": run.data.params, "tags": run.data.tags})
    assert SECRET not in dumped and "https://***@models.example.com/lora?token=***" in dumped
    config_json = (tracking.mlflow_artifact_dir(run.info.artifact_uri) / "config" / "resolved_config.json").read_text()
    assert SECRET not in config_json
    assert SECRET not in caplog.text

    creds = cfg.model_copy(deep=True)
    creds.tracking.tracking_uri = f"https://alice:{SECRET}@mlflow.example.com"
    for shown in (tracking.ui_command(creds), tracking.run_url("r", "1", creds), tracking.display_uri(creds)):
        assert SECRET not in shown and "***@mlflow.example.com" in shown
