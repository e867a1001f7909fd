"""`spo sweep` on the tiny world: variant workspaces sharing the project's data, base and SPM, an SPM variant
trained once, identical configs run once, a real SQLite MLflow store with the sweep parent and child runs, and the
report -- whose pooled gains are recomputed here from the per-image scores."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from spo_test_helpers import SMALL, make_cfg

from spo.cli import main
from spo.models.preference import TimeConditionedCLIP, load_spm, save_spm
from spo.pipeline_spec import artifact_path

SMALL_RUN = [
    "spo.num_steps=4",
    "spo.divert_start_step=1",
    "spo.num_candidates=2",
    "spo.sample_batch_size=4",
    "spo.train_batch_size=4",
    "spo.num_epochs=1",
    "spo.num_prompts=4",
    "spo.threshold=0.0",
    "eval.num_prompts=3",
    "eval.num_images_per_prompt=2",
    "eval.num_steps=4",
    "eval.batch_size=8",
    "eval.bootstrap_samples=200",
    "eval.scorers=[toy_aesthetic,spm]",
    "eval.grid_prompts=2",
    "eval.grid_seeds=1",
    "spm.max_steps=2",
    "spm.batch_size=8",
    "spm.eval_timesteps=[0]",
    "spm.checkpoint_every=2",
    "spm.eval_every=2",
    "spm.warmup_steps=1",
]

SWEEP = """
description: two variants and a repeat of the default
seeds: [0]
metric: toy_aesthetic
paper_metric: PickScore
paper_base: 20.53
groups:
  - name: judge
    variants:
      - {name: spm, set: [], paper: 21.43}
      - {name: no-step, set: [spm.step_conditioned=false], paper: 21.19}
  - name: again
    variants:
      - {name: k2, set: [spo.num_candidates=2]}
