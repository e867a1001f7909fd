"""Losses: the SPO step loss, the SPM (PickScore-style) loss and its per-process share (``shard_loss``), and
win/lose selection from SPM scores."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


# ----------------------------------------------------------------------------------------------------------
# SPM loss
# ----------------------------------------------------------------------------------------------------------
def spm_loss(
    scores_0: torch.Tensor,
    scores_1: torch.Tensor,
    label_0: torch.Tensor,
    label_1: torch.Tensor,
    weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """PickScore-style pair loss: KL(label ‖ softmax([s0, s1])), weighted mean over the batch.

    ``scores_*`` are image–text logits already multiplied by the CLIP ``logit_scale``; ``label_*`` are the
    soft labels (1/0, 0/1, or 0.5/0.5 for a tie) and ``weight`` the per-example weights (PickScore uses
    1/num_examples_per_prompt). Per example

        ℓ_i = −Σ_k y_k·log softmax(s)_k − H(y) = KL(y ‖ softmax(s)),

    i.e. the cross-entropy minus the label entropy, so that a tie predicted as a tie costs 0 (the gradient is
    that of the plain cross-entropy). The result is Σ w_i ℓ_i / Σ w_i (plain mean when ``weight`` is None).
    """
    logits = torch.stack([scores_0, scores_1], dim=-1).float()
    labels = torch.stack([label_0, label_1], dim=-1).to(logits)
    log_p = F.log_softmax(logits, dim=-1)
    # xlogy gives 0·log 0 = 0 for hard labels.
    per_example = (torch.xlogy(labels, labels) - labels * log_p).sum(-1)
    if weight is None:
        return per_example.mean()
    w = weight.to(per_example)
    return (w * per_example).sum() / w.sum().clamp(min=torch.finfo(w.dtype).tiny)


def shard_loss(
    scores_0: torch.Tensor,
    scores_1: torch.Tensor,
    label_0: torch.Tensor,
    label_1: torch.Tensor,
    weight: torch.Tensor,
    mean_weight_sum: torch.Tensor,
) -> torch.Tensor:
    """This process's share of the global-batch SPM loss.

    The pairwise loss needs no other process's features (each pair is scored against its own prompt, no in-batch
    negatives), so features are not all-gathered: that would move 3·B·D floats per step and buy nothing. Only
    the weight normalisation is global. Scaling the local loss Σ_local w·ℓ / Σ_local w by Σ_local w /
    mean_p(Σ_p w) makes DDP's average of the per-process gradients equal the gradient of Σ_global w·ℓ /
    Σ_global w, the PickScore loss on the global batch, for one scalar all-reduce (``mean_weight_sum``).
    """
    local = weight.sum()
    return spm_loss(scores_0, scores_1, label_0, label_1, weight) * (local / mean_weight_sum.clamp(min=1e-12))


# ----------------------------------------------------------------------------------------------------------
# SPO step loss
# ----------------------------------------------------------------------------------------------------------
@dataclass
class SPOLossOutput:
    loss: torch.Tensor  # scalar: mean over pairs
    per_pair: torch.Tensor  # (N,)
    ratio_win: torch.Tensor  # (N,) clipped π_θ/π_ref for x^w (detached)
    ratio_lose: torch.Tensor  # (N,) clipped π_θ/π_ref for x^l (detached)
    implicit_acc: torch.Tensor  # scalar: fraction of pairs with log r_w > log r_l (detached)


def spo_loss(
    logp_win: torch.Tensor,
    logp_win_ref: torch.Tensor,
    logp_lose: torch.Tensor,
    logp_lose_ref: torch.Tensor,
    beta: float,
    eps: float,
) -> SPOLossOutput:
    """SPO's step-wise DPO loss with clipped likelihood ratios (paper eq. 6; official code's clamp).

    For a pair drawn from one shared x_t with SPM-chosen win/lose samples x_{t−1}^w, x_{t−1}^l:

        r_w = clip( π_θ(x_{t−1}^w | x_t, c, t) / π_ref(x_{t−1}^w | x_t, c, t), 1−ε, 1+ε )
        r_l = clip( π_θ(x_{t−1}^l | x_t, c, t) / π_ref(x_{t−1}^l | x_t, c, t), 1−ε, 1+ε )
        L   = −log σ( β · (log r_w − log r_l) )

    ``logp_*`` are log π (the mean per-element Gaussian log-density of :func:`spo.sampling.ddim_step_with_logprob`)
    under the policy and the reference. The clip zeroes a ratio's gradient once it leaves [1−ε, 1+ε] (a trust
    region around the reference) and bounds the sigmoid argument to ±β·2·log((1+ε)/(1−ε)). The ratio is formed
    in log space (exp of the log-prob difference) and ``logsigmoid`` is used, so nothing overflows.
    """
    lo, hi = torch.log1p(torch.tensor(-eps)).item(), torch.log1p(torch.tensor(eps)).item()
    log_r_win = (logp_win.float() - logp_win_ref.float()).clamp(lo, hi)
    log_r_lose = (logp_lose.float() - logp_lose_ref.float()).clamp(lo, hi)
    margin = log_r_win - log_r_lose
    per_pair = -F.logsigmoid(beta * margin)
    return SPOLossOutput(
        loss=per_pair.mean(),
        per_pair=per_pair,
        ratio_win=log_r_win.detach().exp(),
        ratio_lose=log_r_lose.detach().exp(),
        implicit_acc=(margin.detach() > 0).float().mean(),
    )


# ----------------------------------------------------------------------------------------------------------
# Win / lose selection
# ----------------------------------------------------------------------------------------------------------
@dataclass
class Selection:
    win: torch.Tensor  # (B,) index of the best candidate
    lose: torch.Tensor  # (B,) index of the worst candidate
    keep: torch.Tensor  # (B,) bool: softmax probability gap exceeds the threshold
    gap: torch.Tensor  # (B,) p_best − p_worst


def select_pairs(scores: torch.Tensor, threshold: float) -> Selection:
    """Best and worst of k candidates per row of ``scores`` (B, k); keep the pair when the softmax over
    [s_best, s_worst] gives p_best − p_worst > ``threshold`` (the official ``preference_score_compare``).

    The SPM's scores are logit-scaled, so the gap is a calibrated "how sure is the SPM" measure.
    """
    best, win = scores.max(dim=1)
    worst, lose = scores.min(dim=1)
    p = torch.softmax(torch.stack([best, worst], dim=1).float(), dim=1)
    gap = p[:, 0] - p[:, 1]
    return Selection(win=win, lose=lose, keep=gap > threshold, gap=gap)


# ----------------------------------------------------------------------------------------------------------
# Diffusion-DPO loss (the baseline)
# ----------------------------------------------------------------------------------------------------------
@dataclass
class DPOLossOutput:
    per_pair: torch.Tensor  # (N,) −log σ(inside)
    inside: torch.Tensor  # (N,) the sigmoid argument −β/2·(model_diff − ref_diff) (detached)
    model_err_pair: torch.Tensor  # (N,) ½(e_θ(x^w) + e_θ(x^l)), e = mean ‖ε − ε_θ‖² (detached)
    ref_err_pair: torch.Tensor  # (N,) ½(e_ref(x^w) + e_ref(x^l))

    @property
    def loss(self) -> torch.Tensor:
        """Mean over pairs (differentiable)."""
        return self.per_pair.mean()

    @property
    def implicit_acc(self) -> torch.Tensor:
        """Fraction of pairs with model_diff < ref_diff (the official ``inside_term > 0``)."""
        return (self.inside > 0).float().mean()

    @property
    def model_err(self) -> torch.Tensor:
        """Mean ‖ε − ε_θ‖² over the 2N images (the official ``raw_model_loss``)."""
        return self.model_err_pair.mean()

    @property
    def ref_err(self) -> torch.Tensor:
        """Mean ‖ε − ε_ref‖² over the 2N images (the official ``raw_ref_loss``)."""
        return self.ref_err_pair.mean()


def diffusion_dpo_loss(
    eps_model_win: torch.Tensor,
    eps_model_lose: torch.Tensor,
    eps_ref_win: torch.Tensor,
    eps_ref_lose: torch.Tensor,
    noise: torch.Tensor,
    beta: float,
) -> DPOLossOutput:
    """Diffusion-DPO (Wallace et al. 2023, eq. 14; the official ``train.py``).

    Winner and loser are noised with the same ε and timestep t; with per-sample errors averaged over the
    latent elements, e_θ(x) = mean‖ε − ε_θ(x_t, c, t)‖²,

        model_diff = e_θ(x^w) − e_θ(x^l),    ref_diff = e_ref(x^w) − e_ref(x^l)
        L = −log σ( −β/2 · (model_diff − ref_diff) )

    exactly the official ``inside_term = -0.5 * beta_dpo * (model_diff - ref_diff)``: the paper's
    −β·T·ω(λ_t) weighting folded into a constant β/2 (its T and ω(λ_t) = 1 absorbed in β). The loss falls when
    the policy denoises the winner better than the reference does (relative to the loser); at the reference
    (model_diff = ref_diff) it is log 2. ``implicit_acc`` is the official ``inside_term > 0`` (ties count as
    wrong). The reference predictions are taken as constants.
    """
    target = noise.float()
    dims = tuple(range(1, target.ndim))

    def err(pred: torch.Tensor) -> torch.Tensor:
        return (pred.float() - target).pow(2).mean(dim=dims)

    model_w, model_l = err(eps_model_win), err(eps_model_lose)
    with torch.no_grad():
        ref_w, ref_l = err(eps_ref_win.detach()), err(eps_ref_lose.detach())
    model_diff = model_w - model_l
    ref_diff = ref_w - ref_l
    inside = -0.5 * beta * (model_diff - ref_diff)
    per_pair = -F.logsigmoid(inside)
    return DPOLossOutput(
        per_pair=per_pair,
        inside=inside.detach(),
        model_err_pair=0.5 * (model_w.detach() + model_l.detach()),
        ref_err_pair=0.5 * (ref_w + ref_l),
    )
