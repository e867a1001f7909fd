"""``spo evaluate``: base vs base + LoRA on the validation prompts, with paired seeds, scored and summarised.

Protocol (``cfg.eval``; the paper's: DDIM 20 steps, CFG 5, eta 0, the model's default resolution):

1. **Prompts**: ``data/prepared/prompts_val.txt`` (Pick-a-Pic v1 ``validation_unique`` for real presets), the
   first ``eval.num_prompts`` of them.
2. **Seeds**: image k of prompt p starts from the noise of ``torch.Generator("cpu").manual_seed(s)`` with
   ``s = eval.seed * 10**9 + p * 1000 + k`` (:func:`image_seed`): one generator per image, on the CPU, so
   neither the batch size, the number of GPUs nor the device changes an image's noise. The base and the LoRA
   images of a pair use the same seed.
3. **Generation** with the stock diffusers pipeline (what users run), batched, resumable: each PNG is cached
   under ``data/eval_images/<base|spo>-<key>/`` where ``key`` hashes the model fingerprint (base model ref +
   content stamp, LoRA file sha256) and the protocol, and the file name holds the prompt index, a prompt hash
   and the seed. Existing PNGs are reused; a ``manifest.jsonl`` per folder lists them. Base images are
   generated before the LoRA is loaded, so one pipeline serves both. Under ``accelerate launch`` each process
   generates its share of the images; the main process scores and reports.
4. **Scoring** of the PNGs as saved (uint8, like any user's image) by every scorer in ``eval.scorers``.
5. **Statistics** (spo/stats.py): per scorer the base and SPO means, the paired mean difference with a
   prompt-level bootstrap 95 % CI, and the win rate (ties count half) with its CI.

Outputs (``reports/eval/``, replaced atomically): ``metrics.json`` (scorer entries at top level, protocol under
``_protocol``), ``per_image.parquet``, ``table.md`` (with the papers' numbers for the preset), ``grid.png``,
``diffs.png`` and ``diffs.csv``.
"""

from __future__ import annotations

import gc
import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from spo import tracking
from spo.errors import MissingExtraError, ModelLoadError, NonFiniteError, SPOError
from spo.utils import (
    atomic_dir,
    atomic_write_bytes,
    atomic_write_json,
    get_logger,
    json_digest,
    sha256_file,
    torch_dtype,
)

log = get_logger(__name__)

SEED_PROMPT_STRIDE = 1000
SEED_BASE_STRIDE = 10**9
IMAGE_DIR_LABELS = ("base", "spo")


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
    from spo.data.pickapic import read_prompts

    path = cfg.paths.prepared / "prompts_val.txt"
    if not path.exists():
        raise SPOError(
            f"no validation prompts at {path}. Run `spo prepare` first (it writes prompts_val.txt)."
        )
    prompts = list(read_prompts(path))
    if cfg.eval.num_prompts is not None:
        prompts = prompts[: cfg.eval.num_prompts]
    if not prompts:
        raise SPOError(f"{path} holds no prompts; re-run `spo prepare`.")
    return prompts


# -- LoRA ------------------------------------------------------------------------------------------------
def resolve_lora(ref: str | None, cfg) -> Path:
    """A LoRA reference -> the local diffusers-format ``.safetensors`` file.

    ``None``: this run's ``models/spo/lora``. Otherwise a file, a folder, ``models:/name@alias`` (MLflow
    registry), a hub id (the repo's ``pytorch_lora_weights.safetensors`` or its only ``.safetensors``) or
    ``hub_id:filename``.
    """
    from spo.models.lora import LORA_WEIGHT_NAME, resolve_lora_file

    if ref is None:
        if not cfg.paths.lora.exists():
            raise SPOError(
                f"no LoRA at {cfg.paths.lora}: run `spo train` first, or evaluate another one with "
                "--lora PATH|HUB_ID|models:/NAME@ALIAS."
            )
        return resolve_lora_file(cfg.paths.lora)
    if ref.startswith("models:/"):
        return resolve_lora_file(tracking.resolve_lora_uri(ref, cfg))
    local = Path(ref).expanduser()
    if local.exists():
        if local.is_dir() and not (local / LORA_WEIGHT_NAME).exists():
            candidates = sorted(local.glob("*.safetensors"))
            if len(candidates) == 1:
                return candidates[0]
        return resolve_lora_file(local)
    return _hub_lora(ref)


