"""DDIM with log-probabilities, and the SPO candidate-pool sampler.

Notation (DDIM paper, eq. 12 and 16; ᾱ = ``scheduler.alphas_cumprod``):

    x̂0        = (x_t − √(1−ᾱ_t)·ε̂) / √ᾱ_t                         (ε-prediction)
    σ_t(η)    = η · √((1−ᾱ_{t−1})/(1−ᾱ_t)) · √(1 − ᾱ_t/ᾱ_{t−1})
    μ_θ(x_t)  = √ᾱ_{t−1}·x̂0 + √(1−ᾱ_{t−1}−σ_t²)·ε̂
    x_{t−1}   = μ_θ(x_t) + σ_t·z,   z ~ N(0, I)

so the transition is the isotropic Gaussian π_θ(x_{t−1} | x_t) = N(μ_θ(x_t), σ_t² I), whose log-density per
latent element is  −(x_{t−1}−μ)²/(2σ_t²) − log σ_t − ½·log 2π.

**Log-probabilities are the MEAN of that per-element log-density over the non-batch dimensions** (as the
official SPO / DDPO code does), not the sum. This only rescales log π by 1/(C·H·W), i.e. it is equivalent to
using β/(C·H·W) with summed log-probs; SPO's β = 10 and ratio clip ε = 0.1 are tuned for the mean.

Timesteps may be per sample (a (B,) tensor): the SPO trainer batches pairs drawn at different denoising steps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Protocol

import torch

from spo.losses import Selection, select_pairs
from spo.utils import get_logger

log = get_logger(__name__)

_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)
# σ_t is 0 at the last step of a scheduler with ``set_alpha_to_one=True`` (ᾱ_{t−1} = 1): the step is then
# deterministic and its log-density undefined. σ is floored here, as the official SPO code clips it.
STD_FLOOR = 1e-6


# ----------------------------------------------------------------------------------------------------------
# DDIM maths
# ----------------------------------------------------------------------------------------------------------
def _per_sample(values: torch.Tensor, timesteps: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Gather ``values[timesteps]`` as float32 with shape (B, 1, 1, ...) broadcastable against ``like``."""
    t = torch.as_tensor(timesteps, device=values.device).long()
    if t.ndim == 0:
        t = t.expand(like.shape[0])
    out = values[t].to(device=like.device, dtype=torch.float32)
    return out.view(-1, *([1] * (like.ndim - 1)))


