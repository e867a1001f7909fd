"""DDIM maths against diffusers' DDIMScheduler and the closed-form Gaussian log-density."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import DDIMScheduler

from spo.models.tiny import tiny_scheduler
from spo.sampling import ddim_step_with_logprob, predict_x0


def _scheduler(num_steps: int = 20, **kw) -> DDIMScheduler:
    s = tiny_scheduler(**kw)  # SD-1.5's scheduler settings
    s.set_timesteps(num_steps)
    return s


SHAPE = (3, 4, 8, 8)


@pytest.mark.parametrize("eta", [1.0, 0.5])
@pytest.mark.parametrize("step_index", [0, 4, 10, 19])
def test_ddim_step_matches_diffusers(eta, step_index):
    sched = _scheduler()
    t = int(sched.timesteps[step_index])
    g = torch.Generator().manual_seed(step_index)
    sample, eps = torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=g)

    ref = sched.step(eps, t, sample, eta=eta, generator=torch.Generator().manual_seed(7))
    ours = ddim_step_with_logprob(sched, eps, t, sample, eta, generator=torch.Generator().manual_seed(7))

    torch.testing.assert_close(ours.prev_sample, ref.prev_sample, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.pred_original_sample, ref.pred_original_sample, rtol=1e-5, atol=1e-5)
    # Variance: diffusers' own _get_variance(t, prev_t).
    prev_t = t - 1000 // 20
    var = sched._get_variance(t, prev_t)
    assert ours.std.flatten()[0].item() == pytest.approx(eta * math.sqrt(float(var)), rel=1e-5)
    # Mean: the sampled sample minus σ·z with z the same noise diffusers drew.
    z = torch.randn(SHAPE, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(ours.mean, ref.prev_sample - ours.std * z, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("eta", [1.0, 0.5])
def test_ddim_step_mixed_timesteps_batch(eta):
    sched = _scheduler()
    steps = [1, 7, 19]
    ts = sched.timesteps[steps]
    g = torch.Generator().manual_seed(0)
    sample, eps = torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=g)
    prev = torch.randn(SHAPE, generator=g)
    batched = ddim_step_with_logprob(sched, eps, ts, sample, eta, prev_sample=prev)
    for i, t in enumerate(ts.tolist()):
        z = torch.randn(SHAPE[1:], generator=torch.Generator().manual_seed(i))[None]
        ref = sched.step(eps[i : i + 1], t, sample[i : i + 1], eta=eta, variance_noise=z)
        std = batched.std[i]
        torch.testing.assert_close(batched.mean[i : i + 1] + std * z, ref.prev_sample, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(batched.pred_original_sample[i : i + 1], ref.pred_original_sample)
        single = ddim_step_with_logprob(
            sched, eps[i : i + 1], t, sample[i : i + 1], eta, prev_sample=prev[i : i + 1]
        )
        assert batched.log_prob[i].item() == pytest.approx(single.log_prob.item(), rel=1e-6)


def test_log_prob_is_closed_form_gaussian_mean_over_dims():
    sched = _scheduler()
    t = int(sched.timesteps[8])
    g = torch.Generator().manual_seed(3)
    sample, eps, prev = (torch.randn(2, 4, 4, 4, generator=g, dtype=torch.float64).float() for _ in range(3))
    out = ddim_step_with_logprob(sched, eps, t, sample, eta=1.0, prev_sample=prev)

    # Independent oracle: DDIM eq. 12/16 written out in float64 from alphas_cumprod, then the normal log-pdf.
    ac = sched.alphas_cumprod.double()
    a_t, a_prev = ac[t], ac[t - 50]
    x0 = (sample.double() - (1 - a_t).sqrt() * eps.double()) / a_t.sqrt()
    sigma = ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)).sqrt()
    mu = a_prev.sqrt() * x0 + (1 - a_prev - sigma**2).sqrt() * eps.double()
    dist = torch.distributions.Normal(mu, sigma)
    expected = dist.log_prob(prev.double()).mean(dim=(1, 2, 3))
    torch.testing.assert_close(out.log_prob.double(), expected, rtol=1e-5, atol=1e-5)
    # The mean of x_{t-1} has the highest density.
    at_mean = ddim_step_with_logprob(sched, eps, t, sample, eta=1.0, prev_sample=out.mean)
    assert (at_mean.log_prob > out.log_prob).all()


def test_last_step_uses_final_alpha():
    sched = _scheduler()
    t = int(sched.timesteps[-1])  # prev timestep < 0 → final_alpha_cumprod
    sample, eps = torch.randn(1, 4, 4, 4), torch.randn(1, 4, 4, 4)
    z = torch.randn(1, 4, 4, 4)
    ref = sched.step(eps, t, sample, eta=1.0, variance_noise=z).prev_sample
    ours = ddim_step_with_logprob(sched, eps, t, sample, eta=1.0)
    torch.testing.assert_close(ours.mean + ours.std * z, ref, rtol=1e-5, atol=1e-5)


def test_eta_zero_is_rejected():
    sched = _scheduler()
    with pytest.raises(ValueError, match="eta > 0"):
        ddim_step_with_logprob(sched, torch.zeros(1, 4, 2, 2), 500, torch.zeros(1, 4, 2, 2), eta=0.0)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_predict_x0_per_sample_matches_diffusers(prediction_type):
    sched = _scheduler(prediction_type=prediction_type)
    ts = sched.timesteps[[0, 5, 12, 19]]
    g = torch.Generator().manual_seed(1)
    sample, out = torch.randn(4, 4, 8, 8, generator=g), torch.randn(4, 4, 8, 8, generator=g)
    got = predict_x0(sched, out, ts, sample)
    for i, t in enumerate(ts.tolist()):
        ref = sched.step(out[i : i + 1], t, sample[i : i + 1], eta=0.0).pred_original_sample
        torch.testing.assert_close(got[i : i + 1], ref, rtol=1e-5, atol=1e-5)
    if prediction_type == "epsilon":
        # closed form with ᾱ_t directly
        a = sched.alphas_cumprod[ts].view(-1, 1, 1, 1)
        torch.testing.assert_close(got, (sample - (1 - a).sqrt() * out) / a.sqrt(), rtol=1e-5, atol=1e-5)


def test_predict_x0_rejects_unknown_prediction_type():
    sched = _scheduler()
    sched.register_to_config(prediction_type="flow")
    with pytest.raises(ValueError, match="prediction_type"):
        predict_x0(sched, torch.zeros(1, 4, 2, 2), torch.tensor([10]), torch.zeros(1, 4, 2, 2))
