"""The Diffusion-DPO baseline (``spo train --method dpo``) on tiny random-init models and the prepared tiny data.

Oracles: the pair table read with pyarrow (ties counted independently), forward hooks counting UNet rows, the
closed form log 2 at LoRA init (B = 0: policy == reference), the saved LoRA loaded back into a fresh trainer
and into a stock diffusers pipeline, and ``spo evaluate`` run on the outputs.
"""

from __future__ import annotations

import csv
import json
import math
import shutil

import pyarrow.dataset as ds
import pytest
import torch
from spo_test_helpers import make_cfg

from spo import cli
from spo.dpo_trainer import DPOTrainer, make_accelerator
from spo.errors import SPOError
from spo.models.diffusion import DiffusionAdapter, load_pipeline, pipeline_class
from spo.models.lora import load_lora_into
from spo.stages import evaluate, train_spo
from spo.training import seed_generator

DPO = [
    "tracking.enabled=false",
    "dpo.max_steps=12",
    "dpo.batch_size=8",
    "dpo.grad_accum=2",
    "dpo.lr=0.003",
    "dpo.warmup_steps=0",
    "dpo.checkpoint_every=4",
]


def dpo_cfg(project, *overrides):
    return make_cfg(project.paths.root, *DPO, *overrides)


def build_trainer(cfg) -> DPOTrainer:
    pipe = load_pipeline(cfg.model, cfg=cfg)
    return DPOTrainer(cfg, make_accelerator(cfg), DiffusionAdapter(pipe, cfg.model.resolution))


def held_loss(trainer: DPOTrainer) -> tuple[float, float]:
    """(loss, implicit acc) on a fixed batch: the first batch of epoch 0 with fixed VAE samples, t and ε."""
    batch = next(iter(trainer.stream.iter_epoch(0)))
    with torch.no_grad():
        out, mask = trainer.pair_losses(batch, seed_generator(123, 0))
    assert mask.all()
    return out.loss.item(), out.implicit_acc.item()


def table_counts(cfg) -> tuple[int, int]:
    table = ds.dataset(cfg.paths.prepared / "spm_train", format="parquet").to_table()
    l0, l1 = table.column("label_0").to_pylist(), table.column("label_1").to_pylist()
    ties = sum(a == b for a, b in zip(l0, l1, strict=True))
    return table.num_rows, ties


@pytest.fixture(scope="module")
def trained(tmp_path_factory, _tiny_project_template):
    """One tiny DPO run, shared by the read-only checks (no models/spm in the project: DPO needs none)."""
    root = tmp_path_factory.mktemp("dpo") / "project"
    shutil.copytree(_tiny_project_template, root, symlinks=True)
    cfg = make_cfg(root, *DPO)
    assert not cfg.paths.spm_model.exists()
    assert cfg.spo.method == "spo"
    result = train_spo.run(cfg, method="dpo")
    assert cfg.spo.method == "dpo"
    return cfg, result


def test_dpo_run_trains_on_decisive_pairs_and_writes_the_spo_outputs(trained):
    cfg, result = trained
    report = json.loads((cfg.paths.reports / "spo_train.json").read_text())
    assert report == json.loads(json.dumps(dict(result)))
    assert report["method"] == "dpo"
    steps, per_step = 12, 8 * 2
    assert report["optimizer_steps"] == steps and report["pairs_per_optimizer_step"] == per_step
    assert report["pairs_trained"] == steps * per_step
    # One policy forward with grad and one reference forward without, each on [x_t^w; x_t^l].
    assert report["unet_rows_with_grad"] == 2 * report["pairs_trained"]
    assert report["unet_rows_no_grad"] == 2 * report["pairs_trained"]
    # Ties are excluded: counted against the prepared table.
    total, ties = table_counts(cfg)
    assert ties > 0
    assert report["ties_excluded"] == ties and report["pairs_available"] == total - ties
    assert report["loss_first_step"] == pytest.approx(math.log(2), abs=1e-6)  # LoRA B = 0 at init

    rows = list(csv.DictReader((cfg.paths.reports / "spo_train_curves.csv").open()))
    assert [int(r["step"]) for r in rows] == list(range(1, steps + 1))
    for key in ("loss", "implicit_acc", "model_err", "ref_err", "grad_norm", "lr"):
        assert all(math.isfinite(float(r[key])) for r in rows), key
    info = json.loads((cfg.paths.lora / "spo_lora.json").read_text())
    assert info["method"] == "dpo" and info["lora_rank"] == cfg.spo.lora_rank
    assert sorted(p.name for p in (cfg.paths.checkpoints / "spo").glob("checkpoint-*")) == [
        "checkpoint-12",
        "checkpoint-4",
        "checkpoint-8",
    ]

    # The saved LoRA is the trained one: loaded into a fresh (LoRA-zero) trainer it changes the loss.
    trainer = build_trainer(cfg)
    start, _ = held_loss(trainer)
    load_lora_into(trainer.base_unet, cfg.paths.lora / "pytorch_lora_weights.safetensors")
    assert held_loss(trainer)[0] != pytest.approx(start, abs=1e-4)


