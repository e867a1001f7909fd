"""Typed configuration: built-in preset <- params file <- ``--set key=value`` overrides.

Resolution order (later wins):

1. the pydantic defaults below (the settings SD-1.5 and SDXL share in the paper);
2. the preset file ``spo/presets/<preset>.yaml`` (``tiny``, ``sd15``, ``sdxl``);
3. the params file (``params.yaml``, the DVC params file) -- only when its ``preset`` key names the same
   preset, so that ``spo train --preset sd15`` in a checkout whose params.yaml describes the tiny world does
   not silently inherit tiny sizes;
4. ``--set section.key=value`` overrides (values parsed as YAML: ``--set spo.lr=1e-4``, ``--set
   eval.scorers=[pickscore,clip]``).

``spo config --preset sd15`` prints the resolved config; ``spo config --preset sd15 > params.yaml`` makes a
DVC params file for a real run.
"""

from __future__ import annotations

import copy
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError
from ruamel.yaml import YAML, YAMLError

from spo.errors import SPOError
from spo.pipeline_spec import artifact_path
from spo.refs import ModelRef, RefError
from spo.utils import json_digest

PRESETS = ("tiny", "sd15", "sdxl")
DEFAULT_PARAMS_FILE = "params.yaml"


class ConfigError(SPOError, ValueError):
    """A configuration problem, with a message meant for the person at the terminal."""


class Section(BaseModel):
    # Unknown keys are errors: a typo in params.yaml or --set must not be silently ignored.
    # inf/nan are never valid settings (`--set spm.lr=.inf` passes a plain `gt=0`).
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class PathsConfig(Section):
    """Where stages read and write. Everything is relative to ``root``; the sub-paths are the user contract."""

    root: Path = Path(".")

    # Each path is an artifact of the catalog in spo/pipeline_spec.py (declared there once).
    @property
    def raw_data(self) -> Path:
        return artifact_path(self.root, "raw_data")

    @property
    def prepared(self) -> Path:
        return artifact_path(self.root, "prepared")

    @property
    def base_model(self) -> Path:
        return artifact_path(self.root, "base_model")

    @property
    def base_clip(self) -> Path:
        return artifact_path(self.root, "base_clip")

    @property
    def spm_model(self) -> Path:
        return artifact_path(self.root, "spm_model")

    @property
    def spo_dir(self) -> Path:
        return artifact_path(self.root, "spo_dir")

    @property
    def lora(self) -> Path:
        return artifact_path(self.root, "lora")

    @property
    def reports(self) -> Path:
        return self.root / "reports"

    @property
    def eval_reports(self) -> Path:
        return artifact_path(self.root, "eval_reports")

    @property
    def eval_images(self) -> Path:
        return artifact_path(self.root, "eval_images")

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"


class ModelConfig(Section):
    """The diffusion base model (hub id or local diffusers folder)."""

    arch: Literal["sd15", "sdxl"] = "sd15"
    pretrained: str = "stable-diffusion-v1-5/stable-diffusion-v1-5"
    vae: str | None = None
    revision: str | None = None
    resolution: int = Field(512, ge=8, le=4096)
    # dtype of the frozen weights on an accelerator; CPU always runs fp32.
    dtype: Literal["fp32", "fp16", "bf16"] = "fp16"

    @field_validator("resolution")
    @classmethod
    def _multiple_of_8(cls, v: int) -> int:
        if v % 8:
            raise ValueError(f"must be a multiple of 8 (got {v})")
        return v


class SyntheticConfig(Section):
    """The tiny world: a Pick-a-Pic-format dataset of procedural images (see spo/data/synthetic.py)."""

    seed: int = 0
    image_size: int = Field(32, ge=16, le=512)
    train_rows: int = Field(3000, ge=1)
    validation_rows: int = Field(400, ge=1)
    test_rows: int = Field(200, ge=1)
    unique_rows: int = Field(100, ge=1)
    train_shards: int = Field(2, ge=1)
    pairs_per_caption: int = Field(3, ge=1)
    label_noise: float = Field(0.05, ge=0.0, le=0.5)
    tie_fraction: float = Field(0.08, ge=0.0, le=1.0)
    unlabeled_fraction: float = Field(0.03, ge=0.0, le=1.0)
    # Pairs showing the same image twice (are_different = False; exercises data.keep_only_different).
    identical_fraction: float = Field(0.02, ge=0.0, le=1.0)
    # P(image 0 preferred) = sigmoid((s0 - s1) / label_temperature) on the hidden score (unit scale).
    label_temperature: float = Field(0.1, gt=0.0)
    jpeg_quality: int = Field(95, ge=10, le=100)

    @model_validator(mode="after")
    def _shares_fit(self) -> SyntheticConfig:
        if self.tie_fraction + self.unlabeled_fraction > 1.0:
            raise ValueError(
                f"tie_fraction + unlabeled_fraction must be at most 1 (got {self.tie_fraction} + {self.unlabeled_fraction})"
            )
        return self


