"""`spo train-spm` on the tiny world: outputs and schema, resume, SDXL, the pretrained import, failures."""

from __future__ import annotations

import csv
import json
import logging
import math
import shutil

import pytest
import torch
from spm_helpers import official_layout, perturb_time_conditioning
from spo_test_helpers import make_cfg

from spo import spm_training
from spo.errors import ModelLoadError, NonFiniteError
from spo.models.preference import TimeConditionedCLIP, load_spm
from spo.stages import train_spm

EVAL_T = ["0", "251", "501", "701", "951"]
# Small and fast: 4 optimizer steps of 8 pairs, checkpoints every 2.
QUICK = [
    "spm.max_steps=4",
    "spm.batch_size=8",
    "spm.checkpoint_every=2",
    "spm.eval_every=2",
    "spm.warmup_steps=1",
]


def _cfg(project_cfg, *overrides):
    return make_cfg(project_cfg.paths.root, *QUICK, *overrides)


def _read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_train_spm_outputs_and_resume_continue_the_same_run(tiny_project):
    cfg = _cfg(tiny_project)
    result = train_spm.run(cfg)

    # Contract outputs.
    metrics = json.loads((cfg.paths.reports / "spm_metrics.json").read_text())
    assert list(metrics["accuracy"]) == EVAL_T and list(metrics["initial_accuracy"]) == EVAL_T
    assert metrics["n_pairs"] > 0 and metrics["steps"] == 4
    assert all(
        0.0 <= a <= 1.0 for a in [*metrics["accuracy"].values(), *metrics["initial_accuracy"].values()]
    )
    acc_rows = _read_csv(cfg.paths.reports / "spm_accuracy.csv")
    assert [r["t"] for r in acc_rows] == EVAL_T
    assert float(acc_rows[0]["accuracy"]) == pytest.approx(metrics["accuracy"]["0"])
    curves = _read_csv(cfg.paths.reports / "spm_train_curves.csv")
    assert [int(r["step"]) for r in curves] == [1, 2, 3, 4]
    assert all(torch.isfinite(torch.tensor(float(r["loss"]))) for r in curves)
    assert result["steps"] == 4

    spm = load_spm(cfg.paths.spm_model)
    spm_config = json.loads((cfg.paths.spm_model / "spm_config.json").read_text())
    assert spm_config["steps"] == 4 and spm_config["training_config_hash"]
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    assert torch.isfinite(spm.score(images, ["a red circle", "a blue square"], torch.tensor([0, 500]))).all()

    # Checkpoints at steps 2 and 4 (the limit keeps both).
    ckpts = sorted(p.name for p in (cfg.paths.checkpoints / "spm").glob("checkpoint-*"))
    assert ckpts == ["checkpoint-2", "checkpoint-4"]

    # Resume from step 2 in a fresh copy of the outputs: steps 3 and 4 repeat exactly, and so does the model.
    first_weights = {k: v.clone() for k, v in spm.state_dict().items()}
    shutil.rmtree(cfg.paths.spm_model)
    resumed = train_spm.run(cfg, resume=str(cfg.paths.checkpoints / "spm" / "checkpoint-2"))
    assert resumed["steps"] == 4
    curves_b = _read_csv(cfg.paths.reports / "spm_train_curves.csv")
    assert [int(r["step"]) for r in curves_b] == [1, 2, 3, 4]
    for a, b in zip(curves, curves_b, strict=True):
        assert float(b["loss"]) == pytest.approx(float(a["loss"]), rel=1e-5, abs=1e-6)
    second = load_spm(cfg.paths.spm_model).state_dict()
    for k, v in first_weights.items():
        torch.testing.assert_close(second[k], v, rtol=1e-5, atol=1e-6)
    # The initial-model accuracy travels with the checkpoint instead of being recomputed differently.
    metrics_b = json.loads((cfg.paths.reports / "spm_metrics.json").read_text())
    assert metrics_b["initial_accuracy"] == metrics["initial_accuracy"]


