"""The SPM's x̂0 (spo.sampling.predict_x0) against diffusers' DDIMScheduler.step(...).pred_original_sample."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler

from spo.models.tiny import tiny_scheduler
from spo.sampling import predict_x0


def _scheduler(prediction_type: str) -> DDIMScheduler:
    return tiny_scheduler(prediction_type=prediction_type)  # SD-1.5's schedule


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_predict_x0_matches_ddim_step_per_sample(prediction_type):
    sched = _scheduler(prediction_type)
    sched.set_timesteps(1000)  # every training timestep is a valid DDIM step
    g = torch.Generator().manual_seed(0)
    timesteps = torch.tensor([0, 1, 251, 501, 701, 951, 999])
    sample = torch.randn(len(timesteps), 4, 8, 8, generator=g)
    model_out = torch.randn(len(timesteps), 4, 8, 8, generator=g)

    got = predict_x0(sched, model_out, timesteps, sample)

    for i, t in enumerate(timesteps.tolist()):
        expected = sched.step(model_out[i : i + 1], t, sample[i : i + 1], eta=0.0).pred_original_sample
        torch.testing.assert_close(got[i : i + 1], expected, atol=1e-5, rtol=1e-5)


def test_predict_x0_inverts_add_noise_with_the_true_noise():
    """With the exact noise as ε̂, x̂0 recovers the clean latent (the property the SPM relies on)."""
    sched = _scheduler("epsilon")
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(3, 4, 8, 8, generator=g)
    noise = torch.randn(3, 4, 8, 8, generator=g)
    t = torch.tensor([10, 500, 990])
    xt = sched.add_noise(x0, noise, t)
    torch.testing.assert_close(predict_x0(sched, noise, t, xt), x0, atol=2e-4, rtol=1e-4)
