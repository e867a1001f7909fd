"""The SPO trainer on tiny random-init models.

Oracles: forward hooks counting UNet rows, a separately loaded base UNet plus diffusers' DDIMScheduler and
torch.distributions for the "official" 4-pass log-probabilities, closed-form values (ln 2), gradient norms
measured right before the optimizer step, and stock diffusers pipelines loading the saved LoRA.
"""

from __future__ import annotations

import csv
import gc
import json
import math

import pytest
import torch
from spo_standin import BrightnessScorer

from spo.config import load_config
from spo.errors import ModelLoadError, NonFiniteError, SPOError
from spo.models.diffusion import DiffusionAdapter, PromptEmbeddings, load_pipeline, pipeline_class
from spo.spo_trainer import SPOTrainer, make_accelerator
from spo.stages import train_spo

PROMPTS = [
    f"a {c} {s} on a {b} background"
    for c in ("red", "blue")
    for s in ("circle", "square")
    for b in ("white", "black")
]
SMALL_SPO = [
    "spo.num_steps=4",
    "spo.divert_start_step=1",
    "spo.num_candidates=2",
    "spo.sample_batch_size=4",
    "spo.train_batch_size=2",
    "spo.num_epochs=1",
    "spo.num_prompts=8",
    "spo.checkpoint_every=2",
    "spo.lr=0.003",
]


def spo_cfg(root, models_root, *overrides, arch="sd15"):
    folder = {"sd15": "base", "sdxl": "base_sdxl"}[arch]
    cfg = load_config(
        "tiny",
        [
            f"paths.root={root}",
            f"model.arch={arch}",
            f"model.pretrained={models_root / 'models' / folder}",
            *SMALL_SPO,
            *overrides,
        ],
        params_file=None,
    )
    cfg.paths.prepared.mkdir(parents=True, exist_ok=True)
    (cfg.paths.prepared / "prompts_train.txt").write_text("\n".join(PROMPTS) + "\n")
    return cfg


def build_trainer(cfg, scorer=None):
    acc = make_accelerator(cfg)
    pipe = load_pipeline(cfg.model)
    adapter = DiffusionAdapter(pipe, cfg.spo_resolution)
    return SPOTrainer(cfg, acc, adapter, scorer or BrightnessScorer())


def sample_pairs(trainer, n_prompts=4, seed=0):
    trainer.sampler.threshold = 0.0  # keep every pool: these tests need pairs, not the SPM's judgement
    pairs, _ = trainer.sampler.sample(PROMPTS[:n_prompts], torch.Generator().manual_seed(seed))
    return pairs


def randomise_lora(trainer, seed=0, scale=0.05):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in trainer.base_unet.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * scale)


def count_unets() -> int:
    from diffusers import UNet2DConditionModel

    gc.collect()
    return sum(isinstance(o, UNet2DConditionModel) for o in gc.get_objects())


# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("train_cfg", [True, False])
def test_one_policy_and_one_reference_forward_per_pair(tmp_path, tiny_models_root, train_cfg):
    before = count_unets()
    cfg = spo_cfg(
        tmp_path, tiny_models_root, f"spo.train_cfg={str(train_cfg).lower()}", "spo.train_batch_size=64"
    )
    trainer = build_trainer(cfg)
    assert count_unets() - before == 1  # the reference is the same module, adapters off
    pairs = sample_pairs(trainer)
    n = len(pairs)
    assert n >= 4

    calls = []  # (rows, grad enabled)
    handle = trainer.base_unet.register_forward_hook(
        lambda m, args, out: calls.append((args[0].shape[0], torch.is_grad_enabled()))
    )
    try:
        metrics = trainer.optimizer_step(pairs)
    finally:
        handle.remove()
    per_latent = 2 if train_cfg else 1
    assert sum(r for r, grad in calls if grad) == per_latent * n
    assert sum(r for r, grad in calls if not grad) == per_latent * n
    assert len(calls) == 2
    # LoRA B starts at zero: policy == reference, both ratios are 1 and the loss is exactly ln 2.
    assert metrics["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert metrics["ratio_win"] == pytest.approx(1.0, abs=1e-6)
    assert count_unets() - before == 1


def test_shared_xt_dedup_matches_the_official_four_pass_loss(tmp_path, tiny_models_root):
    """One policy + one reference forward give the same per-pair loss as the official 4 passes with a separate
    reference UNet -- including an MSPO pair whose win and lose have different x_t."""
    from diffusers import UNet2DConditionModel

    cfg = spo_cfg(tmp_path, tiny_models_root, "spo.beta=10", "spo.eps=0.1")
    trainer = build_trainer(cfg)
    pairs = sample_pairs(trainer)
    pairs.shared[0] = False  # turn pair 0 into a two-chain pair: its lose transition starts elsewhere
    pairs.xt_lose[0] = pairs.xt_lose[0] + 0.3 * torch.randn_like(pairs.xt_lose[0])
    randomise_lora(trainer, scale=0.02)
    with torch.no_grad():
        ours = trainer.pair_losses(pairs).per_pair

    adapter, sched = trainer.adapter, trainer.sampler.scheduler
    ref_unet = UNet2DConditionModel.from_pretrained(str(tiny_models_root / "models" / "base" / "unet")).eval()
    _, uncond = adapter.encode_prompts([""])

    def log_prob(unet, xt, t, prev, emb):
        with torch.no_grad():
            both = PromptEmbeddings.cat([uncond, emb])
            e_u, e_c = adapter.unet_call(unet, torch.cat([xt, xt]), torch.tensor([t, t]), both).chunk(2)
        eps = e_u + cfg.spo.cfg_scale * (e_c - e_u)
        mean = sched.step(eps, t, xt, eta=1.0, variance_noise=torch.zeros_like(xt)).prev_sample
        std = float(sched._get_variance(t, t - 1000 // cfg.spo.num_steps)) ** 0.5
        return torch.distributions.Normal(mean.double(), std).log_prob(prev.double()).mean().item()

    for i in range(len(pairs)):
        t, emb = int(pairs.timesteps[i]), PromptEmbeddings(pairs.embeds[i : i + 1])
        xw, xl = pairs.xt_win[i : i + 1], pairs.xt_lose[i : i + 1]
        pw, pl = pairs.prev_win[i : i + 1], pairs.prev_lose[i : i + 1]
        lw, ll = log_prob(trainer.base_unet, xw, t, pw, emb), log_prob(trainer.base_unet, xl, t, pl, emb)
        rw, rl = log_prob(ref_unet, xw, t, pw, emb), log_prob(ref_unet, xl, t, pl, emb)
        clip = lambda r: min(max(r, 0.9), 1.1)  # noqa: E731
        margin = math.log(clip(math.exp(lw - rw))) - math.log(clip(math.exp(ll - rl)))
        expected = math.log1p(math.exp(-10.0 * margin))
        assert ours[i].item() == pytest.approx(expected, rel=1e-4, abs=1e-6), f"pair {i}"


def test_gradient_clipping_really_clips(tmp_path, tiny_models_root):
    cfg = spo_cfg(
        tmp_path, tiny_models_root, "spo.beta=100000", "spo.max_grad_norm=0.5", "spo.train_batch_size=64"
    )
    trainer = build_trainer(cfg)
    pairs = sample_pairs(trainer)
    seen = []

    def measure(optimizer, args, kwargs):
        seen.append(
            torch.linalg.vector_norm(
                torch.stack([p.grad.norm() for p in trainer.params if p.grad is not None])
            )
        )

    inner = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    handle = inner.register_step_pre_hook(measure)
    try:
        metrics = trainer.optimizer_step(pairs)
    finally:
        handle.remove()
    assert metrics["grad_norm"] > 100 * 0.5  # the raw gradient is huge...
    assert len(seen) == 1 and seen[0].item() == pytest.approx(0.5, rel=1e-4)  # ...and is clipped to max norm


def test_nonfinite_steps_are_skipped_then_abort(tmp_path, tiny_models_root):
    cfg = spo_cfg(tmp_path, tiny_models_root, "spo.max_consecutive_nonfinite=2", "spo.train_batch_size=64")
    trainer = build_trainer(cfg)
    pairs = sample_pairs(trainer)
    with torch.no_grad():
        trainer.params[0][0, 0] = float("nan")
    others = [p.detach().clone() for p in trainer.params[1:]]
    assert trainer.optimizer_step(pairs) is None
    assert all(torch.equal(a, b) for a, b in zip(others, trainer.params[1:], strict=True))
    trainer.state.global_step, trainer.state.iteration = 7, 1
    assert trainer.save_checkpoint() is None  # never from a NaN state
    assert not trainer.checkpoints.list()
    with pytest.raises(NonFiniteError, match="2 optimizer steps in a row"):
        trainer.optimizer_step(pairs)


# ----------------------------------------------------------------------------------------------------------
def _lora_tensors(cfg):
    from safetensors.torch import load_file

    return load_file(str(cfg.paths.lora / "pytorch_lora_weights.safetensors"))


@pytest.mark.slow
def test_run_writes_outputs_and_accounts_for_every_pair(tmp_path, tiny_models_root):
    cfg = spo_cfg(tmp_path, tiny_models_root, "spo.num_epochs=2", "spo.checkpoints_total_limit=2")
    summary = train_spo.run(cfg, scorer=BrightnessScorer())

    on_disk = json.loads((cfg.paths.reports / "spo_train.json").read_text())
    assert on_disk == json.loads(json.dumps(dict(summary)))
    assert summary["optimizer_steps"] > 0 and summary["pairs_kept"] > 0
    # Every kept pair is trained (the remainder in one last smaller step) or explicitly counted as skipped.
    assert summary["pairs_trained"] + summary["pairs_skipped"] == summary["pairs_kept"]
    assert summary["pairs_skipped"] == 0  # one process: nothing left over
    assert summary["candidates_scored"] == 2 * summary["comparisons"]  # k = 2
    assert summary["unet_samples_with_grad_per_pair"] == 2.0  # one CFG-doubled policy forward per pair
    rows = list(csv.DictReader((cfg.paths.reports / "spo_train_curves.csv").open()))
    assert len(rows) == summary["optimizer_steps"]
    assert [int(r["step"]) for r in rows] == list(range(1, len(rows) + 1))
    assert int(rows[-1]["pairs_trained"]) == summary["pairs_trained"]
    for field in (
        "loss",
        "ratio_win",
        "ratio_lose",
        "kept_fraction",
        "spm_score_mean",
        "spm_score_std",
        "lr",
    ):
        assert all(math.isfinite(float(r[field])) for r in rows), field
    assert all(0.9 - 1e-6 <= float(r["ratio_win"]) <= 1.1 + 1e-6 for r in rows)
    ckpts = list((cfg.paths.checkpoints / "spo").glob("checkpoint-*"))
    assert 1 <= len(ckpts) <= 2

    # The LoRA is a stock diffusers file: it loads and changes the base model's output.
    stock = pipeline_class("sd15").from_pretrained(str(cfg.model.pretrained))
    stock.set_progress_bar_config(disable=True)

    def latents():
        return stock(
            "a red circle",
            num_inference_steps=3,
            height=32,
            width=32,
            generator=torch.Generator().manual_seed(0),
            output_type="latent",
        ).images

    base = latents()
    stock.load_lora_weights(str(cfg.paths.lora))
    assert (latents() - base).abs().max() > 1e-4


@pytest.mark.slow
def test_run_with_the_real_spm_records_its_lineage(tmp_path, tiny_models_root):
    from spo.models.preference import TimeConditionedCLIP, save_spm

    cfg = spo_cfg(tmp_path, tiny_models_root, "spo.threshold=0.0", "spo.num_prompts=4")
    spm = TimeConditionedCLIP.from_clip(str(tiny_models_root / "models" / "base" / "clip"), time_embed_dim=16)
    save_spm(spm, cfg.paths.spm_model)
    summary = train_spo.run(cfg)
    assert summary["spm"]["path"] == str(cfg.paths.spm_model) and len(summary["spm"]["content_hash"]) == 16
    assert summary["pairs_trained"] > 0


def test_missing_inputs_fail_clearly_and_keep_previous_outputs(tmp_path, tiny_models_root):
    cfg = spo_cfg(tmp_path, tiny_models_root)
    cfg.paths.lora.mkdir(parents=True)
    (cfg.paths.lora / "pytorch_lora_weights.safetensors").write_bytes(b"previous")
    with pytest.raises(ModelLoadError, match="spo train-spm"):
        train_spo.run(cfg)  # no models/spm
    (cfg.paths.prepared / "prompts_train.txt").unlink()
    with pytest.raises(SPOError, match="spo prepare"):
        train_spo.run(cfg, scorer=BrightnessScorer())
    (cfg.paths.prepared / "prompts_train.txt").write_text("\n".join(PROMPTS) + "\n")
    with pytest.raises(SPOError, match="not an? SPO checkpoint"):
        train_spo.run(cfg, resume=str(tmp_path / "nowhere"), scorer=BrightnessScorer())
    assert (cfg.paths.lora / "pytorch_lora_weights.safetensors").read_bytes() == b"previous"


@pytest.mark.slow
def test_kill_and_resume_ends_with_the_same_lora(tmp_path, tiny_models_root, monkeypatch):
    # threshold 0 keeps every comparison, so the number of pending pairs at each checkpoint does not hang on
    # float rounding in the scorer (thread counts change it) and a mid-epoch kill with pending pairs happens.
    args = ("spo.num_epochs=2", "spo.checkpoint_every=2", "spo.train_batch_size=2", "spo.threshold=0.0")
    full = spo_cfg(tmp_path / "full", tiny_models_root, *args)
    train_spo.run(full, scorer=BrightnessScorer())

    resumed = spo_cfg(tmp_path / "resumed", tiny_models_root, *args)
    real_save = SPOTrainer.save_checkpoint
    saved = []

    def save_then_die(trainer):
        out = real_save(trainer)
        state = trainer.state
        saved.append((state.global_step, state.epoch, state.iteration, state.pending))
        if state.epoch == 0 and saved[-1][-1] > 0:  # mid-epoch, with kept pairs not trained yet
            raise KeyboardInterrupt("killed right after a checkpoint")
        return out

    monkeypatch.setattr(SPOTrainer, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train_spo.run(resumed, scorer=BrightnessScorer())
    monkeypatch.setattr(SPOTrainer, "save_checkpoint", real_save)
    assert not (resumed.paths.lora / "pytorch_lora_weights.safetensors").exists()
    killed_at = saved[-1][0]

    summary = train_spo.run(resumed, resume="latest", scorer=BrightnessScorer())
    assert summary["resumed_from"].endswith(f"checkpoint-{killed_at}")
    assert summary["optimizer_steps"] > killed_at
    a, b = _lora_tensors(full), _lora_tensors(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    full_summary = json.loads((full.paths.reports / "spo_train.json").read_text())
    for key in ("pairs_trained", "pairs_kept", "candidates_scored", "optimizer_steps"):
        assert summary[key] == full_summary[key], key
    full_rows = (full.paths.reports / "spo_train_curves.csv").read_text()
    assert (resumed.paths.reports / "spo_train_curves.csv").read_text() == full_rows


@pytest.mark.slow
def test_tiny_sdxl_run_completes_with_inner_steps(tmp_path, tiny_models_root):
    cfg = spo_cfg(tmp_path, tiny_models_root, "spo.num_inner_steps=2", "spo.num_steps=5", arch="sdxl")
    summary = train_spo.run(cfg, scorer=BrightnessScorer())
    assert summary["arch"] == "sdxl" and summary["optimizer_steps"] > 0
    # MSPO: each kept comparison gives one pair per transition of the chain (2 here, 1 if cut by the end).
    assert summary["pairs_kept"] > summary["comparisons"] * summary["kept_fraction"]
    stock = pipeline_class("sdxl").from_pretrained(str(cfg.model.pretrained))
    stock.load_lora_weights(str(cfg.paths.lora))
    assert stock.get_active_adapters()


def test_cpu_bf16_runs_the_accelerator_mixed_precision_path(tmp_path, tiny_models_root):
    """runtime.cpu_bf16 on the SDXL path (the real-size run needs it): every UNet call sees bf16 frozen
    weights, the gradient-carrying ones under bf16 autocast, and the saved LoRA stays fp32."""
    from diffusers import UNet2DConditionModel
    from safetensors.torch import load_file

    cfg = spo_cfg(
        tmp_path, tiny_models_root, "runtime.cpu_bf16=true", "spo.num_inner_steps=2", "spo.num_steps=5", arch="sdxl"
    )
    seen = []  # (frozen weight dtype, autocast on, grad on) per UNet call

    def hook(module, args, out):
        if isinstance(module, UNet2DConditionModel):
            seen.append((module.conv_in.weight.dtype, torch.is_autocast_enabled("cpu"), torch.is_grad_enabled()))

    handle = torch.nn.modules.module.register_module_forward_hook(hook)
    try:
        summary = train_spo.run(cfg, scorer=BrightnessScorer())
    finally:
        handle.remove()
    assert summary["optimizer_steps"] > 0 and math.isfinite(summary["final_loss"])
    assert seen and {dtype for dtype, _, _ in seen} == {torch.bfloat16}
    assert all(autocast for _, autocast, grad in seen if grad) and any(grad for _, _, grad in seen)
    lora = load_file(str(cfg.paths.lora / "pytorch_lora_weights.safetensors"))
    assert lora and {v.dtype for v in lora.values()} == {torch.float32}


@pytest.mark.slow
def test_two_processes_reshard_kept_pairs_without_dropping_any(tmp_path, tiny_models_root):
    """`spo train` under torchrun with 2 CPU processes (gloo): each samples its own prompts, the kept pairs are
    gathered and re-split; every kept pair is trained or counted as skipped (at most world-1)."""
    import os
    import socket
    import subprocess
    import sys

    from spo.models.preference import TimeConditionedCLIP, save_spm

    overrides = ["spo.threshold=0.0", "spo.sample_batch_size=2", "spo.train_batch_size=2", "spo.num_epochs=1"]
    cfg = spo_cfg(tmp_path, tiny_models_root, *overrides)
    save_spm(
        TimeConditionedCLIP.from_clip(str(tiny_models_root / "models" / "base" / "clip"), time_embed_dim=16),
        cfg.paths.spm_model,
    )
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    sets = [f"paths.root={tmp_path}", f"model.pretrained={cfg.model.pretrained}", *SMALL_SPO, *overrides]
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(port),
        "-m",
        "spo.cli",
        "train",
        "--preset",
        "tiny",
        "--params",
        os.devnull,
    ]
    for item in sets:
        cmd += ["--set", item]
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((cfg.paths.reports / "spo_train.json").read_text())
    assert summary["num_processes"] == 2
    # 8 prompts, 3 branching steps each, k=2, threshold 0: every pool gives a pair.
    assert summary["comparisons"] == summary["pairs_kept"] == 8 * 3
    assert summary["pairs_trained"] + summary["pairs_skipped"] == summary["pairs_kept"]
    # 24 pairs, 2 per process per step: 6 full steps, nothing carried or skipped at the end.
    assert (
        summary["pairs_trained"] == 24 and summary["optimizer_steps"] == 6 and summary["pairs_skipped"] == 0
    )
    assert summary["unet_samples_with_grad_per_pair"] == 2.0


@pytest.mark.slow
def test_fresh_run_keeps_its_own_checkpoints_when_an_older_run_has_higher_steps(tmp_path, tiny_models_root):
    """The bug: a fresh `spo train` did not clear an earlier run's checkpoints; rotation keeps the highest
    step numbers, so the new run's checkpoints were deleted as soon as written and `--resume latest`
    continued the *old* run."""
    args = ("spo.checkpoints_total_limit=2", "spo.threshold=0.0")
    cfg = spo_cfg(tmp_path, tiny_models_root, *args)
    train_spo.run(cfg, scorer=BrightnessScorer())
    root = cfg.paths.checkpoints / "spo"
    own = sorted((p.name for p in root.glob("checkpoint-*")), key=lambda n: int(n.split("-")[1]))
    assert len(own) == 2
    # Fake an older run that got further: its checkpoints carry higher step numbers.
    for name in own:
        step = int(name.split("-")[1])
        (root / name).rename(root / f"checkpoint-{step + 100}")

    train_spo.run(cfg, scorer=BrightnessScorer())  # a fresh run, no --resume
    assert sorted(p.name for p in root.glob("checkpoint-*")) == sorted(own)  # the new run's survive
    resumed = train_spo.run(cfg, resume="latest", scorer=BrightnessScorer())
    assert resumed["resumed_from"] == str(root / own[-1])  # the new run, not the older one
    # The older run's checkpoints were moved aside, not deleted.
    moved = sorted(p.name for p in (root / "previous").glob("*/checkpoint-*"))
    assert moved == sorted(f"checkpoint-{int(n.split('-')[1]) + 100}" for n in own)


@pytest.mark.slow
def test_resume_warns_only_when_the_config_really_changed(tmp_path, tiny_models_root, caplog):
    import logging

    cfg = spo_cfg(tmp_path, tiny_models_root, "spo.threshold=0.0")
    train_spo.run(cfg, scorer=BrightnessScorer())
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        same = train_spo.run(cfg, resume="latest", scorer=BrightnessScorer())
    assert same["resumed_from"] is not None
    assert not [r.getMessage() for r in caplog.records if "different" in r.getMessage()]
    caplog.clear()

    changed = spo_cfg(tmp_path, tiny_models_root, "spo.threshold=0.0", "spo.lr=0.002")
    with caplog.at_level(logging.WARNING):
        train_spo.run(changed, resume=same["resumed_from"], scorer=BrightnessScorer())
    assert "different config" in caplog.text and "spo.lr" in caplog.text