class DataConfig(Section):
    """Pick-a-Pic source and the prepare stage's filters."""

    source: str = "pickapic-anonymous/pickapic_v1"
    revision: str | None = None
    train_split: str = "train"
    val_split: str = "validation"
    prompts_val_split: str = "validation_unique"
    keep_only_different: bool = False
    limit_examples_per_prompt: int | None = Field(None, ge=1)
    num_train_prompts: int = Field(4000, ge=1)
    prompt_seed: int = 42
    max_spm_train_pairs: int | None = Field(None, ge=1)
    max_spm_val_pairs: int | None = Field(None, ge=1)
    # JPEG decodability is checked on a seeded sample (decoding all of v1 would take hours).
    gx_jpeg_sample: int = Field(64, ge=0)
    batch_rows: int = Field(8192, ge=1)
    # Seed of prepare's pair choices (limit_examples_per_prompt, max_spm_*_pairs).
    pair_seed: int = 0
    # Great Expectations validates the metadata in chunks of this many rows (bounded memory).
    gx_chunk_rows: int = Field(250_000, ge=1)


class BaseTrainConfig(Section):
    """Pretraining of the tiny base model and tiny CLIP (tiny preset only)."""

    seed: int = 0
    vae_steps: int = Field(1200, ge=0)
    vae_batch_size: int = Field(16, ge=1)
    vae_lr: float = Field(1.5e-3, gt=0)
    unet_steps: int = Field(1000, ge=0)
    clip_steps: int = Field(300, ge=0)
    batch_size: int = Field(32, ge=1)  # UNet and CLIP
    lr: float = Field(1e-3, gt=0)  # UNet and CLIP
    num_images: int = Field(2000, ge=1)
    sample_steps: int = Field(20, ge=1)
    max_consecutive_nonfinite: int = Field(5, ge=1)  # non-finite losses in a row before a phase aborts
    # The tiny autoencoder decoder (spm.decoder=tiny) distilled from the trained tiny VAE's decoder.
    tiny_decoder_steps: int = Field(600, ge=0)
    tiny_decoder_lr: float = Field(2e-3, gt=0)


class SPMLoaderConfig(Section):
    """How the SPM's training and validation pairs are read (spo/data/pickapic.py, ``PairStream``).

    Each process reads only the source row groups it consumes; the batch order depends on the seed, the
    epoch, the process count and ``lanes`` -- never on ``num_workers``.
    """

    # DataLoader worker processes reading row groups and decoding + resizing JPEGs; 0 = in the training
    # process (for debugging). Must divide ``lanes``.
    num_workers: int = Field(2, ge=0)
    # Batches each worker prepares ahead of the training loop.
    prefetch_factor: int = Field(2, ge=1)
    # Independent row-group streams per process, interleaved batch by batch (a worker reads only its own lanes').
    lanes: int = Field(4, ge=1)
    # Shuffle buffer: pairs are shuffled within blocks of this many row groups of a lane. A process holds at most
    # 2 * lanes * shuffle_row_groups row groups of its own rows' JPEG bytes (lower both for huge row groups).
    shuffle_row_groups: int = Field(2, ge=1)

    @model_validator(mode="after")
    def _workers_divide_lanes(self) -> SPMLoaderConfig:
        if self.num_workers and self.lanes % self.num_workers:
            raise ValueError(
                f"num_workers ({self.num_workers}) must divide lanes ({self.lanes}): otherwise every worker reads "
                "every lane's row groups"
            )
        return self


