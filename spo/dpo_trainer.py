"""The Diffusion-DPO baseline (Wallace et al. 2023, arXiv 2311.12908), used by ``spo train --method dpo``.

Offline preference optimisation on the prepared SPM training pairs (``data/prepared/spm_train``, the images
decoded by :class:`spo.data.pickapic.PairStream`), with the same LoRA as SPO so the two are compared on equal
terms (``spo.lora_rank`` / ``spo.lora_alpha``; settings in the ``dpo`` config section):

* **ties are dropped** (label 0.5/0.5 pairs carry no preference; the paper removed ~12 % of Pick-a-Pic v2),
  and counted;
* both images are VAE-encoded (a posterior *sample* times the VAE scaling, as the official ``train.py``), one
  timestep t ~ U{0..T−1} and one noise ε per pair are shared by winner and loser;
* a pair batch costs **one policy forward with grad and one reference forward without grad**, each on the
  concatenated [x_t^w; x_t^l] batch (2 UNet rows per pair each); the reference is the same UNet with its
  adapters disabled (:func:`spo.models.lora.reference_unet`), never a copy; conditional predictions only
  (no CFG), as the official code;
* the loss is :func:`spo.losses.diffusion_dpo_loss` (``-logsigmoid(-0.5·β·(model_diff − ref_diff))``);
* AdamW on the LoRA parameters, linear warm-up then constant, gradient clipping on the materialised
  parameter list, :class:`spo.training.NonFiniteGuard`, checkpoints through
  :class:`spo.training.CheckpointManager` (under ``checkpoints/spo``, the stage's folder) every
  ``dpo.checkpoint_every`` steps and at the end. Every random draw (VAE posterior sample, t, ε) comes from a
  generator keyed by (seed, step, micro-batch, process) and the data order by (seed, epoch), so a resumed run
  ends with the same LoRA as an uninterrupted one;
* UNet rows are counted (with and without grad) so that a sweep can report matched compute.
"""

from __future__ import annotations

import contextlib
import dataclasses
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from spo import tracking
from spo.errors import SPOError
from spo.losses import DPOLossOutput, diffusion_dpo_loss
from spo.models.lora import prepare_lora_policy, reference_unet
from spo.pipeline_spec import artifact_path
from spo.training import CheckpointManager, NonFiniteGuard, RunIdentity, require_sane, seed_generator
from spo.training.checkpoints import Resumed
from spo.training.launch import checked_accelerator
from spo.utils import effective_mixed_precision, get_logger, require_path

log = get_logger(__name__)

SECTIONS = ("model", "data", "spo", "dpo")  # the config that shapes the DPO LoRA (checkpoint lineage)
NONFINITE_HINT = (
    "Lower dpo.lr or dpo.beta, use dpo.mixed_precision=bf16 instead of fp16, or resume from the last good "
    "checkpoint with `spo train --method dpo --resume latest`."
)
CURVE_FIELDS = (
    "step",
    "epoch",
    "loss",
    "implicit_acc",
    "model_err",
    "ref_err",
    "grad_norm",
    "lr",
    "pairs_trained",
)


def _new_counters() -> dict[str, float]:
    return {
        "pairs_trained": 0,
        "pairs_skipped": 0,  # in steps skipped as non-finite
        "steps_skipped": 0,
        "pairs_masked": 0,  # undecodable images (dpo.on_bad_image=skip): in a batch, weight 0
        "unet_rows_with_grad": 0,
        "unet_rows_no_grad": 0,
        "vae_encoded_images": 0,
        "time_training_s": 0.0,
    }


@dataclass
class DPOState:
    """Where a run is (stored in every checkpoint next to the accelerate state)."""

    epoch: int = 0
    batch: int = 0  # micro-batches of ``epoch`` this process has consumed
    global_step: int = 0
    counters: dict[str, float] = field(default_factory=_new_counters)
    curves: list[dict[str, Any]] = field(default_factory=list)
    last_checkpoint_step: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DPOState:
        names = {f.name for f in dataclasses.fields(cls)}
        state = cls(**{k: v for k, v in data.items() if k in names})
        state.counters = {**_new_counters(), **state.counters}
        return state


