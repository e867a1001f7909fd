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
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any, ClassVar

from spo import tracking
from spo.errors import ModelLoadError, SPOError
from spo.models.lora import save_lora
from spo.pipeline_spec import artifact_path
from spo.results import StageResult
from spo.spo_trainer import CURVE_FIELDS, SECTIONS, SPOTrainer, make_accelerator, set_tf32
from spo.training import CurveWriter
from spo.utils import get_logger, hash_tree, torch_dtype

log = get_logger(__name__)

SPM_LINEAGE_KEYS = ("run_id", "training_config_hash", "config_hash", "steps", "source_clip")


@dataclass
class TrainSPOResult(StageResult):
    """What ``spo train`` returns and writes to ``reports/spo_train.json``."""

    stage: ClassVar[str] = "train_spo"
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
    """The trained SPM from ``models/spm`` (or the released one when ``spm.source`` is ``pretrained:...``)."""
    from spo.models.preference import RELEASED_SPM_FILES, load_spm

    if artifact_path(cfg, "spm_model").exists():
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


def spm_lineage(cfg) -> dict[str, Any]:
    path = artifact_path(cfg, "spm_model")
    if not path.exists():
        return {"source": cfg.spm.source}
    info: dict[str, Any] = {"path": str(path), "content_hash": hash_tree(path)[:16]}
    config_file = artifact_path(cfg, "spm_config")
    if config_file.exists():
        spm_cfg = json.loads(config_file.read_text())
        info.update({k: spm_cfg[k] for k in SPM_LINEAGE_KEYS if k in spm_cfg})
    return info


def run(cfg, resume: str | None = None, scorer=None) -> TrainSPOResult:
    """Train the SPO LoRA; returns the result written to ``reports/spo_train.json``.

    ``scorer`` replaces the SPM loaded from ``models/spm`` (library use and tests; anything with
    ``encode_text`` and ``score_with_text``, see :class:`spo.sampling.StepScorer`).
    """
    from tqdm.auto import tqdm

    from spo.models.diffusion import DiffusionAdapter, load_pipeline

    started = time.time()
    set_tf32(cfg.spo.allow_tf32)
    prompts = read_train_prompts(cfg)
    acc = make_accelerator(cfg)
    dtype = torch_dtype(cfg.model.dtype, acc.device.type)
    pipe = load_pipeline(cfg.model, device=acc.device, dtype=dtype, cfg=cfg)
    scorer = scorer if scorer is not None else load_scorer(cfg, acc.device, dtype)
    trainer = SPOTrainer(cfg, acc, DiffusionAdapter(pipe, cfg.spo_resolution), scorer, prompts)
    resumed = trainer.start(resume)
    state = trainer.state

    quiet = not trainer.main
    epochs = tqdm(total=cfg.spo.num_epochs, initial=state.epoch, desc="epochs", disable=quiet)
    iters = tqdm(
        total=trainer.iters_per_epoch, initial=state.iteration, desc="iterations", disable=quiet, leave=False
    )
    trainer.train_pool()  # a resumed pool
    while state.epoch < cfg.spo.num_epochs:
        while state.iteration < trainer.iters_per_epoch:
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

    result = TrainSPOResult.from_dict(
        {
            **trainer.finish(),
            "spm": spm_lineage(cfg),
            "base_model": str(cfg.model.pretrained),
            "arch": cfg.model.arch,
            "lora": str(artifact_path(cfg, "lora_weights")),
            "config_hash": cfg.section_hash(*SECTIONS),
            "resumed_from": str(resumed.path) if resumed else None,
            "wall_time_s": round(time.time() - started, 1),
        }
    )
    if trainer.main:
        write_outputs(cfg, trainer, result)
    acc.wait_for_everyone()
    return result


def write_outputs(cfg, trainer: SPOTrainer, result: TrainSPOResult) -> None:
    """The LoRA (with its training info), the curves CSV and the report; logged to the tracker."""
    info = {k: result[k] for k in ("base_model", "arch", "lora_rank", "lora_alpha", "config_hash", "spm")}
    info["resolution"] = cfg.spo_resolution
    lora_dir = artifact_path(cfg, "lora")
    extra = {artifact_path(cfg, "lora_info").name: json.dumps(info, indent=2) + "\n"}
    save_lora(trainer.base_unet, lora_dir, cfg.model.arch, extra_files=extra)
    curves = CurveWriter(CURVE_FIELDS, trainer.state.curves).write(artifact_path(cfg, "spo_curves"))
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
        "SPO LoRA written to %s (%d optimizer steps, %d pairs trained)",
        lora_dir,
        result.optimizer_steps,
        result.pairs_trained,
    )