class SPMConfig(Section):
    """Step-aware preference model training (``spo train-spm``).

    ``init``, ``processor``, ``relabel_model`` and the reference after ``pretrained:`` follow spo/refs.py; pin a
    hub download with ``@<revision>`` (``--set spm.init=yuvalkirstain/PickScore_v1@<commit sha>``).
    """

    # "init": train from ``init``; "pretrained:<hub id or path>": load a released SPM (e.g.
    # pretrained:SPO-Diffusion-Models/Step-Aware_Preference_Models) and skip training.
    source: str = "init"
    init: str = "yuvalkirstain/PickScore_v1"
    processor: str = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
    lr: float = Field(3e-6, gt=0)
    weight_decay: float = Field(0.3, ge=0)
    warmup_steps: int = Field(500, ge=0)
    max_steps: int = Field(8000, ge=1)
    batch_size: int = Field(16, ge=1)
    grad_accum: int = Field(1, ge=1)
    cfg_scale: float = Field(5.0, ge=0)
    image_resolution: int | None = Field(None, ge=8)  # images into the VAE; None = model.resolution
    eval_timesteps: list[int] = [0, 251, 501, 701, 951]
    eval_every: int = Field(1000, ge=1)
    checkpoint_every: int = Field(1000, ge=1)
    mixed_precision: Literal["no", "fp16", "bf16"] = "bf16"
    relabel: bool = False
    relabel_model: str = "yuvalkirstain/PickScore_v1"
    relabel_gap: float = Field(0.1, ge=0, le=1)
    time_embed_dim: int = Field(256, ge=8)  # sinusoid width of the timestep embedding (released SPM: 256)
    seed: int = 42
    max_grad_norm: float = Field(1.0, gt=0)
    checkpoints_total_limit: int | None = Field(2, ge=1)  # keep the newest N checkpoints; None = all
    gradient_checkpointing: bool = False  # recompute the vision blocks in backward (ViT-H at large batches)
    # "adamw" (the paper). "adafactor" (torch.optim.Adafactor): factored second moments and no first moment, so
    # the optimizer state of the 1.3 B-parameter ViT-H SPM drops from 10.5 GB (fp32 AdamW) to a few MB -- for
    # GPUs or hosts under ~40 GB. Its step is relative: each update is spm.lr x RMS(parameter), so raise spm.lr
    # (1e-3 .. 1e-2 is usual for Adafactor) when switching.
    optimizer: Literal["adamw", "adafactor"] = "adamw"
    # File inside a pretrained: hub repo or folder; None = the released SPM for model.arch.
    pretrained_file: str | None = None
    # Share of training pairs shown as the clean images at t = 0 instead of x̂0 at a random t. 0 = the paper.
    # Matters when the VAE round trip visibly changes images (the tiny world's VAE drops colour and grain):
    # then t = 0 -- clean images at evaluation, final images in SPO -- would otherwise never be seen in training.
    clean_fraction: float = Field(0.0, ge=0, le=1)
    # Non-finite losses in a row (each skipped) before training aborts with a NonFiniteError.
    max_consecutive_nonfinite: int = Field(5, ge=1)
    # An undecodable training/validation JPEG: "fail" stops with its row ids; "skip" masks its pair (weight 0,
    # logged with row ids, listed in spm_metrics.json) and fails once more than max_bad_pairs (per process) are bad.
    on_bad_image: Literal["fail", "skip"] = "fail"
    max_bad_pairs: int = Field(100, ge=0)
    # How x̂0 latents become the images the SPM judges, in SPM training and in SPO sampling: "vae", the base
    # model's VAE decoder (the paper), or "tiny", a tiny autoencoder decoder (diffusers AutoencoderTiny: TAESD for
    # SD-1.5, TAESDXL for SDXL, ``tiny_decoder``) at a fraction of the FLOPs. An SPM is used with the decoder it was
    # trained with (saved with it; a mismatch is an error). Evaluation always decodes with the VAE.
    decoder: Literal["vae", "tiny"] = "vae"
    tiny_decoder: str = "madebyollin/taesd"
    # Decode x̂0 straight at this shorter-side size instead of at the image size: the latents are
    # box-filtered (area interpolation) to decode_resolution / the VAE factor first, then decoded. The SPM
    # only ever sees its processor's input (224 px for PickScore), so a 512-px decode does (512/224)² = 5.2x
    # the decoder work it needs. Never upsamples. None = decode at the image size (the paper). Part of how
    # the SPM's images are rendered, like ``decoder``: saved with the SPM, a mismatch is an error.
    # Measured on the tiny world: docs/sweeps/decode-resolution.md.
    decode_resolution: int | None = Field(None, ge=8)
    # False: the SPM never sees the timestep (every image is scored as if t = 0, in training and in SPO) --
    # the paper's "SPM w/o step condition" ablation (Table 5). Saved with the model.
    step_conditioned: bool = True
    loader: SPMLoaderConfig = SPMLoaderConfig()

    @field_validator("eval_timesteps")
    @classmethod
    def _timesteps_in_range(cls, v: list[int]) -> list[int]:
        bad = [t for t in v if not 0 <= t < 1000]
        if bad:
            raise ValueError(f"timesteps must lie in [0, 1000); got {bad}")
        return v

    @field_validator("source")
    @classmethod
    def _source_form(cls, v: str) -> str:
        if v != "init" and not v.startswith("pretrained:"):
            raise ValueError("must be 'init' or 'pretrained:<hub id or path>'")
        return v

    @model_validator(mode="after")
    def _released_spm_renders_as_trained(self) -> SPMConfig:
        if self.source.startswith("pretrained:") and (self.decoder != "vae" or self.decode_resolution is not None):
            raise ValueError(
                f"spm.source={self.source} is a released SPM, trained on full-size VAE-decoded images: use it with "
                "spm.decoder=vae and spm.decode_resolution=null, or train an SPM for this rendering (spm.source=init)"
            )
        return self