def _hub_lora(ref: str) -> Path:
    from spo.models.lora import LORA_WEIGHT_NAME
    from spo.rewards import resolve_weights_file, split_hub_ref

    repo, filename = split_hub_ref(ref)
    if repo.count("/") != 1:
        raise ModelLoadError(f"no LoRA file or folder at {ref!r}, and it is not a hub id (owner/name).")
    if filename:
        return resolve_weights_file(ref, "LoRA")
    from huggingface_hub import snapshot_download

    try:
        folder = Path(snapshot_download(repo, allow_patterns=["*.safetensors"]))
    except Exception as exc:
        raise ModelLoadError(
            f"could not get the LoRA {repo!r} from the hub ({type(exc).__name__}: {exc}). With HF_HUB_OFFLINE=1 it "
            f"must already be cached (huggingface-cli download {repo}), or pass a local folder."
        ) from exc
    files = sorted(folder.rglob("*.safetensors"))
    preferred = [f for f in files if f.name == LORA_WEIGHT_NAME]
    if preferred or len(files) == 1:
        return (preferred or files)[0]
    raise ModelLoadError(
        f"hub repo {repo!r} holds {len(files)} .safetensors files ({', '.join(f.name for f in files[:5])}); "
        f"pick one with --lora {repo}:FILENAME"
    )


def load_lora(pipe, lora_file: Path, adapter_name: str = "spo") -> None:
    """Stock ``load_lora_weights``, refusing a file that put nothing into the UNet (wrong architecture)."""
    try:
        pipe.load_lora_weights(str(lora_file.parent), weight_name=lora_file.name, adapter_name=adapter_name)
    except (ValueError, KeyError, RuntimeError, OSError) as exc:
        raise ModelLoadError(
            f"could not load the LoRA {lora_file} into the {type(pipe).__name__}: {exc}"
        ) from exc
    if adapter_name not in pipe.get_list_adapters().get("unet", []):
        raise ModelLoadError(
            f"the LoRA {lora_file} has no UNet weights for this {type(pipe).__name__}; was it trained for another "
            "base model (model.arch / model.pretrained)?"
        )


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
            self.dir / "info.json", {"label": self.label, "model": self.model, "protocol": self.protocol}
        )
        old = self.dir / "manifest.jsonl"
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
    from tqdm.auto import tqdm

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


# -- scoring ---------------------------------------------------------------------------------------------
def score_files(
    scorer, paths: Sequence[Path], prompts: Sequence[str], batch_size: int, desc: str
) -> np.ndarray:
    from PIL import Image
    from tqdm.auto import tqdm

    out = []
    for i in tqdm(range(0, len(paths), batch_size), desc=desc, unit="batch", leave=False):
        images = []
        for p in paths[i : i + batch_size]:
            with Image.open(p) as im:
                images.append(im.convert("RGB"))
        out.append(scorer(images, list(prompts[i : i + batch_size])).numpy().astype(np.float64))
    return np.concatenate(out)


