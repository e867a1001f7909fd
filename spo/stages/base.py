"""``spo base``: pretrain the tiny world's base model and CLIP on CPU (tiny preset only).

Real presets load ``model.pretrained`` (a hub id); the tiny preset has no hub, so this stage trains, from
random init and in a few CPU minutes, a tiny model of the *real* SD-1.5 architecture on the synthetic
Pick-a-Pic images and captions:

1. the VAE (AutoencoderKL) as an autoencoder (L1 + L2 + a small KL), then its ``scaling_factor`` set so
   latents have unit variance, as SD's 0.18215 does for SD's VAE;
2. a tiny CLIPModel, contrastively: the SPM's initialisation, the tiny stand-in for PickScore, and -- as
   CLIP ViT-L is for SD-1.5 -- the frozen text encoder of the diffusion model (a UNet conditions far
   sooner on a contrastively trained text tower than on one learnt jointly from scratch);
3. the UNet with the standard ε-prediction loss, dropping 10 % of captions so that classifier-free
   guidance works;
4. a tiny autoencoder decoder (diffusers ``AutoencoderTiny``, TAESD's architecture) distilled from the VAE
   decoder, for ``spm.decoder=tiny`` (``models/base/tiny_decoder``; the real presets use TAESD / TAESDXL).

Everything is saved as ordinary folders (``models/base`` via ``save_pretrained``; ``models/base/clip``)
and read back afterwards only through ``from_pretrained`` -- the same call the real presets use.

After each phase a checkpoint (``checkpoints/base/checkpoint-<1..4>``, the training kit's
:class:`~spo.training.CheckpointManager`) holds the models trained so far; ``run(cfg, resume="latest")``
trains only the phases it does not hold. Each phase draws from its own seed stream of ``base.seed``, so a
resumed run ends with the same models as an uninterrupted one. The phases themselves are in
:mod:`spo.base_training`.
"""

from __future__ import annotations

import io
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from spo import tracking
from spo.base_training import (
    clip_text_encoder,
    load_training_images,
    save_sample_grid,
    train_clip,
    train_tiny_decoder,
    train_unet,
    train_vae,
)
from spo.pipeline_spec import artifact_path
from spo.results import StageResult
from spo.training import CheckpointManager, RunIdentity, require_finite, seed_generator
from spo.utils import (
    atomic_dir,
    atomic_write_bytes,
    atomic_write_text,
    get_logger,
    hash_tree,
    read_json,
    seed_everything,
)

log = get_logger(__name__)

SECTIONS = ("base", "synthetic", "model")  # what shapes the base models (fingerprint, checkpoint lineage)
# In training order; one checkpoint after each (checkpoint-1 .. -4). The tiny decoder (spm.decoder=tiny) is
# distilled from the trained VAE.
PHASES = ("clip", "vae", "unet", "tiny_decoder")


@dataclass
class BaseResult(StageResult):
    """What ``spo base`` returns; a skipped run reports ``skipped`` (and, when up to date, the saved info)."""

    stage: ClassVar[str] = "base"
    headline: ClassVar[tuple[str, ...]] = ("skipped", "num_images", "final_loss", "seconds")
    skipped: str | None = None
    fingerprint: str | None = None
    final_loss: dict[str, float | None] | None = None
    seconds: dict[str, float] | None = None
    num_images: int | None = None
    data_hash: str | None = None
    grid_prompts: list[str] | None = None

    def to_dict(self) -> dict[str, Any]:
        # Only what was reported: the keys of a skipped run are those it had as a plain dict.
        return {k: v for k, v in super().to_dict().items() if v is not None or k in self.extra}


def _fingerprint(cfg) -> str:
    return cfg.section_hash(*SECTIONS)


def is_up_to_date(cfg) -> bool:
    info = artifact_path(cfg, "base_info")
    if not info.exists() or not (artifact_path(cfg, "base_clip") / "config.json").exists():
        return False
    if not (artifact_path(cfg, "base_tiny_decoder") / "config.json").exists():
        return False
    return read_json(info).get("fingerprint") == _fingerprint(cfg)