class SPOConfig(Section):
    """SPO fine-tuning (``spo train``); defaults are the paper's settings shared by SD-1.5 and SDXL."""

    # "spo": step-wise preference optimization (the paper). "dpo": the Diffusion-DPO baseline (Wallace et al.
    # 2023) on the prepared preference pairs, same LoRA, settings in the ``dpo`` section; ``spo train --method``.
    method: Literal["spo", "dpo"] = "spo"
    lora_rank: int = Field(4, ge=1)
    lora_alpha: float | None = Field(None, gt=0)  # None = rank (the paper)
    lr: float = Field(6e-5, gt=0)
    adam_beta1: float = Field(0.9, ge=0, lt=1)
    adam_beta2: float = Field(0.999, ge=0, lt=1)
    adam_weight_decay: float = Field(1e-4, ge=0)
    adam_eps: float = Field(1e-8, gt=0)
    max_grad_norm: float = Field(1.0, gt=0)
    lr_warmup_steps: int = Field(0, ge=0)  # linear warm-up, then constant (the paper: constant)
    num_candidates: int = Field(4, ge=2)  # k
    threshold: float = Field(0.3, ge=0, lt=1)
    beta: float = Field(10.0, gt=0)
    eps: float = Field(0.1, gt=0, lt=1)
    # Branching starts at step index divert_start_step and stops above kappa (on the nominal timestep,
    # t - steps_offset). At the paper's 20 steps the two rules agree (divert 4 = first t <= 750); at other step
    # counts they can branch from different timesteps than the official code, whose rule is the step index.
    divert_start_step: int = Field(4, ge=0)
    num_steps: int = Field(20, ge=1)
    # > 0: SPO needs stochastic DDIM steps (k distinct candidates, a defined log-probability).
    eta: float = Field(1.0, gt=0, le=1)
    cfg_scale: float = Field(5.0, ge=0)
    kappa: int = Field(750, ge=0, le=1000)
    # Lower end of the trained timestep range [min_timestep, kappa] (nominal t); steps below it are plain
    # (paper Table 8's [250-750]). 0 = the paper.
    min_timestep: int = Field(0, ge=0, le=1000)
    # Where sampling continues after a comparison: a uniformly random candidate (the paper), the winner or the
    # loser (Table 4's collapse ablations).
    continue_from: Literal["random", "winner", "loser"] = "random"
    # Which two candidates form the pair: the SPM's best and worst (the paper), or two distinct random ones
    # (Table 9), ordered by their SPM scores; either way kept only when the gap exceeds ``threshold``.
    pair_choice: Literal["best_worst", "random"] = "best_worst"
    # The step judge: the trained step-aware SPM (the paper), or "plain": the SPM's initial CLIP (spm.init)
    # with no step conditioning and no preference training on noisy images (Table 5's plain PickScore).
    step_judge: Literal["spm", "plain"] = "spm"
    num_inner_steps: int = Field(1, ge=1)
    # None = the official samplers' rule: SD-1.5 branches at the last step, SDXL (MSPO) never does (the chains
    # in progress take it). See spo.sampling.branches_at_last_step.
    branch_at_last_step: bool | None = None
    num_prompts: int | None = Field(None, ge=1)
    sample_batch_size: int = Field(10, ge=1)
    train_batch_size: int = Field(10, ge=1)
    grad_accum: int = Field(1, ge=1)
    num_epochs: int = Field(10, ge=1)
    train_cfg: bool = True
    mixed_precision: Literal["no", "fp16", "bf16"] = "fp16"
    gradient_checkpointing: bool = False
    allow_tf32: bool = True
    checkpoint_every: int = Field(100, ge=1)
    checkpoints_total_limit: int | None = Field(3, ge=1)
    max_consecutive_nonfinite: int = Field(5, ge=1)
    # A LoRA weight larger than this in magnitude means the run exploded (trained LoRAs stay well below 1):
    # the run fails instead of publishing it (spo evaluate refuses such a file too).
    max_lora_weight: float = Field(1000.0, gt=0)
    seed: int = 42
    resolution: int | None = Field(None, ge=8)  # None = model.resolution

    @model_validator(mode="after")
    def _steps_consistent(self) -> SPOConfig:
        if self.min_timestep > self.kappa:
            raise ValueError(f"min_timestep ({self.min_timestep}) must not exceed kappa ({self.kappa})")
        if self.divert_start_step >= self.num_steps:
            raise ValueError(
                f"divert_start_step ({self.divert_start_step}) must be smaller than num_steps ({self.num_steps})"
            )
        return self


