"""MLflow registry: registration, the promotion gate both ways, idempotence, pyfunc loading, failures.

Real SQLite stores, a real peft LoRA on the random tiny SD-1.5; evaluation metrics are constructed so the
gate's expected outcome is known by hand.
"""

from __future__ import annotations

import mlflow
import numpy as np
import pytest
from e2e_helpers import make_lora, write_eval_metrics
from mlflow import MlflowClient

from spo import tracking
from spo.errors import SPOError
from spo.stages import promote, register

pytestmark = pytest.mark.e2e


def tags(diff: float, low: float, protocol: str = "p") -> dict[str, str]:
    return {"eval.m.diff_mean": repr(diff), "eval.m.diff_ci95_low": repr(low), "eval.protocol": protocol}


@pytest.mark.parametrize(
    ("challenger", "champion", "margin", "require_ci", "promote_expected", "delta"),
    [
        (tags(0.30, 0.10), None, 0.0, True, True, 0.30),  # first champion: beats the base
        (tags(0.30, -0.01), None, 0.0, True, False, 0.30),  # CI touches 0 -> not significant
        (tags(0.30, -0.01), None, 0.0, False, True, 0.30),  # ... unless the CI is not required
        (tags(-0.05, -0.10), None, 0.0, False, False, -0.05),  # worse than the base
        (tags(0.30, 0.10), tags(0.20, 0.05), 0.0, True, True, 0.10),
        (tags(0.30, 0.10), tags(0.20, 0.05), 0.15, True, False, 0.10),  # gain over champion below margin
        (tags(0.20, 0.10), tags(0.20, 0.05), 0.0, True, False, 0.0),  # a tie does not move the champion
        (tags(0.10, 0.02), tags(0.25, 0.05), 0.0, True, False, -0.15),
    ],
)
def test_gate(challenger, champion, margin, require_ci, promote_expected, delta):
    result = promote.decide(challenger, champion, "m", margin, require_ci)
    assert result.promote is promote_expected
    assert result.delta == pytest.approx(delta)
    assert result.reason.startswith("m:")


def test_gate_flags_incomparable_protocols_and_missing_metric():
    result = promote.decide(tags(0.3, 0.1, "a"), tags(0.1, 0.05, "b"), "m", 0.0, True)
    assert result.promote and not result.comparable
    with pytest.raises(SPOError, match="primary_metric"):
        promote.decide({"eval.other.diff_mean": "1"}, None, "m", 0.0, True)


def _versions(cfg) -> list[tuple[str, tuple[str, ...]]]:
    tracking.init_store(cfg)
    return [(v.version, tuple(sorted(v.aliases))) for v in tracking.list_versions(cfg.registered_model_name)]


def test_promotion_both_ways_and_idempotent_registration(registry_project):
    cfg = registry_project
    name = cfg.registered_model_name
    client_versions = lambda: _versions(cfg)  # noqa: E731

    # v1: significant gain over the base -> first champion.
    make_lora(cfg, seed=1)
    write_eval_metrics(cfg, {"toy_aesthetic": (0.30, 0.10, 0.50), "clip": (0.0, -0.1, 0.1)})
    r1 = register.run(cfg)
    assert r1["created"] and r1["version"] == "1"
    p1 = promote.run(cfg)
    assert p1["promoted"] and p1["champion"] == "1" and p1["champion_before"] is None
    assert client_versions() == [("1", ("challenger", "champion"))]

    # The same LoRA again (even re-evaluated): no new version, challenger stays on it.
    write_eval_metrics(cfg, {"toy_aesthetic": (0.31, 0.11, 0.51)})
    again = register.run(cfg)
    assert not again["created"] and again["version"] == "1"
    assert len(client_versions()) == 1
    assert promote.run(cfg)["decision"] == "already-champion"

    # v2: smaller gain than the champion -> rejected, champion untouched, decision recorded.
    make_lora(cfg, seed=2)
    write_eval_metrics(cfg, {"toy_aesthetic": (0.20, 0.05, 0.35)})
    assert register.run(cfg)["version"] == "2"
    p2 = promote.run(cfg)
    assert not p2["promoted"] and p2["champion"] == "1"
    assert p2["delta"] == pytest.approx(-0.10)
    assert client_versions() == [("1", ("champion",)), ("2", ("challenger",))]
    v2 = tracking.get_version(name, "2")
    assert v2.tags["promotion.decision"] == "rejected"
    assert v2.tags["promotion.champion_before"] == "1"

    # v3: beats the champion by more than the margin with a CI above 0 -> champion moves.
    make_lora(cfg, seed=3)
    write_eval_metrics(cfg, {"toy_aesthetic": (0.45, 0.30, 0.60)})
    assert register.run(cfg)["version"] == "3"
    p3 = promote.run(cfg)
    assert p3["promoted"] and p3["champion"] == "3" and p3["champion_before"] == "1"
    assert client_versions() == [("1", ("previous-champion",)), ("2", ()), ("3", ("challenger", "champion"))]
    assert tracking.get_version(name, "3").tags["promotion.decision"] == "promoted"
    assert tracking.get_version(name, "1").tags["promotion.replaced_by"] == "3"

    # Registered versions carry metric and lineage tags.
    v3 = tracking.get_version(name, "3")
    assert float(v3.tags["eval.toy_aesthetic.diff_mean"]) == pytest.approx(0.45)
    assert float(v3.tags["eval.toy_aesthetic.diff_ci95_low"]) == pytest.approx(0.30)
    assert v3.tags["lineage.lora_md5"] == tracking.dvc_md5(cfg.paths.lora)
    assert v3.tags["lineage.base_model_md5"].endswith(".dir")
    assert {"git.commit", "git.dirty", "lineage.base_model", "eval.protocol"} <= set(v3.tags)