# ------------------------------------------------------------------------------------------------------------
# The stage: three phases, a checkpoint after each
# ------------------------------------------------------------------------------------------------------------
class _Models:
    """The models the phases train. Rebuilt from code as in a fresh run, then -- on resume -- the weights of
    the completed phases are loaded from the checkpoint (``<phase>.pt``)."""

    def __init__(self, cfg):
        from spo.data.synthetic import VOCABULARY
        from spo.models.tiny import build_tiny_clip, tiny_decoder

        self.cfg = cfg
        self.clip, self.processor = build_tiny_clip(
            words=VOCABULARY, image_size=cfg.model.resolution, seed=cfg.base.seed
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.base.seed)
            self.tiny_decoder = tiny_decoder()
        self._pipe = None

    @property
    def pipe(self):
        """The SD-1.5 pipeline; built once the CLIP is trained, its text encoder the CLIP's text tower."""
        if self._pipe is None:
            from spo.models.tiny import build_tiny_sd15

            text_encoder = clip_text_encoder(self.clip)
            self._pipe = build_tiny_sd15(seed=self.cfg.base.seed, text_encoder=text_encoder, tokenizer=self.processor.tokenizer)
        return self._pipe

    def module(self, phase: str) -> torch.nn.Module:
        if phase in ("clip", "tiny_decoder"):
            return getattr(self, phase)
        return getattr(self.pipe, phase)

    def write(self, folder: Path, done: list[str]) -> None:
        for phase in done:
            torch.save(self.module(phase).state_dict(), folder / f"{phase}.pt")

    def restore(self, folder: Path, state: dict[str, Any]) -> None:
        for phase in PHASES:  # in order: the pipeline's text encoder is copied from the restored CLIP
            if phase in state["done"]:
                self.module(phase).load_state_dict(torch.load(folder / f"{phase}.pt", weights_only=True))
        if state.get("vae_scaling_factor") is not None:
            self.pipe.vae.register_to_config(scaling_factor=state["vae_scaling_factor"])


def _run_phase(phase: str, models: _Models, pixels, captions, cfg, gen) -> float:
    if phase == "clip":
        return train_clip(models.clip, models.processor, pixels, captions, cfg, gen)
    if phase == "vae":
        return train_vae(models.pipe.vae, pixels, cfg, gen)
    if phase == "tiny_decoder":
        return train_tiny_decoder(models.tiny_decoder, models.pipe.vae, pixels, cfg, gen)
    return train_unet(models.pipe, pixels, captions, cfg, gen)


def _train_phases(cfg, resume: str | Path | None, pixels, captions) -> tuple[_Models, dict[str, Any]]:
    """Train the phases a checkpoint does not already hold, checkpointing after each."""
    checkpoints = CheckpointManager(
        cfg.paths.checkpoints / "base", RunIdentity.for_config(cfg, SECTIONS), keep=1, name="base checkpoint"
    )
    resumed = checkpoints.start(resume)
    models = _Models(cfg)
    state: dict[str, Any] = {"done": [], "losses": {}, "seconds": {}, "vae_scaling_factor": None}
    if resumed is not None:
        state = resumed.state
        models.restore(resumed.path, state)
        log.info("base: phases %s restored from %s", ", ".join(state["done"]) or "(none)", resumed.path)
    for i, phase in enumerate(PHASES, start=1):
        if phase in state["done"]:
            continue
        t = time.perf_counter()
        # One seed stream per phase: a resumed run trains the remaining phases exactly as an uninterrupted one.
        state["losses"][phase] = _run_phase(phase, models, pixels, captions, cfg, seed_generator(cfg.base.seed, i))
        state["seconds"][f"{phase}_s"] = time.perf_counter() - t
        lr_key = {"vae": "base.vae_lr", "tiny_decoder": "base.tiny_decoder_lr"}.get(phase, "base.lr")
        require_finite(models.module(phase).parameters(), f"base/{phase}: the trained weights",
                       f"Lower {lr_key} and retry.")
        state["done"].append(phase)
        if phase == "vae":
            state["vae_scaling_factor"] = float(models.pipe.vae.config.scaling_factor)
        checkpoints.save(i, state, write=lambda folder: models.write(folder, state["done"]))
    return models, state


