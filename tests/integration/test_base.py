"""`spo base`: the tiny base model is trained, saved as ordinary folders and read back with from_pretrained."""

from __future__ import annotations

import json

import pytest
import torch

TINY_STEPS = ["base.vae_steps=3", "base.unet_steps=3", "base.clip_steps=3", "base.num_images=64", "base.sample_steps=2"]


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