def _alphas(scheduler, timesteps: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(ᾱ_t, ᾱ_{t−1}) per sample for a DDIM scheduler whose ``set_timesteps`` has been called."""
    if scheduler.num_inference_steps is None:
        raise ValueError("call scheduler.set_timesteps(num_steps) before stepping the DDIM scheduler")
    t = torch.as_tensor(timesteps).long().cpu()
    if t.ndim == 0:
        t = t.expand(like.shape[0])
    prev_t = t - scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    ac = scheduler.alphas_cumprod.cpu()
    final = torch.as_tensor(scheduler.final_alpha_cumprod, dtype=ac.dtype)
    alpha_prev = torch.where(prev_t >= 0, ac[prev_t.clamp(min=0)], final)
    shape = (-1, *([1] * (like.ndim - 1)))
    to = dict(device=like.device, dtype=torch.float32)
    return ac[t].to(**to).view(shape), alpha_prev.to(**to).view(shape)


def _x0_and_eps(scheduler, model_output: torch.Tensor, sample: torch.Tensor, alpha_t: torch.Tensor):
    """(x̂0, ε̂) from the model output for the scheduler's prediction type (computed in float32)."""
    out, x = model_output.float(), sample.float()
    beta_t = 1 - alpha_t
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return (x - beta_t.sqrt() * out) / alpha_t.sqrt(), out
    if kind == "v_prediction":
        return alpha_t.sqrt() * x - beta_t.sqrt() * out, alpha_t.sqrt() * out + beta_t.sqrt() * x
    if kind == "sample":
        return out, (x - alpha_t.sqrt() * out) / beta_t.sqrt()
    raise ValueError(
        f"unsupported prediction_type {kind!r}: expected 'epsilon', 'v_prediction' or 'sample' "
        "(set it in the model's scheduler/scheduler_config.json)"
    )


def predict_x0(scheduler, noise_pred: torch.Tensor, timesteps: torch.Tensor | int, sample: torch.Tensor):
    """DDIM's x̂0 = (x_t − √(1−ᾱ_t)·ε̂)/√ᾱ_t, with per-sample ``timesteps`` (B,) or one scalar.

    Also handles v-prediction (x̂0 = √ᾱ_t·x_t − √(1−ᾱ_t)·v) and sample prediction, following the scheduler's
    ``prediction_type``. No clipping is applied (SD's schedulers have ``clip_sample=False``). Returns a tensor
    of ``sample``'s dtype. Needs no ``set_timesteps``: only ᾱ_t is used.
    """
    alpha_t = _per_sample(scheduler.alphas_cumprod, timesteps, sample)
    x0, _ = _x0_and_eps(scheduler, noise_pred, sample, alpha_t)
    return x0.to(sample.dtype)


def gaussian_log_prob(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Mean over non-batch dims of the elementwise log N(x; mean, std²) (std broadcastable, > 0)."""
    x, mean = x.float(), mean.float()
    lp = -((x - mean) ** 2) / (2 * std**2) - torch.log(std) - _HALF_LOG_2PI
    return lp.mean(dim=tuple(range(1, lp.ndim)))


@dataclass
class DDIMStep:
    prev_sample: torch.Tensor  # x_{t−1} (given or sampled), dtype of ``sample``
    log_prob: torch.Tensor  # (B,) float32: mean per-element log π(x_{t−1} | x_t)
    pred_original_sample: torch.Tensor  # x̂0
    mean: torch.Tensor  # μ_θ(x_t), float32
    std: torch.Tensor  # σ_t per sample, float32, shape (B, 1, 1, 1)


def ddim_step_with_logprob(
    scheduler,
    noise_pred: torch.Tensor,
    timestep: torch.Tensor | int,
    sample: torch.Tensor,
    eta: float,
    prev_sample: torch.Tensor | None = None,
    generator: torch.Generator | list[torch.Generator] | None = None,
) -> DDIMStep:
    """One DDIM(η) step x_t → x_{t−1} with its Gaussian log-probability (see the module docstring).

    Matches ``DDIMScheduler.step`` (same mean, x̂0, variance and, for the same ``generator`` state, the same
    sampled ``prev_sample``) for ``clip_sample`` / no-thresholding schedulers, with ``timestep`` a scalar or a
    per-sample (B,) tensor. Pass ``prev_sample`` to score a given x_{t−1} instead of sampling one (that is how
    the trainer reads log π of the win and lose samples off one forward pass). ``eta`` must be > 0 for the
    log-probability to exist.
    """
    if eta <= 0:
        raise ValueError(
            "ddim_step_with_logprob needs eta > 0: a deterministic DDIM step has no log-probability"
        )
    if scheduler.config.get("thresholding", False):
        raise ValueError(
            "dynamic thresholding is not supported by ddim_step_with_logprob (SD does not use it)"
        )
    alpha_t, alpha_prev = _alphas(scheduler, timestep, sample)
    x0, eps = _x0_and_eps(scheduler, noise_pred, sample, alpha_t)
    if scheduler.config.get("clip_sample", False):
        r = scheduler.config.clip_sample_range
        x0 = x0.clamp(-r, r)
    variance = (1 - alpha_prev) / (1 - alpha_t) * (1 - alpha_t / alpha_prev)
    std = (eta * variance.sqrt()).clamp(min=STD_FLOOR)
    mean = alpha_prev.sqrt() * x0 + (1 - alpha_prev - std**2).clamp(min=0).sqrt() * eps
    if prev_sample is None:
        from diffusers.utils.torch_utils import randn_tensor

        # Drawn exactly as DDIMScheduler.step draws it, so a shared generator state gives the same sample.
        noise = randn_tensor(
            noise_pred.shape, generator=generator, device=noise_pred.device, dtype=noise_pred.dtype
        )
        prev_sample = (mean + std * noise.float()).to(sample.dtype)
    log_prob = gaussian_log_prob(prev_sample, mean, std)
    return DDIMStep(prev_sample, log_prob, x0.to(sample.dtype), mean, std)


# ----------------------------------------------------------------------------------------------------------
# The candidate-pool sampler
# ----------------------------------------------------------------------------------------------------------
class StepScorer(Protocol):
    """What the sampler needs from a step-aware preference model (``spo.models.preference``'s SPM has it).

    Scores are logits (the SPM multiplies cosine similarity by CLIP's ``logit_scale``), higher is better.
    """

    def encode_text(self, prompts: list[str]) -> torch.Tensor: ...

    def score_with_text(
        self, images: torch.Tensor, text_embeds: torch.Tensor, timesteps: torch.Tensor
    ) -> torch.Tensor: ...


@dataclass
class PairBatch:
    """Training pairs: for pair i, the transitions x_t^w → x_{t−1}^w and x_t^l → x_{t−1}^l at timestep t.

    Pairs drawn at a branching step share x_t (``shared`` is True and ``xt_lose`` equals ``xt_win``): the
    trainer runs ONE policy and ONE reference forward for them. MSPO's inner-step pairs (SDXL) continue two
    different chains, so their x_t differ and need two rows. ``embeds``/``pooled`` are the prompt's
    conditional embeddings (SDXL's pooled embedding too); SDXL's ``time_ids`` depend only on the resolution
    and are rebuilt by the adapter, and the unconditional embedding is the same for every prompt.
    """

    xt_win: torch.Tensor
    xt_lose: torch.Tensor
    prev_win: torch.Tensor
    prev_lose: torch.Tensor
    timesteps: torch.Tensor  # (N,) long
    shared: torch.Tensor  # (N,) bool
    embeds: torch.Tensor
    pooled: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.timesteps.shape[0]

    def _map(self, fn) -> PairBatch:
        return PairBatch(
            **{
                f.name: None if getattr(self, f.name) is None else fn(getattr(self, f.name))
                for f in fields(self)
            }
        )

    def index(self, idx) -> PairBatch:
        return self._map(lambda t: t[idx])

    def to(self, *args, **kwargs) -> PairBatch:
        return self._map(lambda t: t.to(*args, **kwargs))

    @staticmethod
    def cat(items: list[PairBatch]) -> PairBatch:
        items = [i for i in items if i is not None and len(i)]
        if not items:
            raise ValueError("PairBatch.cat needs at least one non-empty batch")
        out = {}
        for f in fields(PairBatch):
            vals = [getattr(i, f.name) for i in items]
            out[f.name] = None if vals[0] is None else torch.cat(vals)
        return PairBatch(**out)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}

    @staticmethod
    def from_state_dict(state: dict[str, torch.Tensor]) -> PairBatch:
        return PairBatch(**{f.name: state.get(f.name) for f in fields(PairBatch)})


@dataclass
class SamplerStats:
    """Counts from one sampling call (summable across processes)."""

    comparisons: int = 0  # (prompt, branching step) pools compared by the SPM
    comparisons_kept: int = 0  # of those, pools whose best/worst gap exceeded the threshold
    pairs_kept: int = 0  # training pairs recorded (a kept MSPO comparison gives one per transition)
    candidates_scored: int = 0  # candidates decoded and scored by the SPM
    unet_samples: int = 0  # UNet batch rows evaluated (a CFG call counts 2 per latent)
    candidate_scores: torch.Tensor | None = None  # every candidate's SPM score (at its own timestep)
    final_scores: torch.Tensor | None = None  # SPM score (t=0) of each finished trajectory's image

    @property
    def kept_fraction(self) -> float:
        return self.comparisons_kept / self.comparisons if self.comparisons else 0.0


CONTINUE_FROM = ("random", "winner", "loser")
PAIR_CHOICES = ("best_worst", "random")


def select_random_pairs(scores: torch.Tensor, threshold: float, generator: torch.Generator) -> Selection:
    """Two distinct uniformly random candidates per row of ``scores`` (B, k), the higher-scored one the winner,
    kept under the same softmax-gap rule as :func:`spo.losses.select_pairs` (paper Table 9's "random pair")."""
    b, k = scores.shape
    first = torch.randint(0, k, (b,), generator=generator)
    second = (first + torch.randint(1, k, (b,), generator=generator)) % k  # uniform over the other k - 1
    first, second = first.to(scores.device), second.to(scores.device)
    rows = torch.arange(b, device=scores.device)
    s1, s2 = scores[rows, first], scores[rows, second]
    first_wins = s1 >= s2
    win, lose = torch.where(first_wins, first, second), torch.where(first_wins, second, first)
    p = torch.softmax(torch.stack([scores[rows, win], scores[rows, lose]], dim=1).float(), dim=1)
    gap = p[:, 0] - p[:, 1]
    return Selection(win=win, lose=lose, keep=gap > threshold, gap=gap)


def branches_at_last_step(spo_cfg, arch: str) -> bool:
    """``spo.branch_at_last_step``, or the official samplers' rule when unset: the SD-1.5 sampler branches at
    the last step (judged on x0 at t = 0); the SDXL (MSPO) sampler never does -- the chains in progress take
    the last step as one more inner step and are judged at t = 0 (20 steps, divert 4, j = 3: 5 comparisons,
    not 6)."""
    value = getattr(spo_cfg, "branch_at_last_step", None)
    return (arch != "sdxl") if value is None else bool(value)


class CandidateSampler:
    """SPO's sampler for SD-1.5 and SDXL (one implementation over :class:`DiffusionAdapter`).

    For a batch of B prompts with k candidates per step and j transitions per comparison (MSPO; j=1 is SPO):

    1. the first ``divert_start_step`` DDIM steps (and any step whose nominal timestep exceeds κ) are plain;
    2. then, from the shared x_t, draw k candidates x_{t−1} (same mean, k noises); with j > 1 each candidate
       continues alone for j−1 more steps;
    3. each chain end x_s is judged on the VAE-decoded x̂0 the UNet predicts from it at the next timestep s,
       by the SPM conditioned on s (at the end of sampling: the decoded x_0 with s = 0). That UNet call is
       also the next step's noise prediction for the chain we continue from, so it is not wasted;
    4. best and worst candidates form a pair if p_best − p_worst > threshold (softmax over their two scores),
       and every transition of their chains with nominal t ≤ κ becomes a training pair;
    5. sampling continues from a uniformly random candidate (continuing from the winner collapses training,
       paper Table 4; ``continue_from`` and ``pair_choice`` exist for the paper's ablations).

    "Nominal" timestep = t − ``steps_offset``: SD's 20-step schedule has t = 951, 901, …, 1 for the paper's
    grid 950, 900, …, 0, so κ = 750 admits t = 751 (what ``divert_start_step = 4`` gives).
    All randomness comes from the ``generator`` passed to :meth:`sample` (a CPU generator, so a run is
    reproducible across devices and resumable).
    """

    def __init__(
        self,
        adapter,
        scorer: StepScorer,
        *,
        num_steps: int,
        num_candidates: int,
        divert_start_step: int,
        threshold: float,
        kappa: int,
        eta: float,
        cfg_scale: float,
        num_inner_steps: int = 1,
        decode_batch_size: int | None = None,
        branch_at_last_step: bool = True,
        min_timestep: int = 0,
        continue_from: str = "random",
        pair_choice: str = "best_worst",
    ):
        if num_candidates < 2:
            raise ValueError("num_candidates must be at least 2 to form a pair")
        self.adapter = adapter
        self.scorer = scorer
        self.num_steps = num_steps
        self.k = num_candidates
        self.divert_start_step = divert_start_step
        self.threshold = threshold
        self.kappa = kappa
        self.eta = eta
        self.cfg_scale = cfg_scale
        self.num_inner_steps = num_inner_steps
        self.decode_batch_size = decode_batch_size
        self.branch_at_last_step = branch_at_last_step
        self.min_timestep = min_timestep
        if continue_from not in CONTINUE_FROM or pair_choice not in PAIR_CHOICES:
            raise ValueError(
                f"continue_from must be one of {CONTINUE_FROM} and pair_choice one of {PAIR_CHOICES} "
                f"(got {continue_from!r}, {pair_choice!r})"
            )
        self.continue_from = continue_from
        self.pair_choice = pair_choice

    @classmethod
    def from_config(cls, adapter, scorer: StepScorer, spo_cfg) -> CandidateSampler:
        return cls(
            adapter,
            scorer,
            num_steps=spo_cfg.num_steps,
            num_candidates=spo_cfg.num_candidates,
            divert_start_step=spo_cfg.divert_start_step,
            threshold=spo_cfg.threshold,
            kappa=spo_cfg.kappa,
            eta=spo_cfg.eta,
            cfg_scale=spo_cfg.cfg_scale,
            num_inner_steps=spo_cfg.num_inner_steps,
            decode_batch_size=spo_cfg.sample_batch_size,
            branch_at_last_step=branches_at_last_step(spo_cfg, getattr(adapter, "arch", "sd15")),
            min_timestep=getattr(spo_cfg, "min_timestep", 0),
            continue_from=getattr(spo_cfg, "continue_from", "random"),
            pair_choice=getattr(spo_cfg, "pair_choice", "best_worst"),
        )

    # -- helpers ------------------------------------------------------------------------------------------
    @property
    def scheduler(self):
        return self.adapter.scheduler

    def nominal(self, t: int) -> int:
        return int(t) - int(self.scheduler.config.get("steps_offset", 0) or 0)

    def trains_at(self, t: int) -> bool:
        return self.min_timestep <= self.nominal(t) <= self.kappa

    def _eps(self, unet, x, t, cond, uncond, stats: SamplerStats) -> torch.Tensor:
        guided = uncond is not None and self.cfg_scale > 1.0
        stats.unet_samples += x.shape[0] * (2 if guided else 1)
        return self.adapter.predict_noise(x, t, cond, uncond, self.cfg_scale, unet=unet)

    def _score(self, x0: torch.Tensor, text: torch.Tensor, t: int) -> torch.Tensor:
        n = x0.shape[0]
        chunk = self.decode_batch_size or n
        scores = []
        for i in range(0, n, chunk):
            images = self.adapter.decode_for_spm(x0[i : i + chunk])
            ts = torch.full((images.shape[0],), int(t), dtype=torch.long, device=images.device)
            scores.append(self.scorer.score_with_text(images, text[i : i + chunk], ts).float())
        return torch.cat(scores)

    # -- the loop -----------------------------------------------------------------------------------------
    @torch.no_grad()
    def sample(
        self, prompts: list[str], generator: torch.Generator, unet=None, progress: bool = False
    ) -> tuple[PairBatch | None, SamplerStats]:
        """Sample one trajectory per prompt and return the kept training pairs (None if none) and stats."""
        from spo.progress import tqdm

        adapter, sched, k = self.adapter, self.scheduler, self.k
        unet = unet if unet is not None else adapter.unet
        device = adapter.device
        b = len(prompts)
        stats = SamplerStats()
        sched.set_timesteps(self.num_steps, device=device)
        timesteps = [int(t) for t in sched.timesteps]
        n = len(timesteps)

        cond, uncond = adapter.encode_prompts(list(prompts))
        uncond = uncond if self.cfg_scale > 1.0 else None
        text = self.scorer.encode_text(list(prompts))
        cond_k, text_k = cond.repeat_interleave(k), text.repeat_interleave(k, dim=0)
        uncond_k = None if uncond is None else uncond.repeat_interleave(k)

        from diffusers.utils.torch_utils import randn_tensor

        x = randn_tensor(adapter.latent_shape(b), generator=generator, device=device, dtype=adapter.dtype)
        x = x * sched.init_noise_sigma
        eps: torch.Tensor | None = None  # noise prediction at the current x, when already known
        pairs: list[PairBatch] = []
        candidate_scores: list[torch.Tensor] = []
        final_scores: torch.Tensor | None = None
        rows = torch.arange(b, device=device)
        bar = tqdm(total=n, desc="sampling steps", leave=False, disable=not progress)
        i = 0
        while i < n:
            bar.n = i
            bar.refresh()
            t = timesteps[i]
            if eps is None:
                eps = self._eps(unet, x, t, cond, uncond, stats)
            if i < self.divert_start_step or not self.trains_at(t):
                x = ddim_step_with_logprob(sched, eps, t, x, self.eta, generator=generator).prev_sample
                eps, i = None, i + 1
                continue

            # Branch: k candidates from the shared x_t, then (MSPO) j−1 independent inner steps per chain.
            states = [x.repeat_interleave(k, dim=0)]
            chain_t = [t]
            cur = ddim_step_with_logprob(
                sched, eps.repeat_interleave(k, dim=0), t, states[0], self.eta, generator=generator
            ).prev_sample
            nexts = [cur]
            i += 1
            inner = self.num_inner_steps - 1
            if not self.branch_at_last_step and i + inner == n - 1:
                inner += 1  # the last step would be a branch of its own: the chains take it instead
            for _ in range(inner):
                if i >= n:
                    break
                ti = timesteps[i]
                eps_i = self._eps(unet, cur, ti, cond_k, uncond_k, stats)
                states.append(cur)
                chain_t.append(ti)
                cur = ddim_step_with_logprob(sched, eps_i, ti, cur, self.eta, generator=generator).prev_sample
                nexts.append(cur)
                i += 1

            # Judge the chain ends on the x̂0 of the next step (that UNet call is reused to continue).
            if i < n:
                t_next = timesteps[i]
                eps_next = self._eps(unet, cur, t_next, cond_k, uncond_k, stats)
                scores = self._score(predict_x0(sched, eps_next, t_next, cur), text_k, t_next)
            else:
                eps_next = None
                scores = self._score(cur, text_k, 0)
            stats.candidates_scored += scores.numel()
            candidate_scores.append(scores.cpu())
            scores = scores.view(b, k)
            if self.pair_choice == "random":
                sel = select_random_pairs(scores, self.threshold, generator)
            else:
                sel = select_pairs(scores, self.threshold)
            stats.comparisons += b
            stats.comparisons_kept += int(sel.keep.sum())
            keep = sel.keep.nonzero().flatten()
            for m, (tm, xs, xn) in enumerate(zip(chain_t, states, nexts, strict=True)):
                if not len(keep) or not self.trains_at(tm):
                    continue
                xs, xn = xs.view(b, k, *xs.shape[1:]), xn.view(b, k, *xn.shape[1:])
                w, l_ = sel.win[keep], sel.lose[keep]
                pairs.append(
                    PairBatch(
                        xt_win=xs[keep, w],
                        xt_lose=xs[keep, l_],
                        prev_win=xn[keep, w],
                        prev_lose=xn[keep, l_],
                        timesteps=torch.full((len(keep),), tm, dtype=torch.long, device=device),
                        shared=torch.full((len(keep),), m == 0, dtype=torch.bool, device=device),
                        embeds=cond.embeds[keep],
                        pooled=None if cond.pooled is None else cond.pooled[keep],
                    )
                )

            # Continue from a uniformly random candidate (or, for the paper's ablations, the winner or loser).
            if self.continue_from == "random":
                choice = torch.randint(0, k, (b,), generator=generator).to(device)
            else:
                choice = (sel.win if self.continue_from == "winner" else sel.lose).to(device)
            x = cur.view(b, k, *cur.shape[1:])[rows, choice]
            eps = None if eps_next is None else eps_next.view(b, k, *eps_next.shape[1:])[rows, choice]
            if i >= n:
                final_scores = scores[rows, choice].cpu()

        bar.close()
        if final_scores is None:  # the last step was a plain one
            final_scores = self._score(x, text, 0).cpu()
        stats.final_scores = final_scores
        stats.candidate_scores = torch.cat(candidate_scores) if candidate_scores else torch.zeros(0)
        batch = PairBatch.cat(pairs) if pairs else None
        if batch is not None:
            stats.pairs_kept = len(batch)
        return batch, stats


@torch.no_grad()
def generate_latents(
    adapter,
    prompts: list[str],
    generator: torch.Generator | list[torch.Generator],
    num_steps: int,
    cfg_scale: float,
    eta: float = 0.0,
    unet=None,
) -> torch.Tensor:
    """Plain DDIM sampling through the adapter, drawing noise exactly as the stock diffusers pipelines do
    (so a LoRA saved by the trainer reproduces these latents in ``StableDiffusion(XL)Pipeline``)."""
    from diffusers.utils.torch_utils import randn_tensor

    sched = adapter.scheduler
    sched.set_timesteps(num_steps, device=adapter.device)
    cond, uncond = adapter.encode_prompts(list(prompts))
    uncond = uncond if cfg_scale > 1.0 else None
    x = randn_tensor(
        adapter.latent_shape(len(prompts)), generator=generator, device=adapter.device, dtype=adapter.dtype
    )
    x = x * sched.init_noise_sigma
    for t in sched.timesteps:
        eps = adapter.predict_noise(x, t, cond, uncond, cfg_scale, unet=unet)
        x = sched.step(eps, t, x, eta=eta, generator=generator).prev_sample
    return x
