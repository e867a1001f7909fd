"""``spo train``: SPO LoRA fine-tuning of the UNet (paper §4; shared/reference/paper.md §2b for the recipe).

One *iteration* = sample a batch of prompts with the candidate-pool sampler (:mod:`spo.sampling`), gather the
kept win/lose pairs from all processes into one pool, and take optimizer steps on that pool:

* the policy is the UNet with a LoRA on ``to_q/to_k/to_v/to_out.0``; the reference is **the same UNet with
  its adapters disabled** (no copy in memory);
* win and lose of a pair share x_t, so a pair costs **one policy forward (with grad) and one reference
  forward (no grad)** -- each CFG-doubled when ``spo.train_cfg`` is on -- and both log π(x_{t−1}|x_t) are read
  off the same predicted mean (:func:`spo.sampling.ddim_step_with_logprob` with ``prev_sample``);
* an optimizer step uses exactly ``train_batch_size × grad_accum`` pairs per process; pool pairs that do not
  fill a whole step are *carried over* to the next iteration (logged), and at the very end the remainder is
  trained as one smaller step, so no kept pair is silently dropped (at most ``num_processes − 1`` can be left
  when the remainder does not split evenly; they are counted in ``pairs_skipped``);
* gradients are clipped on a materialised parameter list (the official code's clipping was a no-op), NaN/inf
  steps are skipped and counted, and ``spo.max_consecutive_nonfinite`` in a row abort the run;
* checkpoints (accelerate ``save_state``: LoRA, optimizer, LR scheduler, RNG, plus the data position and the
  pool of not-yet-trained pairs) every ``spo.checkpoint_every`` optimizer steps and at each epoch end, under
  ``checkpoints/spo/checkpoint-<step>``; ``spo train --resume latest|PATH`` continues mid-epoch and ends with
  the same LoRA as an uninterrupted run (all randomness is drawn from generators seeded by
  (seed, epoch, iteration, process)).

Outputs: ``models/spo/lora/pytorch_lora_weights.safetensors`` (stock diffusers format, loadable by
``StableDiffusion(XL)Pipeline.load_lora_weights``), ``reports/spo_train.json`` and
``reports/spo_train_curves.csv`` (one row per optimizer step, for ``dvc plots``).

Multi-GPU: ``accelerate launch --config_file configs/accelerate/multi_gpu.yaml -m spo.cli train --preset sd15``.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from spo import tracking
from spo.errors import ModelLoadError, NonFiniteError, SPOError
from spo.losses import SPOLossOutput, spo_loss
from spo.models.lora import LORA_WEIGHT_NAME, add_lora, load_lora_into, reference_unet, save_lora, write_lora
from spo.sampling import CandidateSampler, PairBatch, SamplerStats, ddim_step_with_logprob
from spo.utils import (
    atomic_write_json,
    atomic_write_text,
    effective_mixed_precision,
    get_logger,
    hash_tree,
    replace_dir,
    torch_dtype,
)

log = get_logger(__name__)

CHECKPOINT_PREFIX = "checkpoint-"
STATE_FILE = "trainer_state.json"
POOL_FILE = "pending_pairs.pt"
SUMMARY_FILE = "spo_train.json"
CURVES_FILE = "spo_train_curves.csv"
TRAINING_INFO_FILE = "spo_lora.json"
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
    "kept_fraction",
    "spm_score_mean",
    "spm_score_std",
    "candidate_score_mean",
    "pairs_trained",
)


# ----------------------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------------------
def read_train_prompts(cfg) -> list[str]:
    from spo.data.pickapic import read_prompts

    path = cfg.paths.prepared / "prompts_train.txt"
    if not path.exists():
        raise SPOError(f"training prompts not found at {path}. Run `spo prepare` first (or `make run`).")
    prompts = list(read_prompts(path))
    if cfg.spo.num_prompts:
        prompts = prompts[: cfg.spo.num_prompts]
    if not prompts:
        raise SPOError(f"{path} holds no prompts; re-run `spo prepare`.")
    return prompts


def load_scorer(cfg, device, dtype):
    """The trained SPM from ``models/spm`` (or the released one when ``spm.source`` is ``pretrained:...``)."""
    from spo.models.preference import RELEASED_SPM_FILES, load_spm

    if cfg.paths.spm_model.exists():
        return load_spm(cfg.paths.spm_model, device=device, dtype=dtype)
    if cfg.spm.source.startswith("pretrained:"):
        return load_spm(
            cfg.spm.source,
            device=device,
            dtype=dtype,
            clip_ref=cfg.resolve_ref(cfg.spm.init),
            processor_ref=cfg.resolve_ref(cfg.spm.processor),
            time_embed_dim=cfg.spm.time_embed_dim,
            pretrained_file=cfg.spm.pretrained_file or RELEASED_SPM_FILES[cfg.model.arch],
        )
    raise ModelLoadError(
        f"no step-aware preference model at {cfg.paths.spm_model}. Run `spo train-spm` first, or use the released "
        "one with --set spm.source=pretrained:SPO-Diffusion-Models/Step-Aware_Preference_Models"
    )


def spm_lineage(cfg) -> dict[str, Any]:
    path = cfg.paths.spm_model
    if not path.exists():
        return {"source": cfg.spm.source}
    info: dict[str, Any] = {"path": str(path), "content_hash": hash_tree(path)[:16]}
    config_file = path / "spm_config.json"
    if config_file.exists():
        spm_cfg = json.loads(config_file.read_text())
        for key in ("run_id", "training_config_hash", "config_hash", "steps", "source_clip"):
            if key in spm_cfg:
                info[key] = spm_cfg[key]
    return info


def iteration_seed(seed: int, epoch: int, iteration: int, process: int = 0) -> int:
    """Independent, reproducible seed for one sampling iteration (any process count, any resume point)."""
    return int(np.random.SeedSequence([seed, epoch, iteration, process]).generate_state(1)[0])


def _mean(values: list[float]) -> float:
    return float(sum(values) / len(values)) if values else float("nan")


# ----------------------------------------------------------------------------------------------------------
# The trainer
# ----------------------------------------------------------------------------------------------------------
class SPOTrainer:
    """Holds the policy (LoRA UNet), optimizer and sampler; see the module docstring for the algorithm."""

    def __init__(self, cfg, accelerator, adapter, scorer):
        from diffusers.optimization import get_scheduler

        self.cfg, self.scfg = cfg, cfg.spo
        self.accelerator = accelerator
        self.adapter = adapter
        unet = adapter.unet
        # The LoRA's gaussian init draws from the global RNG: seed it here, without side effects elsewhere.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.scfg.seed)
            self.params = add_lora(unet, self.scfg.lora_rank, self.scfg.lora_alpha)
        if self.scfg.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        unet.train()
        optimizer = torch.optim.AdamW(
            self.params,
            lr=self.scfg.lr,
            betas=(self.scfg.adam_beta1, self.scfg.adam_beta2),
            weight_decay=self.scfg.adam_weight_decay,
            eps=self.scfg.adam_eps,
        )
        lr_scheduler = get_scheduler(
            "constant_with_warmup", optimizer=optimizer, num_warmup_steps=self.scfg.lr_warmup_steps
        )
        self.unet, self.optimizer, self.lr_scheduler = accelerator.prepare(unet, optimizer, lr_scheduler)
        self.base_unet = accelerator.unwrap_model(self.unet)
        accelerator.register_save_state_pre_hook(self._save_hook)
        accelerator.register_load_state_pre_hook(self._load_hook)

        # The unconditional (empty-prompt) embedding: the same for every prompt, encoded once.
        self.uncond = adapter.encode_prompts([""])[1]
        self.sampler = CandidateSampler.from_config(adapter, scorer, self.scfg)
        self.sampler.scheduler.set_timesteps(self.scfg.num_steps, device=adapter.device)
        self.nonfinite_in_a_row = 0
        self.unet_samples_with_grad = (
            0  # policy UNet rows run with grad (this process); the reference as many
        )

    # -- accelerate checkpoint hooks: only the LoRA, in diffusers format -----------------------------------
    def _save_hook(self, models, weights, output_dir):
        if self.accelerator.is_main_process:
            write_lora(self.base_unet, output_dir, self.adapter.arch)
        while weights:
            weights.pop()

    def _load_hook(self, models, input_dir):
        load_lora_into(self.base_unet, Path(input_dir) / LORA_WEIGHT_NAME)
        while models:
            models.pop()

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
            return self._skip_nonfinite("loss", n)
        grad_norm = acc.clip_grad_norm_(self.params, self.scfg.max_grad_norm)
        grad_norm = torch.as_tensor(grad_norm, device=device).float()
        if not torch.isfinite(grad_norm) and acc.scaler is None:
            return self._skip_nonfinite("gradient norm", n)
        self.optimizer.step()
        if acc.optimizer_step_was_skipped:  # fp16 loss-scaler overflow: the scaler lowers its scale
            self.optimizer.zero_grad(set_to_none=True)
            log.info("optimizer step skipped by the fp16 loss scaler (overflow); scale reduced")
            return None
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.nonfinite_in_a_row = 0
        metrics = {k: v / n for k, v in sums.items()}
        metrics["loss"] = float(acc.reduce(loss_total, reduction="sum")) / (n * acc.num_processes)
        metrics["grad_norm"] = float(grad_norm)
        metrics["lr"] = float(self.lr_scheduler.get_last_lr()[0])
        return metrics

    def _skip_nonfinite(self, what: str, n: int) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.nonfinite_in_a_row += 1
        limit = self.scfg.max_consecutive_nonfinite
        log.warning(
            "non-finite %s: optimizer step skipped (%d in a row, limit %d)",
            what,
            self.nonfinite_in_a_row,
            limit,
        )
        if self.nonfinite_in_a_row >= limit:
            raise NonFiniteError(
                f"{self.nonfinite_in_a_row} optimizer steps in a row produced a non-finite {what}; training stopped "
                "and no checkpoint was written from that state. Lower spo.lr, use spo.mixed_precision=bf16 "
                "instead of fp16, or resume from the last good checkpoint with `spo train --resume latest`."
            )
        return None

    def lora_is_finite(self) -> bool:
        return all(bool(torch.isfinite(p).all()) for p in self.params)


# ----------------------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------------------
def checkpoint_root(cfg) -> Path:
    return cfg.paths.checkpoints / "spo"


def list_checkpoints(cfg) -> list[Path]:
    """Complete checkpoints (the state file is written last), oldest first."""
    root = checkpoint_root(cfg)
    if not root.exists():
        return []
    found = [p for p in root.glob(f"{CHECKPOINT_PREFIX}*") if (p / STATE_FILE).exists()]
    return sorted(found, key=lambda p: int(p.name.removeprefix(CHECKPOINT_PREFIX)))


def resolve_resume(cfg, resume: str | None) -> Path | None:
    if not resume:
        return None
    if resume == "latest":
        found = list_checkpoints(cfg)
        if not found:
            log.info("--resume latest: no checkpoint under %s, starting from scratch", checkpoint_root(cfg))
            return None
        return found[-1]
    path = Path(resume)
    if not (path / STATE_FILE).exists():
        raise SPOError(
            f"{path} is not an SPO checkpoint (no {STATE_FILE}). Use --resume latest, or one of: "
            + (", ".join(str(p) for p in list_checkpoints(cfg)) or f"(none under {checkpoint_root(cfg)})")
        )
    return path


def save_checkpoint(trainer: SPOTrainer, state: dict[str, Any], pool: PairBatch | None) -> Path | None:
    acc, cfg = trainer.accelerator, trainer.cfg
    if not trainer.lora_is_finite():
        log.error("LoRA weights are not finite; checkpoint at step %s NOT written", state["global_step"])
        return None
    root = checkpoint_root(cfg)
    final = root / f"{CHECKPOINT_PREFIX}{state['global_step']}"
    tmp = root / f".{final.name}.tmp"
    if acc.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    acc.wait_for_everyone()
    acc.save_state(str(tmp))
    acc.wait_for_everyone()  # every process's RNG file is in tmp before it is renamed
    if acc.is_main_process:
        torch.save(pool.state_dict() if pool is not None else {}, tmp / POOL_FILE)
        atomic_write_json(tmp / STATE_FILE, state)  # last: marks the checkpoint complete
        replace_dir(tmp, final)
        limit = cfg.spo.checkpoints_total_limit
        if limit:
            for old in list_checkpoints(cfg)[:-limit]:
                shutil.rmtree(old, ignore_errors=True)
        log.info(
            "checkpoint %s (epoch %d, next iteration %d, %d pairs pending)",
            final,
            state["epoch"],
            state["iteration"],
            0 if pool is None else len(pool),
        )
    acc.wait_for_everyone()
    return final


def load_checkpoint(trainer: SPOTrainer, path: Path) -> tuple[dict[str, Any], PairBatch | None]:
    trainer.accelerator.load_state(str(path))
    state = json.loads((path / STATE_FILE).read_text())
    pool_state = torch.load(path / POOL_FILE, map_location="cpu", weights_only=True)
    pool = PairBatch.from_state_dict(pool_state) if pool_state else None
    if state.get("config_hash") != trainer.cfg.section_hash("model", "spo"):
        log.warning("resuming %s with a different model/spo config than it was written with", path)
    return state, pool


# ----------------------------------------------------------------------------------------------------------
# The stage
# ----------------------------------------------------------------------------------------------------------
def _gather_pairs(acc, pairs: PairBatch | None) -> PairBatch | None:
    """All processes' kept pairs, in process order, on CPU (identical on every process)."""
    local = None if pairs is None else pairs.to("cpu")
    if acc.num_processes == 1:
        return local
    from accelerate.utils import gather_object

    parts = [p for p in gather_object([local]) if p is not None]
    return PairBatch.cat(parts) if parts else None


