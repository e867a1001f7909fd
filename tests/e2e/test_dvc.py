"""dvc.yaml: `dvc repro` of the whole tiny pipeline in a fresh git clone, a no-op second run, `dvc exp run -S`,
`dvc metrics show` / `dvc plots show`; and dvc.yaml declaring what the Prefect flow's stages write."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from e2e_helpers import REPO, sh

pytestmark = pytest.mark.e2e

STAGES = ["synth", "base", "prepare", "train_spm", "train_spo", "evaluate", "register", "promote"]


@pytest.mark.slow
def test_repro_runs_every_stage_in_a_fresh_clone(dvc_clone):
    clone, _, log = dvc_clone
    for stage in STAGES:
        assert f"Running stage '{stage}'" in log, stage
    lock = yaml.safe_load((clone / "dvc.lock").read_text())["stages"]
    assert set(lock) == set(STAGES)
    assert (clone / "models/spo/lora/pytorch_lora_weights.safetensors").exists()
    register = json.loads((clone / "reports/registry/register.json").read_text())
    assert register["model"] == "spo-tiny" and register["version"] == "1"
    # Stages record their params: the locked value is what params.yaml says.
    assert lock["train_spo"]["params"]["params.yaml"]["spo"]["num_prompts"] == 2


@pytest.mark.slow
def test_second_repro_is_a_noop(dvc_clone):
    clone, env, _ = dvc_clone
    again = sh(["dvc", "repro"], clone, env)
    assert "Running stage" not in again.stdout
    assert "up to date" in again.stdout
    assert sh(["dvc", "status"], clone, env).stdout.strip() == "Data and pipelines are up to date."


@pytest.mark.slow
def test_metrics_and_plots_show(dvc_clone, tmp_path):
    clone, env, _ = dvc_clone
    metrics = json.loads(sh(["dvc", "metrics", "show", "--json"], clone, env).stdout)
    data = next(iter(metrics.values()))["data"]
    spm = data["reports/spm_metrics.json"]["data"]
    assert set(spm["accuracy"]) == {"501"} and 0 <= spm["accuracy"]["501"] <= 1
    assert "reports/eval/metrics.json" not in data  # the full report stays out of the table
    evaluation = data["reports/eval/headline.json"]["data"]
    full = json.loads((clone / "reports/eval/metrics.json").read_text())
    assert {"toy_aesthetic", "clip"} <= set(evaluation)
    assert set(evaluation["toy_aesthetic"]) == {"diff_mean", "ci_low", "ci_high", "win_rate"}
    assert evaluation["toy_aesthetic"]["diff_mean"] == round(full["toy_aesthetic"]["diff_mean"], 4)

    out = tmp_path / "plots"
    sh(["dvc", "plots", "show", "-o", str(out)], clone, env)
    html = (out / "index.html").read_text()
    for title in ("SPM accuracy vs t", "SPO training loss", "Evaluation gain"):
        assert title in html


@pytest.mark.slow
def test_exp_run_set_param_reruns_only_what_depends_on_it(dvc_clone):
    clone, env, _ = dvc_clone
    exp = sh(["dvc", "exp", "run", "-S", "registry.margin=0.5", "-n", "strict-gate"], clone, env)
    ran = [s for s in STAGES if f"Running stage '{s}'" in exp.stdout]
    assert ran == ["register", "promote"]  # the gate's params feed only the registry stages
    shown = sh(["dvc", "exp", "show", "--json"], clone, env).stdout
    assert "strict-gate" in shown
    locked = yaml.safe_load((clone / "dvc.lock").read_text())["stages"]["promote"]["params"]["params.yaml"]
    assert locked["registry"]["margin"] == 0.5


def test_dvc_yaml_declares_what_the_flow_stages_write(tmp_path):
    """Both orchestrators run the same stages: every output the flow's cache checks is a DVC out/metric/plot,
    and the flow's config sections are DVC params of that stage."""
    from spo.config import load_config
    from spo.pipeline_spec import STAGES as FLOW_STAGES

    spec = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    assert list(spec) == STAGES
    cfg = load_config("tiny", [f"paths.root={tmp_path}"], params_file=None)
    for stage in FLOW_STAGES:
        declared = set()
        for kind in ("outs", "metrics", "plots"):
            for entry in spec[stage.name].get(kind, []):
                declared.add(next(iter(entry)) if isinstance(entry, dict) else entry)
        for out in stage.output_paths(cfg):
            rel = str(Path(out).relative_to(tmp_path))
            assert rel in declared or any(d.startswith(rel + "/") for d in declared), (stage.name, rel)
        assert set(stage.sections) <= set(spec[stage.name]["params"]), stage.name
        assert spec[stage.name]["cmd"].startswith("spo ")
