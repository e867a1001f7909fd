"""The parts of SPM training (``spo train-spm``), usable on their own (tests, benchmarks) and by the stage.

* :class:`PairDenoiser` -- x̂0 images of a noised preference pair (same noise for both images);
* :func:`relabel`, :func:`pair_correct` -- the SDXL recipe's labels, ties-excluded pair accuracy;
* :class:`ValidationSet` -- the validation pairs' x̂0 images per evaluation timestep (rendered once, cached);
* :func:`pair_streams`, :func:`base_model`, :func:`make_accelerator`, :func:`param_groups` -- set-up;
* :func:`train_micro_step`, :func:`training_images` -- one micro-batch of training;
* :class:`SPMTrainer` -- the loop: accumulation, non-finite guard, LR schedule, curves, evaluation and
  checkpoints (through :class:`spo.training.CheckpointManager`);
* :func:`write_reports` -- spm_accuracy.csv, spm_train_curves.csv, spm_accuracy.png, spm_metrics.json;
* :class:`SectionTimer` -- wall time per section (the benchmark passes a real one, training the no-op).

The loss itself (:func:`spo.losses.spm_loss`, :func:`spo.losses.shard_loss`) lives in :mod:`spo.losses`.
"""

from __future__ import annotations

import contextlib
import io
import math
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from spo import tracking
from spo.errors import SPOError
from spo.losses import shard_loss
from spo.models.diffusion import DiffusionAdapter, PromptEmbeddings, attach_spm_decoder, load_pipeline
from spo.models.preference import TimeConditionedCLIP
from spo.pipeline_spec import artifact_path
from spo.results import StageResult
from spo.sampling import predict_x0
from spo.training import CheckpointManager, CurveWriter, NonFiniteGuard, all_finite, seed_generator
from spo.training.launch import checked_accelerator
from spo.utils import atomic_write_bytes, effective_mixed_precision, get_logger, require_path, weight_dtype

log = get_logger(__name__)

CURVE_COLUMNS = ["step", "loss", "lr", "train_accuracy"]
ACCURACY_COLUMNS = ["t", "accuracy", "initial_accuracy"]
NONFINITE_HINT = (
    "Lower spm.lr or use spm.mixed_precision=bf16/no, then restart (--resume latest keeps the last checkpoint)."
)
EVAL_CACHE_BYTES = 1 << 30  # rendered validation images are kept (on the CPU) when they fit in this
VALIDATION_STREAM = 7  # seed-stream tag of the validation images (training draws are keyed by step)