def _gather_stats(acc, stats: SamplerStats) -> dict[str, Any]:
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


def _make_accelerator(cfg):
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    return Accelerator(
        mixed_precision=effective_mixed_precision(cfg.spo.mixed_precision),
        project_config=ProjectConfiguration(project_dir=str(checkpoint_root(cfg))),
    )


def _set_tf32(enabled: bool) -> None:
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = enabled
        torch.backends.cudnn.allow_tf32 = enabled


def run(cfg, resume: str | None = None, scorer=None) -> dict[str, Any]:
    """Train the SPO LoRA; returns the summary written to ``reports/spo_train.json``.

    ``scorer`` replaces the SPM loaded from ``models/spm`` (library use and tests; anything with
    ``encode_text`` and ``score_with_text``, see :class:`spo.sampling.StepScorer`).
    """
    from tqdm.auto import tqdm

    from spo.models.diffusion import DiffusionAdapter, load_pipeline

    started = time.time()
    scfg = cfg.spo
    _set_tf32(scfg.allow_tf32)
    prompts = read_train_prompts(cfg)
    acc = _make_accelerator(cfg)
    device = acc.device
    dtype = torch_dtype(cfg.model.dtype, device.type)
    pipe = load_pipeline(cfg.model, device=device, dtype=dtype, cfg=cfg)
    adapter = DiffusionAdapter(pipe, cfg.spo_resolution)
    scorer = scorer if scorer is not None else load_scorer(cfg, device, dtype)
    trainer = SPOTrainer(cfg, acc, adapter, scorer)
    rank, world = acc.process_index, acc.num_processes
    main = acc.is_main_process

    per_process = scfg.sample_batch_size
    iters_per_epoch = math.ceil(len(prompts) / (per_process * world))
    local_step = scfg.train_batch_size * scfg.grad_accum
    global_step_size = local_step * world

    state: dict[str, Any] = {
        "epoch": 0,
        "iteration": 0,
        "global_step": 0,
        "counters": {
            "comparisons": 0,
            "comparisons_kept": 0,
            "pairs_kept": 0,
            "candidates_scored": 0,
            "unet_samples_sampling": 0,
            "pairs_trained": 0,
            "pairs_skipped": 0,
            "steps_skipped": 0,
        },
        "curves": [],
        "first_spm_score_mean": None,
        "last_sampling": {},
    }
    pool: PairBatch | None = None
    resumed_from = resolve_resume(cfg, resume)
    if resumed_from is not None:
        state, pool = load_checkpoint(trainer, resumed_from)
        log.info(
            "resumed from %s at epoch %d, iteration %d, step %d",
            resumed_from,
            state["epoch"],
            state["iteration"],
            state["global_step"],
        )
    counters = state["counters"]
    tracker = tracking.active()
    if main:
        log.info(
            "SPO: %d prompts, %d epochs x %d iterations, %d process(es); %d pairs per optimizer step "
            "(%d per process = %d x grad_accum %d)",
            len(prompts),
            scfg.num_epochs,
            iters_per_epoch,
            world,
            global_step_size,
            local_step,
            scfg.train_batch_size,
            scfg.grad_accum,
        )
        tracker.log_params({"spo.num_train_prompts": len(prompts), "spo.num_processes": world})

    def take_step(batch: PairBatch) -> None:
        share = len(batch) // world
        local = batch.index(slice(rank * share, (rank + 1) * share))
        tic = time.perf_counter()
        rows_before = trainer.unet_samples_with_grad
        metrics = trainer.optimizer_step(local)
        counters["time_training_s"] = counters.get("time_training_s", 0.0) + time.perf_counter() - tic
        rows = torch.tensor(float(trainer.unet_samples_with_grad - rows_before), device=acc.device)
        counters["unet_samples_training"] = counters.get("unet_samples_training", 0) + int(
            acc.reduce(rows, reduction="sum")
        )
        if metrics is None:
            counters["steps_skipped"] += 1
            counters["pairs_skipped"] += share * world
            return
        state["global_step"] += 1
        counters["pairs_trained"] += share * world
        last = state["last_sampling"]
        row = {
            "step": state["global_step"],
            "epoch": state["epoch"],
            "iteration": state["iteration"],
            **metrics,
            **{
                k: last.get(k)
                for k in ("kept_fraction", "spm_score_mean", "spm_score_std", "candidate_score_mean")
            },
            "pairs_trained": counters["pairs_trained"],
        }
        state["curves"].append(row)
        tracker.log_metrics(
            {f"spo/{k}": v for k, v in row.items() if k != "step" and v is not None},
            step=state["global_step"],
        )

    def drain(bar) -> None:
        nonlocal pool
        while pool is not None and len(pool) >= global_step_size:
            batch, rest = pool.index(slice(0, global_step_size)), pool.index(slice(global_step_size, None))
            pool = rest if len(rest) else None
            take_step(batch)
            bar.set_postfix(
                step=state["global_step"],
                loss=f"{state['curves'][-1]['loss']:.4f}" if state["curves"] else "-",
            )
            if (
                state["global_step"]
                and state["global_step"] % scfg.checkpoint_every == 0
                and state.get("last_checkpoint_step") != state["global_step"]
            ):
                state["last_checkpoint_step"] = state["global_step"]
                save_checkpoint(trainer, state, pool)

    epoch_bar = tqdm(total=scfg.num_epochs, initial=state["epoch"], desc="epochs", disable=not main)
    iter_bar = tqdm(
        total=iters_per_epoch, initial=state["iteration"], desc="iterations", disable=not main, leave=False
    )
    drain(iter_bar)
    while state["epoch"] < scfg.num_epochs:
        epoch = state["epoch"]
        order = torch.randperm(
            len(prompts), generator=torch.Generator().manual_seed(scfg.seed + epoch)
        ).tolist()
        while state["iteration"] < iters_per_epoch:
            it = state["iteration"]
            start = (it * world + rank) * per_process
            batch_prompts = [prompts[order[(start + j) % len(prompts)]] for j in range(per_process)]
            generator = torch.Generator().manual_seed(iteration_seed(scfg.seed, epoch, it, rank))
            trainer.unet.eval()
            tic = time.perf_counter()
            with acc.autocast():
                pairs, stats = trainer.sampler.sample(
                    batch_prompts, generator, unet=trainer.base_unet, progress=main
                )
            counters["time_sampling_s"] = counters.get("time_sampling_s", 0.0) + time.perf_counter() - tic
            trainer.unet.train()
            gathered = _gather_stats(acc, stats)
            new = _gather_pairs(acc, pairs)
            if new is not None:
                perm = torch.randperm(
                    len(new),
                    generator=torch.Generator().manual_seed(iteration_seed(scfg.seed, epoch, it, 10**6)),
                )
                new = new.index(perm)
                pool = new if pool is None else PairBatch.cat([pool, new])
            for key in ("comparisons", "comparisons_kept", "pairs_kept", "candidates_scored"):
                counters[key] += gathered[key]
            counters["unet_samples_sampling"] += gathered["unet_samples"]
            final = torch.tensor(gathered["final_scores"])
            cand = torch.tensor(gathered["candidate_scores"])
            sampling = {
                "kept_fraction": gathered["comparisons_kept"] / max(gathered["comparisons"], 1),
                "pairs_kept": gathered["pairs_kept"],
                "spm_score_mean": float(final.mean()),
                "spm_score_std": float(final.std()) if len(final) > 1 else 0.0,
                "candidate_score_mean": float(cand.mean()) if len(cand) else float("nan"),
                "candidate_score_std": float(cand.std()) if len(cand) > 1 else 0.0,
            }
            state["last_sampling"] = sampling
            if state["first_spm_score_mean"] is None:
                state["first_spm_score_mean"] = sampling["spm_score_mean"]
            state["iteration"] = it + 1
            sample_step = epoch * iters_per_epoch + it
            tracker.log_metrics(
                {f"spo/sampling_{k}": v for k, v in sampling.items()}, step=state["global_step"]
            )
            log.debug("iteration %d/%d: %s", sample_step + 1, scfg.num_epochs * iters_per_epoch, sampling)
            drain(iter_bar)
            carried = 0 if pool is None else len(pool)
            if carried and main:
                log.info(
                    "iteration %d: %d kept pair(s) carried over to the next iteration (a step takes %d)",
                    it,
                    carried,
                    global_step_size,
                )
            iter_bar.update(1)
        state["epoch"], state["iteration"] = epoch + 1, 0
        epoch_bar.update(1)
        iter_bar.reset()
        state["last_checkpoint_step"] = state["global_step"]
        save_checkpoint(trainer, state, pool)
    iter_bar.close()
    epoch_bar.close()

    # The remainder: one smaller step so that no kept pair is silently dropped.
    if pool is not None and len(pool) >= world:
        usable = (len(pool) // world) * world
        (log.info if main else log.debug)(
            "final step on the %d remaining pair(s)%s",
            usable,
            f"; {len(pool) - usable} skipped (they do not split over {world} processes)"
            if usable < len(pool)
            else "",
        )
        counters["pairs_skipped"] += len(pool) - usable
        take_step(pool.index(slice(0, usable)))
        pool = None
    elif pool is not None:
        counters["pairs_skipped"] += len(pool)
        (log.info if main else log.debug)(
            "%d remaining pair(s) skipped (fewer than the %d processes)", len(pool), world
        )
        pool = None

    if not trainer.lora_is_finite():
        raise NonFiniteError(
            "the trained LoRA holds NaN/inf weights; nothing was written. Lower spo.lr and retrain."
        )
    summary = _summary(cfg, state, counters, prompts, world, resumed_from, time.time() - started)
    if main:
        _write_outputs(cfg, trainer, summary, state["curves"])
    acc.wait_for_everyone()
    return summary


def _summary(cfg, state, counters, prompts, world, resumed_from, seconds) -> dict[str, Any]:
    curves = state["curves"]
    last = state["last_sampling"]
    pairs_per_step = cfg.spo.train_batch_size * cfg.spo.grad_accum * world
    return {
        "pairs_trained": counters["pairs_trained"],
        "pairs_kept": counters["pairs_kept"],
        "candidates_scored": counters["candidates_scored"],
        "optimizer_steps": state["global_step"],
        "comparisons": counters["comparisons"],
        "kept_fraction": counters["comparisons_kept"] / max(counters["comparisons"], 1),
        "pairs_skipped": counters["pairs_skipped"],
        "steps_skipped_nonfinite": counters["steps_skipped"],
        "pairs_per_optimizer_step": pairs_per_step,
        "unet_samples_sampling": counters["unet_samples_sampling"],
        # Policy UNet rows (with grad) per trained pair, counted; the reference costs as many without grad.
        "unet_samples_with_grad_per_pair": round(
            counters["unet_samples_training"] / counters["pairs_trained"], 3
        )
        if counters["pairs_trained"]
        else None,
        "epochs": cfg.spo.num_epochs,
        "num_prompts": len(prompts),
        "num_processes": world,
        "final_loss": curves[-1]["loss"] if curves else None,
        "loss_mean_last_10": _mean([r["loss"] for r in curves[-10:]]) if curves else None,
        "spm_score_mean_first_iteration": state["first_spm_score_mean"],
        "spm_score_mean_last_iteration": last.get("spm_score_mean"),
        "spm": spm_lineage(cfg),
        "base_model": str(cfg.model.pretrained),
        "arch": cfg.model.arch,
        "lora": str(cfg.paths.lora / LORA_WEIGHT_NAME),
        "lora_rank": cfg.spo.lora_rank,
        "lora_alpha": cfg.spo.lora_alpha or cfg.spo.lora_rank,
        "config_hash": cfg.section_hash("model", "spo"),
        "resumed_from": str(resumed_from) if resumed_from else None,
        "wall_time_s": round(seconds, 1),
        # Process 0's time in the sampler vs in optimizer steps (this run only if resumed).
        "time_sampling_s": round(counters.get("time_sampling_s", 0.0), 2),
        "time_training_s": round(counters.get("time_training_s", 0.0), 2),
    }


def _write_outputs(cfg, trainer: SPOTrainer, summary: dict[str, Any], curves: list[dict[str, Any]]) -> None:
    info = {k: summary[k] for k in ("base_model", "arch", "lora_rank", "lora_alpha", "config_hash", "spm")}
    info["resolution"] = cfg.spo_resolution
    save_lora(
        trainer.base_unet,
        cfg.paths.lora,
        cfg.model.arch,
        extra_files={TRAINING_INFO_FILE: json.dumps(info, indent=2) + "\n"},
    )
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(CURVE_FIELDS), extrasaction="ignore")
    writer.writeheader()
    for row in curves:
        writer.writerow({k: row.get(k) for k in CURVE_FIELDS})
    atomic_write_text(cfg.paths.reports / CURVES_FILE, buf.getvalue())
    atomic_write_json(cfg.paths.reports / SUMMARY_FILE, summary)
    tracker = tracking.active()
    tracker.log_metrics(
        {
            f"spo/{k}": float(v)
            for k, v in summary.items()
            if isinstance(v, int | float) and not isinstance(v, bool) and v is not None
        }
    )
    tracker.log_artifact(cfg.paths.lora, artifact_path="lora")
    tracker.log_artifact(cfg.paths.reports / SUMMARY_FILE)
    tracker.log_artifact(cfg.paths.reports / CURVES_FILE)
    log.info(
        "SPO LoRA written to %s (%d optimizer steps, %d pairs trained)",
        cfg.paths.lora,
        summary["optimizer_steps"],
        summary["pairs_trained"],
    )
