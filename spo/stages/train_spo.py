"""``spo train``: SPO LoRA fine-tuning of the UNet (paper §4; the algorithm is in :mod:`spo.spo_trainer`).

Each iteration samples a batch of prompts with the candidate-pool sampler, pools the kept win/lose pairs of
all processes and takes optimizer steps on full steps' worth of pairs; checkpoints every
``spo.checkpoint_every`` steps and at each epoch end under ``checkpoints/spo/`` (:mod:`spo.training`: a fresh
run moves an earlier run's checkpoints aside; ``spo train --resume latest|PATH`` continues mid-epoch and ends
with the same LoRA as an uninterrupted run).

Outputs: ``models/spo/lora/pytorch_lora_weights.safetensors`` (stock diffusers format, loadable by
``StableDiffusion(XL)Pipeline.load_lora_weights``), ``reports/spo_train.json`` (:class:`TrainSPOResult`) and
``reports/spo_train_curves.csv`` (one row per optimizer step, for ``dvc plots``).

Multi-GPU: ``accelerate launch --config_file configs/accelerate/multi_gpu.yaml -m spo.cli train --preset sd15``.

``spo train --method dpo`` (or ``spo.method: dpo``) trains the Diffusion-DPO baseline instead
(:mod:`spo.dpo_trainer`, settings in the ``dpo`` section) on the prepared preference pairs, with the same LoRA,
and writes the same outputs (the report with ``method: "dpo"``), so ``spo evaluate`` / ``spo register`` work
unchanged. It needs no SPM.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any, ClassVar

from spo import tracking
from spo.config import ConfigError
from spo.errors import ModelLoadError, SPOError
from spo.models.lora import save_lora
from spo.models.runtime import apply_runtime
from spo.pipeline_spec import artifact_path
from spo.results import StageResult
from spo.spo_trainer import CURVE_FIELDS, SECTIONS, SPOTrainer, make_accelerator, set_tf32
from spo.training import CurveWriter
from spo.utils import get_logger, hash_tree, weight_dtype

log = get_logger(__name__)

SPM_LINEAGE_KEYS = ("run_id", "training_config_hash", "config_hash", "steps", "source_clip")


@dataclass
class TrainSPOResult(StageResult):
    """What ``spo train`` returns and writes to ``reports/spo_train.json``."""

    stage: ClassVar[str] = "train_spo"
    headline: ClassVar[tuple[str, ...]] = ("method", "pairs_trained", "kept_fraction", "optimizer_steps", "loss_mean_last_10", "steps_skipped_nonfinite")
    method: str = "spo"  # "spo" | "dpo" (spo.method)
    pairs_trained: int = 0
    pairs_kept: int = 0
    candidates_scored: int = 0
    optimizer_steps: int = 0
    comparisons: int = 0
    kept_fraction: float = 0.0
    pairs_skipped: int = 0
    steps_skipped_nonfinite: int = 0
    pairs_per_optimizer_step: int = 0
    unet_samples_sampling: int = 0
    unet_samples_with_grad_per_pair: float | None = None
    # UNet rows run in training, with grad (policy) and without (sampling + reference): matched compute.
    unet_rows_with_grad: int = 0
    unet_rows_no_grad: int = 0
    epochs: int = 0
    num_prompts: int = 0
    num_processes: int = 1
    final_loss: float | None = None
    loss_mean_last_10: float | None = None
    spm_score_mean_first_iteration: float | None = None
    spm_score_mean_last_iteration: float | None = None
    spm: dict[str, Any] = field(default_factory=dict)
    base_model: str = ""
    arch: str = ""
    lora: str = ""
    lora_rank: int = 0
    lora_alpha: int = 0
    config_hash: str = ""
    resumed_from: str | None = None
    wall_time_s: float = 0.0
    time_sampling_s: float = 0.0
    time_training_s: float = 0.0


def read_train_prompts(cfg) -> list[str]:
    from spo.data.pickapic import read_prompts

    path = artifact_path(cfg, "prompts_train")
    if not path.exists():
        raise SPOError(f"training prompts not found at {path}. Run `spo prepare` first (or `make run`).")
    prompts = list(read_prompts(path))[: cfg.spo.num_prompts or None]
    if not prompts:
        raise SPOError(f"{path} holds no prompts; re-run `spo prepare`.")
    return prompts


def load_scorer(cfg, device, dtype):
    """The trained SPM from ``models/spm`` (or the released one when ``spm.source`` is ``pretrained:...``); with
    ``spo.step_judge=plain``, the SPM's initial CLIP, which a fresh time-conditioned model scores exactly like."""
    from spo.models.preference import RELEASED_SPM_FILES, TimeConditionedCLIP, load_spm

    if cfg.spo.step_judge == "plain":
        plain = TimeConditionedCLIP.from_clip(
            cfg.resolve_ref(cfg.spm.init), cfg.resolve_ref(cfg.spm.processor)
        )
        plain.step_conditioned = False
        return plain.requires_grad_(False).to(device=device, dtype=dtype).eval()
    if artifact_path(cfg, "spm_model").exists():
        check_spm_decoder(cfg)
        return load_spm(artifact_path(cfg, "spm_model"), device=device, dtype=dtype)
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
        f"no step-aware preference model at {artifact_path(cfg, 'spm_model')}. Run `spo train-spm` first, or "
        "use the released one with --set spm.source=pretrained:SPO-Diffusion-Models/Step-Aware_Preference_Models"
    )