def test_adafactor_keeps_a_factored_state_trains_and_resumes_exactly(tiny_project):
    """spm.optimizer=adafactor: its checkpointed state is a small fraction of the weights (AdamW's is twice
    them), the model moves, and a resume restores that state -- steps after it repeat exactly."""
    cfg = _cfg(tiny_project, "spm.optimizer=adafactor", "spm.lr=1e-2", "spm.eval_timesteps=[0]")
    initial = TimeConditionedCLIP.from_clip(cfg.resolve_ref(cfg.spm.init), time_embed_dim=cfg.spm.time_embed_dim)
    train_spm.run(cfg)
    trained = load_spm(cfg.paths.spm_model).state_dict()
    moved = [k for k, v in initial.state_dict().items() if not torch.equal(trained[k], v)]
    assert len(moved) > len(trained) // 2

    ckpt = cfg.paths.checkpoints / "spm" / "checkpoint-2"
    optimizer_bytes = sum(f.stat().st_size for f in ckpt.glob("optimizer*"))
    model_bytes = sum(f.stat().st_size for f in ckpt.glob("model*"))
    assert 0 < optimizer_bytes < 0.25 * model_bytes

    shutil.rmtree(cfg.paths.spm_model)
    train_spm.run(cfg, resume=str(ckpt))
    for k, v in load_spm(cfg.paths.spm_model).state_dict().items():
        torch.testing.assert_close(v, trained[k], rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_train_spm_runs_on_an_sdxl_architecture_base(tiny_project):
    root = tiny_project.paths.root
    cfg = _cfg(
        tiny_project,
        "model.arch=sdxl",
        f"model.pretrained={root / 'models' / 'base_sdxl'}",
        "spm.max_steps=2",
        "spm.eval_timesteps=[0,501]",
    )
    result = train_spm.run(cfg)
    assert result["steps"] == 2
    metrics = json.loads((cfg.paths.reports / "spm_metrics.json").read_text())
    assert list(metrics["accuracy"]) == ["0", "501"]
    assert load_spm(cfg.paths.spm_model) is not None


def test_nonfinite_training_stops_and_keeps_the_previous_model(tiny_project):
    cfg = _cfg(tiny_project, "spm.eval_timesteps=[0]", "spm.max_steps=50")
    previous = cfg.paths.spm_model
    previous.mkdir(parents=True)
    (previous / "marker").write_text("previous output")
    # An absurd learning rate blows the weights up after one step; the loss turns NaN/inf.
    bad = make_cfg(
        cfg.paths.root,
        *QUICK,
        "spm.eval_timesteps=[0]",
        "spm.max_steps=50",
        "spm.lr=1e30",
        "spm.warmup_steps=0",
        "spm.max_grad_norm=1e30",
    )
    with pytest.raises(NonFiniteError, match="spm.lr"):
        train_spm.run(bad)
    assert (previous / "marker").read_text() == "previous output"
    assert not (cfg.paths.reports / "spm_metrics.json").exists()


def test_missing_init_clip_is_a_clear_error(tiny_project):
    cfg = _cfg(tiny_project, f"spm.init={tiny_project.paths.root / 'no_such_clip'}")
    with pytest.raises(ModelLoadError, match="no_such_clip"):
        train_spm.run(cfg)


def test_pretrained_source_imports_the_released_layout(tiny_project, tmp_path):
    from spo.models.preference import TimeConditionedCLIP

    clip_dir = tiny_project.paths.root / "models" / "base" / "clip"
    released = TimeConditionedCLIP.from_clip(str(clip_dir), time_embed_dim=64).eval()
    perturb_time_conditioning(released, seed=7)
    ckpt = tmp_path / "released"
    ckpt.mkdir()
    torch.save(official_layout(released), ckpt / "sd-v1-5_step-aware_preference_model.bin")

    cfg = _cfg(tiny_project, f"spm.source=pretrained:{ckpt}", "spm.eval_timesteps=[0,501]")
    result = train_spm.run(cfg)
    assert set(result["accuracy"]) == {"0", "501"}
    imported = load_spm(cfg.paths.spm_model)
    images = torch.rand(3, 3, 32, 32) * 2 - 1
    prompts = ["a red circle", "a", "a green square"]
    t = torch.tensor([0, 300, 900])
    with torch.no_grad():
        torch.testing.assert_close(imported.score(images, prompts, t), released.score(images, prompts, t))


def test_validation_accuracy_cached_and_uncached_agree_with_a_hand_count(tiny_project, tmp_path):
    from spo.models.preference import TimeConditionedCLIP

    cfg = _cfg(tiny_project)
    accelerator = spm_training.make_accelerator(cfg, tmp_path)
    _, val = spm_training.pair_streams(cfg)
    denoiser = spm_training.PairDenoiser(spm_training.base_model(cfg, accelerator.device), cfg.spm.cfg_scale)
    spm = TimeConditionedCLIP.from_clip(str(cfg.paths.base_clip), time_embed_dim=64).eval()
    perturb_time_conditioning(spm, seed=2, scale=0.3)
    timesteps = [0, 501, 951]

    cached = spm_training.ValidationSet(val, denoiser, timesteps, 42, accelerator)
    first, n = cached.accuracy({"m": spm})
    rendered = denoiser.counts["pairs"]
    again, _ = cached.accuracy({"m": spm})
    assert denoiser.counts["pairs"] == rendered  # served from the cache: no UNet/VAE work
    uncached, _ = spm_training.ValidationSet(val, denoiser, timesteps, 42, accelerator, cache_bytes=0).accuracy(
        {"m": spm}
    )
    assert first == again == uncached

    # t = 0 by hand: clean images, ties excluded.
    right = total = 0
    with torch.no_grad():
        for batch in val.iter_epoch(0):
            s0 = spm.score(batch["image_0"], batch["caption"])
            s1 = spm.score(batch["image_1"], batch["caption"])
            for a, b, l0, l1 in zip(s0, s1, batch["label_0"], batch["label_1"], strict=True):
                if l0 != l1:
                    total += 1
                    right += int((a > b) == (l0 > l1) and a != b)
    assert n == total
    assert first["m"]["0"] == pytest.approx(right / total)


def test_resume_latest_without_checkpoints_says_what_to_do(tiny_cfg, caplog):
    from spo.errors import SPOError

    # The kit's rule: --resume latest with no checkpoint starts a fresh run (here it then stops at the
    # missing prepared data, not at the resume).
    with caplog.at_level(logging.INFO), pytest.raises(SPOError, match="spo prepare"):
        train_spm.run(tiny_cfg, resume="latest")
    assert "starting a fresh run" in caplog.text
    with pytest.raises(SPOError, match="not an SPM checkpoint"):
        train_spm.run(tiny_cfg, resume=str(tiny_cfg.paths.root))


def test_resumed_run_warns_on_a_config_change_only(tiny_project, caplog):
    cfg = _cfg(tiny_project, "spm.max_steps=2", "spm.eval_timesteps=[0]")
    train_spm.run(cfg)
    ckpt = cfg.paths.checkpoints / "spm" / "checkpoint-2"
    assert ckpt.is_dir()
    with caplog.at_level(logging.WARNING, logger="spo.training.checkpoints"):
        train_spm.run(cfg, resume=str(ckpt))
    assert "different config" not in caplog.text
    caplog.clear()
    changed = _cfg(tiny_project, "spm.max_steps=2", "spm.eval_timesteps=[0]", "spm.lr=1e-5")
    with caplog.at_level(logging.WARNING, logger="spo.training.checkpoints"):
        result = train_spm.run(changed, resume=str(ckpt))
    assert "different config" in caplog.text and "spm.lr" in caplog.text
    assert result["steps"] == 2


def _corrupt_every_third_training_jpeg(cfg) -> None:
    import os
    from pathlib import Path

    import pyarrow as pa
    import pyarrow.parquet as pq

    from spo.data.pickapic import resolve_source

    src = resolve_source(cfg)
    for rel in src.shards("train"):
        path = Path(src.root) / rel
        t = pq.read_table(path)
        jpg = [b[:40] if i % 3 == 0 else b for i, b in enumerate(t.column("jpg_1").to_pylist())]
        # Written aside and renamed: the project is a copy that may share files with the session's template.
        t = t.set_column(t.schema.get_field_index("jpg_1"), "jpg_1", pa.array(jpg, pa.binary()))
        pq.write_table(t, f"{path}.new")
        os.replace(f"{path}.new", path)


def test_undecodable_training_jpegs_fail_or_are_skipped_counted_and_resumed(tiny_project):
    from spo.errors import DataValidationError

    _corrupt_every_third_training_jpeg(tiny_project)
    quick = ["spm.eval_timesteps=[0]", "spm.max_steps=2", "spm.checkpoint_every=1"]
    with pytest.raises(DataValidationError, match="spm.on_bad_image=skip"):
        train_spm.run(_cfg(tiny_project, *quick))
    cfg = _cfg(tiny_project, *quick, "spm.on_bad_image=skip", "spm.max_bad_pairs=1000")
    train_spm.run(cfg)
    metrics = json.loads((cfg.paths.reports / "spm_metrics.json").read_text())
    assert metrics["skipped_pairs"] > 0 and len(metrics["skipped"]) == metrics["skipped_pairs"]
    assert all(math.isfinite(float(r["loss"])) for r in _read_csv(cfg.paths.reports / "spm_train_curves.csv"))
    # Resumed after step 1, the run still counts the pairs skipped before its checkpoint: same list.
    first = cfg.paths.root / "checkpoints/spm/checkpoint-1"
    assert json.loads((first / "trainer_state.json").read_text())["state"]["bad_pairs"][0]  # step 1 skipped some
    train_spm.run(cfg, resume=str(first))
    resumed = json.loads((cfg.paths.reports / "spm_metrics.json").read_text())
    assert resumed["steps"] == 2 and resumed["skipped"] == metrics["skipped"]


def test_an_spm_trained_on_the_tiny_decoder_is_used_only_with_it(tiny_project):
    from spo.config import ConfigError
    from spo.stages.train_spo import load_scorer

    cfg = _cfg(tiny_project, "spm.max_steps=2", "spm.eval_timesteps=[0]", "spm.decoder=tiny")
    train_spm.run(cfg)
    saved = json.loads((cfg.paths.spm_model / "spm_config.json").read_text())
    assert saved["decoder"] == "tiny" and saved["tiny_decoder"] == "models/base/tiny_decoder"
    assert load_scorer(cfg, "cpu", torch.float32) is not None
    with pytest.raises(ConfigError, match="trained with spm.decoder=tiny, but spm.decoder=vae"):
        load_scorer(_cfg(tiny_project), "cpu", torch.float32)


def test_an_spm_trained_at_a_decode_resolution_is_used_only_at_it(tiny_project):
    from spo.config import ConfigError
    from spo.stages.train_spo import load_scorer

    cfg = _cfg(tiny_project, "spm.max_steps=2", "spm.eval_timesteps=[0,501]", "spm.decode_resolution=16")
    train_spm.run(cfg)
    saved = json.loads((cfg.paths.spm_model / "spm_config.json").read_text())
    assert saved["decoder"] == "vae" and saved["decode_resolution"] == 16
    metrics = json.loads((cfg.paths.reports / "spm_metrics.json").read_text())
    assert set(metrics["accuracy"]) == {"0", "501"}
    assert load_scorer(cfg, "cpu", torch.float32) is not None
    with pytest.raises(ConfigError, match="trained with spm.decode_resolution=16, but spm.decode_resolution=null"):
        load_scorer(_cfg(tiny_project), "cpu", torch.float32)
    with pytest.raises(ConfigError, match="spm.decode_resolution=16, but spm.decode_resolution=24"):
        load_scorer(_cfg(tiny_project, "spm.decode_resolution=24"), "cpu", torch.float32)