# ------------------------------------------------------------------------------------------------------------
# Timing
# ------------------------------------------------------------------------------------------------------------
class SectionTimer:
    """Wall time per named section; synchronises CUDA so asynchronous kernels are charged to their section."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self.seconds: dict[str, float] = defaultdict(float)

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        if not self.enabled:
            yield
            return
        _sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            _sync()
            self.seconds[name] += time.perf_counter() - start


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


NO_TIMER = SectionTimer(enabled=False)


# ------------------------------------------------------------------------------------------------------------
# x̂0 images of noised pairs (frozen base model)
# ------------------------------------------------------------------------------------------------------------
class PairDenoiser:
    """Noise both images of a pair identically, predict x̂0 with the base UNet under CFG, decode.

    Both images get the same VAE-posterior noise and the same diffusion noise: whatever differs between the two
    x̂0 images comes from the images, not from the noise (the paper's assumption that noising keeps the
    preference order). Counts UNet/VAE samples for the benchmark.
    """

    def __init__(self, adapter: DiffusionAdapter, cfg_scale: float):
        self.adapter = adapter
        self.cfg_scale = cfg_scale
        self.counts: dict[str, int] = defaultdict(int)

    @torch.no_grad()
    def __call__(
        self,
        images_0: torch.Tensor,
        images_1: torch.Tensor,
        captions: list[str],
        timesteps: torch.Tensor,
        generator: torch.Generator,
        timer: SectionTimer = NO_TIMER,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        ad = self.adapter
        b = len(captions)
        with timer("vae_encode"):
            state = generator.get_state()
            latents_0 = ad.encode(images_0.to(ad.device, ad.vae.dtype), generator)
            generator.set_state(state)  # the same posterior noise for the second image
            latents_1 = ad.encode(images_1.to(ad.device, ad.vae.dtype), generator)
        noise = torch.randn(
            latents_0.shape, generator=generator, device=generator.device, dtype=torch.float32
        ).to(ad.device, latents_0.dtype)
        t = timesteps.to(ad.device).long()
        t2 = t.repeat(2)
        noisy = ad.scheduler.add_noise(torch.cat([latents_0, latents_1]), torch.cat([noise, noise]), t2)
        with timer("text_encode"):
            cond, uncond = ad.encode_prompts(list(captions))
            cond2, uncond2 = PromptEmbeddings.cat([cond, cond]), PromptEmbeddings.cat([uncond, uncond])
        with timer("unet"):
            eps = ad.predict_noise(noisy, t2, cond2, uncond2, self.cfg_scale)
        x0 = predict_x0(ad.scheduler, eps, t2, noisy)
        with timer("vae_decode"):
            images = ad.decode_for_spm(x0)
        self.counts["pairs"] += b
        self.counts["unet_samples"] += 2 * b * (2 if self.cfg_scale > 1.0 else 1)
        self.counts["vae_encode_images"] += 2 * b
        self.counts["vae_decode_images"] += 2 * b
        return images[:b], images[b:]


# ------------------------------------------------------------------------------------------------------------
# Labels, accuracy
# ------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def relabel(
    scorer: TimeConditionedCLIP, images_0, images_1, captions, gap: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The SDXL recipe: labels from a reference scorer on the clean images; softmax gap ≤ ``gap`` is a tie."""
    text = scorer.encode_text(list(captions))
    s0 = scorer.score_with_text(images_0, text)
    s1 = scorer.score_with_text(images_1, text)
    p0, p1 = torch.softmax(torch.stack([s0, s1], -1).float(), -1).unbind(-1)
    half = torch.full_like(p0, 0.5)
    label_0 = torch.where(
        p0 - p1 > gap, torch.ones_like(p0), torch.where(p1 - p0 > gap, torch.zeros_like(p0), half)
    )
    return label_0, 1 - label_0


def pair_correct(
    scores_0: torch.Tensor, scores_1: torch.Tensor, label_0: torch.Tensor, label_1: torch.Tensor
):
    """(correct, counted) per pair: ties are not counted; equal scores count as wrong."""
    counted = label_0 != label_1
    correct = torch.where(label_0 > label_1, scores_0 > scores_1, scores_1 > scores_0) & counted
    return correct, counted