def test_register_bad_inputs_leave_registry_untouched(registry_project):
    cfg = registry_project
    make_lora(cfg, seed=4)
    write_eval_metrics(cfg, {"toy_aesthetic": (0.3, 0.1, 0.5)})
    register.run(cfg)
    before = _versions(cfg)

    make_lora(cfg, seed=5)
    write_eval_metrics(cfg, {"clip": (0.3, 0.1, 0.5)})  # the primary metric was not evaluated
    with pytest.raises(SPOError, match="toy_aesthetic"):
        register.run(cfg)
    (cfg.paths.eval_reports / "metrics.json").unlink()
    with pytest.raises(SPOError, match="spo evaluate"):
        register.run(cfg)
    assert _versions(cfg) == before


@pytest.mark.slow
def test_registered_model_loads_as_pyfunc_and_generates(registry_project, tmp_path):
    """models:/<name>@challenger through mlflow.pyfunc draws what diffusers draws with base + this LoRA."""
    import torch
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    cfg = registry_project
    lora_file = make_lora(cfg, seed=6)
    write_eval_metrics(cfg, {"toy_aesthetic": (0.3, 0.1, 0.5)})
    register.run(cfg)
    uri = f"models:/{cfg.registered_model_name}@challenger"

    # The version is self-contained: the tiny base is bundled, so it loads with the project gone.
    import shutil

    moved = tmp_path / "moved_base"
    shutil.move(cfg.paths.base_model, moved)
    model = tracking.load_model(uri, cfg)
    prompts = ["a red circle on a blue background", "a small green square"]
    images = model.predict(prompts, params={"seed": 7, "num_inference_steps": 3})
    assert len(images) == 2 and images[0].shape == (32, 32, 3) and images[0].dtype == np.uint8

    # Oracle: the stock diffusers pipeline with the same base, LoRA, sampler and seed.
    pipe = StableDiffusionPipeline.from_pretrained(moved, safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)

    def draw():
        out = pipe(
            prompts,
            num_inference_steps=3,
            guidance_scale=cfg.eval.cfg_scale,
            eta=cfg.eval.eta,
            height=32,
            width=32,
            generator=torch.Generator().manual_seed(7),
            output_type="np",
        )
        return (out.images * 255).round().clip(0, 255).astype("uint8")

    without_lora = draw()
    pipe.load_lora_weights(str(lora_file.parent))
    with_lora = draw()
    np.testing.assert_array_equal(np.stack(images), with_lora)
    assert np.abs(with_lora.astype(int) - without_lora.astype(int)).mean() > 1  # the LoRA is applied

    # resolve_lora_uri hands the registered LoRA bytes to `spo generate` / `spo evaluate`.
    resolved = tracking.resolve_lora_uri(uri, cfg)
    assert (resolved / "pytorch_lora_weights.safetensors").read_bytes() == lora_file.read_bytes()
    with pytest.raises(SPOError, match="spo promote"):
        tracking.resolve_lora_uri(f"models:/{cfg.registered_model_name}@champion", cfg)


def test_spo_generate_from_registry(registry_project, tmp_path):
    from spo.cli import main

    cfg = registry_project
    make_lora(cfg, seed=8)
    write_eval_metrics(cfg, {"toy_aesthetic": (0.3, 0.1, 0.5)})
    register.run(cfg)
    assert promote.run(cfg)["promoted"]
    out = tmp_path / "out.png"
    args = ["generate", "--params", "/dev/null", "--preset", "tiny"]
    args += [f"--set=paths.root={cfg.paths.root}", f"--set=tracking.tracking_uri={cfg.tracking.tracking_uri}"]
    args += [f"--set=registry.model_name={cfg.registered_model_name}", "--steps", "2"]
    args += ["--model", f"models:/{cfg.registered_model_name}@champion", "a red circle", "-o", str(out)]
    assert main(args) == 0
    from PIL import Image

    assert Image.open(out).size == (32, 32)


def test_stage_runs_nest_under_the_pipeline_run(registry_project):
    """stage_tracker opens a nested run under pipeline_run, logs the config and tags lineage by content."""
    cfg = registry_project
    make_lora(cfg, seed=9)
    with tracking.pipeline_run(cfg) as parent:
        with tracking.stage_tracker(cfg, "train_spo") as stage:
            stage.log_metrics({"loss": 1.5}, step=3)
            stage.log_params({"spo.lr": 123})  # clashes with the config's value: kept as first logged
    client = MlflowClient()
    run = client.get_run(stage.run_id)
    assert run.data.tags["mlflow.parentRunId"] == parent.run_id
    assert run.data.tags["spo.output_md5"] == tracking.dvc_md5(cfg.paths.lora)
    assert run.data.params["spo.lr"] == str(cfg.spo.lr)
    assert client.get_metric_history(stage.run_id, "loss")[0].step == 3
    assert run.info.status == "FINISHED"
    assert [r.info.run_id for r in tracking.child_runs(parent.run_id)] == [stage.run_id]
    with pytest.raises(RuntimeError):
        with tracking.stage_tracker(cfg, "evaluate") as failing:
            raise RuntimeError("boom")
    assert client.get_run(failing.run_id).info.status == "FAILED"
    assert mlflow.active_run() is None
