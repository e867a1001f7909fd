"""The SPO trainer (paper §4; shared/reference/paper.md §2b for the recipe), used by ``spo train``.

One *iteration* = sample a batch of prompts with the candidate-pool sampler (:mod:`spo.sampling`), gather the
kept win/lose pairs from all processes into one pool (:meth:`SPOTrainer.sample_iteration`), and take
optimizer steps on that pool (:meth:`SPOTrainer.train_pool`):

* the policy is the UNet with a LoRA on ``to_q/to_k/to_v/to_out.0``; the reference is **the same UNet with
  its adapters disabled** (no copy in memory);
* win and lose of a pair share x_t, so a pair costs **one policy forward (with grad) and one reference
  forward (no grad)** -- each CFG-doubled when ``spo.train_cfg`` is on -- and both log π(x_{t−1}|x_t) are read
  off the same predicted mean (:func:`spo.sampling.ddim_step_with_logprob` with ``prev_sample``);
* an optimizer step uses exactly ``train_batch_size × grad_accum`` pairs per process; pool pairs that do not
  fill a whole step are *carried over* to the next iteration (logged), and at the very end
  (:meth:`SPOTrainer.finish`) the remainder is trained as one smaller step, so no kept pair is silently
  dropped (at most ``num_processes − 1`` can be left when the remainder does not split evenly; they are
  counted in ``pairs_skipped``);
* gradients are clipped on a materialised parameter list (the official code's clipping was a no-op), NaN/inf
  steps are skipped and counted, and ``spo.max_consecutive_nonfinite`` in a row abort the run
  (:class:`spo.training.NonFiniteGuard`);
* checkpoints (:class:`spo.training.CheckpointManager` under ``checkpoints/spo/checkpoint-<step>``: accelerate
  ``save_state`` -- LoRA, optimizer, LR scheduler, RNG -- plus the run state :class:`SPOState` and the pool of
  not-yet-trained pairs) every ``spo.checkpoint_every`` optimizer steps and at each epoch end; a resumed run
  ends with the same LoRA as an uninterrupted one (all randomness is drawn from seed streams keyed by
  (seed, epoch, iteration, process), :func:`spo.training.seed_generator`). On another process count it
  continues the epoch at the same prompt (``SPOState.prompt_offset`` counts prompts of all processes).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from spo import tracking
from spo.errors import SPOError
from spo.losses import SPOLossOutput, spo_loss
from spo.models.lora import prepare_lora_policy, reference_unet
from spo.pipeline_spec import artifact_path
from spo.sampling import CandidateSampler, PairBatch, SamplerStats, ddim_step_with_logprob
from spo.training import CheckpointManager, NonFiniteGuard, RunIdentity, require_sane, seed_generator
from spo.training.checkpoints import Resumed
from spo.training.launch import checked_accelerator
from spo.utils import effective_mixed_precision, get_logger

log = get_logger(__name__)

SECTIONS = ("model", "spo")  # the config that shapes the LoRA (checkpoint lineage, config_hash)
POOL_FILE = "pending_pairs.pt"
POOL_SHUFFLE = 10**6  # seed-stream "process" slot of the pool shuffle (never a real process index)
NONFINITE_HINT = (
    "Lower spo.lr, use spo.mixed_precision=bf16 instead of fp16, or resume from the last good checkpoint "
    "with `spo train --resume latest`."
)
SAMPLING_CURVE_KEYS = ("kept_fraction", "spm_score_mean", "spm_score_std", "candidate_score_mean")
CURVE_FIELDS = (
    "step",
    "epoch",
    "iteration",
    "loss",
    "ratio_win",
    "ratio_lose",
    "implicit_acc",
    "grad_norm",
    "lr",
    *SAMPLING_CURVE_KEYS,
    "pairs_trained",
)
SAMPLER_COUNTERS = ("comparisons", "comparisons_kept", "pairs_kept", "candidates_scored")


def _new_counters() -> dict[str, float]:
    counts = (*SAMPLER_COUNTERS, "unet_samples_sampling", "unet_samples_training")
    return {
        **dict.fromkeys((*counts, "pairs_trained", "pairs_skipped", "steps_skipped"), 0),
        "time_sampling_s": 0.0,  # this process's seconds in the sampler / in optimizer steps
        "time_training_s": 0.0,
    }


@dataclass
class SPOState:
    """Where a run is: everything a checkpoint stores besides the accelerate state and the pool file."""

    epoch: int = 0
    iteration: int = 0  # the next iteration of ``epoch`` to sample
    # Prompts of this epoch sampled so far by all processes together: a checkpoint resumes on any process
    # count from here (an iteration index alone would mean a different prompt on another count).
    prompt_offset: int = 0
    global_step: int = 0  # optimizer steps taken
    counters: dict[str, float] = field(default_factory=_new_counters)
    curves: list[dict[str, Any]] = field(default_factory=list)  # one row per optimizer step
    first_spm_score_mean: float | None = None
    last_sampling: dict[str, float] = field(default_factory=dict)
    last_checkpoint_step: int | None = None
    pool: PairBatch | None = None  # kept pairs not trained yet (stored in POOL_FILE, not in the state JSON)

    @property
    def pending(self) -> int:
        return 0 if self.pool is None else len(self.pool)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "pool"}

    @classmethod
    def from_dict(cls, data: dict[str, Any], pool: PairBatch | None = None) -> SPOState:
        names = {f.name for f in dataclasses.fields(cls)} - {"pool"}
        state = cls(**{k: v for k, v in data.items() if k in names}, pool=pool)
        state.counters = {**_new_counters(), **state.counters}
        return state


def make_accelerator(cfg):
    from accelerate.utils import ProjectConfiguration

    return checked_accelerator(
        mixed_precision=effective_mixed_precision(cfg.spo.mixed_precision, cfg.runtime.cpu_bf16),
        project_config=ProjectConfiguration(project_dir=str(artifact_path(cfg, "spo_checkpoints"))),
    )


def set_tf32(enabled: bool) -> None:
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = enabled
        torch.backends.cudnn.allow_tf32 = enabled


def gather_pairs(acc, pairs: PairBatch | None) -> PairBatch | None:
    """All processes' kept pairs, in process order, on CPU (identical on every process)."""
    local = None if pairs is None else pairs.to("cpu")
    if acc.num_processes == 1:
        return local
    from accelerate.utils import gather_object

    parts = [p for p in gather_object([local]) if p is not None]
    return PairBatch.cat(parts) if parts else None


