"""``spo train-spm``: train the step-aware preference model (SPM) and report its accuracy by timestep.

For each preference pair: t ~ U{0..999}; both images are VAE-encoded and noised with the *same* noise; the
frozen base UNet predicts x̂0 under CFG (DDIM's x̂0 formula); the decoded x̂0 images and t go to the SPM, trained
with the PickScore-style soft-label loss (``spo.losses.spm_loss``). Accuracy on the validation pairs is measured
at ``spm.eval_timesteps`` (t = 0: the clean images) for the trained and the initial model, with the same noise
for both, so the two curves are a paired comparison.

accelerate handles device, mixed precision, gradient accumulation, multi-GPU (DDP or DeepSpeed ZeRO-2, see
configs/accelerate/spm_zero2.yaml): ``accelerate launch -m spo.cli train-spm --preset sd15``. Checkpoints
(``checkpoints/spm/checkpoint-<step>``), resume, the non-finite policy and the seed streams are the training
kit's (:mod:`spo.training`); the parts of the recipe are in :mod:`spo.spm_training`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from spo import tracking
from spo.models.preference import RELEASED_SPM_FILES, TimeConditionedCLIP, load_spm, save_spm
from spo.pipeline_spec import artifact_path
from spo.results import StageResult
from spo.spm_training import (
    NO_TIMER,
    NONFINITE_HINT,
    PairDenoiser,
    SectionTimer,
    SPMTrainer,
    ValidationSet,
    base_model,
    fmt_accuracy,
    load_relabeller,
    log_accuracy,
    make_accelerator,
    make_optimizer,
    pair_streams,
    tail_mean,
    write_reports,
)
from spo.training import CheckpointManager, RunIdentity, require_finite, warmup_schedule
from spo.utils import get_logger, seed_everything

log = get_logger(__name__)

SECTIONS = ("model", "data", "spm")  # the config that shapes the SPM (checkpoint lineage, model hash)


@dataclass
class TrainSPMResult(StageResult):
    """What ``spo train-spm`` returns (the full report is reports/spm_metrics.json)."""

    stage: ClassVar[str] = "train_spm"
    headline: ClassVar[tuple[str, ...]] = ("accuracy", "n_pairs", "steps", "train_pairs_per_s")
    spm_model: str = ""
    accuracy: dict[str, float] = field(default_factory=dict)
    initial_accuracy: dict[str, float] | None = None
    n_pairs: int = 0
    steps: int = 0
    train_pairs_per_s: float | None = None


def run(cfg, resume: str | None = None, timer: SectionTimer | None = None) -> TrainSPMResult:
    """Train (or import, with ``spm.source=pretrained:...``) the SPM; write models/spm/ and the reports."""
    if cfg.spm.source.startswith("pretrained:"):
        return _import_pretrained(cfg)
    return _train(cfg, resume, timer or NO_TIMER)


def _train(cfg, resume: str | None, timer: SectionTimer) -> TrainSPMResult:
    ckpt_root = artifact_path(cfg, "spm_checkpoints")
    accelerator = make_accelerator(cfg, ckpt_root)
    identity = RunIdentity.for_config(cfg, SECTIONS, accelerator.num_processes)
    checkpoints = CheckpointManager(
        ckpt_root, identity, keep=cfg.spm.checkpoints_total_limit, accelerator=accelerator, name="SPM checkpoint"
    )
    resumed = checkpoints.start(resume)  # before anything heavy: a bad --resume fails at once
    seed_everything(cfg.spm.seed)
    train_stream, val_stream = pair_streams(cfg)
    trainer = _build_trainer(cfg, accelerator, train_stream, val_stream, checkpoints, timer)
    if resumed is not None:
        trainer.resume(resumed.path, resumed.state)
    trainer.measure_initial()
    start_pairs = trainer.state.pairs_seen
    seconds = trainer.fit()
    accuracy, n_val = trainer.evaluate()
    state = trainer.state
    bad = [pair for rank in trainer.gathered_bad_pairs() for pair in rank] + val_stream.bad_pairs
    if bad:
        log.warning("%d pairs were skipped for undecodable JPEGs (listed in spm_metrics.json)", len(bad))
    metrics = {
        "accuracy": accuracy,
        "initial_accuracy": state.initial_accuracy,
        "n_pairs": n_val,
        "steps": state.step,
        "pairs_seen": state.pairs_seen,
        "final_loss": tail_mean([r["loss"] for r in state.curves]),
        "train_pairs_per_s": (state.pairs_seen - start_pairs) / seconds if seconds > 0 else None,
        "num_processes": accelerator.num_processes,
        "eval_history": state.eval_history,
        "relabelled": cfg.spm.relabel,
        "base_model": str(cfg.model.pretrained),
        "init": cfg.spm.init,
        "skipped_pairs": len(bad),
        "skipped": bad[:1000],
    }
    info = {"training_config_hash": checkpoints.identity.config_hash, "base_model": str(cfg.model.pretrained),
            "steps": state.step, "accuracy": accuracy, **decoder_info(cfg)}
    _publish(cfg, accelerator, trainer.unwrapped, info, metrics, state.curves)
    log.info("SPM accuracy by t: %s (initial %s)", fmt_accuracy(accuracy), fmt_accuracy(state.initial_accuracy))
    accelerator.end_training()
    return TrainSPMResult(
        spm_model=str(artifact_path(cfg, "spm_model")),
        accuracy=accuracy,
        initial_accuracy=state.initial_accuracy,
        n_pairs=n_val,
        steps=state.step,
        train_pairs_per_s=metrics["train_pairs_per_s"],
    )


def _build_trainer(cfg, accelerator, train_stream, val_stream, checkpoints, timer) -> SPMTrainer:
    """The base model, the SPM with its optimizer and LR schedule (prepared), the validation set."""
    spm, device = cfg.spm, accelerator.device
    denoiser = PairDenoiser(base_model(cfg, device), spm.cfg_scale)
    processor = cfg.resolve_ref(spm.processor)
    model = TimeConditionedCLIP.from_clip(cfg.resolve_ref(spm.init), processor, spm.time_embed_dim)
    model.step_conditioned = spm.step_conditioned
    model.enable_gradient_checkpointing(spm.gradient_checkpointing)
    model.to(device).train()
    relabeller = load_relabeller(cfg, processor, device) if spm.relabel else None
    optimizer = make_optimizer(model, spm)
    # Stepped by hand once per optimizer step (SPMTrainer.end_step), so it is not prepared.
    schedule = warmup_schedule("linear", spm.warmup_steps, spm.max_steps)
    lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    ds_plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if ds_plugin is not None:
        # No dataloader goes through prepare(), so DeepSpeed's "auto" batch size and clipping come from here.
        ds_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = spm.batch_size
        ds_plugin.deepspeed_config["gradient_clipping"] = spm.max_grad_norm
    model, optimizer = accelerator.prepare(model, optimizer)
    # The LR scheduler's state travels in the checkpoint's JSON (TrainState.lr_scheduler), not through
    # accelerate's register_for_checkpointing, whose loader unpickles with weights_only=False (code execution
    # from a tampered checkpoint).
    validation = ValidationSet(
        val_stream, denoiser, list(spm.eval_timesteps), spm.seed, accelerator, relabeller, spm.relabel_gap
    )
    return SPMTrainer(
        cfg, accelerator, model, optimizer, lr_scheduler, denoiser, relabeller, validation, train_stream,
        checkpoints, timer,
    )


def _publish(cfg, accelerator, model, info: dict[str, Any], metrics: dict[str, Any], curves) -> None:
    """Save the SPM to models/spm and write the reports -- never a non-finite model (checked on every
    process, so all of them raise together and the previous models/spm stays as it was)."""
    require_finite(
        (p.detach() for p in model.parameters()),
        "the trained SPM",
        f"{artifact_path(cfg, 'spm_model')} keeps its previous contents. {NONFINITE_HINT}",
    )
    if accelerator.is_main_process:
        save_spm(model, artifact_path(cfg, "spm_model"), info)
        write_reports(cfg, metrics, curves)
        if metrics.get("final_loss") is not None:
            tracking.active().log_metrics({"spm/final_loss": metrics["final_loss"]}, step=metrics["steps"])
    accelerator.wait_for_everyone()


def decoder_info(cfg) -> dict[str, Any]:
    """What renders the SPM's images (saved in spm_config.json; SPO refuses another rendering)."""
    info: dict[str, Any] = {"decoder": cfg.spm.decoder, "decode_resolution": cfg.spm.decode_resolution}
    if cfg.spm.decoder == "tiny":
        info["tiny_decoder"] = str(cfg.spm.tiny_decoder)
    return info