def score_pairs(
    cfg, names: Sequence[str], table, device
) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], dict[str, str]]:
    """Scores of the base and SPO images of every pair by each scorer; (scores, skipped scorer -> reason)."""
    from spo.rewards import get_scorer

    scores: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    skipped: dict[str, str] = {}
    prompts = table["prompt"].tolist()
    for name in names:
        try:
            scorer = get_scorer(name, cfg, device)
        except (MissingExtraError, ModelLoadError) as exc:
            if not cfg.eval.skip_unavailable:
                raise
            log.warning("skipping scorer %s (eval.skip_unavailable=true): %s", name, exc)
            skipped[name] = str(exc)
            continue
        pair = tuple(
            score_files(
                scorer, table[f"{side}_file"].tolist(), prompts, cfg.eval.batch_size, f"{name} {side}"
            )
            for side in IMAGE_DIR_LABELS
        )
        for side, values in zip(IMAGE_DIR_LABELS, pair, strict=True):
            if not np.isfinite(values).all():
                raise NonFiniteError(
                    f"scorer {name} returned NaN/inf for {int((~np.isfinite(values)).sum())} {side} images"
                )
        scores[name] = pair  # type: ignore[assignment]
        del scorer
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return scores, skipped


# -- reports ---------------------------------------------------------------------------------------------
def _fmt(x: float) -> str:
    return f"{x:.5g}"


