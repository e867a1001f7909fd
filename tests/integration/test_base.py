"""`spo base`: the tiny base model is trained, saved as ordinary folders and read back with from_pretrained."""

from __future__ import annotations

import json

import pytest
import torch

TINY_STEPS = [
    "base.vae_steps=3",
    "base.unet_steps=3",
    "base.clip_steps=3",
    "base.tiny_decoder_steps=3",
    "base.num_images=64",
    "base.sample_steps=2",
]


@pytest.fixture
def trained_base(tiny_project):
    from spo_test_helpers import make_cfg

    from spo.stages import base

    cfg = make_cfg(tiny_project.paths.root, *TINY_STEPS, "tracking.enabled=false")
    info = base.run(cfg, force=True)
    return cfg, info


def test_base_round_trips_through_from_pretrained(trained_base):
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPModel

    from spo.data.synthetic import VOCABULARY

    cfg, info = trained_base
    pipe = StableDiffusionPipeline.from_pretrained(cfg.paths.base_model)
    clip = CLIPModel.from_pretrained(cfg.paths.base_clip)
    # SD-1.5 conditions on CLIP's text tower: the saved text encoder is the saved CLIP's, weight for weight.
    for name, tensor in clip.text_model.state_dict().items():
        assert torch.equal(pipe.text_encoder.state_dict()[name], tensor), name
    # The VAE's scaling factor was fitted (SD's 0.18215 belongs to SD's VAE, not this one).
    assert pipe.vae.config.scaling_factor != pytest.approx(0.18215)
    with torch.no_grad():
        latents = pipe.vae.encode(torch.zeros(1, 3, 32, 32)).latent_dist.mean
    assert latents.shape == (1, 4, 8, 8)
    # Every caption word is one token.
    ids = pipe.tokenizer("a large red circle on a blue background at the top left").input_ids
    assert len(ids) == 2 + 12
    assert all(len(pipe.tokenizer(w, add_special_tokens=False).input_ids) == 1 for w in VOCABULARY)
    image = pipe("a red circle", num_inference_steps=2, height=32, width=32, output_type="np").images[0]
    assert image.shape == (32, 32, 3)
    assert (cfg.paths.reports / "base_samples.png").stat().st_size > 0
    saved = json.loads((cfg.paths.base_model / "spo_base.json").read_text())
    assert saved["fingerprint"] == info["fingerprint"]


def test_base_distils_a_tiny_decoder_that_renders_like_the_vae(tiny_project):
    """Oracle: the VAE's own decoder (whatever it has learnt). 150 distillation steps bring the tiny decoder's
    images far closer to the VAE's than the random-init decoder it starts from."""
    from diffusers import AutoencoderKL, AutoencoderTiny
    from spo_test_helpers import make_cfg

    from spo.models.tiny import tiny_decoder
    from spo.stages import base

    steps = [s for s in TINY_STEPS if not s.startswith("base.tiny_decoder_steps")]
    cfg = make_cfg(tiny_project.paths.root, *steps, "base.tiny_decoder_steps=150", "tracking.enabled=false")
    base.run(cfg, force=True)
    vae = AutoencoderKL.from_pretrained(cfg.paths.base_model / "vae")
    tiny = AutoencoderTiny.from_pretrained(cfg.paths.base_model / "tiny_decoder")
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(8, 3, 32, 32, generator=gen) * 2 - 1
    with torch.no_grad():
        z = vae.encode(images).latent_dist.mean * vae.config.scaling_factor
        target = vae.decode(z / vae.config.scaling_factor).sample.clamp(-1, 1)
        err = (tiny.decode(z).sample - target).abs().mean()
        untrained = (tiny_decoder().decode(z).sample - target).abs().mean()
    assert err < 0.5 * untrained, (float(err), float(untrained))