def _import_pretrained(cfg) -> TrainSPMResult:
    """``spm.source=pretrained:<ref>``: load the released SPM, evaluate it beside its source CLIP, save it."""
    spm = cfg.spm
    accelerator = make_accelerator(cfg, artifact_path(cfg, "spm_checkpoints"))
    device = accelerator.device
    seed_everything(spm.seed)
    _, val_stream = pair_streams(cfg)
    adapter = base_model(cfg, device)
    init, processor = cfg.resolve_ref(spm.init), cfg.resolve_ref(spm.processor)
    source = "pretrained:" + cfg.resolve_ref(spm.source.removeprefix("pretrained:"))
    model = load_spm(
        source,
        device=device,
        clip_ref=init,
        processor_ref=processor,
        time_embed_dim=spm.time_embed_dim,
        pretrained_file=spm.pretrained_file or RELEASED_SPM_FILES[cfg.model.arch],
    )
    initial = TimeConditionedCLIP.from_clip(init, processor, spm.time_embed_dim)
    initial.requires_grad_(False).eval().to(device)
    relabeller = None
    if spm.relabel:
        # The SDXL recipe: PickScore is both the initialisation and the labeller.
        relabeller = initial if spm.relabel_model == spm.init else load_relabeller(cfg, processor, device)
    validation = ValidationSet(
        val_stream, PairDenoiser(adapter, spm.cfg_scale), list(spm.eval_timesteps), spm.seed, accelerator,
        relabeller, spm.relabel_gap,
    )
    acc, n_val = validation.accuracy({"spm": model, "initial": initial})
    metrics = {
        "accuracy": acc["spm"],
        "initial_accuracy": acc["initial"],
        "n_pairs": n_val,
        "steps": 0,
        "source": spm.source,
        "relabelled": spm.relabel,
        "base_model": str(cfg.model.pretrained),
    }
    info = {"training_config_hash": cfg.section_hash(*SECTIONS), "steps": 0, "accuracy": acc["spm"], **decoder_info(cfg)}
    _publish(cfg, accelerator, model, info, metrics, [])
    log_accuracy("spm/val_acc", acc["spm"], 0)
    log_accuracy("spm/initial_val_acc", acc["initial"], 0)
    return TrainSPMResult(
        spm_model=str(artifact_path(cfg, "spm_model")),
        accuracy=acc["spm"],
        initial_accuracy=acc["initial"],
        n_pairs=n_val,
    )
