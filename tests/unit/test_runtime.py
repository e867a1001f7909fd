"""The speed switches (config ``runtime``, ``spo.mixed_precision``) change how the networks run, not what they
compute: each is checked against the eager fp32 path on the tiny models, with the tolerance it is held to."""

from __future__ import annotations

import pytest
import torch
from spo_test_helpers import make_cfg

from spo.losses import spo_loss
from spo.models.diffusion import DiffusionAdapter, load_pipeline
from spo.models.lora import add_lora, reference_unet
from spo.sampling import ddim_step_with_logprob

CFG_SCALE = 5.0


def _adapter(root, *overrides):
    cfg = make_cfg(root, *overrides)
    return DiffusionAdapter(load_pipeline(cfg.model, cfg=cfg), cfg.model.resolution), cfg


def _inputs(adapter, n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(adapter.latent_shape(n), generator=g)
    cond, uncond = adapter.encode_prompts(["a red circle", "a blue square", "a green cross"][:n])
    t = torch.tensor([901, 501, 101])[:n]
    return x, t, cond, uncond


def _with_trained_lora(unet, seed=1):
    """A LoRA whose up-projections are non-zero, so the policy differs from the reference."""
    params = add_lora(unet, rank=4)
    g = torch.Generator().manual_seed(seed)
    for p in params:
        p.data = 0.05 * torch.randn(p.shape, generator=g)
    return params


def test_attention_is_sdpa_by_default(tiny_models_root):
    from diffusers.models.attention_processor import AttnProcessor2_0

    adapter, _ = _adapter(tiny_models_root)
    processors = adapter.unet.attn_processors.values()
    assert processors and all(isinstance(p, AttnProcessor2_0) for p in processors)
    assert adapter.pipe.text_encoder.config._attn_implementation == "sdpa"


def test_channels_last_gives_the_same_noise_prediction(tiny_models_root):
    plain, _ = _adapter(tiny_models_root)
    nhwc, _ = _adapter(tiny_models_root, "runtime.channels_last=true")
    conv = nhwc.unet.conv_in.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    x, t, cond, uncond = _inputs(plain)
    with torch.no_grad():
        expected = plain.predict_noise(x, t, cond, uncond, CFG_SCALE)
        got = nhwc.predict_noise(x.to(memory_format=torch.channels_last), t, cond, uncond, CFG_SCALE)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_compiled_unet_matches_eager_with_lora_added_after_compile_and_toggled(tiny_models_root):
    pytest.importorskip("torch._dynamo")
    torch._dynamo.reset()
    eager, _ = _adapter(tiny_models_root)
    compiled, _ = _adapter(tiny_models_root, "runtime.compile=true", "runtime.compile_backend=aot_eager")
    assert compiled.unet._compiled_call_impl is not None and eager.unet._compiled_call_impl is None
    params_e, params_c = _with_trained_lora(eager.unet), _with_trained_lora(compiled.unet)
    x, t, cond, uncond = _inputs(eager)

    def loss(adapter):
        eps = adapter.predict_noise(x, t, cond, uncond, CFG_SCALE)
        with reference_unet(adapter.unet) as ref:
            eps_ref = adapter.predict_noise(x, t, cond, uncond, CFG_SCALE, unet=ref)
        return eps, eps_ref, ((eps - eps_ref) ** 2).mean()

    eps_e, ref_e, loss_e = loss(eager)
    eps_c, ref_c, loss_c = loss(compiled)
    torch.testing.assert_close(eps_c, eps_e, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ref_c, ref_e, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(eps_e, ref_e, atol=1e-3)  # the LoRA is on for the policy, off for the reference
    loss_e.backward()
    loss_c.backward()
    for pe, pc in zip(params_e, params_c, strict=True):
        torch.testing.assert_close(pc.grad, pe.grad, rtol=1e-4, atol=1e-7)
    torch._dynamo.reset()


def _avx512_cpu() -> bool:
    """torch's CPU kernels use AVX-512 here: the machines the 0.02 loss tolerance below was measured on did."""
    return torch.backends.cpu.get_cpu_capability() == "AVX512"


def test_bf16_autocast_keeps_log_probs_and_the_spo_loss_close_to_fp32(tiny_models_root):
    """The training step under ``spo.mixed_precision=bf16``: UNet in bf16 autocast, LoRA parameters and the
    DDIM log-density in fp32. Held to: per-pair log-prob ratio (policy - reference) within 0.05 of fp32,
    log-probs within 2 %; the loss moves by at most β times the sum of the two ratios' moves (−log σ and the
    clip are 1-Lipschitz), and with AVX-512 kernels within 0.02 (β=10; the loss of these pairs is ~0.7). Measured
    on an AVX2-only CPU: ratios within 0.008, but one pair's loss 0.063 from fp32, because its win and lose ratios
    moved in opposite directions."""
    adapter, cfg = _adapter(tiny_models_root)
    params = _with_trained_lora(adapter.unet)
    assert all(p.dtype == torch.float32 for p in params)
    sched = adapter.scheduler
    sched.set_timesteps(cfg.spo.num_steps)
    x, t, cond, uncond = _inputs(adapter)
    # Two candidates x_{t-1} as the sampler draws them (the fp32 policy's DDIM step, two noise draws).
    with torch.no_grad():
        eps32 = adapter.predict_noise(x, t, cond, uncond, CFG_SCALE)
    win, lose = (
        ddim_step_with_logprob(
            sched, eps32, t, x, cfg.spo.eta, generator=torch.Generator().manual_seed(s)
        ).prev_sample
        for s in (3, 4)
    )

    def terms(autocast: bool):
        ctx = torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast)
        with torch.no_grad():
            with ctx:
                eps = adapter.predict_noise(x, t, cond, uncond, CFG_SCALE)
            with reference_unet(adapter.unet) as ref, ctx:
                eps_ref = adapter.predict_noise(x, t, cond, uncond, CFG_SCALE, unet=ref)
        out = {}
        for name, e in (("policy", eps), ("ref", eps_ref)):
            mean = ddim_step_with_logprob(sched, e.float(), t, x, cfg.spo.eta, prev_sample=win)
            out[f"{name}_win"] = mean.log_prob
            out[f"{name}_lose"] = ddim_step_with_logprob(
                sched, e.float(), t, x, cfg.spo.eta, prev_sample=lose
            ).log_prob
        loss = spo_loss(out["policy_win"], out["ref_win"], out["policy_lose"], out["ref_lose"], beta=10.0, eps=0.1)
        return out, loss.per_pair

    full, loss_full = terms(False)
    half, loss_half = terms(True)
    for key in full:
        torch.testing.assert_close(half[key], full[key], rtol=0.02, atol=0.0)
    ratio_moves = torch.zeros_like(loss_full)
    for side in ("win", "lose"):
        ratio_full = full[f"policy_{side}"] - full[f"ref_{side}"]
        ratio_half = half[f"policy_{side}"] - half[f"ref_{side}"]
        torch.testing.assert_close(ratio_half, ratio_full, rtol=0.0, atol=0.05)
        ratio_moves += (ratio_half - ratio_full).abs()
    assert ((loss_half - loss_full).abs() <= 10.0 * ratio_moves + 1e-6).all()
    if _avx512_cpu():
        torch.testing.assert_close(loss_half, loss_full, rtol=0.0, atol=0.02)
