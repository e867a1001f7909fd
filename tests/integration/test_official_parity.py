"""Parity with the official SPO code where it matters at real sizes: the released SPM's preprocessing, the
SDXL sampler's last step, σ = 0 at the last step of a set_alpha_to_one scheduler."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler

from spo.config import ModelConfig, load_config
from spo.models.diffusion import DiffusionAdapter, load_pipeline
from spo.models.preference import TimeConditionedCLIP, load_spm, preprocess_images, save_spm
from spo.sampling import CandidateSampler, branches_at_last_step, ddim_step_with_logprob, gaussian_log_prob

PROC = SimpleNamespace(
    size={"shortest_edge": 24}, crop_size={"height": 24, "width": 24}, image_mean=[0.5] * 3, image_std=[0.25] * 3
)


def test_official_resize_rounds_half_up_and_does_not_antialias():
    g = torch.Generator().manual_seed(0)
    images = torch.rand(2, 3, 37, 55, generator=g) * 2 - 1
    out = preprocess_images(images, PROC, resize="official")
    # The documented rule: target sizes int(x*s + 0.5) (55*24/37 = 35.68 -> 36; the PIL rule floors to 35),
    # plain bicubic, centre crop, normalise.
    expect = F.interpolate(images, size=(24, 36), mode="bicubic", align_corners=False, antialias=False)
    expect = ((expect[..., :, 6:30] + 1) / 2 - 0.5) / 0.25
    torch.testing.assert_close(out, expect)
    assert not torch.allclose(out, preprocess_images(images, PROC, resize="pil"), atol=1e-2)


def test_unknown_resize_rule_is_refused():
    with pytest.raises(ValueError, match="resize must be one of"):
        preprocess_images(torch.zeros(1, 3, 8, 8), PROC, resize="nearest")


def test_resize_mode_is_saved_with_the_spm(tiny_models_root, tmp_path):
    clip = tiny_models_root / "models" / "base" / "clip"
    spm = TimeConditionedCLIP.from_clip(str(clip), time_embed_dim=32)
    assert spm.resize_mode == "pil"
    spm.resize_mode = "official"
    save_spm(spm, tmp_path / "spm")
    assert load_spm(tmp_path / "spm").resize_mode == "official"


def test_sigma_zero_last_step_keeps_a_finite_log_prob():
    sched = DDIMScheduler(num_train_timesteps=1000, set_alpha_to_one=True, steps_offset=1)
    sched.set_timesteps(10)
    t = int(sched.timesteps[-1])
    g = torch.Generator().manual_seed(0)
    x, eps = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    step = ddim_step_with_logprob(sched, eps, t, x, eta=1.0, generator=g)
    assert torch.isfinite(step.log_prob).all()
    assert float(step.std.max()) == pytest.approx(1e-6)
    # The closed form with the floored σ: the Gaussian log-density of the given sample.
    torch.testing.assert_close(step.log_prob, gaussian_log_prob(step.prev_sample, step.mean, step.std))
    # Elsewhere nothing changes: diffusers' own step is the oracle.
    t0 = int(sched.timesteps[3])
    ours = ddim_step_with_logprob(sched, eps, t0, x, eta=1.0, generator=torch.Generator().manual_seed(5))
    ref = sched.step(eps, t0, x, eta=1.0, generator=torch.Generator().manual_seed(5)).prev_sample
    torch.testing.assert_close(ours.prev_sample, ref)


class _Scorer:
    def encode_text(self, prompts):
        return torch.zeros(len(prompts), 1)

    def score_with_text(self, images, text, timesteps):
        return 2000.0 * images.float().mean(dim=(1, 2, 3))


@pytest.mark.parametrize("branch_last, comparisons", [(None, 5), (False, 5), (True, 6)])
def test_sdxl_sampler_never_branches_at_the_last_step(tiny_models_root, branch_last, comparisons):
    model = ModelConfig(arch="sdxl", pretrained=str(tiny_models_root / "models" / "base_sdxl"), resolution=32, dtype="fp32")
    adapter = DiffusionAdapter(load_pipeline(model), 32)
    cfg = load_config(
        "tiny",
        ["spo.num_steps=20", "spo.divert_start_step=4", "spo.num_inner_steps=3", "spo.kappa=1000",
         "spo.num_candidates=2", f"spo.branch_at_last_step={'null' if branch_last is None else str(branch_last).lower()}"],
        params_file=None,
    )
    sampler = CandidateSampler.from_config(adapter, _Scorer(), cfg.spo)
    _, stats = sampler.sample(["a red circle"], torch.Generator().manual_seed(0))
    assert stats.comparisons == comparisons


def test_sd15_default_branches_at_the_last_step():
    spo = SimpleNamespace(branch_at_last_step=None)
    assert branches_at_last_step(spo, "sd15") and not branches_at_last_step(spo, "sdxl")