class DPOConfig(Section):
    """The Diffusion-DPO baseline (``spo train --method dpo``; Wallace et al. 2023, arXiv 2311.12908), trained
    offline on the prepared SPM preference pairs (ties dropped) with the same LoRA as SPO (``spo.lora_rank``,
    ``spo.lora_alpha``). Defaults: the official launchers (shared/reference/paper.md §2c), per process."""

    # The launchers' --beta_dpo (the paper's good range is 2000-5000; its main SD-1.5 model used 2000).
    beta: float = Field(5000.0, gt=0)
    # The launchers' --learning_rate 1e-8 --scale_lr at 2048 pairs per step (a full-UNet fine-tune; a LoRA
    # usually wants more).
    lr: float = Field(2.048e-5, gt=0)
    adam_beta1: float = Field(0.9, ge=0, lt=1)
    adam_beta2: float = Field(0.999, ge=0, lt=1)
    adam_weight_decay: float = Field(1e-2, ge=0)  # the official train.py default
    adam_eps: float = Field(1e-8, gt=0)
    max_grad_norm: float = Field(1.0, gt=0)
    warmup_steps: int = Field(500, ge=0)  # linear warm-up, then constant (SD-1.5 launcher; SDXL: 200)
    max_steps: int = Field(2000, ge=1)  # optimizer steps
    # Pairs per UNet call and micro-batches per optimizer step, per process: a step takes
    # batch_size x grad_accum x processes pairs (launchers: 1 x 128 x 16 GPUs = 2048).
    batch_size: int = Field(1, ge=1)
    grad_accum: int = Field(128, ge=1)
    mixed_precision: Literal["no", "fp16", "bf16"] = "fp16"
    gradient_checkpointing: bool = False
    checkpoint_every: int = Field(500, ge=1)
    checkpoints_total_limit: int | None = Field(3, ge=1)
    max_consecutive_nonfinite: int = Field(5, ge=1)
    # Undecodable JPEGs: fail the run, or train without those pairs (masked, counted; see spm.on_bad_image).
    on_bad_image: Literal["fail", "skip"] = "fail"
    max_bad_pairs: int = Field(100, ge=0)
    seed: int = 42
    image_resolution: int | None = Field(None, ge=8)  # None = model.resolution


# The evaluation scorers (``eval.scorers``); spo/rewards maps each name to its loader.
SCORER_NAMES: tuple[str, ...] = (
    "toy_aesthetic",
    "spm",
    "clip",
    "pickscore",
    "aesthetic",
    "hpsv21",
    "imagereward",
)