class ValidationSet:
    """The validation pairs with their x̂0 images at each evaluation timestep.

    The x̂0 images of batch i at timestep t use a generator seeded by (seed, t, i, rank) only, so every model,
    and every evaluation during training, sees exactly the same images: accuracies are paired comparisons.
    When they fit in ``cache_bytes`` (the tiny world: ~40 MB) they are rendered once and reused, which takes
    the UNet and VAE out of every evaluation after the first; otherwise they are re-rendered identically.
    """

    def __init__(
        self,
        val_stream,
        denoiser: PairDenoiser,
        timesteps: list[int],
        seed: int,
        accelerator,
        relabeller: TimeConditionedCLIP | None = None,
        relabel_gap: float = 0.1,
        cache_bytes: int = EVAL_CACHE_BYTES,
    ):
        self.stream, self.denoiser, self.timesteps = val_stream, denoiser, list(timesteps)
        self.seed, self.accelerator = seed, accelerator
        self.relabeller, self.relabel_gap = relabeller, relabel_gap
        res = val_stream.resolution
        rendered = sum(1 for t in self.timesteps if t != 0) + 1  # + the clean images
        need = len(val_stream) * val_stream.batch_size * 2 * rendered * 3 * res * res * 4
        self._cache: list[dict[str, Any]] | None = [] if need <= cache_bytes else None
        self._complete = False

    @torch.no_grad()
    def _batches(self) -> Iterator[dict[str, Any]]:
        acc = self.accelerator
        if self._complete:
            yield from self._cache
            return
        rank, world = acc.process_index, acc.num_processes
        if self._cache is not None:
            self._cache = []  # a pass cut short earlier left a partial cache
        for i, batch in enumerate(self.stream.iter_epoch(0, process_index=rank, num_processes=world)):
            item = self._render(i, batch, rank)
            if self._cache is not None:
                self._cache.append(_to_cpu(item))
            yield item
        self._complete = self._cache is not None

    def _render(self, i: int, batch: dict[str, Any], rank: int) -> dict[str, Any]:
        device = self.accelerator.device
        captions = list(batch["caption"])
        img0, img1 = batch["image_0"].to(device), batch["image_1"].to(device)
        label_0, label_1 = batch["label_0"].to(device), batch["label_1"].to(device)
        if self.relabeller is not None:
            label_0, label_1 = relabel(self.relabeller, img0, img1, captions, self.relabel_gap)
        item: dict[str, Any] = {"captions": captions, "label_0": label_0, "label_1": label_1, "images": {}}
        if (label_0 != label_1).any():
            for t in self.timesteps:
                if t == 0:  # the clean images, at the resolution the SPM's x̂0 images are decoded at
                    item["images"][t] = tuple(self.denoiser.adapter.images_for_spm(x) for x in (img0, img1))
                    continue
                ts = torch.full((len(captions),), t, device=device, dtype=torch.long)
                gen = seed_generator(self.seed, VALIDATION_STREAM, t, i, rank, device=device)
                item["images"][t] = self.denoiser(img0, img1, captions, ts, gen)
        return item

    @torch.no_grad()
    def accuracy(self, models: dict[str, TimeConditionedCLIP]) -> tuple[dict[str, dict[str, float]], int]:
        """Pair accuracy of each model at each t (ties excluded; t = 0 scores the clean images)."""
        acc = self.accelerator
        correct = {name: torch.zeros(len(self.timesteps), device=acc.device) for name in models}
        counted = torch.zeros((), device=acc.device)
        for item in self._batches():
            label_0, label_1 = item["label_0"].to(acc.device), item["label_1"].to(acc.device)
            counted += (label_0 != label_1).sum()
            for j, t in enumerate(self.timesteps):
                if t not in item["images"]:
                    continue
                x0, x1 = (x.to(acc.device) for x in item["images"][t])
                ts = torch.full((len(item["captions"]),), t, device=acc.device, dtype=torch.long)
                for name, model in models.items():
                    with acc.autocast():
                        scores = model(torch.cat([x0, x1]), ts.repeat(2), **model.tokenize(item["captions"]))
                    ok, _ = pair_correct(*scores.float().chunk(2), label_0, label_1)
                    correct[name][j] += ok.sum()
        total = acc.reduce(counted, "sum").item()
        out = {}
        for name, c in correct.items():
            c = acc.reduce(c, "sum")
            out[name] = {
                str(t): (c[j].item() / total if total else float("nan")) for j, t in enumerate(self.timesteps)
            }
        return out, int(total)


def _to_cpu(item: dict[str, Any]) -> dict[str, Any]:
    return {
        **item,
        "label_0": item["label_0"].cpu(),
        "label_1": item["label_1"].cpu(),
        "images": {t: (a.cpu(), b.cpu()) for t, (a, b) in item["images"].items()},
    }


# ------------------------------------------------------------------------------------------------------------
# Set-up
# ------------------------------------------------------------------------------------------------------------
def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: no decay on biases, norms, embedding vectors and the logit scale (decaying them only
    shrinks scales the loss needs -- the usual AdamW practice for transformers)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or name.endswith("logit_scale") else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(model: torch.nn.Module, spm) -> torch.optim.Optimizer:
    """``spm.optimizer`` over :func:`param_groups` (both decay decoupled from the gradient step)."""
    groups = param_groups(model, spm.weight_decay)
    if spm.optimizer == "adafactor":
        return torch.optim.Adafactor(groups, lr=spm.lr)
    return torch.optim.AdamW(groups, lr=spm.lr)


