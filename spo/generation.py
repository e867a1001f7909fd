"""Paired-seed image generation: the seed rule, the protocol, a resumable PNG cache, batched sampling.

The evaluation (``spo evaluate``) and ``spo generate`` draw images through these, so an evaluation image can
be reproduced from its seed.

* **Seeds**: image k of prompt p starts from the noise of ``torch.Generator("cpu").manual_seed(s)`` with
  ``s = eval.seed * 10**9 + p * 1000 + k`` (:func:`image_seed`): one generator per image, on the CPU, so
  neither the batch size, the number of GPUs nor the device changes an image's noise.
* **Cache** (:class:`ImageCache`): each PNG under ``data/eval_images/<label>-<key>/`` where ``key`` hashes
  the model fingerprint and the :func:`protocol`; the file name holds the prompt index, a prompt hash and
  the seed. A ``manifest.jsonl`` and an ``info.json`` describe the folder.
"""

from __future__ import annotations

import gc
import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from spo.errors import SPOError
from spo.pipeline_spec import artifact_path
from spo.utils import atomic_write_bytes, atomic_write_json, get_logger, json_digest, weight_dtype

log = get_logger(__name__)

SEED_PROMPT_STRIDE = 1000
SEED_BASE_STRIDE = 10**9
IMAGE_DIR_LABELS = ("base", "spo")
MANIFEST_NAME = "manifest.jsonl"
INFO_NAME = "info.json"


# -- protocol and seeds ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Job:
    """One image of a pair: prompt ``prompt_index``, image ``image_index``, generated from ``seed``."""

    prompt_index: int
    image_index: int
    prompt: str
    seed: int


def image_seed(eval_seed: int, prompt_index: int, image_index: int) -> int:
    """The documented seed rule: ``eval_seed * 10**9 + prompt_index * 1000 + image_index``."""
    if (
        not 0 <= image_index < SEED_PROMPT_STRIDE
        or not 0 <= prompt_index < SEED_BASE_STRIDE // SEED_PROMPT_STRIDE
    ):
        raise ValueError(f"prompt {prompt_index} / image {image_index} outside the seed rule's range")
    return eval_seed * SEED_BASE_STRIDE + prompt_index * SEED_PROMPT_STRIDE + image_index


def make_jobs(prompts: Sequence[str], images_per_prompt: int, eval_seed: int) -> list[Job]:
    return [
        Job(p, k, prompt, image_seed(eval_seed, p, k))
        for p, prompt in enumerate(prompts)
        for k in range(images_per_prompt)
    ]


def protocol(cfg) -> dict[str, Any]:
    """Everything besides the model and the seed that determines an image."""
    return {
        "arch": cfg.model.arch,
        "scheduler": "DDIM",
        "num_steps": cfg.eval.num_steps,
        "cfg_scale": cfg.eval.cfg_scale,
        "eta": cfg.eval.eta,
        "resolution": cfg.eval_resolution,
        "dtype": cfg.model.dtype,
    }


def base_fingerprint(model_cfg) -> dict[str, Any]:
    """Identity of the base model: its reference, plus a stamp of the files when it is a local folder.

    The stamp covers names, sizes and modification times (not contents: hashing a 5 GB folder on every run is
    not worth it); any rewrite of the model changes it.
    """
    ref = str(model_cfg.pretrained)
    fp: dict[str, Any] = {"pretrained": ref, "revision": model_cfg.revision, "vae": model_cfg.vae}
    path = Path(ref)
    if path.exists():
        files = sorted(p for p in path.rglob("*") if p.is_file())
        fp["stamp"] = json_digest(
            [(str(p.relative_to(path)), p.stat().st_size, p.stat().st_mtime_ns) for p in files]
        )
    return fp


# -- prompts ---------------------------------------------------------------------------------------------
def load_prompts(cfg) -> list[str]:
    """The first ``eval.num_prompts`` validation prompts (``prompts_val``, written by ``spo prepare``)."""
    from spo.data.pickapic import read_prompts

    path = artifact_path(cfg, "prompts_val")
    if not path.exists():
        raise SPOError(f"no validation prompts at {path}. Run `spo prepare` first (it writes {path.name}).")
    prompts = list(read_prompts(path))
    if cfg.eval.num_prompts is not None:
        prompts = prompts[: cfg.eval.num_prompts]
    if not prompts:
        raise SPOError(f"{path} holds no prompts; re-run `spo prepare`.")
    return prompts


