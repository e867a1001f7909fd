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