def pair_streams(cfg):
    """The prepared SPM training stream (shuffled, full batches) and validation stream (in order)."""
    from spo.data.pickapic import PairStream

    hint = "Run `spo prepare` first (or `make run`)."
    train_path = require_path(artifact_path(cfg, "spm_train_pairs"), "prepared SPM training pairs", hint)
    val_path = require_path(artifact_path(cfg, "spm_val_pairs"), "prepared SPM validation pairs", hint)
    res, bs, seed, root = cfg.spm_resolution, cfg.spm.batch_size, cfg.spm.seed, cfg.paths.root
    common = dict(
        root=root, on_bad_image=cfg.spm.on_bad_image, max_bad_pairs=cfg.spm.max_bad_pairs,
        **cfg.spm.loader.model_dump(),
    )
    train = PairStream(train_path, cfg.data.source, res, bs, seed, shuffle=True, drop_last=True, **common)
    val = PairStream(val_path, cfg.data.source, res, bs, seed, shuffle=False, drop_last=False, **common)
    if len(train) == 0:
        raise SPOError(
            f"{train_path} holds fewer pairs than one batch (spm.batch_size={bs}); lower spm.batch_size or "
            "prepare more data."
        )
    return train, val


def base_model(cfg, device) -> DiffusionAdapter:
    """The frozen base diffusion model (``model.*``) that renders the x̂0 images."""
    dtype = weight_dtype(cfg, device)
    pipe = load_pipeline(cfg.model, device=device, dtype=dtype, cfg=cfg)
    for part in ("unet", "vae", "text_encoder", "text_encoder_2"):
        module = getattr(pipe, part, None)
        if module is not None:
            module.requires_grad_(False).eval()
    return attach_spm_decoder(DiffusionAdapter(pipe, cfg.spm_resolution), cfg)


def make_accelerator(cfg, project_dir: Path):
    """The accelerate Accelerator of SPM training (mixed precision and accumulation from ``spm.*``)."""
    from accelerate.utils import ProjectConfiguration

    return checked_accelerator(
        mixed_precision=effective_mixed_precision(cfg.spm.mixed_precision, cfg.runtime.cpu_bf16),
        gradient_accumulation_steps=cfg.spm.grad_accum,
        project_config=ProjectConfiguration(project_dir=str(project_dir)),
    )


def load_relabeller(cfg, processor: str, device) -> TimeConditionedCLIP:
    """The frozen reference scorer of ``spm.relabel`` (a fresh TimeConditionedCLIP scores like its CLIP)."""
    relabeller = TimeConditionedCLIP.from_clip(cfg.resolve_ref(cfg.spm.relabel_model), processor)
    return relabeller.requires_grad_(False).eval().to(device)


# ------------------------------------------------------------------------------------------------------------
# One micro-batch
# ------------------------------------------------------------------------------------------------------------
def train_micro_step(model, unwrapped, denoiser, relabeller, batch, gen, cfg, accelerator, timer):
    """One micro-batch: x̂0 images at random t, SPM scores, the globally normalised loss.

    Returns (loss, correct pairs, counted pairs); the counts are gathered over processes (a metric only)."""
    device = accelerator.device
    captions = list(batch["caption"])
    img0, img1 = batch["image_0"].to(device), batch["image_1"].to(device)
    label_0, label_1 = batch["label_0"].to(device), batch["label_1"].to(device)
    weight = batch["weight"].to(device).float()
    if relabeller is not None:
        with timer("relabel"):
            label_0, label_1 = relabel(relabeller, img0, img1, captions, cfg.spm.relabel_gap)
    num_t = denoiser.adapter.scheduler.config.num_train_timesteps
    t = torch.randint(0, num_t, (len(captions),), generator=gen, device=gen.device).to(device)
    x0, x1 = training_images(denoiser, img0, img1, captions, t, gen, cfg.spm.clean_fraction, timer)
    with timer("clip_forward"), accelerator.autocast():
        scores = model(torch.cat([x0, x1]), t.repeat(2), **unwrapped.tokenize(captions)).float()
    s0, s1 = scores.chunk(2)
    mean_w = accelerator.reduce(weight.sum().detach().clone(), "mean")
    loss = shard_loss(s0, s1, label_0, label_1, weight, mean_w)
    ok, counted = pair_correct(s0.detach(), s1.detach(), label_0, label_1)
    return loss, accelerator.gather(ok.float()).sum().item(), accelerator.gather(counted.float()).sum().item()


