"""SPM and SPO losses against hand-computed values (math module, no torch in the oracle)."""

from __future__ import annotations

import math

import pytest
import torch

from spo.losses import diffusion_dpo_loss, select_pairs, spm_loss, spo_loss


def _log_softmax2(a: float, b: float) -> tuple[float, float]:
    z = math.log(math.exp(a) + math.exp(b))
    return a - z, b - z


def test_spm_loss_hand_computed_with_tie_and_weights():
    # Example 1: image 0 wins, logits 2 vs 0, weight 1.
    # Example 2: a tie, logits 1 vs 0, weight 0.5 (its prompt has two examples).
    # Example 3: image 1 wins, logits 0.5 vs 3, weight 0.25.
    s0, s1 = [2.0, 1.0, 0.5], [0.0, 0.0, 3.0]
    l0, l1 = [1.0, 0.5, 0.0], [0.0, 0.5, 1.0]
    w = [1.0, 0.5, 0.25]

    # ℓ = cross-entropy − label entropy (by hand).
    lp = [_log_softmax2(a, b) for a, b in zip(s0, s1, strict=True)]
    ce = [-(y0 * p0 + y1 * p1) for (p0, p1), y0, y1 in zip(lp, l0, l1, strict=True)]
    ent = [0.0, math.log(2), 0.0]
    per = [c - h for c, h in zip(ce, ent, strict=True)]
    # spot-check the hand formula itself: example 1 is log(1 + e^-2); the tie is 0.5·log((1+e)(1+e^-1)) − log 2
    assert per[0] == pytest.approx(math.log1p(math.exp(-2)))
    assert per[1] == pytest.approx(0.5 * math.log((1 + math.e) * (1 + math.exp(-1))) - math.log(2))
    expected = sum(wi * li for wi, li in zip(w, per, strict=True)) / sum(w)

    got = spm_loss(torch.tensor(s0), torch.tensor(s1), torch.tensor(l0), torch.tensor(l1), torch.tensor(w))
    assert got.ndim == 0
    assert got.item() == pytest.approx(expected, rel=1e-6)
    # Unweighted: plain mean.
    got_plain = spm_loss(torch.tensor(s0), torch.tensor(s1), torch.tensor(l0), torch.tensor(l1))
    assert got_plain.item() == pytest.approx(sum(per) / 3, rel=1e-6)


def test_spm_loss_perfect_tie_is_zero_and_gradient_matches_cross_entropy():
    s = torch.tensor([0.7, -0.3], requires_grad=True)
    loss = spm_loss(
        s[:1], s[:1].detach().clone(), torch.tensor([0.5]), torch.tensor([0.5]), torch.tensor([1.0])
    )
    assert loss.item() == pytest.approx(0.0, abs=1e-7)
    # For a hard label the loss is the cross-entropy; d/ds0 of −log σ(s0−s1) = σ(s0−s1) − 1.
    s0 = torch.tensor([0.7], requires_grad=True)
    spm_loss(
        s0, torch.tensor([-0.3]), torch.tensor([1.0]), torch.tensor([0.0]), torch.tensor([2.0])
    ).backward()
    assert s0.grad.item() == pytest.approx(1 / (1 + math.exp(-1.0)) - 1, rel=1e-6)


def test_spo_loss_hand_computed_with_clipping():
    beta, eps = 10.0, 0.1
    # pair 1: log ratios 0.05 (win) and −0.02 (lose): inside the clip band.
    # pair 2: log ratios 0.5 (win, clipped to log 1.1) and −0.3 (lose, clipped to log 0.9).
    # pair 3: win ratio below the band (−0.2 → log 0.9), lose inside (0.01).
    lw = torch.tensor([-1.00, -2.0, -0.5])
    lw_ref = torch.tensor([-1.05, -2.5, -0.3])
    ll = torch.tensor([-0.80, -1.3, -0.7])
    ll_ref = torch.tensor([-0.78, -1.0, -0.71])
    out = spo_loss(lw.clone().requires_grad_(), lw_ref, ll.clone().requires_grad_(), ll_ref, beta, eps)

    def loss(rw: float, rl: float) -> float:
        rw = min(max(math.exp(rw), 1 - eps), 1 + eps)
        rl = min(max(math.exp(rl), 1 - eps), 1 + eps)
        m = beta * (math.log(rw) - math.log(rl))
        return -math.log(1 / (1 + math.exp(-m)))

    expected = [loss(0.05, -0.02), loss(0.5, -0.3), loss(-0.2, 0.01)]
    assert out.per_pair.tolist() == pytest.approx(expected, rel=1e-5)
    assert out.loss.item() == pytest.approx(sum(expected) / 3, rel=1e-5)
    assert out.ratio_win.tolist() == pytest.approx([math.exp(0.05), 1.1, 0.9], rel=1e-5)
    assert out.ratio_lose.tolist() == pytest.approx([math.exp(-0.02), 0.9, math.exp(0.01)], rel=1e-5)
    assert out.implicit_acc.item() == pytest.approx(2 / 3)