def gather_stats(acc, stats: SamplerStats) -> dict[str, Any]:
    """All processes' sampler counts (summed) and scores (concatenated in process order)."""
    local = {
        "comparisons": stats.comparisons,
        "comparisons_kept": stats.comparisons_kept,
        "pairs_kept": stats.pairs_kept,
        "candidates_scored": stats.candidates_scored,
        "unet_samples": stats.unet_samples,
        "final_scores": stats.final_scores.tolist(),
        "candidate_scores": stats.candidate_scores.tolist(),
    }
    parts = [local]
    if acc.num_processes > 1:
        from accelerate.utils import gather_object

        parts = gather_object([local])
    out: dict[str, Any] = {k: sum(p[k] for p in parts) for k in local if not k.endswith("_scores")}
    for k in ("final_scores", "candidate_scores"):
        out[k] = [v for p in parts for v in p[k]]
    return out


def sampling_metrics(gathered: dict[str, Any]) -> dict[str, float]:
    final, cand = torch.tensor(gathered["final_scores"]), torch.tensor(gathered["candidate_scores"])
    return {
        "kept_fraction": gathered["comparisons_kept"] / max(gathered["comparisons"], 1),
        "pairs_kept": gathered["pairs_kept"],
        "spm_score_mean": float(final.mean()),
        "spm_score_std": float(final.std()) if len(final) > 1 else 0.0,
        "candidate_score_mean": float(cand.mean()) if len(cand) else float("nan"),
        "candidate_score_std": float(cand.std()) if len(cand) > 1 else 0.0,
    }