def markdown_table(cfg, metrics: dict[str, Any], info: dict[str, Any]) -> str:
    from spo.rewards.published import COLUMNS, published_for

    lines = [
        f"# Evaluation: base vs base + LoRA (preset `{cfg.preset}`)",
        "",
        f"- base model: `{info['base_model']}`; LoRA: `{info['lora']}` (sha256 {info['lora_sha256'][:12]})",
        f"- {info['num_prompts']} prompts x {info['images_per_prompt']} images, DDIM {info['num_steps']} steps, "
        f"CFG {info['cfg_scale']}, eta {info['eta']}, {info['resolution']} px; seed of image k of prompt p = "
        f"{info['seed']}*10^9 + p*1000 + k, the same for base and LoRA",
        f"- 95 % CIs: prompt-level (cluster) bootstrap, {info['bootstrap_samples']} resamples; win rate = share "
        "of (prompt, seed) pairs where the LoRA scores higher, ties count half",
        "",
        "| scorer | base | SPO | diff (SPO - base) | 95 % CI of diff | win rate | 95 % CI of win rate | n pairs |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, m in metrics.items():
        if name.startswith("_"):
            continue
        lo, hi = m["diff_ci95"]
        wlo, whi = m["win_rate_ci95"]
        sig = " *" if lo > 0 or hi < 0 else ""
        lines.append(
            f"| {name} | {_fmt(m['base_mean'])} | {_fmt(m['spo_mean'])} | {_fmt(m['diff_mean'])}{sig} | "
            f"[{_fmt(lo)}, {_fmt(hi)}] | {m['win_rate']:.3f} | [{wlo:.3f}, {whi:.3f}] | {m['n']} |"
        )
    lines += ["", "`*`: the 95 % CI of the difference excludes 0."]
    if info.get("skipped_scorers"):
        lines += ["", "Skipped (eval.skip_unavailable): " + ", ".join(info["skipped_scorers"])]
    rows = published_for(cfg.preset)
    lines += ["", "## Published numbers", ""]
    if not rows:
        lines.append(
            "None: the tiny world is synthetic. `toy_aesthetic` is its ground truth (the hidden score that "
            "labelled the training pairs)."
        )
        return "\n".join(lines) + "\n"
    header = ["source", "model", *COLUMNS]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for side, label in (("base_mean", "base"), ("spo_mean", "SPO (LoRA)")):
        cells = [_fmt(metrics[c][side]) if c in metrics else "-" for c in COLUMNS]
        lines.append(f"| **this run** | {label} | " + " | ".join(cells) + " |")
    for row in rows:
        lines.append(
            f"| {row['source']} | {row['model']} | " + " | ".join(_fmt(row[c]) for c in COLUMNS) + " |"
        )
    lines += [
        "",
        "Pick-a-Pic v1 validation_unique (500 prompts), DDIM 20 steps, CFG 5 unless noted. SPO's `HPSV2` column is "
        "listed as HPSv2.1 (as LPO files it). LPO's script scores effectively one image per prompt and uses CFG 7.5 "
        "for the SD-1.5 base. The published numbers for one checkpoint differ by 0.2-0.4 PickScore between "
        "protocols: compare differences, not only levels. Source: shared/reference/paper.md §1a, §5a.",
    ]
    return "\n".join(lines) + "\n"


def _label_font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType
        return ImageFont.load_default()


def image_grid(table, n_prompts: int, n_seeds: int, resolution: int):
    """Rows = prompts; per seed a (base, SPO) pair of the same seed side by side; a caption column on the left."""
    import textwrap

    from PIL import Image, ImageDraw

    tile = max(96, min(256, resolution))
    prompts = sorted(table["prompt_index"].unique())[:n_prompts]
    seeds = sorted(table["image_index"].unique())[:n_seeds]
    caption_w, header_h, gap = 220, 24, 4
    width = caption_w + len(seeds) * (2 * tile + gap)
    height = header_h + len(prompts) * tile
    grid = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(grid)
    font = _label_font(12)
    for s, k in enumerate(seeds):
        x = caption_w + s * (2 * tile + gap)
        draw.text((x + 4, 6), f"base, image {k}", fill="black", font=font)
        draw.text((x + tile + 4, 6), f"SPO, image {k}", fill="black", font=font)
    resample = Image.NEAREST if resolution < tile else Image.BICUBIC
    for r, p in enumerate(prompts):
        rows = table[table["prompt_index"] == p]
        y = header_h + r * tile
        text = "\n".join(textwrap.wrap(rows["prompt"].iloc[0], 32)[: max(1, tile // 16)])
        draw.multiline_text((4, y + 4), text, fill="black", font=font)
        for s, k in enumerate(seeds):
            row = rows[rows["image_index"] == k]
            if row.empty:
                continue
            x = caption_w + s * (2 * tile + gap)
            for j, side in enumerate(IMAGE_DIR_LABELS):
                with Image.open(row[f"{side}_file"].iloc[0]) as im:
                    grid.paste(im.convert("RGB").resize((tile, tile), resample), (x + j * tile, y))
    return grid


def diff_plot(table, metrics: dict[str, Any], path: Path) -> None:
    """Per scorer: violin of per-prompt mean differences, with the mean and its 95 % CI."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from spo.stats import group_means

    names = [n for n in metrics if not n.startswith("_")]
    fig, axes = plt.subplots(1, len(names), figsize=(2.6 * len(names) + 0.6, 3.6), squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        per_prompt = group_means(table[f"{name}_spo"] - table[f"{name}_base"], table["prompt_index"])
        if np.ptp(per_prompt) > 0:
            ax.violinplot(per_prompt, showextrema=False)
        ax.scatter(np.full(len(per_prompt), 1.0), per_prompt, s=4, alpha=0.3, color="gray")
        m = metrics[name]
        lo, hi = m["diff_ci95"]
        ax.errorbar(
            [1.0],
            [m["diff_mean"]],
            yerr=[[m["diff_mean"] - lo], [hi - m["diff_mean"]]],
            fmt="o",
            color="C3",
            capsize=6,
            label="mean, 95 % CI",
        )
        ax.axhline(0.0, color="black", lw=0.8, ls="--")
        ax.set_title(f"{name}\nwin {m['win_rate']:.2f}", fontsize=9)
        ax.set_xticks([])
    axes[0][0].set_ylabel("SPO - base (per-prompt mean)")
    axes[0][-1].legend(loc="lower right", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_reports(cfg, table, metrics: dict[str, Any]) -> dict[str, Path]:
    """Everything under reports/eval/, written into a temp folder that replaces the old one at the end."""
    import pandas as pd

    info = metrics["_protocol"]
    dest = cfg.paths.eval_reports
    with atomic_dir(dest) as tmp:
        atomic_write_json(tmp / "metrics.json", metrics)
        root = Path(cfg.paths.root).resolve()
        stored = table.copy()
        for side in IMAGE_DIR_LABELS:
            stored[f"{side}_file"] = [_relative(p, root) for p in stored[f"{side}_file"]]
        stored.to_parquet(tmp / "per_image.parquet", index=False)
        (tmp / "table.md").write_text(markdown_table(cfg, metrics, info))
        rows = [
            {
                "scorer": n,
                "diff_mean": m["diff_mean"],
                "ci_low": m["diff_ci95"][0],
                "ci_high": m["diff_ci95"][1],
                "win_rate": m["win_rate"],
            }
            for n, m in metrics.items()
            if not n.startswith("_")
        ]
        pd.DataFrame(rows).to_csv(tmp / "diffs.csv", index=False)
        image_grid(table, cfg.eval.grid_prompts, cfg.eval.grid_seeds, cfg.eval_resolution).save(
            tmp / "grid.png"
        )
        diff_plot(table, metrics, tmp / "diffs.png")
    return {
        name: dest / name
        for name in ("metrics.json", "per_image.parquet", "table.md", "grid.png", "diffs.png", "diffs.csv")
    }


def _relative(path: str | Path, root: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(root))
    except ValueError:
        return str(path)


# -- the stage -------------------------------------------------------------------------------------------
def run(cfg, lora: str | None = None) -> dict[str, Any]:
    """Evaluate base vs base + LoRA (``lora``: path, hub id or ``models:/...``; default ``eval.lora`` or
    this run's models/spo/lora). Returns a summary; writes reports/eval/ (see the module docstring)."""
    from accelerate import PartialState

    from spo.rewards import resolve_local_refs

    cfg = resolve_local_refs(cfg)
    state = PartialState()
    prompts = load_prompts(cfg)
    jobs = make_jobs(prompts, cfg.eval.num_images_per_prompt, cfg.eval.seed)
    lora_ref = lora if lora is not None else cfg.eval.lora
    lora_file = resolve_lora(lora_ref, cfg)
    lora_sha = sha256_file(lora_file)
    skipped = _preflight_scorers(cfg)

    proto = protocol(cfg)
    base_fp = base_fingerprint(cfg.model)
    caches = {
        "base": ImageCache(cfg.paths.eval_images, "base", base_fp, proto),
        "spo": ImageCache(cfg.paths.eval_images, "spo", {**base_fp, "lora_sha256": lora_sha}, proto),
    }
    # Under `accelerate launch` every process draws its share of the images; the main one does the rest.
    mine = jobs[state.process_index :: state.num_processes]
    generated = _generate(cfg, caches, mine, lora_file, state.device)
    state.wait_for_everyone()
    if not state.is_main_process:
        return {"process_index": state.process_index, "generated": generated}
    for cache in caches.values():
        cache.write_manifest(jobs)

    table = pair_table(jobs, caches)
    scores, late_skips = score_pairs(
        cfg, [n for n in cfg.eval.scorers if n not in skipped], table, state.device
    )
    skipped.update(late_skips)
    if not scores:
        raise SPOError("none of eval.scorers could run (all skipped as unavailable; see the warnings above)")
    metrics = summarise(cfg, table, scores)
    metrics["_protocol"] = {
        "preset": cfg.preset,
        "base_model": str(cfg.model.pretrained),
        "lora": str(lora_ref) if lora_ref is not None else str(cfg.paths.lora),
        "lora_sha256": lora_sha,
        "num_prompts": len(prompts),
        "images_per_prompt": cfg.eval.num_images_per_prompt,
        **{k: proto[k] for k in ("num_steps", "cfg_scale", "eta", "resolution")},
        "seed": cfg.eval.seed,
        "bootstrap_samples": cfg.eval.bootstrap_samples,
        "scorers": list(scores),
        "skipped_scorers": sorted(skipped),
    }
    paths = write_reports(cfg, table, metrics)
    _log_to_tracker(metrics)

    summary = {
        "metrics": str(paths["metrics.json"]),
        "table": str(paths["table.md"]),
        "grid": str(paths["grid.png"]),
        "images": {"generated": generated, "total_pairs": len(jobs)},
        "scores": {
            n: {k: m[k] for k in ("diff_mean", "diff_ci95", "win_rate")}
            for n, m in metrics.items()
            if n[0] != "_"
        },
    }
    primary = cfg.registry.primary_metric
    if primary in metrics:
        summary["primary"] = {"metric": primary, **metrics[primary]}
    log.info("evaluation written to %s", cfg.paths.eval_reports)
    return summary


def _preflight_scorers(cfg) -> dict[str, str]:
    """Check every requested scorer before generating; returns the skipped ones (eval.skip_unavailable)."""
    from spo.rewards import check_scorer

    skipped: dict[str, str] = {}
    for name in cfg.eval.scorers:
        try:
            check_scorer(name, cfg)
        except (MissingExtraError, ModelLoadError) as exc:
            if not cfg.eval.skip_unavailable:
                raise
            log.warning("skipping scorer %s (eval.skip_unavailable=true): %s", name, exc)
            skipped[name] = str(exc)
    return skipped


def _generate(
    cfg, caches: dict[str, ImageCache], jobs: Sequence[Job], lora_file: Path, device
) -> dict[str, int]:
    """Fill both caches for ``jobs``: base images first, then the LoRA is loaded into the same pipeline."""
    from spo.models.diffusion import load_pipeline

    generated = {"base": 0, "spo": 0}
    if not any(cache.missing(jobs) for cache in caches.values()):
        log.info("all %d image pairs already generated; reusing them", len(jobs))
        return generated
    proto = protocol(cfg)
    pipe = load_pipeline(
        cfg.model, device=device, dtype=torch_dtype(cfg.model.dtype, torch.device(device).type)
    )
    generated["base"] = generate_missing(pipe, caches["base"], jobs, proto, cfg.eval.batch_size)
    if caches["spo"].missing(jobs):
        load_lora(pipe, lora_file)
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


def pair_table(jobs: Sequence[Job], caches: dict[str, ImageCache]):
    """One row per pair: the job's fields and the two image files."""
    import pandas as pd

    table = pd.DataFrame([asdict(j) for j in jobs])
    for side, cache in caches.items():
        table[f"{side}_file"] = [str(cache.path(j)) for j in jobs]
    return table


def summarise(cfg, table, scores: dict[str, tuple[np.ndarray, np.ndarray]]) -> dict[str, Any]:
    """Add the score columns to ``table``; the per-scorer metrics.json entries."""
    from spo.stats import paired_summary

    metrics: dict[str, Any] = {}
    for name, (base_scores, spo_scores) in scores.items():
        table[f"{name}_base"] = base_scores
        table[f"{name}_spo"] = spo_scores
        metrics[name] = paired_summary(
            base_scores,
            spo_scores,
            table["prompt_index"].to_numpy(),
            cfg.eval.bootstrap_samples,
            cfg.eval.seed,
        )
    return metrics


def _log_to_tracker(metrics: dict[str, Any]) -> None:
    tracker = tracking.active()
    info = metrics["_protocol"]
    # A prefix of its own: the stage's tracker already logged the config's eval.* keys, and MLflow refuses to
    # log a param twice with another value (eval.resolution: null there, the resolved 32 here).
    tracker.log_params({f"eval_protocol.{k}": v for k, v in info.items() if not isinstance(v, (list, dict))})
    flat: dict[str, float] = {}
    for name, m in metrics.items():
        if name.startswith("_"):
            continue
        for key in ("base_mean", "spo_mean", "diff_mean", "win_rate"):
            flat[f"eval/{name}/{key}"] = m[key]
        flat[f"eval/{name}/diff_ci95_low"], flat[f"eval/{name}/diff_ci95_high"] = m["diff_ci95"]
        flat[f"eval/{name}/win_rate_ci95_low"], flat[f"eval/{name}/win_rate_ci95_high"] = m["win_rate_ci95"]
    # The report files are attached by the stage's tracker (spo.tracking.stage_reports).
    tracker.log_metrics(flat)