def test_spo_loss_clip_zeroes_gradient_outside_band():
    lw = torch.tensor([0.0, 0.0], requires_grad=True)
    ll = torch.tensor([0.0, 0.0], requires_grad=True)
    # pair 0 inside the band, pair 1 both ratios far outside it
    out = spo_loss(lw, torch.tensor([-0.01, -1.0]), ll, torch.tensor([0.01, 1.0]), beta=10.0, eps=0.1)
    out.loss.backward()
    assert lw.grad[0].item() < 0 and ll.grad[0].item() > 0  # pushes win up, lose down
    assert lw.grad[1].item() == 0.0 and ll.grad[1].item() == 0.0
    # d/dlw of −log σ(β(lw−ll)) / N = −β(1−σ(m))/N with m = β·0.02
    m = 10.0 * 0.02
    assert lw.grad[0].item() == pytest.approx(-10.0 * (1 - 1 / (1 + math.exp(-m))) / 2, rel=1e-5)


def test_select_pairs_threshold():
    scores = torch.tensor([[1.0, 3.0, 0.0, 2.0], [1.0, 1.1, 1.05, 1.0]])
    sel = select_pairs(scores, threshold=0.3)
    assert sel.win.tolist() == [1, 1]
    assert sel.lose.tolist() == [2, 0]
    gap0 = (math.exp(3) - 1) / (math.exp(3) + 1)  # softmax([3, 0]) gap = tanh(1.5)
    assert sel.gap[0].item() == pytest.approx(gap0, rel=1e-6)
    assert sel.keep.tolist() == [True, False]


def test_shard_loss_of_a_single_process_is_the_spm_loss():
    from spo.losses import shard_loss

    g = torch.Generator().manual_seed(0)
    s0, s1 = torch.randn(6, generator=g), torch.randn(6, generator=g)
    l0 = torch.tensor([1.0, 0.0, 0.5, 1.0, 0.0, 1.0])
    w = torch.rand(6, generator=g) + 0.1
    torch.testing.assert_close(shard_loss(s0, s1, l0, 1 - l0, w, w.sum()), spm_loss(s0, s1, l0, 1 - l0, w))


# ----------------------------------------------------------------------------------------------------------
# Diffusion-DPO
# ----------------------------------------------------------------------------------------------------------
def _lat(*pairs: tuple[float, float]) -> torch.Tensor:
    """(N, 1, 1, 2) latents from per-pair element pairs."""
    return torch.tensor(pairs, dtype=torch.float32).view(len(pairs), 1, 1, 2)


def test_diffusion_dpo_loss_hand_computed():
    # Per-sample errors e = mean over the 2 latent elements of (pred − ε)², worked out by hand:
    # pair 1: ε = (0, 0); model w (1, 1) -> 1, model l (2, 0) -> 2, ref w (0, 2) -> 2, ref l (1, 1) -> 1
    #         model_diff = −1, ref_diff = 1, inside = −0.5·β·(−2) = 0.5 (β = 0.5)
    # pair 2: ε = (1, −1); model w (3, −1) -> 2, model l (1, −1) -> 0, ref w = ref l = (1, −1) -> 0
    #         model_diff = 2, ref_diff = 0, inside = −0.5·β·2 = −0.5
    noise = _lat((0, 0), (1, -1))
    out = diffusion_dpo_loss(
        eps_model_win=_lat((1, 1), (3, -1)),
        eps_model_lose=_lat((2, 0), (1, -1)),
        eps_ref_win=_lat((0, 2), (1, -1)),
        eps_ref_lose=_lat((1, 1), (1, -1)),
        noise=noise,
        beta=0.5,
    )
    expected = [math.log1p(math.exp(-0.5)), math.log1p(math.exp(0.5))]  # −log σ(x) = log(1 + e^−x)
    assert out.per_pair.tolist() == pytest.approx(expected, rel=1e-6)
    assert out.loss.item() == pytest.approx(sum(expected) / 2, rel=1e-6)
    assert out.inside.tolist() == pytest.approx([0.5, -0.5])
    assert out.implicit_acc.item() == 0.5  # pair 1: model_diff < ref_diff
    assert out.model_err.item() == pytest.approx((1 + 2 + 2 + 0) / 4)
    assert out.ref_err.item() == pytest.approx((2 + 1 + 0 + 0) / 4)


def test_diffusion_dpo_loss_is_log2_at_the_reference_and_falls_when_the_winner_is_denoised_better():
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(3, 4, 2, 2, generator=g)
    ref_w = noise + 0.3 * torch.randn(noise.shape, generator=g)
    ref_l = noise + 0.3 * torch.randn(noise.shape, generator=g)
    same = diffusion_dpo_loss(ref_w, ref_l, ref_w, ref_l, noise, beta=5000.0)
    assert same.loss.item() == pytest.approx(math.log(2), abs=1e-7)
    assert same.implicit_acc.item() == 0.0  # inside = 0 is not counted as correct (the official > 0)

    model_w = (0.9 * ref_w + 0.1 * noise).requires_grad_()  # closer to ε than the reference on the winner
    better = diffusion_dpo_loss(model_w, ref_l, ref_w, ref_l, noise, beta=5000.0)
    assert better.loss.item() < math.log(2)
    assert better.implicit_acc.item() == 1.0
    assert better.model_err.item() < better.ref_err.item()
    better.loss.backward()  # the gradient flows to the policy prediction only
    assert model_w.grad is not None and torch.isfinite(model_w.grad).all()