"""


@pytest.fixture
def sweep_project(tiny_project, tmp_path):
    root = tiny_project.paths.root
    clip = root / "models" / "base" / "clip"
    save_spm(TimeConditionedCLIP.from_clip(str(clip), str(clip), 64), root / "models" / "spm")
    (root / "sweeps").mkdir()
    (root / "sweeps" / "mini.yaml").write_text(SWEEP)
    return root


def test_sweep_runs_variants_shares_inputs_and_reports(sweep_project):
    root = sweep_project
    db = root / "mlflow" / "mlflow.db"
    args = ["sweep", "mini", "--preset", "tiny", "--params", "/dev/null"]
    sets = [f"paths.root={root}", f"tracking.tracking_uri=sqlite:///{db}", *SMALL, *SMALL_RUN]
    assert main([*args, *[a for s in sets for a in ("--set", s)]]) == 0

    runs = root / "runs" / "sweeps" / "mini"
    spm_ws = list((root / "runs" / "spm").iterdir())
    assert len(spm_ws) == 1, "the no-step-condition SPM is trained once"
    assert load_spm(spm_ws[0] / "models" / "spm").step_conditioned is False
    default = runs / "judge" / "spm" / "seed0"
    for ws in (default, runs / "judge" / "no-step" / "seed0"):
        assert (ws / "data").is_symlink() and (ws / "data").resolve() == (root / "data").resolve()
        assert (ws / "models" / "base").resolve() == (root / "models" / "base").resolve()
        # Every variant is evaluated by the project's SPM.
        assert (ws / "models" / "spm").resolve() == (root / "models" / "spm").resolve()
        assert (ws / "models" / "spo" / "lora").is_dir() and (
            ws / "reports" / "eval" / "metrics.json"
        ).exists()
    # The repeat of the default config ran nowhere: it reused the default's workspace.
    assert not (runs / "again" / "k2" / "seed0" / "reports").exists()

    summary = json.loads((root / "reports" / "sweeps" / "mini" / "results.json").read_text())
    assert [r["cached"] for r in summary["runs"]] == [False, False, True]
    rows = {r["variant"]: r for g in summary["groups"] for r in g["rows"]}
    assert set(rows) == {"spm", "no-step", "k2"}
    assert rows["k2"]["gains"] == rows["spm"]["gains"]
    # Oracle: the pooled gain is the mean paired difference of the per-image scores.
    per_image = pd.read_parquet(default / "reports" / "eval" / "per_image.parquet")
    diff = (per_image["toy_aesthetic_spo"] - per_image["toy_aesthetic_base"]).to_numpy()
    gain = rows["spm"]["gains"]["toy_aesthetic"]
    assert gain["gain"] == pytest.approx(float(np.mean(diff)))
    assert gain["ci95"][0] <= gain["gain"] <= gain["ci95"][1]
    assert rows["spm"]["paper_gain"] == pytest.approx(21.43 - 20.53)
    table = (root / "reports" / "sweeps" / "mini" / "table.md").read_text()
    assert "## judge" in table and "| no-step |" in table and "+0.90" in table
    assert (root / "reports" / "sweeps" / "mini" / "gains.png").stat().st_size > 1000

    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{db}")
    exp = client.get_experiment_by_name("spo")
    all_runs = client.search_runs([exp.experiment_id])
    parents = [r for r in all_runs if r.data.tags.get("mlflow.runName") == "sweep mini"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    parent = parents[0]
    children = [r for r in all_runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    # One run per (variant, seed), and the shared SPM variant's training, which is no single variant's.
    assert sorted(r.data.tags["mlflow.runName"].split(" tiny-")[0] for r in children) == [
        "again/k2 seed0",
        "judge/no-step seed0",
        "judge/spm seed0",
        "train_spm",
    ]
    child = next(r for r in children if r.data.tags["mlflow.runName"] == "judge/spm seed0")
    assert child.data.metrics["toy_aesthetic/gain"] == pytest.approx(gain["gain"])
    assert child.data.params["sweep.variant"] == "spm"
    stages = sorted(
        r.data.tags["mlflow.runName"].split()[0]
        for r in all_runs
        if r.data.tags.get("mlflow.parentRunId") == child.info.run_id
    )
    assert stages == ["evaluate", "train_spo"]
    assert parent.data.metrics["judge.spm/toy_aesthetic/gain"] == pytest.approx(gain["gain"])
    assert {a.path for a in client.list_artifacts(parent.info.run_id, "sweep")} >= {
        "sweep/table.md",
        "sweep/gains.png",
    }

    # A second invocation reuses every finished workspace.
    assert main([*args, *[a for s in sets for a in ("--set", s)]]) == 0
    again = json.loads((root / "reports" / "sweeps" / "mini" / "results.json").read_text())
    assert all(r["cached"] for r in again["runs"])


def test_sweep_refuses_a_variant_that_changes_shared_inputs(sweep_project, capsys):
    root = sweep_project
    (root / "sweeps" / "bad.yaml").write_text(
        "groups:\n  - name: g\n    variants:\n      - {name: v, set: [model.resolution=64]}\n"
    )
    cfg_args = ["--preset", "tiny", "--params", "/dev/null", "--set", f"paths.root={root}"]
    assert main(["sweep", "bad", *cfg_args]) == 2
    assert "may change only spm, spo, dpo, eval" in capsys.readouterr().err
    assert main(["sweep", "nosuch", *cfg_args]) == 2
    err = capsys.readouterr().err
    assert "no sweep 'nosuch'" in err and "'bad'" in err and "'mini'" in err


def test_sweep_needs_the_project_spm_first(tiny_project, capsys):
    root = tiny_project.paths.root
    (root / "sweeps").mkdir()
    (root / "sweeps" / "mini.yaml").write_text(SWEEP)
    assert not artifact_path(make_cfg(root), "spm_model").exists()
    code = main(["sweep", "mini", "--preset", "tiny", "--params", "/dev/null", "--set", f"paths.root={root}"])
    assert code != 0 and "Run `make run`" in capsys.readouterr().err