def check_spm_decoder(cfg) -> None:
    """The SPM judges images rendered the way it was trained on (spm_config.json ``decoder`` and
    ``decode_resolution``; SPMs saved without them: the full-size VAE decode)."""
    config_file = artifact_path(cfg, "spm_config")
    saved = json.loads(config_file.read_text()) if config_file.exists() else {}
    for key, default in (("decoder", "vae"), ("decode_resolution", None)):
        trained, configured = saved.get(key, default), getattr(cfg.spm, key)
        if trained != configured:
            raise ConfigError(
                f"the SPM at {artifact_path(cfg, 'spm_model')} was trained with spm.{key}={_yaml(trained)}, but "
                f"spm.{key}={_yaml(configured)}: set spm.{key}={_yaml(trained)}, or retrain it (`spo train-spm`)"
            )


def _yaml(value) -> str:
    return "null" if value is None else str(value)


def spm_lineage(cfg) -> dict[str, Any]:
    if cfg.spo.step_judge == "plain":
        return {"step_judge": "plain", "source_clip": str(cfg.spm.init)}
    path = artifact_path(cfg, "spm_model")
    if not path.exists():
        return {"source": cfg.spm.source}
    info: dict[str, Any] = {"path": str(path), "content_hash": hash_tree(path)[:16]}
    config_file = artifact_path(cfg, "spm_config")
    if config_file.exists():
        spm_cfg = json.loads(config_file.read_text())
        info.update({k: spm_cfg[k] for k in SPM_LINEAGE_KEYS if k in spm_cfg})
    return info


def run(cfg, resume: str | None = None, scorer=None, method: str | None = None) -> TrainSPOResult:
    """Train the SPO LoRA; returns the result written to ``reports/spo_train.json``.

    ``scorer`` replaces the SPM loaded from ``models/spm`` (library use and tests; anything with
    ``encode_text`` and ``score_with_text``, see :class:`spo.sampling.StepScorer`). ``method`` (``--method``)
    overrides ``spo.method``: ``"dpo"`` trains the Diffusion-DPO baseline (:func:`run_dpo`).
    """
    from spo.progress import tqdm

    if method is not None:
        set_method(cfg, method)
    if cfg.spo.method == "dpo":
        return run_dpo(cfg, resume)

    from spo.models.diffusion import DiffusionAdapter, attach_spm_decoder, load_pipeline

    started = time.time()
    set_tf32(cfg.spo.allow_tf32)
    prompts = read_train_prompts(cfg)
    acc = make_accelerator(cfg)
    dtype = weight_dtype(cfg, acc.device)
    pipe = load_pipeline(cfg.model, device=acc.device, dtype=dtype, cfg=cfg)
    if scorer is None:
        scorer = load_scorer(cfg, acc.device, dtype)
        apply_runtime(cfg.runtime, acc.device, spm=scorer)
    adapter = attach_spm_decoder(DiffusionAdapter(pipe, cfg.spo_resolution), cfg)
    trainer = SPOTrainer(cfg, acc, adapter, scorer, prompts)
    resumed = trainer.start(resume)
    state = trainer.state

    quiet = not trainer.main
    epochs = tqdm(total=cfg.spo.num_epochs, initial=state.epoch, desc="epochs", disable=quiet)
    iters = tqdm(
        total=trainer.iters_per_epoch, initial=state.iteration, desc="iterations", disable=quiet, leave=False
    )
    trainer.train_pool()  # a resumed pool
    while state.epoch < cfg.spo.num_epochs:
        while not trainer.epoch_done():
            trainer.sample_iteration()
            trainer.train_pool()
            loss = f"{state.curves[-1]['loss']:.4f}" if state.curves else "-"
            iters.set_postfix(step=state.global_step, loss=loss)
            iters.update(1)
        trainer.end_epoch()
        epochs.update(1)
        iters.reset()
    iters.close()
    epochs.close()

    summary = trainer.finish()
    summary.update(spo_unet_rows(summary, trainer.state.counters))
    return finish_run(cfg, acc, trainer, summary, spm_lineage(cfg), SECTIONS, resumed, started, CURVE_FIELDS)