def _mean(values: list[float]) -> float:
    return float(sum(values) / len(values)) if values else float("nan")


class SPOTrainer:
    """The policy (LoRA UNet), optimizer, sampler, checkpoints and run state; see the module docstring.

    ``prompts``: the training prompts (needed by :meth:`sample_iteration`; optional for step-level use).
    """

    def __init__(self, cfg, accelerator, adapter, scorer, prompts: list[str] | tuple[str, ...] = ()):
        self.cfg, self.scfg = cfg, cfg.spo
        self.accelerator = accelerator
        self.adapter = adapter
        self.prompts = list(prompts)
        self.world, self.rank = accelerator.num_processes, accelerator.process_index
        self.main = accelerator.is_main_process
        policy = prepare_lora_policy(
            accelerator,
            adapter,
            rank=self.scfg.lora_rank,
            alpha=self.scfg.lora_alpha,
            seed=self.scfg.seed,
            lr=self.scfg.lr,
            betas=(self.scfg.adam_beta1, self.scfg.adam_beta2),
            weight_decay=self.scfg.adam_weight_decay,
            eps=self.scfg.adam_eps,
            warmup_steps=self.scfg.lr_warmup_steps,
            gradient_checkpointing=self.scfg.gradient_checkpointing,
        )
        self.unet, self.base_unet, self.params = policy.unet, policy.base_unet, policy.params
        self.optimizer, self.lr_scheduler = policy.optimizer, policy.lr_scheduler

        # The unconditional (empty-prompt) embedding: the same for every prompt, encoded once.
        self.uncond = adapter.encode_prompts([""])[1]
        self.sampler = CandidateSampler.from_config(adapter, scorer, self.scfg)
        self.sampler.scheduler.set_timesteps(self.scfg.num_steps, device=adapter.device)
        self.guard = NonFiniteGuard(self.scfg.max_consecutive_nonfinite, "SPO", NONFINITE_HINT)
        # Policy UNet rows run with grad (this process); the reference runs as many without grad.
        self.unet_samples_with_grad = 0
        self.pairs_per_step = self.scfg.train_batch_size * self.scfg.grad_accum * self.world
        per_iteration = self.scfg.sample_batch_size * self.world
        self.iters_per_epoch = math.ceil(len(self.prompts) / per_iteration)
        self.checkpoints = CheckpointManager(
            artifact_path(cfg, "spo_checkpoints"),
            RunIdentity.for_config(cfg, SECTIONS, self.world),
            keep=self.scfg.checkpoints_total_limit,
            accelerator=accelerator,
            elastic=True,  # the data position is SPOState.prompt_offset, in prompts of all processes
            name="SPO checkpoint",
        )
        self.state = SPOState()
        self.tracker = tracking.active()
        self._order: tuple[int, list[int]] | None = None

    # -- one pair batch: 1 policy forward + 1 reference forward ---------------------------------------------
    def _uncond_rows(self, n: int):
        from spo.models.diffusion import PromptEmbeddings

        u = self.uncond
        return PromptEmbeddings(
            u.embeds.expand(n, *u.embeds.shape[1:]),
            None if u.pooled is None else u.pooled.expand(n, *u.pooled.shape[1:]),
        )

    def pair_losses(self, pairs: PairBatch) -> SPOLossOutput:
        """SPO loss of a batch of pairs (on the accelerator device).

        UNet rows: x_t of every pair, plus x_t^l only for pairs that do not share x_t (MSPO inner steps).
        """
        from spo.models.diffusion import PromptEmbeddings

        sched, scfg = self.sampler.scheduler, self.scfg
        n = len(pairs)
        own = (~pairs.shared).nonzero().flatten()
        x = torch.cat([pairs.xt_win, pairs.xt_lose[own]])
        t = torch.cat([pairs.timesteps, pairs.timesteps[own]])
        emb = PromptEmbeddings(
            torch.cat([pairs.embeds, pairs.embeds[own]]),
            None if pairs.pooled is None else torch.cat([pairs.pooled, pairs.pooled[own]]),
        )
        lose_row = torch.arange(n, device=x.device)
        lose_row[own] = n + torch.arange(len(own), device=x.device)
        uncond = self._uncond_rows(x.shape[0]) if scfg.train_cfg else None
        guided = uncond is not None and scfg.cfg_scale > 1.0
        self.unet_samples_with_grad += x.shape[0] * (2 if guided else 1)

        def log_probs(eps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            win = ddim_step_with_logprob(
                sched, eps[:n], pairs.timesteps, pairs.xt_win, scfg.eta, prev_sample=pairs.prev_win
            )
            lose = ddim_step_with_logprob(
                sched, eps[lose_row], pairs.timesteps, pairs.xt_lose, scfg.eta, prev_sample=pairs.prev_lose
            )
            return win.log_prob, lose.log_prob

        with self.accelerator.autocast():
            eps = self.adapter.predict_noise(x, t, emb, uncond, scfg.cfg_scale, unet=self.unet)
        logp_win, logp_lose = log_probs(eps)
        with reference_unet(self.base_unet) as ref, self.accelerator.autocast():
            eps_ref = self.adapter.predict_noise(x, t, emb, uncond, scfg.cfg_scale, unet=ref)
            ref_win, ref_lose = log_probs(eps_ref)
        return spo_loss(logp_win, ref_win, logp_lose, ref_lose, beta=scfg.beta, eps=scfg.eps)

    # -- one optimizer step -----------------------------------------------------------------------------------
    def _all_finite(self, value: torch.Tensor) -> bool:
        flag = torch.tensor([float(torch.isfinite(value).all())], device=self.accelerator.device)
        return bool(self.accelerator.gather(flag).min() > 0)

    def _skip_nonfinite(self, what: str) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.guard.ok(False, what, step=self.state.global_step + 1)  # raises on the limit-th in a row

    def optimizer_step(self, pairs: PairBatch) -> dict[str, float] | None:
        """One optimizer step on this process's share of pairs (chunks of ``train_batch_size`` accumulate).

        Returns the step's metrics, or None when the step was skipped (non-finite loss/gradients, or an fp16
        loss-scaler overflow).
        """
        acc, device, n = self.accelerator, self.accelerator.device, len(pairs)
        chunk = self.scfg.train_batch_size
        starts = list(range(0, n, chunk))
        sums = {"loss": 0.0, "ratio_win": 0.0, "ratio_lose": 0.0, "implicit_acc": 0.0}
        loss_total = torch.zeros((), device=device)
        self.optimizer.zero_grad(set_to_none=True)
        for j, s in enumerate(starts):
            part = pairs.index(slice(s, s + chunk)).to(device)
            sync = contextlib.nullcontext() if j == len(starts) - 1 else acc.no_sync(self.unet)
            with sync:
                out = self.pair_losses(part)
                # Sum/n: the gradient is the mean over the whole step, however it is chunked.
                acc.backward(out.per_pair.sum() / n)
            loss_total = loss_total + out.per_pair.detach().sum()
            sums["ratio_win"] += out.ratio_win.sum().item()
            sums["ratio_lose"] += out.ratio_lose.sum().item()
            sums["implicit_acc"] += out.implicit_acc.item() * len(part)

        if not self._all_finite(loss_total):
            return self._skip_nonfinite("loss")
        grad_norm = acc.clip_grad_norm_(self.params, self.scfg.max_grad_norm)
        grad_norm = torch.as_tensor(grad_norm, device=device).float()
        if not torch.isfinite(grad_norm) and acc.scaler is None:
            return self._skip_nonfinite("gradient norm")
        self.optimizer.step()
        if acc.optimizer_step_was_skipped:  # fp16 loss-scaler overflow: the scaler lowers its scale
            self.optimizer.zero_grad(set_to_none=True)
            log.info("optimizer step skipped by the fp16 loss scaler (overflow); scale reduced")
            return None
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.guard.ok(True)
        metrics = {k: v / n for k, v in sums.items()}
        metrics["loss"] = float(acc.reduce(loss_total, reduction="sum")) / (n * acc.num_processes)
        metrics["grad_norm"] = float(grad_norm)
        metrics["lr"] = float(self.lr_scheduler.get_last_lr()[0])
        return metrics

    def lora_is_finite(self) -> bool:
        return all(bool(torch.isfinite(p).all()) for p in self.params)

    # -- the run: start, sample, train, checkpoint, finish ------------------------------------------------
    def start(self, resume: str | Path | None) -> Resumed | None:
        """Fresh run (an earlier run's checkpoints are moved aside) or resume ``"latest"`` / a checkpoint."""
        resumed = self.checkpoints.start(resume)
        if resumed is not None:
            if "global_step" not in resumed.state:
                raise SPOError(
                    f"{resumed.path} holds no SPO trainer state; start a fresh run without --resume"
                )
            self.accelerator.load_state(str(resumed.path))
            pool = torch.load(resumed.path / POOL_FILE, map_location="cpu", weights_only=True)
            self.state = SPOState.from_dict(resumed.state, PairBatch.from_state_dict(pool) if pool else None)
            self.guard.load_state_dict(resumed.state.get("nonfinite", {}))
            s = self.state
            saved_world = int(resumed.meta.get("num_processes", self.world))
            if "prompt_offset" not in resumed.state:  # written before the offset was stored
                saved_spo = resumed.meta.get("config", {}).get("spo", {})
                per = int(saved_spo.get("sample_batch_size", self.scfg.sample_batch_size))
                s.prompt_offset = s.iteration * per * saved_world
            log.info(
                "resumed at epoch %d, iteration %d (prompt %d of %d), step %d",
                s.epoch, s.iteration, min(s.prompt_offset, len(self.prompts)), len(self.prompts), s.global_step,
            )
            if saved_world != self.world and self.main:
                log.warning(
                    "%s was written by %d process(es), this run has %d: the epoch continues at the same "
                    "prompt, with %d pairs per optimizer step instead of %d (the LR schedule counts steps)",
                    resumed.path, saved_world, self.world, self.pairs_per_step,
                    self.pairs_per_step // self.world * saved_world,
                )
        if self.main:
            log.info(
                "SPO: %d prompts, %d epochs x %d iterations, %d process(es); %d pairs per optimizer step "
                "(%d per process = %d x grad_accum %d)",
                len(self.prompts),
                self.scfg.num_epochs,
                self.iters_per_epoch,
                self.world,
                self.pairs_per_step,
                self.pairs_per_step // self.world,
                self.scfg.train_batch_size,
                self.scfg.grad_accum,
            )
            self.tracker.log_params(
                {"spo.num_train_prompts": len(self.prompts), "spo.num_processes": self.world}
            )
        return resumed

    def _prompt_order(self, epoch: int) -> list[int]:
        if self._order is None or self._order[0] != epoch:
            perm = torch.randperm(len(self.prompts), generator=seed_generator(self.scfg.seed, epoch))
            self._order = (epoch, perm.tolist())
        return self._order[1]

    def sample_iteration(self) -> dict[str, float]:
        """Sample this process's prompts of the next iteration, gather every process's kept pairs (shuffled)
        into the pool and the sampler counts into the state; returns the iteration's sampling metrics."""
        s, scfg, acc = self.state, self.scfg, self.accelerator
        per, order = scfg.sample_batch_size, self._prompt_order(s.epoch)
        first = s.prompt_offset + self.rank * per
        prompts = [self.prompts[order[(first + j) % len(self.prompts)]] for j in range(per)]
        generator = seed_generator(scfg.seed, s.epoch, s.iteration, self.rank)
        self.unet.eval()
        tic = time.perf_counter()
        with acc.autocast():
            pairs, stats = self.sampler.sample(prompts, generator, unet=self.base_unet, progress=self.main)
        s.counters["time_sampling_s"] += time.perf_counter() - tic
        self.unet.train()
        gathered, new = gather_stats(acc, stats), gather_pairs(acc, pairs)
        if new is not None:
            shuffle = seed_generator(scfg.seed, s.epoch, s.iteration, POOL_SHUFFLE)
            new = new.index(torch.randperm(len(new), generator=shuffle))
            s.pool = new if s.pool is None else PairBatch.cat([s.pool, new])
        for key in SAMPLER_COUNTERS:
            s.counters[key] += gathered[key]
        s.counters["unet_samples_sampling"] += gathered["unet_samples"]
        sampling = sampling_metrics(gathered)
        s.last_sampling = sampling
        if s.first_spm_score_mean is None:
            s.first_spm_score_mean = sampling["spm_score_mean"]
        self.tracker.log_metrics({f"spo/sampling_{k}": v for k, v in sampling.items()}, step=s.global_step)
        log.debug("epoch %d, iteration %d/%d: %s", s.epoch, s.iteration + 1, self.iters_per_epoch, sampling)
        s.iteration += 1
        s.prompt_offset += per * self.world
        return sampling

    def epoch_done(self) -> bool:
        """Every prompt of the epoch sampled (the last iteration wraps round to fill its batch)."""
        return self.state.prompt_offset >= len(self.prompts)

    def _take_step(self, batch: PairBatch) -> None:
        """One optimizer step on ``batch`` (split evenly over the processes), accounted in the state."""
        s, acc = self.state, self.accelerator
        share = len(batch) // self.world
        rows_before, tic = self.unet_samples_with_grad, time.perf_counter()
        metrics = self.optimizer_step(batch.index(slice(self.rank * share, (self.rank + 1) * share)))
        s.counters["time_training_s"] += time.perf_counter() - tic
        rows = torch.tensor(float(self.unet_samples_with_grad - rows_before), device=acc.device)
        s.counters["unet_samples_training"] += int(acc.reduce(rows, reduction="sum"))
        if metrics is None:
            s.counters["steps_skipped"] += 1
            s.counters["pairs_skipped"] += share * self.world
            return
        s.global_step += 1
        s.counters["pairs_trained"] += share * self.world
        sampled = {k: s.last_sampling.get(k) for k in SAMPLING_CURVE_KEYS}
        row = {"step": s.global_step, "epoch": s.epoch, "iteration": s.iteration, **metrics, **sampled}
        row["pairs_trained"] = s.counters["pairs_trained"]
        s.curves.append(row)
        logged = {f"spo/{k}": v for k, v in row.items() if k != "step" and v is not None}
        self.tracker.log_metrics(logged, step=s.global_step)

    def train_pool(self) -> None:
        """Take every full optimizer step the pool holds; checkpoint every ``spo.checkpoint_every`` steps."""
        s, n = self.state, self.pairs_per_step
        while s.pool is not None and len(s.pool) >= n:
            batch, rest = s.pool.index(slice(0, n)), s.pool.index(slice(n, None))
            s.pool = rest if len(rest) else None
            self._take_step(batch)
            every = self.scfg.checkpoint_every
            if s.global_step and s.global_step % every == 0 and s.last_checkpoint_step != s.global_step:
                s.last_checkpoint_step = s.global_step
                self.save_checkpoint()
        if s.pending and self.main:
            log.info("%d kept pair(s) carried over to the next iteration (a step takes %d)", s.pending, n)

    def end_epoch(self) -> None:
        s = self.state
        s.epoch, s.iteration, s.prompt_offset, s.last_checkpoint_step = s.epoch + 1, 0, 0, s.global_step
        self.save_checkpoint()

    def save_checkpoint(self) -> Path | None:
        """Checkpoint ``checkpoint-<global_step>`` (None, and nothing written, if the LoRA is not finite)."""
        s, acc = self.state, self.accelerator

        def write(tmp: Path) -> None:
            acc.save_state(str(tmp))  # collective: every process writes its RNG state
            if self.main:
                torch.save(s.pool.state_dict() if s.pool is not None else {}, tmp / POOL_FILE)

        state = {**s.to_dict(), "nonfinite": self.guard.state_dict()}
        path = self.checkpoints.save(s.global_step, state, write=write, finite=self.lora_is_finite())
        if path is not None and self.main:
            log.info(
                "checkpoint %s (epoch %d, next iteration %d, %d pairs pending)",
                path,
                s.epoch,
                s.iteration,
                s.pending,
            )
        return path

    def finish(self) -> dict[str, Any]:
        """Train the remainder of the pool as one smaller step, check the LoRA is finite; returns the
        training part of the summary (see :meth:`summary`)."""
        s, world = self.state, self.world
        log_main = log.info if self.main else log.debug
        usable = (s.pending // world) * world
        if usable:
            left = s.pending - usable
            note = f"; {left} skipped (they do not split over {world} processes)" if left else ""
            log_main("final step on the %d remaining pair(s)%s", usable, note)
            s.counters["pairs_skipped"] += left
            self._take_step(s.pool.index(slice(0, usable)))
        elif s.pending:
            log_main("%d remaining pair(s) skipped (fewer than the %d processes)", s.pending, world)
            s.counters["pairs_skipped"] += s.pending
        s.pool = None
        require_sane(
            self.params, "the trained LoRA", self.cfg.spo.max_lora_weight, "Lower spo.lr and retrain."
        )
        return self.summary()

    def summary(self) -> dict[str, Any]:
        s, c = self.state, self.state.counters
        losses = [r["loss"] for r in s.curves]
        return {
            "pairs_trained": c["pairs_trained"],
            "pairs_kept": c["pairs_kept"],
            "candidates_scored": c["candidates_scored"],
            "optimizer_steps": s.global_step,
            "comparisons": c["comparisons"],
            "kept_fraction": c["comparisons_kept"] / max(c["comparisons"], 1),
            "pairs_skipped": c["pairs_skipped"],
            "steps_skipped_nonfinite": c["steps_skipped"],
            "pairs_per_optimizer_step": self.pairs_per_step,
            "unet_samples_sampling": c["unet_samples_sampling"],
            # Policy UNet rows (with grad) per trained pair, counted; the reference costs as many without grad.
            "unet_samples_with_grad_per_pair": round(c["unet_samples_training"] / c["pairs_trained"], 3)
            if c["pairs_trained"]
            else None,
            "epochs": self.scfg.num_epochs,
            "num_prompts": len(self.prompts),
            "num_processes": self.world,
            "final_loss": losses[-1] if losses else None,
            "loss_mean_last_10": _mean(losses[-10:]) if losses else None,
            "spm_score_mean_first_iteration": s.first_spm_score_mean,
            "spm_score_mean_last_iteration": s.last_sampling.get("spm_score_mean"),
            "lora_rank": self.scfg.lora_rank,
            "lora_alpha": self.scfg.lora_alpha or self.scfg.lora_rank,
            # Process 0's time in the sampler vs in optimizer steps (summed over the runs of a resumed lineage).
            "time_sampling_s": round(c["time_sampling_s"], 2),
            "time_training_s": round(c["time_training_s"], 2),
        }