# -- image cache -----------------------------------------------------------------------------------------
class ImageCache:
    """PNGs of one (model, protocol), keyed by prompt and seed, plus a manifest."""

    def __init__(self, root: Path, label: str, model: dict[str, Any], proto: dict[str, Any]):
        self.label = label
        self.model = model
        self.protocol = proto
        self.dir = Path(root) / f"{label}-{json_digest({'model': model, 'protocol': proto})}"

    def path(self, job: Job) -> Path:
        prompt_hash = hashlib.sha256(job.prompt.encode()).hexdigest()[:10]
        return self.dir / f"p{job.prompt_index:05d}-{prompt_hash}-s{job.seed}.png"

    def missing(self, jobs: Sequence[Job]) -> list[Job]:
        return [j for j in jobs if not self.path(j).exists()]

    def save(self, job: Job, image) -> None:
        atomic_write_bytes(
            self.path(job), png_bytes(image, {"prompt": job.prompt, "seed": job.seed, **self.protocol})
        )

    def write_manifest(self, jobs: Sequence[Job]) -> Path:
        """Describe the folder: ``info.json`` (model, protocol) and one JSON line per image of ``jobs``."""
        atomic_write_json(
            self.dir / INFO_NAME, {"label": self.label, "model": self.model, "protocol": self.protocol}
        )
        old = self.dir / MANIFEST_NAME
        entries: dict[str, dict] = {}
        if old.exists():
            for line in old.read_text().splitlines():
                if line.strip():
                    entry = json.loads(line)
                    entries[entry["file"]] = entry
        for job in jobs:
            entries[self.path(job).name] = {"file": self.path(job).name, **asdict(job)}
        text = "".join(json.dumps(e) + "\n" for e in sorted(entries.values(), key=lambda e: e["file"]))
        atomic_write_bytes(old, text.encode())
        return old


def pair_caches(cfg, lora_sha256: str, proto: dict[str, Any] | None = None) -> dict[str, ImageCache]:
    """The base and the base + LoRA caches of this config (same protocol; the LoRA's hash in the key)."""
    proto = protocol(cfg) if proto is None else proto
    root = artifact_path(cfg, "eval_images")
    base_fp = base_fingerprint(cfg.model)
    return {
        "base": ImageCache(root, "base", base_fp, proto),
        "spo": ImageCache(root, "spo", {**base_fp, "lora_sha256": lora_sha256}, proto),
    }


def png_bytes(image, info: dict[str, Any]) -> bytes:
    """PNG with the generation settings as text chunks (prompt, seed, protocol), so a file explains itself."""
    import io

    from PIL.PngImagePlugin import PngInfo

    meta = PngInfo()
    for key, value in info.items():
        meta.add_text(f"spo:{key}", str(value))
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=meta)
    return buf.getvalue()


# -- generation ------------------------------------------------------------------------------------------
@torch.no_grad()
def sample_images(pipe, prompts: Sequence[str], seeds: Sequence[int], proto: dict[str, Any]) -> list:
    """One PIL image per (prompt, seed), each from its own CPU generator (batching does not change them)."""
    generators = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
    out = pipe(
        prompt=list(prompts),
        num_inference_steps=proto["num_steps"],
        guidance_scale=proto["cfg_scale"],
        eta=proto["eta"],
        height=proto["resolution"],
        width=proto["resolution"],
        generator=generators,
        output_type="pil",
    )
    return out.images


def generate_missing(
    pipe, cache: ImageCache, jobs: Sequence[Job], proto: dict[str, Any], batch_size: int
) -> int:
    """Generate the images of ``jobs`` that ``cache`` lacks; returns how many were generated."""
    from spo.progress import tqdm

    todo = cache.missing(jobs)
    if not todo:
        return 0
    cache.dir.mkdir(parents=True, exist_ok=True)
    with tqdm(total=len(todo), desc=f"generate {cache.label}", unit="img") as bar:
        for i in range(0, len(todo), batch_size):
            chunk = todo[i : i + batch_size]
            images = sample_images(pipe, [j.prompt for j in chunk], [j.seed for j in chunk], proto)
            for job, image in zip(chunk, images, strict=True):
                cache.save(job, image)
            bar.update(len(chunk))
    return len(todo)


def generate_pairs(
    cfg, caches: dict[str, ImageCache], jobs: Sequence[Job], lora_file: Path, device
) -> dict[str, int]:
    """Fill both caches for ``jobs``: base images first, then the LoRA is loaded into the same pipeline.

    Returns how many images each side generated (0 for those already cached)."""
    from spo.models.diffusion import load_pipeline
    from spo.models.lora import check_lora_weights, load_lora_into_pipeline

    generated = {"base": 0, "spo": 0}
    if not any(cache.missing(jobs) for cache in caches.values()):
        log.info("all %d image pairs already generated; reusing them", len(jobs))
        return generated
    if caches["spo"].missing(jobs):  # before any base image is generated: a broken LoRA fails at once
        check_lora_weights(lora_file, cfg.spo.max_lora_weight)
    proto = protocol(cfg)
    pipe = load_pipeline(
        cfg.model, device=device, dtype=weight_dtype(cfg, device)
    )
    generated["base"] = generate_missing(pipe, caches["base"], jobs, proto, cfg.eval.batch_size)
    if caches["spo"].missing(jobs):
        load_lora_into_pipeline(pipe, lora_file, max_lora_weight=cfg.spo.max_lora_weight)
        generated["spo"] = generate_missing(pipe, caches["spo"], jobs, proto, cfg.eval.batch_size)
    del pipe
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    log.info(
        "generated %d base and %d LoRA images; reused %d and %d",
        generated["base"],
        generated["spo"],
        len(jobs) - generated["base"],
        len(jobs) - generated["spo"],
    )
    return generated