class EvalConfig(Section):
    """``spo evaluate``: paired-seed generation and scoring (protocol and scorers: spo/stages/evaluate.py).

    Model references (``*_model``, ``*_processor``, ``*_weights``, ``lora``) follow spo/refs.py: a local path,
    ``org/name``, ``org/name:file`` or (``lora``) ``models:/name@alias``. A hub download is pinned by writing
    the revision into the reference: ``--set eval.pickscore_model=yuvalkirstain/PickScore_v1@<commit sha>``,
    ``--set eval.hps_weights=xswu/HPSv2@<sha>:HPS_v2.1_compressed.pt``; without one the hub's main branch is used.
    """

    # Image k of prompt p uses seed  eval.seed * 10**9 + p * 1000 + k  (hence at most 1000 per prompt).
    num_images_per_prompt: int = Field(4, ge=1, le=1000)
    num_prompts: int | None = Field(None, ge=1)  # None = all validation prompts (500 for Pick-a-Pic)
    num_steps: int = Field(20, ge=1)
    cfg_scale: float = Field(5.0, ge=0)
    eta: float = Field(0.0, ge=0, le=1)
    resolution: int | None = Field(None, ge=8)
    seed: int = Field(0, ge=0)
    batch_size: int = Field(8, ge=1)
    lora: str | None = None  # None = this run's models/spo/lora; else a path or hub id
    scorers: list[str] = ["pickscore", "hpsv21", "imagereward", "aesthetic", "clip", "spm"]
    # False: a requested scorer that cannot load (missing extra or weights) fails the stage. True: it is
    # skipped with a warning and listed under metrics.json "_protocol.skipped_scorers".
    skip_unavailable: bool = False
    bootstrap_samples: int = Field(2000, ge=100)
    pickscore_model: str = "yuvalkirstain/PickScore_v1"
    pickscore_processor: str = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
    clip_model: str = "openai/clip-vit-large-patch14"
    aesthetic_clip_model: str = "openai/clip-vit-large-patch14"
    # A local .pth state dict or "hub_id:filename"; the default is TRL's hub copy of LAION's
    # sac+logos+ava1-l14-linearMSE.pth.
    aesthetic_weights: str = "trl-lib/ddpo-aesthetic-predictor:aesthetic-model.pth"
    hps_model: str = "ViT-H-14"  # open_clip architecture the HPS weights belong to
    hps_weights: str = "xswu/HPSv2:HPS_v2.1_compressed.pt"
    imagereward_model: str = "THUDM/ImageReward"  # hub id (ImageReward.pt + med_config.json) or a local .pt
    # BERT uncased tokenizer ImageReward was trained with (hub id or a local folder with vocab.txt).
    imagereward_tokenizer: str = "google-bert/bert-base-uncased"
    grid_prompts: int = Field(8, ge=1)
    grid_seeds: int = Field(2, ge=1)  # images per prompt shown (base | SPO pairs) in reports/eval/grid.png

    @field_validator("scorers")
    @classmethod
    def _known_scorers(cls, v: list[str]) -> list[str]:
        unknown = [s for s in v if s not in SCORER_NAMES]
        if unknown:
            raise ValueError(f"unknown scorer(s) {unknown}; choose from {', '.join(SCORER_NAMES)}")
        if len(set(v)) != len(v):
            raise ValueError(f"scorers listed twice: {sorted({s for s in v if v.count(s) > 1})}")
        if not v:
            raise ValueError("list at least one scorer")
        return v


class RegistryConfig(Section):
    """MLflow registration and the promotion gate."""

    model_name: str | None = None  # None = "spo-<preset>"
    primary_metric: str = "pickscore"
    margin: float = Field(0.0, ge=0)
    require_ci_excludes_zero: bool = True
    # Copy a local base-model folder into every model version so that `models:/...` loads on any machine
    # (the tiny preset's base lives only in this checkout). Hub ids are always referenced, never copied;
    # leave this off for large local mirrors of real models.
    bundle_base: bool = False


class RuntimeConfig(Section):
    """How the frozen and trained networks run: kernels and layouts that change speed, not the algorithm.

    Outputs stay within float tolerance of the eager fp32 path (tests/unit/test_runtime.py states each bound).
    Attention is PyTorch SDPA in both diffusers and transformers by default (checked by the same tests).
    """

    # NHWC memory layout for the UNet and VAE convolutions (faster on tensor cores). None = on CUDA only.
    channels_last: bool | None = None
    # torch.compile the UNet, the VAE decoder and the SPM in place (nn.Module.compile: LoRA adapters added
    # later and toggled for the reference are traced as they are used). The first calls pay the compile time.
    compile: bool = False
    compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = "default"
    compile_backend: str = "inductor"  # any torch.compile backend ("aot_eager" compiles without codegen)
    # CPU only: frozen weights in bf16 and bf16 autocast over the fp32 trained parameters -- the code path of an
    # accelerator with model.dtype=bf16 and mixed_precision=bf16. It halves the frozen weights' memory (the real
    # SDXL architecture on a 24 GB host); fast only with AVX512-BF16 or AMX. Ignored on an accelerator.
    cpu_bf16: bool = False


class TrackingConfig(Section):
    enabled: bool = True
    experiment: str = "spo"
    tracking_uri: str | None = None  # None = $MLFLOW_TRACKING_URI or sqlite:///mlflow/mlflow.db
    log_system_metrics: bool = True


# Config keys whose values are model/data references (spo/refs.py), validated when a Config is built.
REF_KEYS: tuple[str, ...] = (
    "model.pretrained",
    "model.vae",
    "data.source",
    "spm.init",
    "spm.processor",
    "spm.relabel_model",
    "spm.tiny_decoder",
    "eval.lora",
    "eval.pickscore_model",
    "eval.pickscore_processor",
    "eval.clip_model",
    "eval.aesthetic_clip_model",
    "eval.aesthetic_weights",
    "eval.hps_weights",
    "eval.imagereward_model",
    "eval.imagereward_tokenizer",
)
# Reference key -> the key of its separately configured revision.
REVISION_KEYS: dict[str, str] = {"model.pretrained": "model.revision", "data.source": "data.revision"}