def finish_run(cfg, acc, trainer, summary, spm, sections, resumed, started, curve_fields) -> TrainSPOResult:
    """The result of either method, and its outputs written by the main process."""
    result = TrainSPOResult.from_dict(
        {
            **summary,
            "spm": spm,
            "base_model": str(cfg.model.pretrained),
            "arch": cfg.model.arch,
            "lora": str(artifact_path(cfg, "lora_weights")),
            "config_hash": cfg.section_hash(*sections),
            "resumed_from": str(resumed.path) if resumed else None,
            "wall_time_s": round(time.time() - started, 1),
        }
    )
    if trainer.main:
        write_outputs(cfg, trainer, result, curve_fields)
    acc.wait_for_everyone()
    return result


def write_outputs(cfg, trainer, result: TrainSPOResult, curve_fields=CURVE_FIELDS) -> None:
    """The LoRA (with its training info), the curves CSV and the report; logged to the tracker."""
    info = {k: result[k] for k in ("base_model", "arch", "lora_rank", "lora_alpha", "config_hash", "spm")}
    info["resolution"] = cfg.spo_resolution
    if result.method != "spo":
        info["method"] = result.method
        info["resolution"] = cfg.dpo.image_resolution or cfg.model.resolution
    lora_dir = artifact_path(cfg, "lora")
    extra = {artifact_path(cfg, "lora_info").name: json.dumps(info, indent=2) + "\n"}
    save_lora(trainer.base_unet, lora_dir, cfg.model.arch, extra_files=extra)
    curves = CurveWriter(curve_fields, trainer.state.curves).write(artifact_path(cfg, "spo_curves"))
    report = result.write(artifact_path(cfg, "spo_summary"))
    tracker = tracking.active()
    numbers = {
        k: float(v) for k, v in result.items() if isinstance(v, int | float) and not isinstance(v, bool)
    }
    tracker.log_metrics({f"spo/{k}": v for k, v in numbers.items()})
    tracker.log_artifact(lora_dir, artifact_path="lora")
    tracker.log_artifact(report)
    tracker.log_artifact(curves)
    log.info(
        "%s LoRA written to %s (%d optimizer steps, %d pairs trained)",
        result.method.upper(),
        lora_dir,
        result.optimizer_steps,
        result.pairs_trained,
    )


def spo_unet_rows(summary: dict[str, Any], counters: dict[str, float]) -> dict[str, int]:
    """SPO's UNet rows: the policy's with grad; without grad, the sampler's plus the reference's (as many as
    the policy's, :meth:`spo.spo_trainer.SPOTrainer.pair_losses`)."""
    with_grad = int(counters.get("unet_samples_training", 0))
    return {
        "unet_rows_with_grad": with_grad,
        "unet_rows_no_grad": int(summary.get("unet_samples_sampling", 0)) + with_grad,
    }


# -- the Diffusion-DPO baseline (spo train --method dpo) -----------------------------------------------------
def set_method(cfg, method: str) -> None:
    """``--method``: set ``spo.method`` (validated like any config value)."""
    from pydantic import ValidationError

    try:
        cfg.spo.method = method
    except ValidationError:
        raise SPOError(f"--method {method!r}: choose spo or dpo") from None


def run_dpo(cfg, resume: str | None = None) -> TrainSPOResult:
    """Train the Diffusion-DPO LoRA on the prepared preference pairs; the same outputs as SPO."""
    from spo.dpo_trainer import CURVE_FIELDS as DPO_CURVE_FIELDS
    from spo.dpo_trainer import SECTIONS as DPO_SECTIONS
    from spo.dpo_trainer import DPOTrainer
    from spo.dpo_trainer import make_accelerator as make_dpo_accelerator
    from spo.models.diffusion import DiffusionAdapter, load_pipeline
    from spo.progress import tqdm

    started = time.time()
    set_tf32(cfg.spo.allow_tf32)
    acc = make_dpo_accelerator(cfg)
    dtype = weight_dtype(cfg, acc.device)
    pipe = load_pipeline(cfg.model, device=acc.device, dtype=dtype, cfg=cfg)
    trainer = DPOTrainer(cfg, acc, DiffusionAdapter(pipe, cfg.dpo.image_resolution or cfg.model.resolution))
    resumed = trainer.start(resume)
    tracking.active().set_tags({"spo.method": "dpo"})  # --method may have overridden the logged spo.method
    bar = tqdm(
        total=cfg.dpo.max_steps, initial=trainer.state.global_step, desc="DPO steps", disable=not trainer.main
    )

    def progress(state) -> None:
        loss = f"{state.curves[-1]['loss']:.4f}" if state.curves else "-"
        bar.set_postfix(loss=loss, acc=f"{state.curves[-1]['implicit_acc']:.2f}" if state.curves else "-")
        bar.n = state.global_step
        bar.refresh()

    trainer.train(progress)
    bar.close()
    # DPO trains on the preference labels, not an SPM.
    spm = {"method": "dpo", "used": False}
    return finish_run(
        cfg, acc, trainer, trainer.finish(), spm, DPO_SECTIONS, resumed, started, DPO_CURVE_FIELDS
    )
