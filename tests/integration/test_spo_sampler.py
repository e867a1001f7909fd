"""The candidate-pool sampler on tiny random-init SD-1.5 / SDXL models.

Oracles: diffusers' DDIMScheduler (every recorded x_{t-1} must be a DDIM(η=1) sample from its recorded x_t),
a forward hook counting UNet rows, and scorers whose preferences are known in advance.
"""

from __future__ import annotations

import pytest
import torch
from spo_standin import BrightnessScorer

from spo.config import ModelConfig
from spo.models.diffusion import DiffusionAdapter, PromptEmbeddings, load_pipeline
from spo.sampling import CandidateSampler


class PatternScorer:
    """Scores candidate j of every pool with ``pattern[j]`` (so the winner/loser are known in advance)."""

    def __init__(self, pattern: list[float]):
        self.pattern = torch.tensor(pattern)
        self.calls: list[list[int]] = []

    def encode_text(self, prompts):
        return torch.zeros(len(prompts), 1)

    def score_with_text(self, images, text_embeds, timesteps):
        self.calls.append(torch.as_tensor(timesteps).tolist())
        return self.pattern.repeat(images.shape[0] // len(self.pattern))


@pytest.fixture(scope="module")
def adapters(tiny_models_root):
    out = {}
    for arch, folder in (("sd15", "base"), ("sdxl", "base_sdxl")):
        cfg = ModelConfig(
            arch=arch, pretrained=str(tiny_models_root / "models" / folder), resolution=32, dtype="fp32"
        )
        out[arch] = DiffusionAdapter(load_pipeline(cfg), 32)
    return out


def _sampler(adapter, scorer, **kw):
    args = dict(
        num_steps=6,
        num_candidates=4,
        divert_start_step=2,
        threshold=0.3,
        kappa=750,
        eta=1.0,
        cfg_scale=5.0,
        num_inner_steps=1,
    )
    args.update(kw)
    return CandidateSampler(adapter, scorer, **args)


def _count_unet_rows(unet):
    rows = []
    handle = unet.register_forward_hook(lambda m, args, out: rows.append(args[0].shape[0]))
    return rows, handle


def _check_ddim_transition(adapter, xt, t, prev, prompts_cond, cfg_scale=5.0):
    """x_{t-1} - μ(x_t) must look like σ_t·N(0, I) under diffusers' own DDIM step."""
    sched = adapter.scheduler
    _, uncond = adapter.encode_prompts([""] * xt.shape[0])
    with torch.no_grad():
        eps = adapter.predict_noise(xt, t, prompts_cond, uncond, cfg_scale)
    for i in range(xt.shape[0]):
        ti = int(t[i])
        mean = sched.step(
            eps[i : i + 1], ti, xt[i : i + 1], eta=1.0, variance_noise=torch.zeros_like(xt[i : i + 1])
        ).prev_sample
        std = float(sched._get_variance(ti, ti - 1000 // sched.num_inference_steps)) ** 0.5
        z = (prev[i : i + 1] - mean) / std
        assert 0.6 < z.var().item() < 1.5, (
            f"pair {i}: residual variance {z.var().item():.3f} is not DDIM noise"
        )
        assert abs(z.mean().item()) < 0.35


def test_candidate_pool_pairs_counts_and_transitions(adapters):
    adapter = adapters["sd15"]
    scorer = PatternScorer([0.0, 5.0, 1.0, 3.0])  # candidate 1 always wins, candidate 0 always loses
    sampler = _sampler(adapter, scorer)
    prompts = ["a red circle", "a blue square", "a green star"]
    b, k, n, d = len(prompts), 4, 6, 2
    rows, handle = _count_unet_rows(adapter.unet)
    try:
        pairs, stats = sampler.sample(prompts, torch.Generator().manual_seed(0))
    finally:
        handle.remove()

    # UNet rows: plain steps on B latents (CFG x2), then one scoring call on B*k per branching step
    # except the last (the final x_0 is decoded directly); that call doubles as the next step's prediction.
    assert sum(rows) == stats.unet_samples == 2 * b * (d + 1) + 2 * b * k * (n - d - 1)
    ts = [int(t) for t in adapter.scheduler.timesteps]
    assert scorer.calls == [[t] * (b * k) for t in ts[d + 1 :]] + [[0] * (b * k)]
    assert stats.comparisons == stats.comparisons_kept == b * (n - d) == len(pairs) == stats.pairs_kept
    assert stats.candidates_scored == b * k * (n - d)
    assert sorted(pairs.timesteps.tolist()) == sorted(t for t in ts[d:] for _ in range(b))
    assert pairs.shared.all() and torch.equal(pairs.xt_win, pairs.xt_lose)
    assert not torch.allclose(pairs.prev_win, pairs.prev_lose)

    cond, _ = adapter.encode_prompts(prompts)
    assert torch.equal(pairs.embeds, cond.embeds.repeat(n - d, 1, 1))
    _check_ddim_transition(
        adapter, pairs.xt_win, pairs.timesteps, pairs.prev_win, PromptEmbeddings.cat([cond] * (n - d))
    )
    _check_ddim_transition(
        adapter, pairs.xt_lose, pairs.timesteps, pairs.prev_lose, PromptEmbeddings.cat([cond] * (n - d))
    )

    # Continuation: x_t of the next branching step is one of the previous step's candidates, drawn at
    # random, so it is neither always the winner nor always the loser.
    nxt = pairs.xt_win[b:]
    from_win = (nxt == pairs.prev_win[:-b]).flatten(1).all(1)
    from_lose = (nxt == pairs.prev_lose[:-b]).flatten(1).all(1)
    assert not from_win.all() and not (from_win & from_lose).any()
    # Final images are scored at t=0; the trajectory ends on a random candidate of the last pool.
    assert len(stats.final_scores) == b and set(stats.final_scores.tolist()) <= {0.0, 5.0, 1.0, 3.0}


def test_threshold_filters_undecided_pools(adapters):
    scorer = PatternScorer([0.0, 0.1, 0.05, 0.02])  # softmax gap tanh(0.05) ≈ 0.05 < 0.3
    pairs, stats = _sampler(adapters["sd15"], scorer).sample(
        ["a red circle"] * 2, torch.Generator().manual_seed(1)
    )
    assert pairs is None and stats.comparisons == 2 * 4 and stats.comparisons_kept == 0
    assert stats.kept_fraction == 0.0


def test_kappa_limits_branching_and_training_timesteps(adapters):
    adapter = adapters["sd15"]
    scorer = PatternScorer([0.0, 5.0, 1.0, 3.0])
    sampler = _sampler(adapter, scorer, num_steps=10, divert_start_step=1, kappa=400)
    pairs, stats = sampler.sample(["a red circle"] * 2, torch.Generator().manual_seed(2))
    ts = [int(t) for t in adapter.scheduler.timesteps]  # 901, 801, ..., 1
    eligible = [t for t in ts[1:] if t - 1 <= 400]
    assert eligible == [401, 301, 201, 101, 1]
    assert stats.comparisons == 2 * len(eligible)
    assert sorted(set(pairs.timesteps.tolist())) == sorted(eligible)


def test_mspo_inner_steps_on_sdxl(adapters):
    adapter = adapters["sdxl"]
    scorer = PatternScorer([0.0, 5.0])  # k = 2
    sampler = _sampler(adapter, scorer, num_candidates=2, num_steps=7, divert_start_step=1, num_inner_steps=3)
    prompts = ["a red circle", "a blue square"]
    pairs, stats = sampler.sample(prompts, torch.Generator().manual_seed(3))
    ts = [int(t) for t in adapter.scheduler.timesteps]
    # Chains: steps 1-3 (branch at ts[1], inner ts[2], ts[3]) and 4-6: 2 comparisons x 3 transitions per prompt.
    assert stats.comparisons == 2 * 2 and len(pairs) == 2 * 2 * 3
    assert scorer.calls == [[ts[4]] * 4, [0] * 4]
    shared = pairs.shared
    assert sorted(pairs.timesteps[shared].tolist()) == sorted([ts[1]] * 2 + [ts[4]] * 2)
    assert sorted(pairs.timesteps[~shared].tolist()) == sorted([ts[2], ts[3], ts[5], ts[6]] * 2)
    assert torch.equal(pairs.xt_win[shared], pairs.xt_lose[shared])
    assert not torch.allclose(pairs.xt_win[~shared], pairs.xt_lose[~shared])  # two different chains
    assert pairs.pooled is not None and pairs.pooled.shape[0] == len(pairs)
    cond, _ = adapter.encode_prompts(prompts)
    order = pairs.embeds.shape[0] // len(prompts)
    cond_rep = PromptEmbeddings.cat(
        [cond] * order
    )  # pairs are stored per transition, prompts in order within each
    _check_ddim_transition(adapter, pairs.xt_lose, pairs.timesteps, pairs.prev_lose, cond_rep)
    _check_ddim_transition(adapter, pairs.xt_win, pairs.timesteps, pairs.prev_win, cond_rep)


def test_sampling_is_reproducible_from_the_generator(adapters):
    sampler = _sampler(
        adapters["sd15"],
        BrightnessScorer(),
        num_candidates=2,
        num_steps=4,
        divert_start_step=1,
        threshold=0.0,
    )
    a, _ = sampler.sample(["a red circle"] * 2, torch.Generator().manual_seed(7))
    b, _ = sampler.sample(["a red circle"] * 2, torch.Generator().manual_seed(7))
    c, _ = sampler.sample(["a red circle"] * 2, torch.Generator().manual_seed(8))
    assert all(
        torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True)
    )
    assert not torch.equal(a.prev_win, c.prev_win)


# -- the paper's ablation switches (Tables 4, 8, 9) ------------------------------------------------------
@pytest.mark.parametrize("continue_from", ["winner", "loser"])
def test_continue_from_winner_or_loser_takes_that_candidate(adapters, continue_from):
    adapter = adapters["sd15"]
    scorer = PatternScorer([0.0, 5.0, 1.0, 3.0])  # candidate 1 wins, candidate 0 loses, every pool
    b = 3
    pairs, _ = _sampler(adapter, scorer, continue_from=continue_from).sample(
        ["a red circle"] * b, torch.Generator().manual_seed(4)
    )
    nxt = pairs.xt_win[b:]  # x_t of every branching step after the first
    previous = pairs.prev_win[:-b] if continue_from == "winner" else pairs.prev_lose[:-b]
    other = pairs.prev_lose[:-b] if continue_from == "winner" else pairs.prev_win[:-b]
    assert torch.equal(nxt, previous)
    assert not (nxt == other).flatten(1).all(1).any()


def test_min_timestep_keeps_branching_inside_the_range(adapters):
    adapter = adapters["sd15"]
    scorer = PatternScorer([0.0, 5.0, 1.0, 3.0])
    sampler = _sampler(adapter, scorer, num_steps=10, divert_start_step=1, kappa=750, min_timestep=250)
    pairs, stats = sampler.sample(["a red circle"] * 2, torch.Generator().manual_seed(5))
    ts = [int(t) for t in adapter.scheduler.timesteps]  # 901, 801, ..., 1 (nominal t - 1)
    eligible = [t for t in ts[1:] if 250 <= t - 1 <= 750]
    assert eligible == [701, 601, 501, 401, 301]
    assert stats.comparisons == 2 * len(eligible)
    assert sorted(set(pairs.timesteps.tolist())) == eligible[::-1]
    # The steps below the range are plain, so the final image is scored once per prompt, not per candidate.
    assert scorer.calls[-1] == [0] * 2


def test_random_pair_choice_orders_by_score_and_covers_every_pair():
    from spo.losses import select_pairs
    from spo.sampling import select_random_pairs

    scores = torch.tensor([[0.0, 5.0, 1.0, 3.0]]).repeat(6000, 1)
    sel = select_random_pairs(scores, 0.3, torch.Generator().manual_seed(0))
    rows = torch.arange(len(scores))
    assert (scores[rows, sel.win] > scores[rows, sel.lose]).all()
    # Each of the C(4, 2) = 6 unordered pairs is drawn with probability 1/6.
    pair_ids = (sel.win * 4 + sel.lose).tolist()
    counts = torch.bincount(torch.tensor(pair_ids), minlength=16).float()
    drawn = counts[counts > 0]
    assert len(drawn) == 6 and ((drawn / len(scores) - 1 / 6).abs() < 0.02).all()
    # The keep rule is the best/worst rule applied to the drawn pair: a two-way softmax over scores that
    # differ by d gives p_win - p_lose = tanh(d / 2) (e.g. scores 1 vs 0: 0.46 > 0.3, kept).
    gap = torch.tanh((scores[rows, sel.win] - scores[rows, sel.lose]) / 2)
    assert torch.allclose(sel.gap, gap, atol=1e-6) and torch.equal(sel.keep, gap > 0.3)
    best = select_pairs(scores[:1], 0.3)
    assert (best.win, best.lose) == (torch.tensor([1]), torch.tensor([0]))


def test_sampler_refuses_unknown_ablation_settings(adapters):
    with pytest.raises(ValueError, match="continue_from"):
        _sampler(adapters["sd15"], PatternScorer([0.0, 1.0]), continue_from="best")


def test_the_tiny_decoder_renders_what_the_spm_judges(adapters, tiny_models_root):
    """spm.decoder=tiny: the sampler's candidates go through the tiny decoder (diffusers' AutoencoderTiny, its
    own decode as the oracle) and never through the VAE."""
    from diffusers import AutoencoderTiny

    adapter = adapters["sd15"]
    tiny = AutoencoderTiny.from_pretrained(tiny_models_root / "models" / "base" / "tiny_decoder")
    latents = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(adapter.decode_for_spm(latents), adapter.decode(latents))  # none attached: the VAE
        expected = tiny.decode(latents).sample.clamp(-1, 1)
    vae_rows, tiny_rows = [], []
    hooks = [
        adapter.vae.decoder.register_forward_hook(lambda m, a, o: vae_rows.append(a[0].shape[0])),
        tiny.decoder.register_forward_hook(lambda m, a, o: tiny_rows.append(a[0].shape[0])),
    ]
    adapter.spm_decoder = tiny
    try:
        with torch.no_grad():
            torch.testing.assert_close(adapter.decode_for_spm(latents), expected)
        tiny_rows.clear()
        _, stats = _sampler(adapter, PatternScorer([0.0, 5.0, 1.0, 3.0])).sample(
            ["a red circle"] * 2, torch.Generator().manual_seed(0)
        )
    finally:
        adapter.spm_decoder = None
        for h in hooks:
            h.remove()
    assert vae_rows == [] and sum(tiny_rows) == stats.candidates_scored > 0


def test_spm_latent_size_scales_the_shorter_side_and_never_upsamples():
    from spo.models.diffusion import spm_latent_size

    assert spm_latent_size(64, 64, 8, 224) == (28, 28)  # SD-1.5 at 512 px -> PickScore's 224 px
    assert spm_latent_size(128, 128, 8, 224) == (28, 28)  # SDXL at 1024 px
    assert spm_latent_size(96, 128, 8, 224) == (28, 37)  # 768 x 1024: the shorter side -> 224, 1024 * 224/768
    assert spm_latent_size(64, 64, 8, None) == (64, 64)
    assert spm_latent_size(64, 64, 8, 512) == (64, 64) == spm_latent_size(64, 64, 8, 1024)


def test_decode_resolution_decodes_box_filtered_latents_and_filters_clean_images_alike(adapters, tiny_models_root):
    """spm.decode_resolution=16 on the 32-px tiny model (VAE factor 4): the SPM's decoder gets the 8x8 latents
    averaged over 2x2 blocks (oracle: avg_pool2d) and renders 16-px images, with the VAE or the tiny decoder;
    clean images are averaged over the same blocks of pixels; in the sampler every decode is at 4x4 latents."""
    import torch.nn.functional as F
    from diffusers import AutoencoderTiny

    adapter = adapters["sd15"]
    tiny = AutoencoderTiny.from_pretrained(tiny_models_root / "models" / "base" / "tiny_decoder")
    latents = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    pooled = F.avg_pool2d(latents, 2)
    decoded_sides = []
    hooks = [
        m.register_forward_hook(lambda m, a, o: decoded_sides.append(tuple(a[0].shape[-2:])))
        for m in (adapter.vae.decoder, tiny.decoder)
    ]
    adapter.spm_decode_resolution = 16
    try:
        with torch.no_grad():
            torch.testing.assert_close(adapter.decode_for_spm(latents), adapter.decode(pooled))
            assert adapter.decode_for_spm(latents).shape[-2:] == (16, 16)
            adapter.spm_decoder = tiny
            torch.testing.assert_close(adapter.decode_for_spm(latents), tiny.decode(pooled).sample.clamp(-1, 1))
            adapter.spm_decoder = None
        torch.testing.assert_close(adapter.images_for_spm(images), F.avg_pool2d(images, 2))
        decoded_sides.clear()
        _, stats = _sampler(adapter, PatternScorer([0.0, 5.0, 1.0, 3.0])).sample(
            ["a red circle"] * 2, torch.Generator().manual_seed(0)
        )
        assert stats.candidates_scored > 0 and decoded_sides and set(decoded_sides) == {(4, 4)}
        adapter.spm_decode_resolution = 32  # not smaller than the image: nothing changes
        assert adapter.images_for_spm(images) is images and adapter.latents_for_spm(latents) is latents
    finally:
        adapter.spm_decode_resolution, adapter.spm_decoder = None, None
        for h in hooks:
            h.remove()