class Config(Section):
    preset: str = "sd15"
    paths: PathsConfig = PathsConfig()
    model: ModelConfig = ModelConfig()
    synthetic: SyntheticConfig = SyntheticConfig()
    data: DataConfig = DataConfig()
    base: BaseTrainConfig = BaseTrainConfig()
    spm: SPMConfig = SPMConfig()
    spo: SPOConfig = SPOConfig()
    dpo: DPOConfig = DPOConfig()
    eval: EvalConfig = EvalConfig()
    registry: RegistryConfig = RegistryConfig()
    tracking: TrackingConfig = TrackingConfig()
    runtime: RuntimeConfig = RuntimeConfig()

    @field_validator("preset")
    @classmethod
    def _known_preset(cls, v: str) -> str:
        if v not in PRESETS:
            raise ValueError(f"unknown preset {v!r}; choose one of {', '.join(PRESETS)}")
        return v

    @property
    def is_tiny(self) -> bool:
        return self.preset == "tiny"

    @property
    def registered_model_name(self) -> str:
        return self.registry.model_name or f"spo-{self.preset}"

    @property
    def spo_resolution(self) -> int:
        return self.spo.resolution or self.model.resolution

    @property
    def spm_resolution(self) -> int:
        return self.spm.image_resolution or self.model.resolution

    @property
    def eval_resolution(self) -> int:
        return self.eval.resolution or self.model.resolution

    @model_validator(mode="after")
    def _refs_parse(self) -> Config:
        """Every reference-valued key must parse (spo/refs.py); the error names the key."""
        for key in (*REF_KEYS, "spm.source"):
            if self._value(key) is None or (key == "spm.source" and self.spm.source == "init"):
                continue
            try:
                self.ref(key)
            except ConfigError as exc:
                msg = str(exc).removeprefix(f"{key}: ")
                raise PydanticCustomError("model_ref", "{msg}", {"key": key, "msg": msg}) from None
        return self

    def _value(self, key: str) -> Any:
        section, name = key.split(".", 1)
        return getattr(getattr(self, section), name)

    def ref(self, key_or_text: str | Path | ModelRef) -> ModelRef:
        """A reference-valued config key (``"model.pretrained"``, ``"eval.lora"``, ... :data:`REF_KEYS`, and
        ``"spm.source"`` for the part after ``pretrained:``) or any reference text, parsed by
        :meth:`spo.refs.ModelRef.parse` with relative paths rooted at ``paths.root``.

        ``model.pretrained`` and ``data.source`` carry ``model.revision`` / ``data.revision`` (a conflicting
        ``@revision`` in the reference itself is an error). The filesystem is looked at on every call: a stage
        may have created ``models/base`` since the config was built. Raises ConfigError naming the key.
        """
        if isinstance(key_or_text, ModelRef):
            return key_or_text
        key = str(key_or_text)
        if key not in REF_KEYS and key != "spm.source":
            try:
                return ModelRef.parse(key, root=self.paths.root)
            except RefError as exc:
                raise ConfigError(str(exc)) from None
        value = self._value(key)
        if key == "spm.source":
            if not str(value).startswith("pretrained:"):
                raise ConfigError(f"spm.source is {value!r}, not 'pretrained:<hub id or path>'")
            value = str(value).removeprefix("pretrained:")
        if value is None:
            raise ConfigError(f"{key} is not set")
        try:
            ref = ModelRef.parse(value, root=self.paths.root)
            if key in REVISION_KEYS:
                ref = ref.with_revision(self._value(REVISION_KEYS[key]))
        except RefError as exc:
            raise ConfigError(f"{key}: {exc}") from None
        return ref

    def resolve_ref(self, ref: str | Path | None) -> str | None:
        """A model/data reference from the config -> what loaders should open (compatibility wrapper).

        Relative paths are project paths: ``models/base`` means ``<paths.root>/models/base`` when that exists
        (or always, when written ``./models/base``), else a path relative to the working directory when that
        exists (returned as written). Anything else (``org/name``, ``org/name:file``, ``models:/...``) is
        returned unchanged, as are absolute paths (``~`` expanded). New code: :meth:`ref`.
        """
        if ref is None:
            return None
        text = str(ref)
        try:
            parsed = ModelRef.parse(text, root=self.paths.root)
        except RefError:  # malformed: what the path-only rule gave before ModelRef existed
            rooted = self.paths.root / Path(text).expanduser()
            return str(rooted) if rooted.exists() else text
        if parsed.is_local and parsed.anchor in ("absolute", "root"):
            return str(parsed.path)
        return text

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def with_overrides(self, *overrides: str) -> Config:
        """This config with ``--set``-style ``section.key=value`` overrides applied (validated as a whole)."""
        data = self.to_dict()
        for item in overrides:
            path, value = parse_override(item)
            _apply_override(data, path, value)
        try:
            return Config.model_validate(data)
        except ValidationError as exc:
            raise ConfigError(_format_validation_error(exc, "--set " + " ".join(overrides))) from None

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def flat(self) -> dict[str, Any]:
        """``section.key -> value`` for experiment trackers."""
        out: dict[str, Any] = {}

        def walk(prefix: str, node: Any) -> None:
            if isinstance(node, dict):
                for k, v in node.items():
                    walk(f"{prefix}.{k}" if prefix else k, v)
            else:
                out[prefix] = node

        walk("", self.to_dict())
        return out

    def section_hash(self, *sections: str) -> str:
        """Stable hash of the named sections (used as a cache key for the stage they configure)."""
        return json_digest({s: self.to_dict()[s] for s in sections})


