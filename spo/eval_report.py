"""The evaluation's report files (``reports/eval/``, replaced atomically as one folder).

``metrics.json`` (scorer entries at top level, protocol under ``_protocol``), ``per_image.parquet`` (image
paths relative to ``paths.root``), ``table.md`` (with the papers' numbers for the preset), ``grid.png``
(prompts x seeds of (base, SPO) tiles), ``diffs.png`` (per-prompt differences per scorer) and ``diffs.csv``.
File names come from the artifact catalog (spo/pipeline_spec.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from spo.generation import IMAGE_DIR_LABELS
from spo.pipeline_spec import artifact_path
from spo.utils import atomic_dir, atomic_write_json

# The files of reports/eval/, by artifact name.
REPORT_ARTIFACTS = (
    "eval_metrics",
    "eval_headline",
    "eval_per_image",
    "eval_table",
    "eval_grid",
    "eval_diffs_plot",
    "eval_diffs",
)


def _fmt(x: float) -> str:
    return f"{x:.5g}"


# Scorer -> the eval key naming its model (the others follow `<scorer>_model`).
_SCORER_MODEL_KEY = {"aesthetic": "aesthetic_clip_model"}


def stand_in_scorers(cfg) -> dict[str, str]:
    """Scorers whose model is one the project built under models/base (the tiny preset's CLIP standing in
    for PickScore / CLIP), by name -> model reference."""
    out = {}
    for name in cfg.eval.scorers:
        ref = getattr(cfg.eval, _SCORER_MODEL_KEY.get(name, f"{name}_model"), None)
        if not isinstance(ref, str) or "://" in ref or ref.startswith("models:/"):
            continue
        path = Path(ref) if Path(ref).is_absolute() else Path(cfg.paths.root) / ref
        if path.resolve().is_relative_to(Path(cfg.paths.base_model).resolve()):
            out[name] = ref
    return out


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
    stand_ins = stand_in_scorers(cfg)
    for name, m in metrics.items():
        if name.startswith("_"):
            continue
        lo, hi = m["diff_ci95"]
        wlo, whi = m["win_rate_ci95"]
        sig = " *" if lo > 0 or hi < 0 else ""
        lines.append(
            f"| {name}{' †' if name in stand_ins else ''} | {_fmt(m['base_mean'])} | {_fmt(m['spo_mean'])} | {_fmt(m['diff_mean'])}{sig} | "
            f"[{_fmt(lo)}, {_fmt(hi)}] | {m['win_rate']:.3f} | [{wlo:.3f}, {whi:.3f}] | {m['n']} |"
        )
    lines += ["", "`*`: the 95 % CI of the difference excludes 0."]
    if stand_ins & metrics.keys():
        models = ", ".join(f"`{name}` on `{ref}`" for name, ref in sorted(stand_ins.items()) if name in metrics)
        lines += [
            "",
            f"`†`: stand-in scorer ({models}): a model this project built, not the scorer's published weights. "
            "Its numbers say how the tiny base model's own CLIP sees the images, not human preference; a "
            "'worse' here is not a regression. `toy_aesthetic` (the world's ground truth) and `spm` are the "
            "scores that show whether SPO worked.",
        ]
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
    """Everything under reports/eval/, written into a temp folder that replaces the old one at the end.

    Returns the written files by artifact name (``eval_metrics``, ``eval_table``, ...)."""
    import pandas as pd

    info = metrics["_protocol"]
    dest = artifact_path(cfg, "eval_reports")
    files = {name: artifact_path(cfg, name) for name in REPORT_ARTIFACTS}
    with atomic_dir(dest) as tmp:

        def out(name: str) -> Path:
            return tmp / files[name].relative_to(dest)

        atomic_write_json(out("eval_metrics"), metrics)
        root = Path(cfg.paths.root).resolve()
        stored = table.copy()
        for side in IMAGE_DIR_LABELS:
            stored[f"{side}_file"] = [_relative(p, root) for p in stored[f"{side}_file"]]
        stored.to_parquet(out("eval_per_image"), index=False)
        out("eval_table").write_text(markdown_table(cfg, metrics, info))
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
        pd.DataFrame(rows).to_csv(out("eval_diffs"), index=False)
        # What `dvc metrics show` / `dvc exp show` print: a few columns per scorer, not the whole report.
        headline = {r.pop("scorer"): {k: round(float(v), 4) for k, v in r.items()} for r in rows}
        atomic_write_json(out("eval_headline"), headline)
        image_grid(table, cfg.eval.grid_prompts, cfg.eval.grid_seeds, cfg.eval_resolution).save(
            out("eval_grid")
        )
        diff_plot(table, metrics, out("eval_diffs_plot"))
    return files


def _relative(path: str | Path, root: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(root))
    except ValueError:
        return str(path)