def training_images(denoiser, img0, img1, captions, t, gen, clean_fraction: float, timer):
    """x̂0 images of the pairs at their t; with ``spm.clean_fraction`` > 0 a share of pairs is shown clean at
    t = 0 instead (t is set to 0 in place), so that the t = 0 condition also learns the clean-image domain."""
    if clean_fraction <= 0:
        return denoiser(img0, img1, captions, t, gen, timer)
    clean = (torch.rand(len(captions), generator=gen, device=gen.device) < clean_fraction).to(t.device)
    t.masked_fill_(clean, 0)
    x0, x1 = (denoiser.adapter.images_for_spm(img).clone() for img in (img0, img1))  # spm.decode_resolution
    idx = (~clean).nonzero().squeeze(1)
    if len(idx):
        x0[idx], x1[idx] = denoiser(
            img0[idx], img1[idx], [captions[i] for i in idx.tolist()], t[idx], gen, timer
        )
    return x0, x1


# ------------------------------------------------------------------------------------------------------------
# The training loop
# ------------------------------------------------------------------------------------------------------------
@dataclass
class TrainState:
    """What a checkpoint holds besides accelerate's state (JSON: ``trainer_state.json``'s ``state``)."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    pairs_seen: int = 0
    curves: list[dict[str, float]] = field(default_factory=list)
    initial_accuracy: dict[str, float] | None = None
    eval_history: list[dict[str, Any]] = field(default_factory=list)
    nonfinite: dict[str, int] = field(default_factory=dict)  # NonFiniteGuard.state_dict()
    lr_scheduler: dict[str, Any] = field(default_factory=dict)  # LambdaLR.state_dict(), plain numbers
    bad_pairs: list[list[dict[str, Any]]] = field(default_factory=list)  # skipped training pairs, by process


class SPMTrainer:
    """Trains a prepared (``accelerator.prepare``-d) SPM to ``spm.max_steps``.

    Each micro-batch draws from a generator keyed by (seed, step, micro-batch, rank) only, so a run resumed
    from a checkpoint repeats the uninterrupted run's steps exactly. A non-finite loss skips its step
    (:class:`~spo.training.NonFiniteGuard`, ``spm.max_consecutive_nonfinite`` in a row abort); a non-finite
    model is never checkpointed.
    """

    def __init__(
        self, cfg, accelerator, model, optimizer, lr_scheduler, denoiser, relabeller,
        validation: ValidationSet, train_stream, checkpoints: CheckpointManager, timer: SectionTimer = NO_TIMER,
    ):
        self.cfg, self.acc, self.model, self.optimizer = cfg, accelerator, model, optimizer
        self.lr_scheduler, self.denoiser, self.relabeller = lr_scheduler, denoiser, relabeller
        self.validation, self.train_stream, self.checkpoints, self.timer = validation, train_stream, checkpoints, timer
        self.unwrapped: TimeConditionedCLIP = accelerator.unwrap_model(model)
        # A list, not a generator: clip_grad_norm_ must see every parameter (the official script clipped nothing).
        self.trainable = [p for p in model.parameters() if p.requires_grad]
        self.guard = NonFiniteGuard(cfg.spm.max_consecutive_nonfinite, "train-spm", NONFINITE_HINT)
        self.state = TrainState()
        self.window: dict[str, float] = defaultdict(float)
        self.side_seconds = 0.0  # evaluation and checkpointing: not training throughput

    def resume(self, path: Path, state: dict[str, Any]) -> None:
        try:
            # accelerate loads with weights_only=True: a tampered file is refused, never executed.
            self.acc.load_state(str(path))
        except Exception as exc:
            raise SPOError(
                f"cannot load the SPM checkpoint {path} ({type(exc).__name__}: {str(exc).splitlines()[0][:300]}); "
                "it is damaged or not from this project: resume another one, or start fresh without --resume"
            ) from exc
        self.state = TrainState(**state)
        self.guard.load_state_dict(self.state.nonfinite)
        if self.state.lr_scheduler:
            self.lr_scheduler.load_state_dict(self.state.lr_scheduler)
        # The skipped batches are not decoded again: their bad pairs still count towards the cap.
        rank = self.acc.process_index
        self.train_stream.bad_pairs = list(self.state.bad_pairs[rank]) if rank < len(self.state.bad_pairs) else []

    def measure_initial(self) -> None:
        """Accuracy of the untrained model (once per run: it travels with the checkpoints)."""
        if self.state.initial_accuracy is not None:
            return
        self.unwrapped.eval()
        acc, _ = self.validation.accuracy({"initial": self.unwrapped})
        self.unwrapped.train()
        self.state.initial_accuracy = acc["initial"]
        log_accuracy("spm/initial_val_acc", self.state.initial_accuracy, 0)
        log.info("initial (plain CLIP) accuracy by t: %s", fmt_accuracy(self.state.initial_accuracy))

    def fit(self) -> float:
        """Train to ``spm.max_steps``; returns the training seconds (evaluation and checkpoints excluded)."""
        from spo.progress import tqdm

        spm, state, acc = self.cfg.spm, self.state, self.acc
        bar = tqdm(total=spm.max_steps, initial=state.step, desc="train-spm", unit="step",
                   disable=not acc.is_local_main_process)
        batches = self._epoch(state.batch_in_epoch)
        micro, start = 0, time.perf_counter()
        while state.step < spm.max_steps:
            with self.timer("data"):
                batch = next(batches, None)
            if batch is None:  # epoch boundary
                state.epoch, state.batch_in_epoch = state.epoch + 1, 0
                batches = self._epoch(0)
                continue
            state.batch_in_epoch += 1
            gen = seed_generator(spm.seed, state.step, micro % spm.grad_accum, acc.process_index, device=acc.device)
            micro += 1
            if self.micro_step(batch, gen) and acc.sync_gradients:
                self.end_step(bar)
        bar.close()
        return time.perf_counter() - start - self.side_seconds

    def _epoch(self, skip: int):
        return self.train_stream.iter_epoch(
            self.state.epoch, skip_batches=skip, process_index=self.acc.process_index,
            num_processes=self.acc.num_processes,
        )

    def micro_step(self, batch, gen) -> bool:
        """Forward, backward and optimizer; False when the loss was non-finite (the micro-batch is skipped)."""
        acc = self.acc
        with acc.accumulate(self.model):
            loss, ok, counted = train_micro_step(
                self.model, self.unwrapped, self.denoiser, self.relabeller, batch, gen, self.cfg, acc, self.timer
            )
            # Every process takes the same decision (a process skipping backward alone would hang DDP).
            finite = acc.reduce(torch.isfinite(loss.detach()).float(), "sum").item() == acc.num_processes
            if not self.guard.ok(finite, "SPM loss", step=self.state.step):
                self.optimizer.zero_grad()
                return False
            with self.timer("clip_backward"):
                acc.backward(loss)
            with self.timer("optimizer"):
                if acc.sync_gradients:
                    acc.clip_grad_norm_(self.trainable, self.cfg.spm.max_grad_norm)
                self.optimizer.step()
                self.optimizer.zero_grad()
        w = self.window
        w["loss"], w["micro"] = w["loss"] + loss.item(), w["micro"] + 1
        w["correct"], w["counted"] = w["correct"] + ok, w["counted"] + counted
        self.state.pairs_seen += len(batch["caption"]) * acc.num_processes
        return True

    def end_step(self, bar) -> None:
        """After an optimizer step: LR, curve row, metrics; evaluation and checkpoint when due."""
        spm, state, w = self.cfg.spm, self.state, self.window
        lr = self.lr_scheduler.get_last_lr()[0]
        self.lr_scheduler.step()  # by hand: a prepared scheduler would step num_processes times per step
        state.step += 1
        train_acc = w["correct"] / w["counted"] if w["counted"] else float("nan")
        row = {"step": state.step, "loss": w["loss"] / w["micro"], "lr": lr, "train_accuracy": train_acc}
        w.clear()
        state.curves.append(row)
        logged = {"spm/loss": row["loss"], "spm/lr": lr, "spm/train_acc": train_acc}
        tracking.active().log_metrics({k: v for k, v in logged.items() if math.isfinite(v)}, step=state.step)
        bar.update(1)
        bar.set_postfix(loss=f"{row['loss']:.3f}", acc=f"{train_acc:.2f}")
        side_start = time.perf_counter()
        if state.step % spm.eval_every == 0 and state.step < spm.max_steps:
            accuracy, _ = self.evaluate()
            bar.write(f"step {state.step}: val accuracy by t {fmt_accuracy(accuracy)}")
        if state.step % spm.checkpoint_every == 0:
            self.checkpoint()
        self.side_seconds += time.perf_counter() - side_start

    def evaluate(self) -> tuple[dict[str, float], int]:
        """Validation accuracy by t of the model now (recorded in the eval history and the tracker)."""
        self.unwrapped.eval()
        acc, n_val = self.validation.accuracy({"spm": self.unwrapped})
        self.unwrapped.train()
        self.state.eval_history.append({"step": self.state.step, "accuracy": acc["spm"]})
        log_accuracy("spm/val_acc", acc["spm"], self.state.step)
        return acc["spm"], n_val

    def gathered_bad_pairs(self) -> list[list[dict[str, Any]]]:
        """Every process's skipped training pairs (a collective: all processes call it)."""
        from accelerate.utils import gather_object

        return gather_object([list(self.train_stream.bad_pairs)])  # one process: the list as it is

    def checkpoint(self) -> Path | None:
        self.state.nonfinite = self.guard.state_dict()
        self.state.lr_scheduler = self.lr_scheduler.state_dict()  # plain numbers (its lambdas are functions: None)
        self.state.bad_pairs = self.gathered_bad_pairs()
        return self.checkpoints.save(
            self.state.step,
            asdict(self.state),
            write=lambda folder: self.acc.save_state(str(folder)),
            finite=all_finite(p.detach() for p in self.trainable),
        )