def _load_yaml(text: str) -> Any:
    """YAML 1.2, as DVC reads and rewrites params.yaml: ``no`` stays a string and ``1e-4`` is a number
    (YAML 1.1 readers such as PyYAML turn an unquoted ``no`` into False and ``1e-4`` into a string)."""
    return _plain(YAML(typ="safe", pure=True).load(text))


def _plain(node: Any) -> Any:
    if isinstance(node, dict):
        return {str(k): _plain(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_plain(v) for v in node]
    return node


def preset_dict(name: str) -> dict[str, Any]:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    text = resources.files("spo.presets").joinpath(f"{name}.yaml").read_text()
    data = _load_yaml(text) or {}
    data["preset"] = name
    return data


def _deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like section.key=value (e.g. spo.lr=1e-4)")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {item!r} has an empty key")
    try:
        value = _load_yaml(raw) if raw.strip() else None
    except YAMLError as exc:
        raise ConfigError(f"override {item!r}: value is not valid YAML ({exc})") from exc
    return key.split("."), value


def _apply_override(data: dict[str, Any], path: list[str], value: Any) -> None:
    node = data
    for part in path[:-1]:
        nxt = node.setdefault(part, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"cannot set {'.'.join(path)}: {part!r} is a value, not a section")
        node = nxt
    node[path[-1]] = value


def _format_validation_error(exc: ValidationError, origin: str) -> str:
    lines = [f"invalid configuration ({origin}):"]
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = err["msg"]
        if err["type"] == "model_ref":  # Config._refs_parse: name the reference's own key
            lines.append(f"  - {err['ctx']['key']}: {err['ctx']['msg']}")
            continue
        if err["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling; `spo config` lists every key)"
        value = err.get("input")
        shown = "" if err["type"] == "extra_forbidden" or isinstance(value, dict) else f" (got {value!r})"
        lines.append(f"  - {loc}: {msg}{shown}")
    return "\n".join(lines)


def load_params_file(path: str | Path | None) -> dict[str, Any]:
    if path is None:
        return {}
    p = Path(path)
    if not p.exists():
        if str(path) == DEFAULT_PARAMS_FILE:  # no params.yaml here: the preset alone
            return {}
        raise ConfigError(f"params file {p} does not exist (pass an existing YAML file, or /dev/null for none)")
    if p.is_dir():
        raise ConfigError(f"params file {p} is a directory; pass a YAML file (e.g. params.yaml)")
    try:
        data = _load_yaml(p.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as exc:
        raise ConfigError(f"params file {p} is not a text file (not UTF-8: {exc.reason} at byte {exc.start})") from None
    except YAMLError as exc:
        raise ConfigError(f"{p} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{p} must hold a mapping of sections, not {type(data).__name__}")
    return data


def load_config(
    preset: str | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    params_file: str | Path | None = DEFAULT_PARAMS_FILE,
) -> Config:
    """Resolve a config. ``preset=None`` takes the params file's preset (or ``tiny`` without one)."""
    params = load_params_file(params_file)
    params_preset = params.get("preset")
    name = preset or params_preset or "tiny"
    data = preset_dict(name)
    origin = [f"preset {name}"]
    if params and params_preset in (None, name):
        data = _deep_merge(data, {k: v for k, v in params.items() if k != "preset"})
        origin.append(str(params_file))
    for item in overrides:
        path, value = parse_override(item)
        _apply_override(data, path, value)
    if overrides:
        origin.append("--set " + " ".join(overrides))
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(exc, " + ".join(origin))) from None