def make_accelerator(cfg):
    from accelerate.utils import ProjectConfiguration

    return checked_accelerator(
        mixed_precision=effective_mixed_precision(cfg.dpo.mixed_precision, cfg.runtime.cpu_bf16),
        project_config=ProjectConfiguration(project_dir=str(artifact_path(cfg, "spo_checkpoints"))),
    )


def decisive_pairs(pairs_path: str | Path):
    """(the pair table without ties, number of ties dropped). A tie is a pair whose labels are equal."""
    import pyarrow.compute as pc

    from spo.data.pickapic import read_pairs

    table = read_pairs(pairs_path)
    decisive = pc.not_equal(table.column("label_0"), table.column("label_1"))
    kept = table.filter(decisive)
    return kept, table.num_rows - kept.num_rows


def pair_stream(cfg, shuffle: bool = True):
    """The prepared SPM training pairs without ties, as a :class:`PairStream` of ``dpo.batch_size`` pairs
    (full batches); returns (stream, ties dropped)."""
    import pyarrow.parquet as pq

    from spo.data.pickapic import PairStream

    path = require_path(
        artifact_path(cfg, "spm_train_pairs"), "prepared SPM training pairs", "Run `spo prepare` first."
    )
    table, ties = decisive_pairs(path)
    d = cfg.dpo
    resolution = d.image_resolution or cfg.model.resolution
    # PairStream reads its pair table once, in its constructor: hand it the tie-free table as a file.
    with tempfile.TemporaryDirectory(prefix="spo-dpo-pairs-") as tmp:
        pq.write_table(table, Path(tmp) / "pairs.parquet")
        stream = PairStream(
            Path(tmp) / "pairs.parquet",
            cfg.data.source,
            resolution,
            d.batch_size,
            d.seed,
            shuffle=shuffle,
            drop_last=True,
            root=cfg.paths.root,
            on_bad_image=d.on_bad_image,
            max_bad_pairs=d.max_bad_pairs,
        )
    return stream, ties


def _mean(values: list[float]) -> float | None:
    return float(sum(values) / len(values)) if values else None


