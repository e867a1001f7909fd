"""``spo train-spm``: train the step-aware preference model (SPM) and report its accuracy by timestep.

For each preference pair: t ~ U{0..999}; both images are VAE-encoded and noised with the *same* noise; the
frozen base UNet predicts x̂0 under CFG (DDIM's x̂0 formula); the decoded x̂0 images and t go to the SPM, trained
with the PickScore-style soft-label loss (``spo.losses.spm_loss``). Accuracy on the validation pairs is measured
at ``spm.eval_timesteps`` (t = 0: the clean images) for the trained and the initial model, with the same noise
for both, so the two curves are a paired comparison.

accelerate handles device, mixed precision, gradient accumulation, multi-GPU (DDP or DeepSpeed ZeRO-2, see
configs/accelerate/spm_zero2.yaml) and checkpoints: ``accelerate launch -m spo.cli train-spm --preset sd15``.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import shutil
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from spo import tracking
from spo.errors import NonFiniteError, SPOError
from spo.losses import spm_loss
from spo.models.diffusion import DiffusionAdapter, PromptEmbeddings, load_pipeline
from spo.models.preference import RELEASED_SPM_FILES, TimeConditionedCLIP, load_spm, save_spm
from spo.sampling import predict_x0
from spo.utils import (
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    effective_mixed_precision,
    get_logger,
    require_path,
    seed_everything,
    torch_dtype,
)

log = get_logger(__name__)

TRAIN_STATE_FILE = "spm_trainer_state.json"
MAX_CONSECUTIVE_NONFINITE = 5


# ------------------------------------------------------------------------------------------------------------
# Timing (the benchmark passes a real one; training runs with the no-op)
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
            images = ad.decode(x0)
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


def _generator(device: torch.device, *parts: int) -> torch.Generator:
    """A generator whose stream depends only on ``parts`` (seed, step, rank, ...): runs resume bit-exactly."""
    seed = 0
    for p in parts:
        seed = (seed * 1_000_003 + int(p)) % (2**63 - 1)
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g


# ------------------------------------------------------------------------------------------------------------
# The stage
# ------------------------------------------------------------------------------------------------------------
@dataclass
class TrainState:
    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    pairs_seen: int = 0
    curves: list[dict[str, float]] = field(default_factory=list)
    initial_accuracy: dict[str, float] | None = None
    eval_history: list[dict[str, Any]] = field(default_factory=list)
    config_hash: str = ""


def _config_hash(cfg) -> str:
    return cfg.section_hash("model", "data", "spm")


def _streams(cfg):
    from spo.data.pickapic import PairStream

    prepared = cfg.paths.prepared
    hint = "Run `spo prepare` first (or `make run`)."
    train_path = require_path(prepared / "spm_train", "prepared SPM training pairs", hint)
    val_path = require_path(prepared / "spm_val", "prepared SPM validation pairs", hint)
    res, bs = cfg.spm_resolution, cfg.spm.batch_size
    root = cfg.paths.root
    train = PairStream(
        train_path, cfg.data.source, res, bs, cfg.spm.seed, shuffle=True, drop_last=True, root=root
    )
    val = PairStream(
        val_path, cfg.data.source, res, bs, cfg.spm.seed, shuffle=False, drop_last=False, root=root
    )
    if len(train) == 0:
        raise SPOError(
            f"{train_path} holds fewer pairs than one batch (spm.batch_size={bs}); lower spm.batch_size or "
            "prepare more data."
        )
    return train, val


def _base_model(cfg, device):
    dtype = torch_dtype(cfg.model.dtype, str(device.type))
    pipe = load_pipeline(cfg.model, device=device, dtype=dtype, cfg=cfg)
    for part in ("unet", "vae", "text_encoder", "text_encoder_2"):
        module = getattr(pipe, part, None)
        if module is not None:
            module.requires_grad_(False).eval()
    return DiffusionAdapter(pipe, cfg.spm_resolution)


EVAL_CACHE_BYTES = 1 << 30  # rendered validation images are kept (on the CPU) when they fit in this


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
            captions = list(batch["caption"])
            img0, img1 = batch["image_0"].to(acc.device), batch["image_1"].to(acc.device)
            label_0, label_1 = batch["label_0"].to(acc.device), batch["label_1"].to(acc.device)
            if self.relabeller is not None:
                label_0, label_1 = relabel(self.relabeller, img0, img1, captions, self.relabel_gap)
            item: dict[str, Any] = {
                "captions": captions,
                "label_0": label_0,
                "label_1": label_1,
                "images": {},
            }
            if (label_0 != label_1).any():
                for t in self.timesteps:
                    if t == 0:
                        item["images"][t] = (img0, img1)
                        continue
                    ts = torch.full((len(captions),), t, device=acc.device, dtype=torch.long)
                    gen = _generator(acc.device, self.seed, 7, t, i, rank)
                    item["images"][t] = self.denoiser(img0, img1, captions, ts, gen)
            if self._cache is not None:
                self._cache.append(_to_cpu(item))
            yield item
        self._complete = self._cache is not None

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


def _lr_lambda(warmup: int, total: int):
    """Linear warm-up, then linear decay to 0 at ``total`` (DeepSpeed's WarmupDecayLR, as the official run)."""

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return max(0.0, (total - step) / max(1, total - warmup))

    return f


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    # No decay on biases, norms, embeddings vectors and the logit scale: decaying them only shrinks scales the
    # loss needs (the usual AdamW practice for transformers).
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or name.endswith("logit_scale") else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _checkpoint_dirs(root: Path) -> list[Path]:
    return sorted((p for p in root.glob("step-*") if p.is_dir()), key=lambda p: int(p.name.split("-")[1]))


def _resolve_resume(root: Path, resume: str | None) -> Path | None:
    if resume is None:
        return None
    if resume == "latest":
        found = _checkpoint_dirs(root)
        if not found:
            raise SPOError(f"--resume latest: no SPM checkpoint under {root}. Start without --resume.")
        return found[-1]
    path = Path(resume)
    if not (path / TRAIN_STATE_FILE).exists():
        raise SPOError(
            f"--resume {resume}: not an SPM checkpoint (no {TRAIN_STATE_FILE}); use 'latest' or a "
            f"folder like {root / 'step-000100'}."
        )
    return path


def _save_checkpoint(accelerator, root: Path, state: TrainState, keep: int | None) -> None:
    """accelerate save_state into a temporary folder, renamed once complete (a kill never leaves half a one)."""
    final = root / f"step-{state.step:06d}"
    tmp = root / f".step-{state.step:06d}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    if accelerator.is_main_process:
        atomic_write_json(tmp / TRAIN_STATE_FILE, state.__dict__)
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        if keep is not None:
            for old in _checkpoint_dirs(root)[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def _csv(rows: list[dict[str, Any]], columns: list[str]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def _write_reports(cfg, metrics: dict[str, Any], curves: list[dict[str, Any]]) -> None:
    reports = cfg.paths.reports
    ts = [str(t) for t in cfg.spm.eval_timesteps]
    acc_rows = [
        {"t": t, "accuracy": metrics["accuracy"][t], "initial_accuracy": metrics["initial_accuracy"][t]}
        for t in ts
    ]
    atomic_write_text(reports / "spm_accuracy.csv", _csv(acc_rows, ["t", "accuracy", "initial_accuracy"]))
    atomic_write_text(
        reports / "spm_train_curves.csv", _csv(curves, ["step", "loss", "lr", "train_accuracy"])
    )
    _accuracy_plot(metrics, reports / "spm_accuracy.png")
    atomic_write_json(reports / "spm_metrics.json", metrics)


def _accuracy_plot(metrics: dict[str, Any], path: Path) -> None:
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


def _log_accuracy(prefix: str, acc: dict[str, float], step: int) -> None:
    tracking.active().log_metrics(
        {f"{prefix}_t{t}": a for t, a in acc.items() if not math.isnan(a)}, step=step
    )


def run(cfg, resume: str | None = None, timer: SectionTimer | None = None) -> dict[str, Any]:
    """Train (or import, with ``spm.source=pretrained:...``) the SPM; write models/spm/ and the reports."""
    if cfg.spm.source.startswith("pretrained:"):
        return _import_pretrained(cfg)
    return _train(cfg, resume, timer or NO_TIMER)


def _accelerator(cfg, project_dir: Path):
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    return Accelerator(
        mixed_precision=effective_mixed_precision(cfg.spm.mixed_precision),
        gradient_accumulation_steps=cfg.spm.grad_accum,
        project_config=ProjectConfiguration(project_dir=str(project_dir)),
    )


def _train(cfg, resume: str | None, timer: SectionTimer) -> dict[str, Any]:
    from tqdm.auto import tqdm

    spm_cfg = cfg.spm
    ckpt_root = cfg.paths.checkpoints / "spm"
    resume_dir = _resolve_resume(ckpt_root, resume)
    accelerator = _accelerator(cfg, ckpt_root)
    device = accelerator.device
    seed_everything(spm_cfg.seed)
    train_stream, val_stream = _streams(cfg)

    adapter = _base_model(cfg, device)
    denoiser = PairDenoiser(adapter, spm_cfg.cfg_scale)
    init, processor = cfg.resolve_ref(spm_cfg.init), cfg.resolve_ref(spm_cfg.processor)
    model = TimeConditionedCLIP.from_clip(init, processor, spm_cfg.time_embed_dim)
    model.enable_gradient_checkpointing(spm_cfg.gradient_checkpointing)
    model.to(device).train()
    relabeller = None
    if spm_cfg.relabel:
        # A fresh TimeConditionedCLIP scores exactly like its source CLIP (PickScore for the SDXL recipe).
        relabeller = TimeConditionedCLIP.from_clip(cfg.resolve_ref(spm_cfg.relabel_model), processor)
        relabeller.requires_grad_(False).eval().to(device)

    optimizer = torch.optim.AdamW(_param_groups(model, spm_cfg.weight_decay), lr=spm_cfg.lr)
    # Stepped by hand once per optimizer step: a prepared scheduler would step num_processes times per step.
    lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, _lr_lambda(spm_cfg.warmup_steps, spm_cfg.max_steps)
    )
    ds_plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if ds_plugin is not None:
        # No dataloader goes through prepare(), so DeepSpeed's "auto" batch size and clipping come from here.
        ds_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = spm_cfg.batch_size
        ds_plugin.deepspeed_config["gradient_clipping"] = spm_cfg.max_grad_norm
    model, optimizer = accelerator.prepare(model, optimizer)
    accelerator.register_for_checkpointing(lr_scheduler)
    unwrapped: TimeConditionedCLIP = accelerator.unwrap_model(model)
    # A list, not a generator: clip_grad_norm_ must see every parameter (the official script clipped nothing).
    trainable = [p for p in model.parameters() if p.requires_grad]

    state = TrainState(config_hash=_config_hash(cfg))
    if resume_dir is not None:
        accelerator.load_state(str(resume_dir))
        saved = json.loads((resume_dir / TRAIN_STATE_FILE).read_text())
        if saved.get("config_hash") != state.config_hash:
            log.warning(
                "resuming %s with a changed model/data/spm config; the run continues with the new one",
                resume_dir,
            )
        state = TrainState(**{**saved, "config_hash": state.config_hash})
        log.info("resumed from %s at step %d", resume_dir, state.step)
    elif accelerator.is_main_process and _checkpoint_dirs(ckpt_root):
        log.info(
            "fresh run: removing the checkpoints of a previous run in %s (use --resume latest to continue "
            "one instead)",
            ckpt_root,
        )
        for old in _checkpoint_dirs(ckpt_root):
            shutil.rmtree(old, ignore_errors=True)

    tracker = tracking.active()  # the CLI/flow logs the resolved config and attaches the reports
    validation = ValidationSet(
        val_stream,
        denoiser,
        list(spm_cfg.eval_timesteps),
        spm_cfg.seed,
        accelerator,
        relabeller,
        spm_cfg.relabel_gap,
    )
    if state.initial_accuracy is None:
        unwrapped.eval()
        acc, n_val = validation.accuracy({"initial": unwrapped})
        unwrapped.train()
        state.initial_accuracy = acc["initial"]
        _log_accuracy("spm/initial_val_acc", state.initial_accuracy, 0)
        log.info("initial (plain CLIP) accuracy by t: %s", _fmt(state.initial_accuracy))

    rank, world = accelerator.process_index, accelerator.num_processes
    batches = train_stream.iter_epoch(
        state.epoch, skip_batches=state.batch_in_epoch, process_index=rank, num_processes=world
    )
    bar = tqdm(
        total=spm_cfg.max_steps,
        initial=state.step,
        desc="train-spm",
        unit="step",
        disable=not accelerator.is_local_main_process,
    )
    window: dict[str, float] = defaultdict(float)
    nonfinite = 0
    micro = 0
    start = time.perf_counter()
    side_seconds = 0.0  # evaluation and checkpointing: not training throughput
    start_pairs = state.pairs_seen
    while state.step < spm_cfg.max_steps:
        with timer("data"):
            batch = next(batches, None)
        if batch is None:  # epoch boundary
            state.epoch, state.batch_in_epoch = state.epoch + 1, 0
            batches = train_stream.iter_epoch(state.epoch, process_index=rank, num_processes=world)
            continue
        state.batch_in_epoch += 1
        with accelerator.accumulate(model):
            gen = _generator(device, spm_cfg.seed, state.step, micro % spm_cfg.grad_accum, rank)
            micro += 1
            loss, ok, counted = _train_micro_step(
                model, unwrapped, denoiser, relabeller, batch, gen, cfg, accelerator, timer
            )
            if not torch.isfinite(loss):
                nonfinite += 1
                if nonfinite >= MAX_CONSECUTIVE_NONFINITE:
                    raise NonFiniteError(
                        f"SPM loss was NaN/inf {nonfinite} times in a row at step {state.step}; lower spm.lr or "
                        "use spm.mixed_precision=bf16/no, then restart (--resume latest keeps the last checkpoint)."
                    )
                optimizer.zero_grad()
                continue
            nonfinite = 0
            with timer("clip_backward"):
                accelerator.backward(loss)
            with timer("optimizer"):
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(trainable, spm_cfg.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad()
        window["loss"] += loss.item()
        window["micro"] += 1
        window["correct"] += ok
        window["counted"] += counted
        state.pairs_seen += len(batch["caption"]) * world
        if not accelerator.sync_gradients:
            continue
        lr = lr_scheduler.get_last_lr()[0]
        lr_scheduler.step()
        state.step += 1
        row = {
            "step": state.step,
            "loss": window["loss"] / window["micro"],
            "lr": lr,
            "train_accuracy": window["correct"] / window["counted"] if window["counted"] else float("nan"),
        }
        window.clear()
        state.curves.append(row)
        logged = {"spm/loss": row["loss"], "spm/lr": lr, "spm/train_acc": row["train_accuracy"]}
        tracker.log_metrics({k: v for k, v in logged.items() if math.isfinite(v)}, step=state.step)
        bar.update(1)
        bar.set_postfix(loss=f"{row['loss']:.3f}", acc=f"{row['train_accuracy']:.2f}")
        side_start = time.perf_counter()
        if state.step % spm_cfg.eval_every == 0 and state.step < spm_cfg.max_steps:
            unwrapped.eval()
            acc, _ = validation.accuracy({"spm": unwrapped})
            unwrapped.train()
            state.eval_history.append({"step": state.step, "accuracy": acc["spm"]})
            _log_accuracy("spm/val_acc", acc["spm"], state.step)
            bar.write(f"step {state.step}: val accuracy by t {_fmt(acc['spm'])}")
        if state.step % spm_cfg.checkpoint_every == 0:
            _save_checkpoint(accelerator, ckpt_root, state, spm_cfg.checkpoints_total_limit)
        side_seconds += time.perf_counter() - side_start
    bar.close()
    elapsed = time.perf_counter() - start - side_seconds

    unwrapped.eval()
    acc, n_val = validation.accuracy({"spm": unwrapped})
    state.eval_history.append({"step": state.step, "accuracy": acc["spm"]})
    _log_accuracy("spm/val_acc", acc["spm"], state.step)
    pairs_trained = state.pairs_seen - start_pairs
    metrics = {
        "accuracy": acc["spm"],
        "initial_accuracy": state.initial_accuracy,
        "n_pairs": n_val,
        "steps": state.step,
        "pairs_seen": state.pairs_seen,
        "final_loss": _tail_mean([r["loss"] for r in state.curves]),
        "train_pairs_per_s": pairs_trained / elapsed if elapsed > 0 else None,
        "num_processes": world,
        "eval_history": state.eval_history,
        "relabelled": spm_cfg.relabel,
        "base_model": str(cfg.model.pretrained),
        "init": spm_cfg.init,
    }
    if accelerator.is_main_process:
        save_spm(
            unwrapped,
            cfg.paths.spm_model,
            {
                "training_config_hash": state.config_hash,
                "base_model": str(cfg.model.pretrained),
                "steps": state.step,
                "accuracy": acc["spm"],
            },
        )
        _write_reports(cfg, metrics, state.curves)
        if metrics["final_loss"] is not None:
            tracker.log_metrics({"spm/final_loss": metrics["final_loss"]}, step=state.step)
    accelerator.wait_for_everyone()
    log.info("SPM accuracy by t: %s (initial %s)", _fmt(acc["spm"]), _fmt(state.initial_accuracy))
    accelerator.end_training()
    return {
        "spm_model": str(cfg.paths.spm_model),
        "accuracy": acc["spm"],
        "initial_accuracy": state.initial_accuracy,
        "n_pairs": n_val,
        "steps": state.step,
        "train_pairs_per_s": metrics["train_pairs_per_s"],
    }


def _train_micro_step(model, unwrapped, denoiser, relabeller, batch, gen, cfg, accelerator, timer):
    """One micro-batch: x̂0 images at random t, SPM scores, the globally normalised loss."""
    device = accelerator.device
    captions = list(batch["caption"])
    img0, img1 = batch["image_0"].to(device), batch["image_1"].to(device)
    label_0, label_1 = batch["label_0"].to(device), batch["label_1"].to(device)
    weight = batch["weight"].to(device).float()
    if relabeller is not None:
        with timer("relabel"):
            label_0, label_1 = relabel(relabeller, img0, img1, captions, cfg.spm.relabel_gap)
    t = torch.randint(
        0,
        denoiser.adapter.scheduler.config.num_train_timesteps,
        (len(captions),),
        generator=gen,
        device=gen.device,
    ).to(device)
    x0, x1 = _training_images(denoiser, img0, img1, captions, t, gen, cfg.spm.clean_fraction, timer)
    with timer("clip_forward"), accelerator.autocast():
        scores = model(torch.cat([x0, x1]), t.repeat(2), **unwrapped.tokenize(captions)).float()
    s0, s1 = scores.chunk(2)
    mean_w = accelerator.reduce(weight.sum().detach().clone(), "mean")
    loss = shard_loss(s0, s1, label_0, label_1, weight, mean_w)
    ok, counted = pair_correct(s0.detach(), s1.detach(), label_0, label_1)
    # Scores are gathered for the training-accuracy metric only.
    ok, counted = (
        accelerator.gather(ok.float()).sum().item(),
        accelerator.gather(counted.float()).sum().item(),
    )
    return loss, ok, counted


def _training_images(denoiser, img0, img1, captions, t, gen, clean_fraction: float, timer):
    """x̂0 images of the pairs at their t; with ``spm.clean_fraction`` > 0 a share of pairs is shown clean at
    t = 0 instead (t is set to 0 in place), so that the t = 0 condition also learns the clean-image domain."""
    if clean_fraction <= 0:
        return denoiser(img0, img1, captions, t, gen, timer)
    clean = (torch.rand(len(captions), generator=gen, device=gen.device) < clean_fraction).to(t.device)
    t.masked_fill_(clean, 0)
    x0, x1 = img0.clone(), img1.clone()
    idx = (~clean).nonzero().squeeze(1)
    if len(idx):
        x0[idx], x1[idx] = denoiser(
            img0[idx], img1[idx], [captions[i] for i in idx.tolist()], t[idx], gen, timer
        )
    return x0, x1


def shard_loss(s0, s1, label_0, label_1, weight, mean_weight_sum: torch.Tensor) -> torch.Tensor:
    """This process's share of the global-batch SPM loss.

    The pairwise loss needs no other process's features (each pair is scored against its own prompt, no in-batch
    negatives), so features are not all-gathered: that would move 3·B·D floats per step and buy nothing. Only
    the weight normalisation is global. Scaling the local loss Σ_local w·ℓ / Σ_local w by Σ_local w /
    mean_p(Σ_p w) makes DDP's average of the per-process gradients equal the gradient of Σ_global w·ℓ /
    Σ_global w, the PickScore loss on the global batch, for one scalar all-reduce (``mean_weight_sum``).
    """
    local = weight.sum()
    return spm_loss(s0, s1, label_0, label_1, weight) * (local / mean_weight_sum.clamp(min=1e-12))


def _tail_mean(values: list[float], n: int = 20) -> float | None:
    tail = [v for v in values[-n:] if math.isfinite(v)]
    return sum(tail) / len(tail) if tail else None


def _fmt(acc: dict[str, float] | None) -> str:
    return "" if acc is None else " ".join(f"t={t}:{a:.3f}" for t, a in acc.items())


def _import_pretrained(cfg) -> dict[str, Any]:
    """``spm.source=pretrained:<ref>``: load the released SPM, evaluate it beside its source CLIP, save it."""
    accelerator = _accelerator(cfg, cfg.paths.checkpoints / "spm")
    device = accelerator.device
    seed_everything(cfg.spm.seed)
    _, val_stream = _streams(cfg)
    adapter = _base_model(cfg, device)
    init, processor = cfg.resolve_ref(cfg.spm.init), cfg.resolve_ref(cfg.spm.processor)
    source = "pretrained:" + cfg.resolve_ref(cfg.spm.source.removeprefix("pretrained:"))
    model = load_spm(
        source,
        device=device,
        clip_ref=init,
        processor_ref=processor,
        time_embed_dim=cfg.spm.time_embed_dim,
        pretrained_file=cfg.spm.pretrained_file or RELEASED_SPM_FILES[cfg.model.arch],
    )
    initial = TimeConditionedCLIP.from_clip(init, processor, cfg.spm.time_embed_dim)
    initial.requires_grad_(False).eval().to(device)
    relabeller = None
    if cfg.spm.relabel and cfg.spm.relabel_model == cfg.spm.init:
        relabeller = initial  # the SDXL recipe: PickScore is both the initialisation and the labeller
    elif cfg.spm.relabel:
        relabeller = TimeConditionedCLIP.from_clip(cfg.resolve_ref(cfg.spm.relabel_model), processor)
        relabeller.requires_grad_(False).eval().to(device)
    validation = ValidationSet(
        val_stream,
        PairDenoiser(adapter, cfg.spm.cfg_scale),
        list(cfg.spm.eval_timesteps),
        cfg.spm.seed,
        accelerator,
        relabeller,
        cfg.spm.relabel_gap,
    )
    acc, n_val = validation.accuracy({"spm": model, "initial": initial})
    metrics = {
        "accuracy": acc["spm"],
        "initial_accuracy": acc["initial"],
        "n_pairs": n_val,
        "steps": 0,
        "source": cfg.spm.source,
        "relabelled": cfg.spm.relabel,
        "base_model": str(cfg.model.pretrained),
    }
    if accelerator.is_main_process:
        save_spm(
            model,
            cfg.paths.spm_model,
            {"training_config_hash": _config_hash(cfg), "steps": 0, "accuracy": acc["spm"]},
        )
        _write_reports(cfg, metrics, [])
    _log_accuracy("spm/val_acc", acc["spm"], 0)
    _log_accuracy("spm/initial_val_acc", acc["initial"], 0)
    return {
        "spm_model": str(cfg.paths.spm_model),
        **{k: metrics[k] for k in ("accuracy", "initial_accuracy", "n_pairs")},
    }