# ------------------------------------------------------------------------------------------------------------
# Reports
# ------------------------------------------------------------------------------------------------------------
def write_reports(cfg, metrics: dict[str, Any], curves: list[dict[str, Any]]) -> None:
    """spm_accuracy.csv, spm_train_curves.csv, spm_accuracy.png and spm_metrics.json (strict JSON)."""
    rows = [
        {"t": t, "accuracy": metrics["accuracy"][t], "initial_accuracy": metrics["initial_accuracy"][t]}
        for t in (str(t) for t in cfg.spm.eval_timesteps)
    ]
    CurveWriter(ACCURACY_COLUMNS, rows).write(artifact_path(cfg, "spm_accuracy"))
    CurveWriter(CURVE_COLUMNS, curves).write(artifact_path(cfg, "spm_curves"))
    accuracy_plot(metrics, artifact_path(cfg, "spm_accuracy_plot"))
    # StageResult's writer: NaN/inf become null, so the report is JSON that every reader accepts.
    StageResult(extra=metrics).write(artifact_path(cfg, "spm_metrics"))


def accuracy_plot(metrics: dict[str, Any], path: Path) -> None:
    """Accuracy vs t, trained and initial model (also in MLflow, beside the CSV that DVC plots)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ts = [int(t) for t in metrics["accuracy"]]
    fig, ax = plt.subplots(figsize=(4.5, 3.2))
    ax.plot(ts, list(metrics["accuracy"].values()), "o-", label="SPM")
    ax.plot(ts, list(metrics["initial_accuracy"].values()), "s--", label="initial (plain CLIP)")
    ax.axhline(0.5, color="gray", lw=0.8, ls=":")
    ax.set_xlabel("timestep t (0 = clean image)")
    ax.set_ylabel(f"pair accuracy (n = {metrics['n_pairs']})")
    ax.set_ylim(0, 1)
    ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def log_accuracy(prefix: str, acc: dict[str, float], step: int) -> None:
    tracking.active().log_metrics({f"{prefix}_t{t}": a for t, a in acc.items() if not math.isnan(a)}, step=step)


def tail_mean(values: list[float], n: int = 20) -> float | None:
    tail = [v for v in values[-n:] if math.isfinite(v)]
    return sum(tail) / len(tail) if tail else None


def fmt_accuracy(acc: dict[str, float] | None) -> str:
    return "" if acc is None else " ".join(f"t={t}:{a:.3f}" for t, a in acc.items())