def test_base_skips_when_up_to_date_and_for_real_presets(trained_base):
    from spo.config import load_config
    from spo.stages import base

    cfg, info = trained_base
    before = (cfg.paths.base_model / "unet" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns
    again = base.run(cfg)
    assert again["skipped"] == "up to date"
    assert (cfg.paths.base_model / "unet" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns == before
    real = load_config("sd15", [f"paths.root={cfg.paths.root}"], params_file=None)
    assert "only for the tiny preset" in base.run(real)["skipped"]
    # An existing base folder is left alone; a missing one becomes a placeholder (dvc.yaml declares it).
    assert (cfg.paths.base_model / "unet" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns == before
    elsewhere = load_config("sd15", [f"paths.root={cfg.paths.root / 'real'}"], params_file=None)
    base.run(elsewhere)
    assert "only for the tiny preset" in (elsewhere.paths.base_model / "README.txt").read_text()


def test_base_without_data_says_what_to_do(tmp_path):
    from spo_test_helpers import make_cfg

    from spo.errors import SPOError
    from spo.stages import base

    with pytest.raises(SPOError, match="spo synth"):
        base.run(make_cfg(tmp_path, "tracking.enabled=false"))
    assert not (tmp_path / "models" / "base").exists()


def test_base_resume_skips_the_completed_phases(tiny_project, monkeypatch):
    from spo_test_helpers import make_cfg
    from transformers import CLIPModel

    from spo.stages import base

    cfg = make_cfg(tiny_project.paths.root, *TINY_STEPS, "tracking.enabled=false")

    def killed(*args, **kwargs):
        raise RuntimeError("killed after the clip phase")

    monkeypatch.setattr(base, "train_vae", killed)
    with pytest.raises(RuntimeError, match="killed"):
        base.run(cfg, force=True)
    root = cfg.paths.checkpoints / "base"
    assert [p.name for p in root.glob("checkpoint-*")] == ["checkpoint-1"]
    clip_loss = json.loads((root / "checkpoint-1" / "trainer_state.json").read_text())["state"]["losses"]["clip"]
    clip_weights = torch.load(root / "checkpoint-1" / "clip.pt", weights_only=True)

    monkeypatch.undo()

    def clip_again(*args, **kwargs):
        raise AssertionError("the completed clip phase was trained again")

    monkeypatch.setattr(base, "train_clip", clip_again)
    info = base.run(cfg, force=True, resume="latest")
    assert set(info["final_loss"]) == {"clip", "vae", "unet", "tiny_decoder"}
    assert info["final_loss"]["clip"] == pytest.approx(round(clip_loss, 5))
    # The saved CLIP is the checkpoint's, and the text encoder is its text tower.
    saved = CLIPModel.from_pretrained(cfg.paths.base_clip).state_dict()
    for name, tensor in clip_weights.items():
        assert torch.equal(saved[name], tensor), name
    assert [p.name for p in root.glob("checkpoint-*")] == ["checkpoint-4"]  # keep=1: the newest holds all
    # ... and ends where an uninterrupted run ends (one seed stream per phase).
    monkeypatch.undo()
    assert base.run(cfg, force=True)["final_loss"] == info["final_loss"]


def test_base_nonfinite_loss_is_skipped_then_stops_naming_the_lr(tiny_cfg):
    from spo.base_training import train_loop
    from spo.errors import NonFiniteError

    weight = torch.nn.Parameter(torch.ones(3))
    before = weight.detach().clone()
    nan_loss = lambda idx: weight.sum() * float("nan")  # noqa: E731
    limit = tiny_cfg.base.max_consecutive_nonfinite
    with pytest.raises(NonFiniteError, match="base.lr"):
        train_loop("unet", [weight], 20, 1e-3, nan_loss, iter([None] * 20), tiny_cfg)
    assert torch.equal(weight.detach(), before)  # no non-finite step was applied
    # Fewer than the limit in a row are skipped and training goes on.
    calls = iter(range(100))
    flaky = lambda idx: weight.sum() * (float("nan") if next(calls) % limit == 0 else 1.0)  # noqa: E731
    loss = train_loop("unet", [weight], 20, 1e-3, flaky, iter([None] * 20), tiny_cfg)
    assert loss == loss and torch.isfinite(weight).all() and not torch.equal(weight.detach(), before)