def test_dpo_loss_on_a_fixed_batch_starts_at_log2_and_goes_down(tiny_project):
    """LoRA B = 0: policy == reference, loss exactly log 2 and no pair counted as correct; optimizer steps on
    one fixed batch with fixed draws (VAE samples, t, ε: the step stays 0) bring the loss on exactly those
    draws below log 2. The random tiny UNet carries no preference signal to generalise across t and ε from
    (fresh draws per step made this seed-dependent), so this checks the objective, its gradient and its sign."""
    cfg = dpo_cfg(tiny_project, "dpo.lr=0.001", "dpo.grad_accum=1")
    trainer = build_trainer(cfg)
    start, start_acc = held_loss(trainer)
    assert start == pytest.approx(math.log(2), abs=1e-6) and start_acc == 0.0
    batch = next(iter(trainer.stream.iter_epoch(0)))

    def loss_on_the_training_draws() -> tuple[float, float]:
        with torch.no_grad():  # the generator optimizer_step uses for step 0, micro-batch 0
            out, _ = trainer.pair_losses(batch, seed_generator(cfg.dpo.seed, 0, 0, trainer.rank))
        return out.loss.item(), out.implicit_acc.item()

    assert loss_on_the_training_draws()[0] == pytest.approx(math.log(2), abs=1e-6)
    for _ in range(10):
        assert trainer.optimizer_step([batch]) is not None
    end, end_acc = loss_on_the_training_draws()
    assert end < start - 0.02 and end_acc > 0.5, (start, end, end_acc)


def test_dpo_outputs_evaluate_and_load_in_a_stock_pipeline(trained):
    cfg, _ = trained
    stock = pipeline_class("sd15").from_pretrained(cfg.resolve_ref(cfg.model.pretrained))
    stock.set_progress_bar_config(disable=True)

    def latents():
        generator = torch.Generator().manual_seed(0)
        return stock("a red circle", num_inference_steps=2, height=32, width=32, generator=generator, output_type="latent").images

    base = latents()
    stock.load_lora_weights(str(cfg.paths.lora))
    assert (latents() - base).abs().max() > 1e-5

    fast = [
        "eval.num_prompts=2",
        "eval.num_images_per_prompt=1",
        "eval.num_steps=2",
        "eval.bootstrap_samples=100",
        "eval.scorers=[toy_aesthetic]",
        "eval.grid_prompts=1",
        "eval.grid_seeds=1",
    ]
    evaluate.run(make_cfg(cfg.paths.root, *DPO, *fast))
    metrics = json.loads((cfg.paths.eval_reports / "metrics.json").read_text())
    assert metrics["toy_aesthetic"]["n"] == 2


def test_every_trained_pair_is_decisive_and_rows_are_counted(tiny_project):
    cfg = dpo_cfg(tiny_project)
    trainer = build_trainer(cfg)
    seen = 0
    for batch in trainer.stream.iter_epoch(0):
        assert (batch["label_0"] != batch["label_1"]).all()
        seen += len(batch["caption"])
    total, ties = table_counts(cfg)
    assert seen == (total - ties) // 8 * 8  # full batches of the tie-free table

    calls = []  # (rows, grad enabled)
    handle = trainer.base_unet.register_forward_hook(
        lambda m, args, out: calls.append((args[0].shape[0], torch.is_grad_enabled()))
    )
    batches = trainer.micro_batches()
    try:
        metrics = trainer.optimizer_step([next(batches), next(batches)])
    finally:
        handle.remove()
        batches.close()
    assert calls == [(16, True), (16, False), (16, True), (16, False)]
    assert metrics["loss"] == pytest.approx(math.log(2), abs=1e-6)


def test_kill_and_resume_ends_with_the_same_lora(tiny_project, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    full = dpo_cfg(tiny_project, "dpo.max_steps=6", "dpo.checkpoint_every=2")
    train_spo.run(full, method="dpo")
    expected = load_file(str(full.paths.lora / "pytorch_lora_weights.safetensors"))
    expected_rows = (full.paths.reports / "spo_train_curves.csv").read_text()

    real_save = DPOTrainer.save_checkpoint

    def save_then_die(trainer):
        out = real_save(trainer)
        if trainer.state.global_step == 4:
            raise KeyboardInterrupt("killed right after a checkpoint")
        return out

    monkeypatch.setattr(DPOTrainer, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train_spo.run(full, method="dpo")  # a fresh run: the first run's checkpoints are moved aside
    monkeypatch.setattr(DPOTrainer, "save_checkpoint", real_save)

    summary = train_spo.run(full, method="dpo", resume="latest")
    assert summary["resumed_from"].endswith("checkpoint-4") and summary["optimizer_steps"] == 6
    got = load_file(str(full.paths.lora / "pytorch_lora_weights.safetensors"))
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in got)
    assert (full.paths.reports / "spo_train_curves.csv").read_text() == expected_rows


def test_method_option(tiny_project):
    parser = cli.build_parser()
    assert parser.parse_args(["train", "--method", "dpo"]).method == "dpo"
    assert parser.parse_args(["train"]).method is None
    with pytest.raises(SPOError, match="choose spo or dpo"):
        train_spo.run(dpo_cfg(tiny_project), method="ppo")


def test_nonfinite_steps_are_skipped_then_abort(tiny_project):
    from spo.errors import NonFiniteError

    cfg = dpo_cfg(tiny_project, "dpo.max_consecutive_nonfinite=2", "dpo.grad_accum=1")
    trainer = build_trainer(cfg)
    batch = next(iter(trainer.stream.iter_epoch(0)))
    with torch.no_grad():
        trainer.params[0][0, 0] = float("nan")
    others = [p.detach().clone() for p in trainer.params[1:]]
    assert trainer.optimizer_step([batch]) is None
    assert all(torch.equal(a, b) for a, b in zip(others, trainer.params[1:], strict=True))
    assert trainer.save_checkpoint() is None  # never from a NaN state
    with pytest.raises(NonFiniteError, match="2 optimizer steps in a row"):
        trainer.optimizer_step([batch])