def run(cfg, force: bool = False, resume: str | Path | None = None) -> BaseResult:
    """Train the tiny base model and CLIP into models/base (``resume``: "latest" or a checkpoint folder of
    checkpoints/base, whose completed phases are not trained again)."""
    if not cfg.is_tiny:
        msg = f"base pretraining is only for the tiny preset; preset {cfg.preset} loads {cfg.model.pretrained}"
        log.info(msg)
        # dvc.yaml declares models/base for every preset: leave a placeholder rather than a missing output.
        if not artifact_path(cfg, "base_model").exists():
            with atomic_dir(artifact_path(cfg, "base_model")) as tmp:
                (tmp / "README.txt").write_text(f"Placeholder: {msg}.\n")
        # ... and its reports too (dvc.yaml declares them), saying why they are empty.
        result = BaseResult(skipped=msg)
        result.write(artifact_path(cfg, "base_report"))
        if not artifact_path(cfg, "base_samples").exists():
            from PIL import Image

            buf = io.BytesIO()
            Image.new("RGB", (1, 1), "white").save(buf, format="PNG")
            atomic_write_bytes(artifact_path(cfg, "base_samples"), buf.getvalue())
        return result
    if not force and is_up_to_date(cfg):
        log.info("models/base is up to date (fingerprint %s); use --force to retrain", _fingerprint(cfg))
        return BaseResult.from_dict({"skipped": "up to date", **read_json(artifact_path(cfg, "base_info"))})

    seed_everything(cfg.base.seed)
    t0 = time.perf_counter()
    pixels, captions = load_training_images(cfg, cfg.base.num_images)
    log.info("base: %d training images, %d distinct captions", len(pixels), len(set(captions)))
    models, state = _train_phases(cfg, resume, pixels, captions)
    timings = dict(state["seconds"])
    timings["total_s"] = time.perf_counter() - t0
    info = BaseResult(
        fingerprint=_fingerprint(cfg),
        final_loss={k: round(v, 5) for k, v in state["losses"].items()},
        seconds={k: round(v, 1) for k, v in timings.items()},
        num_images=len(pixels),
        data_hash=hash_tree(artifact_path(cfg, "raw_data") / "data"),
    )
    with atomic_dir(artifact_path(cfg, "base_model")) as tmp:
        models.pipe.save_pretrained(tmp)
        clip_dir = tmp / artifact_path(cfg, "base_clip").relative_to(artifact_path(cfg, "base_model"))
        models.clip.save_pretrained(clip_dir)
        models.processor.save_pretrained(clip_dir)
        models.tiny_decoder.save_pretrained(
            tmp / artifact_path(cfg, "base_tiny_decoder").relative_to(artifact_path(cfg, "base_model"))
        )
        atomic_write_text(tmp / artifact_path(cfg, "base_info").name, info.to_json())
    return _report(cfg, info, captions)


def _report(cfg, info: BaseResult, captions: list[str]) -> BaseResult:
    """The sample grid, drawn from the saved folder through the loader every later stage uses."""
    from spo.models.diffusion import load_pipeline

    saved = load_pipeline(cfg.model, cfg=cfg)
    prompts = sorted(set(captions))[:: max(1, len(set(captions)) // 6)][:6]
    grid = artifact_path(cfg, "base_samples")
    save_sample_grid(saved, prompts, grid, cfg)
    info.grid_prompts = prompts
    info.write(artifact_path(cfg, "base_report"))
    losses = info.final_loss or {}
    tracking.active().log_metrics({f"base/final_{k}_loss": v for k, v in losses.items() if math.isfinite(v)})
    tracking.active().log_artifact(grid)
    log.info("base: trained in %.0f s (%s); grid at %s", (info.seconds or {}).get("total_s", 0.0),
             ", ".join(f"{k} {v:.4f}" for k, v in losses.items()), grid)
    return info