class DPOTrainer:
    """The policy (LoRA UNet), optimizer, pair stream, checkpoints and run state; see the module docstring."""

    def __init__(self, cfg, accelerator, adapter, stream=None):
        self.cfg, self.dcfg = cfg, cfg.dpo
        self.accelerator = accelerator
        self.adapter = adapter
        self.world, self.rank = accelerator.num_processes, accelerator.process_index
        self.main = accelerator.is_main_process
        if stream is None:
            stream, ties = pair_stream(cfg)
        else:
            ties = 0
        self.stream, self.ties_excluded = stream, ties
        self.batches_per_epoch = stream.num_batches(self.world)
        if self.batches_per_epoch == 0:
            raise SPOError(
                f"the prepared training pairs hold {stream.pairs.num_rows} decisive pairs, fewer than "
                f"dpo.batch_size={self.dcfg.batch_size} x {self.world} process(es); lower dpo.batch_size or "
                "prepare more data."
            )
        policy = prepare_lora_policy(
            accelerator,
            adapter,
            rank=cfg.spo.lora_rank,
            alpha=cfg.spo.lora_alpha,
            seed=self.dcfg.seed,
            lr=self.dcfg.lr,
            betas=(self.dcfg.adam_beta1, self.dcfg.adam_beta2),
            weight_decay=self.dcfg.adam_weight_decay,
            eps=self.dcfg.adam_eps,
            warmup_steps=self.dcfg.warmup_steps,
            gradient_checkpointing=self.dcfg.gradient_checkpointing,
        )
        self.unet, self.base_unet, self.params = policy.unet, policy.base_unet, policy.params
        self.optimizer, self.lr_scheduler = policy.optimizer, policy.lr_scheduler

        self.num_train_timesteps = int(adapter.scheduler.config.num_train_timesteps)
        self.guard = NonFiniteGuard(self.dcfg.max_consecutive_nonfinite, "DPO", NONFINITE_HINT)
        self.pairs_per_step = self.dcfg.batch_size * self.dcfg.grad_accum * self.world
        self.checkpoints = CheckpointManager(
            artifact_path(cfg, "spo_checkpoints"),
            RunIdentity.for_config(cfg, SECTIONS, self.world),
            keep=self.dcfg.checkpoints_total_limit,
            accelerator=accelerator,
            name="DPO checkpoint",
        )
        self.state = DPOState()
        self.tracker = tracking.active()
        # This process's counts since the last step was accounted: UNet rows (policy with grad, reference
        # without), VAE encodes, masked pairs; summed over the processes at each step.
        self._rows = {"unet_rows_with_grad": 0, "unet_rows_no_grad": 0, "vae_encoded_images": 0, "pairs_masked": 0}

    # -- one pair batch: 1 policy forward + 1 reference forward on [x_t^w; x_t^l] ---------------------------
    def pair_losses(self, batch: dict[str, Any], generator: torch.Generator) -> tuple[DPOLossOutput, torch.Tensor]:
        """DPO loss of a :class:`PairStream` batch; returns (loss output, mask of the pairs that count).

        ``generator`` (CPU) draws the VAE posterior samples, then t and ε: the same generator state gives the
        same noised latents, whatever the LoRA.
        """
        from spo.models.diffusion import PromptEmbeddings

        ad, device = self.adapter, self.accelerator.device
        label_0, label_1 = batch["label_0"], batch["label_1"]
        counts = (label_0 != label_1) & (batch["weight"] > 0)  # masked (undecodable) pairs are ties
        first_wins = (label_0 > label_1).view(-1, 1, 1, 1)
        win = torch.where(first_wins, batch["image_0"], batch["image_1"])
        lose = torch.where(first_wins, batch["image_1"], batch["image_0"])
        n = win.shape[0]
        with torch.no_grad():
            latents = ad.encode(torch.cat([win, lose]).to(device, ad.vae.dtype), generator)
            t = torch.randint(0, self.num_train_timesteps, (n,), generator=generator)
            noise = torch.randn(latents[:n].shape, generator=generator, dtype=torch.float32)
            t2, noise2 = torch.cat([t, t]).to(device), torch.cat([noise, noise]).to(device, latents.dtype)
            noisy = ad.scheduler.add_noise(latents, noise2, t2)
            cond, _ = ad.encode_prompts(list(batch["caption"]))
            cond2 = PromptEmbeddings.cat([cond, cond])
        self._rows["vae_encoded_images"] += 2 * n
        self._rows["unet_rows_with_grad"] += 2 * n
        self._rows["unet_rows_no_grad"] += 2 * n
        with self.accelerator.autocast():
            eps = ad.predict_noise(noisy, t2, cond2, None, 0.0, unet=self.unet)
        with reference_unet(self.base_unet) as ref, self.accelerator.autocast():
            eps_ref = ad.predict_noise(noisy, t2, cond2, None, 0.0, unet=ref)
        out = diffusion_dpo_loss(eps[:n], eps[n:], eps_ref[:n], eps_ref[n:], noise2[:n], self.dcfg.beta)
        return out, counts.to(out.per_pair.device)

    # -- data position ------------------------------------------------------------------------------------
    def micro_batches(self) -> Iterator[dict[str, Any]]:
        """This process's micro-batches from the state's position on, epoch after epoch (the state's
        ``epoch``/``batch`` advance as they are consumed)."""
        s = self.state
        while True:
            if s.batch >= self.batches_per_epoch:
                s.epoch, s.batch = s.epoch + 1, 0
            for batch in self.stream.iter_epoch(s.epoch, s.batch, self.rank, self.world):
                s.batch += 1
                yield batch
            if s.batch < self.batches_per_epoch:  # PairStream and num_batches disagree: never loop forever
                raise SPOError(f"the pair stream ended after {s.batch} of {self.batches_per_epoch} batches")

    # -- one optimizer step -------------------------------------------------------------------------------
    def _all_finite(self, value: torch.Tensor) -> bool:
        flag = torch.tensor([float(torch.isfinite(value).all())], device=self.accelerator.device)
        return bool(self.accelerator.gather(flag).min() > 0)

    def _skip_nonfinite(self, what: str) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.guard.ok(False, what, step=self.state.global_step + 1)  # raises on the limit-th in a row

    def optimizer_step(self, batches: list[dict[str, Any]]) -> dict[str, float] | None:
        """One optimizer step on ``batches`` (micro-batches, gradients accumulated); the metrics, or None when
        the step was skipped (non-finite loss/gradients, fp16 loss-scaler overflow)."""
        acc, device, step = self.accelerator, self.accelerator.device, self.state.global_step
        counted = sum(int(((b["label_0"] != b["label_1"]) & (b["weight"] > 0)).sum()) for b in batches)
        denom = max(counted, 1)
        sums = dict.fromkeys(("loss", "implicit_acc", "model_err", "ref_err"), 0.0)
        loss_total = torch.zeros((), device=device)
        self.optimizer.zero_grad(set_to_none=True)
        for j, batch in enumerate(batches):
            generator = seed_generator(self.dcfg.seed, step, j, self.rank)
            sync = contextlib.nullcontext() if j == len(batches) - 1 else acc.no_sync(self.unet)
            with sync:
                out, mask = self.pair_losses(batch, generator)
                per_pair = torch.where(mask, out.per_pair, torch.zeros_like(out.per_pair))
                # Sum/count: the gradient is the mean over the step's pairs, however it is chunked.
                acc.backward(per_pair.sum() / denom)
            loss_total = loss_total + per_pair.detach().sum()
            m = mask.float()
            sums["implicit_acc"] += float(((out.inside > 0).float() * m).sum())
            sums["model_err"] += float((out.model_err_pair * m).sum())
            sums["ref_err"] += float((out.ref_err_pair * m).sum())

        if not self._all_finite(loss_total):
            return self._skip_nonfinite("loss")
        grad_norm = acc.clip_grad_norm_(self.params, self.dcfg.max_grad_norm)
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
        totals = torch.tensor(
            [float(loss_total), sums["implicit_acc"], sums["model_err"], sums["ref_err"], float(counted)],
            device=device,
        )
        totals = acc.reduce(totals, reduction="sum")
        n_all = max(float(totals[4]), 1.0)
        return {
            "loss": float(totals[0]) / n_all,
            "implicit_acc": float(totals[1]) / n_all,
            "model_err": float(totals[2]) / n_all,
            "ref_err": float(totals[3]) / n_all,
            "grad_norm": float(grad_norm),
            "lr": float(self.lr_scheduler.get_last_lr()[0]),
        }

    def lora_is_finite(self) -> bool:
        return all(bool(torch.isfinite(p).all()) for p in self.params)

    # -- the run ------------------------------------------------------------------------------------------
    def start(self, resume: str | Path | None) -> Resumed | None:
        """Fresh run (an earlier run's checkpoints are moved aside) or resume ``"latest"`` / a checkpoint."""
        resumed = self.checkpoints.start(resume)
        if resumed is not None:
            if resumed.state.get("method") != "dpo":
                raise SPOError(
                    f"{resumed.path} holds no DPO trainer state (an SPO checkpoint?); start a fresh run "
                    "without --resume"
                )
            self.accelerator.load_state(str(resumed.path))
            self.state = DPOState.from_dict(resumed.state)
            self.guard.load_state_dict(resumed.state.get("nonfinite", {}))
            s = self.state
            log.info("resumed at step %d (epoch %d, batch %d)", s.global_step, s.epoch, s.batch)
        if self.main:
            log.info(
                "Diffusion-DPO: %d decisive pairs (%d ties dropped), %d steps of %d pairs (%d per process = %d x "
                "grad_accum %d), beta %g",
                self.stream.pairs.num_rows,
                self.ties_excluded,
                self.dcfg.max_steps,
                self.pairs_per_step,
                self.pairs_per_step // self.world,
                self.dcfg.batch_size,
                self.dcfg.grad_accum,
                self.dcfg.beta,
            )
        return resumed

    def _account(self, metrics: dict[str, float] | None, n_pairs: int, seconds: float) -> None:
        s, acc = self.state, self.accelerator
        rows = torch.tensor([float(v) for v in self._rows.values()], device=acc.device)
        rows = acc.reduce(rows, reduction="sum")
        for key, value in zip(self._rows, rows.tolist(), strict=True):
            s.counters[key] += int(value)
            self._rows[key] = 0
        s.counters["time_training_s"] += seconds
        if metrics is None:
            s.counters["steps_skipped"] += 1
            s.counters["pairs_skipped"] += n_pairs
            return
        s.global_step += 1
        s.counters["pairs_trained"] += n_pairs
        row = {"step": s.global_step, "epoch": s.epoch, **metrics, "pairs_trained": s.counters["pairs_trained"]}
        s.curves.append(row)
        self.tracker.log_metrics({f"dpo/{k}": v for k, v in row.items() if k != "step"}, step=s.global_step)

    def train(self, progress=None) -> None:
        """Optimizer steps until ``dpo.max_steps``; checkpoints every ``dpo.checkpoint_every`` and at the end."""
        s, d = self.state, self.dcfg
        batches = self.micro_batches()
        try:
            while s.global_step < d.max_steps:
                tic = time.perf_counter()
                chunk = [next(batches) for _ in range(d.grad_accum)]
                self._rows["pairs_masked"] += sum(int((b["weight"] <= 0).sum()) for b in chunk)
                metrics = self.optimizer_step(chunk)
                n_pairs = self.pairs_per_step
                self._account(metrics, n_pairs, time.perf_counter() - tic)
                if progress is not None:
                    progress(s)
                if s.global_step and s.global_step % d.checkpoint_every == 0 and s.last_checkpoint_step != s.global_step:
                    s.last_checkpoint_step = s.global_step
                    self.save_checkpoint()
        finally:
            batches.close()
        if s.last_checkpoint_step != s.global_step:
            s.last_checkpoint_step = s.global_step
            self.save_checkpoint()

    def save_checkpoint(self) -> Path | None:
        """Checkpoint ``checkpoint-<global_step>`` (None, and nothing written, if the LoRA is not finite)."""
        s, acc = self.state, self.accelerator
        state = {**s.to_dict(), "method": "dpo", "nonfinite": self.guard.state_dict()}
        path = self.checkpoints.save(
            s.global_step, state, write=lambda tmp: acc.save_state(str(tmp)), finite=self.lora_is_finite()
        )
        if path is not None and self.main:
            log.info("checkpoint %s (epoch %d, batch %d)", path, s.epoch, s.batch)
        return path

    def finish(self) -> dict[str, Any]:
        """Check the LoRA is sane; returns the training part of the summary."""
        require_sane(self.params, "the trained LoRA", self.cfg.spo.max_lora_weight, "Lower dpo.lr and retrain.")
        return self.summary()

    def summary(self) -> dict[str, Any]:
        s, c = self.state, self.state.counters
        rows = s.curves
        losses = [r["loss"] for r in rows]
        available = self.stream.pairs.num_rows
        return {
            "method": "dpo",
            "pairs_trained": int(c["pairs_trained"]),
            "optimizer_steps": s.global_step,
            "pairs_skipped": int(c["pairs_skipped"]),
            "steps_skipped_nonfinite": int(c["steps_skipped"]),
            "pairs_per_optimizer_step": self.pairs_per_step,
            # UNet rows counted: the policy on [x_t^w; x_t^l] with grad, the reference on the same without.
            "unet_rows_with_grad": int(c["unet_rows_with_grad"]),
            "unet_rows_no_grad": int(c["unet_rows_no_grad"]),
            "unet_samples_with_grad_per_pair": 2.0,
            "unet_samples_sampling": 0,
            "vae_encoded_images": int(c["vae_encoded_images"]),
            "epochs": s.epoch + (1 if s.batch else 0),
            "epochs_of_data": round((c["pairs_trained"] + c["pairs_skipped"]) / available, 3) if available else None,
            "pairs_available": available,
            "ties_excluded": self.ties_excluded,
            "pairs_masked": int(c["pairs_masked"]),
            "num_processes": self.world,
            "final_loss": losses[-1] if losses else None,
            "loss_mean_last_10": _mean(losses[-10:]),
            "loss_first_step": losses[0] if losses else None,
            "implicit_acc_mean_last_10": _mean([r["implicit_acc"] for r in rows[-10:]]),
            "model_err_last": rows[-1]["model_err"] if rows else None,
            "ref_err_last": rows[-1]["ref_err"] if rows else None,
            "beta": self.dcfg.beta,
            "lora_rank": self.cfg.spo.lora_rank,
            "lora_alpha": self.cfg.spo.lora_alpha or self.cfg.spo.lora_rank,
            "time_training_s": round(c["time_training_s"], 2),
            # SPO's sampler quantities do not exist here.
            "pairs_kept": None,
            "candidates_scored": None,
            "comparisons": None,
            "kept_fraction": None,
            "num_prompts": None,
            "spm_score_mean_first_iteration": None,
            "spm_score_mean_last_iteration": None,
            "time_sampling_s": 0.0,
        }
