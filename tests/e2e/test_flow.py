"""The Prefect flow end to end on the tiny world, under one prefect_test_harness, against a real MLflow store.

One module-scoped pipeline run is inspected by several tests; a second run checks caching and idempotent
registration, a third one a failing stage.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlflow
import numpy as np
import pytest
from e2e_helpers import PIPELINE_SMALL, free_port, project_cfg, wait_for_http
from mlflow import MlflowClient

from spo import tracking
from spo.errors import DataValidationError

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

CPU_ACCELERATE = """\
compute_environment: LOCAL_MACHINE
distributed_type: "NO"
mixed_precision: "no"
num_machines: 1
num_processes: 1
use_cpu: true
"""


@pytest.fixture(scope="module")
def project(tmp_path_factory, dvc_clone):
    """A fresh project directory, also the working directory while the module runs (as for `make run`).

    It starts with the DVC test's tiny world (same synthetic/base/model config): the flow's synth and base
    stages run and find it up to date, as in a second `make run`, instead of pretraining the base again.
    """
    root = tmp_path_factory.mktemp("flow_project")
    for world in ("data/raw/pickapic_tiny", "models/base"):
        shutil.copytree(dvc_clone[0] / world, root / world)
    store = f"sqlite:///{root / 'mlflow' / 'mlflow.db'}"
    overrides = ["paths.root=.", f"tracking.tracking_uri={store}", *PIPELINE_SMALL]
    (root / "accelerate_cpu.yaml").write_text(CPU_ACCELERATE)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        yield {"root": root, "overrides": overrides, "cfg": project_cfg(Path("."), store, *PIPELINE_SMALL)}


def _run(project, *extra, **kwargs):
    from flows.pipeline import spo_pipeline

    return spo_pipeline(
        preset="tiny",
        overrides=[*project["overrides"], *extra],
        params_file=None,
        return_state=True,
        **kwargs,
    )


@pytest.fixture(scope="module")
def first(prefect_harness, project):
    """The whole pipeline; evaluate goes through `accelerate launch` (a CPU config), as on a GPU pool."""
    state = _run(project, accelerate_configs={"evaluate": str(project["root"] / "accelerate_cpu.yaml")})
    assert state.is_completed(), state.message
    return state.result()


@pytest.fixture(scope="module")
def second(first, project):
    """Same config again after deleting the evaluation: only evaluate runs, the registry is unchanged."""
    tracking.init_store(project["cfg"])
    versions_before = tracking.list_versions("spo-tiny")
    shutil.rmtree(project["cfg"].paths.eval_reports)
    state = _run(project)
    assert state.is_completed(), state.message
    return state.result(), versions_before


def test_flow_runs_every_stage_and_registers(first, project):
    cfg = project["cfg"]
    assert list(first["stages"]) == ["synth", "base", "prepare", "train_spm", "train_spo", "evaluate"]
    assert not any(s["cached"] for s in first["stages"].values())
    for path in (
        cfg.paths.prepared / "data_card.json",
        cfg.paths.spm_model,
        cfg.paths.lora / "pytorch_lora_weights.safetensors",
        cfg.paths.eval_reports / "metrics.json",
        cfg.paths.eval_reports / "grid.png",
    ):
        assert path.exists(), path
    metrics = json.loads((cfg.paths.eval_reports / "metrics.json").read_text())
    assert set(first["eval"]) == {"toy_aesthetic", "clip"}
    assert first["eval"]["toy_aesthetic"]["diff_mean"] == pytest.approx(metrics["toy_aesthetic"]["diff_mean"])

    reg = first["registry"]
    assert reg["model"] == "spo-tiny" and reg["version"] == "1" and reg["created"]
    tracking.init_store(cfg)
    challenger = tracking.get_version("spo-tiny", "challenger")
    assert challenger.version == "1"
    # The gate's decision is recorded on the version and agrees with the champion alias.
    gain = metrics["toy_aesthetic"]["diff_mean"]
    assert (
        challenger.tags["promotion.decision"] == ("promoted" if gain > 0 else "rejected") == reg["decision"]
    )
    champion = tracking.get_version("spo-tiny", "champion")
    assert (champion.version if champion else None) == ("1" if gain > 0 else None) == reg["champion"]


def test_mlflow_parent_run_nests_stage_runs_with_lineage(first, project):
    cfg = project["cfg"]
    tracking.init_store(cfg)
    client = MlflowClient()
    parent = client.get_run(first["mlflow"]["run_id"])
    assert parent.info.status == "FINISHED"
    assert parent.data.params["spo.lr"] == str(cfg.spo.lr)  # params = the resolved config
    children = {r.data.tags["spo.stage"]: r for r in tracking.child_runs(parent.info.run_id)}
    assert set(children) == {
        "synth",
        "base",
        "prepare",
        "train_spm",
        "train_spo",
        "evaluate",
        "register",
        "promote",
    }
    assert all(r.info.status == "FINISHED" for r in children.values())

    prepared_md5 = tracking.dvc_md5(cfg.paths.prepared)
    spm, spo, ev = children["train_spm"], children["train_spo"], children["evaluate"]
    for run in (parent, *children.values()):
        assert run.data.tags["git.commit"] and run.data.tags["git.dirty"] in {"true", "false", "unknown"}
        assert run.data.tags["lineage.base_model"] == str(cfg.paths.base_model.resolve())
        assert run.data.tags["lineage.base_model_md5"] == tracking.dvc_md5(cfg.paths.base_model)
    assert parent.data.tags["lineage.data_prepared_md5"] == prepared_md5
    assert spm.data.tags["lineage.data_prepared_md5"] == prepared_md5
    assert spm.data.tags["lineage.data_prepared_run_id"] == children["prepare"].info.run_id
    assert spo.data.tags["lineage.spm_run_id"] == spm.info.run_id  # the SPM run the SPO run used
    assert ev.data.tags["lineage.lora_run_id"] == spo.info.run_id  # ran under accelerate launch, still nested
    # Step metrics of the stages, and their reports as artifacts.
    assert client.get_metric_history(spm.info.run_id, "spm/final_loss")
    assert any(k.startswith("eval/toy_aesthetic") for k in ev.data.metrics)
    artifacts = {a.path for a in client.list_artifacts(children["prepare"].info.run_id, "data")}
    assert "data/data_card.json" in artifacts
    assert "config/resolved_config.json" in {a.path for a in client.list_artifacts(spo.info.run_id, "config")}
    assert {"pipeline_summary.md", "pipeline_summary.json"} <= {
        a.path for a in client.list_artifacts(parent.info.run_id)
    }
    # The registered version points back to its run and lineage.
    version = tracking.get_version("spo-tiny", "1")
    assert version.tags["lineage.spm_run_id"] == spm.info.run_id
    assert version.tags["lineage.lora_run_id"] == spo.info.run_id
    assert version.tags["lineage.data_prepared_md5"] == prepared_md5


def test_prefect_artifacts_published(first, project):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey

    tracking.init_store(project["cfg"])  # other modules' flow runs publish the same keys: this run's only
    flow_run_id = MlflowClient().get_run(first["mlflow"]["run_id"]).data.tags["prefect.flow_run_id"]
    with get_client(sync_client=True) as client:
        arts = {
            a.key: a
            for a in client.read_artifacts(
                artifact_filter=ArtifactFilter(
                    key=ArtifactFilterKey(any_=["spo-tiny-summary", "spo-tiny-eval", "spo-tiny-spm-accuracy"]),
                    flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]),
                )
            )
        }
    assert set(arts) == {"spo-tiny-summary", "spo-tiny-eval", "spo-tiny-spm-accuracy"}
    summary = arts["spo-tiny-summary"].data
    for heading in (
        "## Data card",
        "## SPM accuracy by timestep",
        "## Evaluation",
        "## Registry",
        "## Tracking",
    ):
        assert heading in summary
    assert first["mlflow"]["run_id"] in summary
    assert "toy_aesthetic" in arts["spo-tiny-eval"].data


def test_registered_model_generates_through_pyfunc(first, project):
    tracking.init_store(project["cfg"])
    model = mlflow.pyfunc.load_model("models:/spo-tiny@challenger")
    [image] = model.predict(["a red circle on a blue background"], params={"num_inference_steps": 2})
    assert image.shape == (32, 32, 3) and image.dtype == np.uint8 and image.std() > 0


def test_second_run_is_cached_and_registration_idempotent(second, project):
    summary, versions_before = second
    cached = {name: s["cached"] for name, s in summary["stages"].items()}
    # evaluate's outputs were deleted: it runs again; everything upstream comes from the cache.
    assert cached == {
        "synth": True,
        "base": True,
        "prepare": True,
        "train_spm": True,
        "train_spo": True,
        "evaluate": False,
    }
    assert (project["cfg"].paths.eval_reports / "metrics.json").exists()
    assert not summary["registry"]["created"] and summary["registry"]["version"] == "1"
    assert [(v.version, v.aliases) for v in tracking.list_versions("spo-tiny")] == [
        (v.version, v.aliases) for v in versions_before
    ]


def test_failing_stage_fails_flow_without_retry_and_leaves_registry(second, project, tmp_path):
    from prefect.client.orchestration import get_client

    tracking.init_store(project["cfg"])
    before = [(v.version, v.aliases, v.tags) for v in tracking.list_versions("spo-tiny")]
    empty = tmp_path / "empty_source"
    empty.mkdir()
    state = _run(project, f"data.source={empty}")
    assert state.is_failed()
    with pytest.raises(DataValidationError, match="no parquet shards"):
        state.result()
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs()
        prepare = [
            r for r in runs if r.flow_run_id == state.state_details.flow_run_id and r.name == "prepare"
        ]
    assert len(prepare) == 1 and prepare[0].run_count == 1  # a data-validation failure is never retried
    assert [(v.version, v.aliases, v.tags) for v in tracking.list_versions("spo-tiny")] == before
    failed = mlflow.search_runs(
        filter_string="tags.`spo.stage` = 'pipeline' and attributes.status = 'FAILED'"
    )
    assert len(failed) == 1


def test_mlflow_views_compare_parent_runs(first, project):
    """What a comparison of parent runs needs is on the parent run; the evaluation's report files and grid
    image on the evaluate run; names and descriptions tell runs apart; the UI opens the experiment on runs."""
    cfg = project["cfg"]
    tracking.init_store(cfg)
    client = MlflowClient()
    parent = client.get_run(first["mlflow"]["run_id"])
    m = parent.data.metrics
    ev = json.loads((cfg.paths.eval_reports / "metrics.json").read_text())
    for scorer in cfg.eval.scorers:
        low, high = ev[scorer]["diff_ci95"]
        assert m[f"eval/{scorer}/diff_ci95_low"] == pytest.approx(low)
        assert m[f"eval/{scorer}/diff_ci95_high"] == pytest.approx(high)
        assert low <= m[f"eval/{scorer}/diff_mean"] <= high
    spo_report = json.loads((cfg.paths.reports / "spo_train.json").read_text())
    assert m["spo/pairs_trained"] == spo_report["pairs_trained"] > 0
    assert m["spo/kept_fraction"] == pytest.approx(spo_report["kept_fraction"])
    for stage in ("synth", "base", "prepare", "train_spm", "train_spo", "evaluate"):
        assert m[f"stage/{stage}/seconds"] == first["stages"][stage]["seconds"]

    digest = tracking.config_digest(cfg)
    assert parent.info.run_name.startswith(f"pipeline tiny-{digest}")
    assert len(parent.info.run_name.split()) >= 3  # PIPELINE_SMALL's changed keys follow the hash
    assert digest in parent.data.tags["mlflow.note.content"]
    children = {r.data.tags["spo.stage"]: r for r in tracking.child_runs(parent.info.run_id)}
    assert children["train_spo"].info.run_name.startswith(f"train_spo tiny-{digest}")
    assert "SPO LoRA" in children["train_spo"].data.tags["mlflow.note.content"]

    evaluate = children["evaluate"].info.run_id
    files = {a.path for a in client.list_artifacts(evaluate, "eval")}
    assert {"eval/grid.png", "eval/diffs.png", "eval/table.md"} <= files
    images = {a.path for a in client.list_artifacts(evaluate, "images")}
    assert any(p.startswith("images/eval_grid") and p.endswith(".png") for p in images), images

    exp = client.get_experiment(parent.info.experiment_id)
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    assert f"--backend-store-uri {tracking.display_uri(cfg)}" in first["mlflow"]["ui"]


def test_mlflow_models_serve_answers_with_png(first, project, tmp_path):
    """MLflow's own `mlflow models serve` on the registered model, as the README documents it."""
    import base64
    import io
    import os
    import subprocess
    import sys
    import urllib.request

    from PIL import Image

    reg = first["registry"]
    alias = "champion" if reg["champion"] else "challenger"  # the tiny gate may reject the LoRA
    port = free_port()
    mlflow_cli = Path(sys.executable).with_name("mlflow")
    env = {  # the server execs `uvicorn` from PATH: the environment's bin first, as in an activated venv
        **os.environ,
        "MLFLOW_TRACKING_URI": tracking.tracking_uri(project["cfg"]),
        "PATH": f"{mlflow_cli.parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    log = (tmp_path / "serve.log").open("w")
    proc = subprocess.Popen(
        [
            str(mlflow_cli),
            "models",
            "serve",
            "-m",
            f"models:/spo-tiny@{alias}",
            "--env-manager",
            "local",
            "-h",
            "127.0.0.1",
            "-p",
            str(port),
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        wait_for_http(f"http://127.0.0.1:{port}/ping", proc, tmp_path / "serve.log", 180, "mlflow models serve")
        body = {"inputs": ["a red circle"], "params": {"num_inference_steps": 2, "output": "png_base64"}}
        req = urllib.request.Request(
            f"http://127.0.0.1:{port}/invocations",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=120) as r:
            answer = json.loads(r.read())
    finally:
        import signal

        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)
    [png] = answer["predictions"]
    image = Image.open(io.BytesIO(base64.b64decode(png)))
    assert image.format == "PNG" and image.size == (32, 32)
    assert np.asarray(image).std() > 0


def test_stage_logs_reach_the_prefect_flow_run(first, project):
    """The stages' spo.* log lines are in the flow run's logs (the Prefect UI's Logs tab) via the API."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogHandler

    APILogHandler().flush()  # the batched log worker sends what it holds
    tracking.init_store(project["cfg"])
    flow_run_id = MlflowClient().get_run(first["mlflow"]["run_id"]).data.tags["prefect.flow_run_id"]
    with get_client(sync_client=True) as client:
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
    spo_lines = [log for log in logs if log.name.startswith("spo.")]
    assert len(spo_lines) >= 5, sorted({log.name for log in logs})
    assert any(log.name == "spo.stages.train_spo" for log in spo_lines)


def test_sweep_flow_publishes_its_table_as_an_artifact(first, project):
    """`spo sweep --prefect`: the sweep runs as a flow on the pipeline's project (its data, base and SPM) and
    its table becomes the flow run's markdown artifact. Last in the module: it adds runs to the store."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    from flows.sweep import spo_sweep

    sweep = project["root"] / "sweeps" / "one.yaml"
    sweep.parent.mkdir(exist_ok=True)
    sweep.write_text("groups:\n  - name: lr\n    variants:\n      - {name: high, set: [spo.lr=0.01]}\n")
    state = spo_sweep("one", "tiny", project["overrides"], None, return_state=True)
    assert state.is_completed(), state.message
    summary = state.result()
    assert [r["variant"] for r in summary["groups"][0]["rows"]] == ["high"]
    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["sweep-one"]))
        )
    assert (
        len(arts) == 1
        and "| high |" in arts[0].data
        and arts[0].flow_run_id == state.state_details.flow_run_id
    )
