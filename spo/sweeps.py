"""``spo sweep <name>``: named variants x seeds of the training and evaluation stages, compared in one report.

A sweep file (``sweeps/<name>.yaml``) lists groups of variants, each variant a list of ``--set`` overrides and,
where the paper has one, its published number. Every (variant, seed) runs in its own workspace
``runs/sweeps/<sweep>/<group>/<variant>/seed<k>/`` whose ``data/`` and ``models/base`` link to this project's, so
the base model and the prepared data are shared, never rebuilt. The SPM is shared too, unless a variant changes
``spm.*``: then an SPM is trained once per distinct SPM config under ``runs/spm/<hash>/`` and shared by the seeds
(and by every variant with that config). Each workspace runs ``train_spo`` then ``evaluate``; a workspace whose
inputs and config are unchanged is not run again (``--force`` reruns). **Every variant is evaluated with this
project's SPM**, whatever judged its training, so SPM-score gains are comparable across variants.

Why not ``dvc exp run --queue``: a DVC experiment is a whole-pipeline copy of the repo in a temp workspace, so the
shared SPM / base would be re-resolved per experiment, the queue needs git commits and a celery worker, and its
table cannot pool seeds or put the paper's numbers beside ours. The workspaces here are still plain stage runs
(the same ``run(cfg)`` the CLI, DVC and Prefect call), each an MLflow run under one sweep parent run.

Outputs: ``reports/sweeps/<sweep>/table.md``, ``gains.png`` (gain with 95 % CI per variant, seeds pooled, and
per seed) and ``results.json``. Pooled CIs resample prompts (each prompt's paired difference averaged over all
seeds' images); the spread between training seeds is shown separately (per-seed gains, their SD).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from spo.config import Config, ConfigError, parse_override
from spo.errors import SPOError
from spo.utils import atomic_write_json, atomic_write_text, get_logger, hash_tree, json_digest

log = get_logger(__name__)

SWEEP_DIR = "sweeps"  # definitions, in the repository
RUNS_DIR = Path("runs")  # workspaces, under paths.root
# Sections a variant may change: the ones downstream of the shared data and base model.
VARIANT_SECTIONS = ("spm", "spo", "dpo", "eval")
DONE_FILE = "sweep_run.json"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Variant(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_.+-]+$")
    set: list[str] = []
    paper: float | None = None  # the paper's published value of ``paper_metric`` for this setting
    note: str = ""


class Group(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_.+-]+$")
    title: str = ""
    paper: str = ""  # where the published numbers come from
    variants: list[Variant]

    @field_validator("variants")
    @classmethod
    def _distinct(cls, v: list[Variant]) -> list[Variant]:
        names = [x.name for x in v]
        if len(set(names)) != len(names) or not names:
            raise ValueError(f"variant names must be distinct and at least one: {names}")
        return v


class SweepSpec(_Strict):
    description: str = ""
    seeds: list[int] = [0]
    # Each seed s is written into these keys (training randomness; the evaluation seeds stay paired).
    seed_keys: list[str] = ["spo.seed"]
    set: list[str] = []  # overrides for every variant
    metric: str = "toy_aesthetic"  # the scorer whose gain the table ranks
    paper_metric: str = ""  # what the ``paper`` numbers measure (e.g. "PickScore, SD-1.5")
    paper_base: float | None = None  # the paper's base-model value of paper_metric (gains are vs it)
    groups: list[Group]


def find_sweep(name: str, root: Path) -> Path:
    """``name`` as a file, or ``sweeps/<name>.yaml`` in the project root or the working directory."""
    candidates = [Path(name), root / SWEEP_DIR / f"{name}.yaml", Path(SWEEP_DIR) / f"{name}.yaml"]
    for path in candidates:
        if path.is_file():
            return path
    shipped = sorted(
        {p.stem for d in (root / SWEEP_DIR, Path(SWEEP_DIR)) if d.is_dir() for p in d.glob("*.yaml")}
    )
    raise ConfigError(
        f"no sweep {name!r} (looked for {', '.join(map(str, candidates[1:]))}); available: {shipped}"
    )


def load_sweep(path: Path) -> SweepSpec:
    from spo.config import _load_yaml

    try:
        spec = SweepSpec.model_validate(_load_yaml(path.read_text(encoding="utf-8")) or {})
    except ValidationError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    for group in spec.groups:
        for variant in group.variants:
            for item in [*spec.set, *variant.set]:
                key, _ = parse_override(item)
                if key[0] not in VARIANT_SECTIONS:
                    raise ConfigError(
                        f"{path}: {group.name}/{variant.name} sets {'.'.join(key)}; a sweep variant may change "
                        f"only {', '.join(VARIANT_SECTIONS)} (data and base model are shared by the sweep)"
                    )
    return spec


# ----------------------------------------------------------------------------------------------------------
# Workspaces
# ----------------------------------------------------------------------------------------------------------
def _link(target: Path, link: Path) -> None:
    """``link`` -> ``target`` (replacing an earlier link; never a real folder)."""
    link.parent.mkdir(parents=True, exist_ok=True)
    if link.is_symlink():
        link.unlink()
    elif link.exists():
        raise SPOError(
            f"{link} is a real folder, not a sweep link; remove it or rerun with a fresh runs/ folder"
        )
    os.symlink(target.resolve(), link, target_is_directory=True)


def _workspace(project: Config, root: Path, overrides: list[str], link: bool = True) -> Config:
    """A config rooted at ``root`` whose shared inputs are (with ``link``) links to the project's."""
    for name in ("data", "models/base") if link else ():
        if (project.paths.root / name).exists():
            _link(project.paths.root / name, root / name)
    from spo import tracking

    uri = tracking.tracking_uri(project)  # one store for the whole sweep
    return project.with_overrides(*overrides, f"paths.root={root}", f"tracking.tracking_uri={uri}")


def _changes_spm(cfg: Config, project: Config) -> bool:
    return cfg.to_dict()["spm"] != project.to_dict()["spm"]


@dataclass
class RunResult:
    group: str
    variant: str
    seed: int
    root: str
    cached: bool
    metrics: dict[str, Any]  # reports/eval/metrics.json
    train: dict[str, Any]  # reports/spo_train.json
    spm: dict[str, Any] | None  # the variant's own SPM's metrics, when it trained one


def _spm_for(project: Config, cfg: Config, base_key: str) -> tuple[Path, dict[str, Any] | None]:
    """The SPM that judges ``cfg``'s training: the project's, or one trained once per distinct spm config."""
    from spo.pipeline_spec import artifact_path

    if not _changes_spm(cfg, project):
        own = artifact_path(project, "spm_metrics")
        return artifact_path(project, "spm_model"), json.loads(own.read_text()) if own.exists() else None
    key = json_digest({"spm": cfg.to_dict()["spm"], "model": cfg.to_dict()["model"], "inputs": base_key}, 12)
    ws_root = (project.paths.root / RUNS_DIR / "spm" / key).resolve()
    spm_cfg = _workspace(project, ws_root, _variant_overrides(project, cfg, "spm"))
    done = ws_root / DONE_FILE
    if not done.exists():
        from spo import tracking
        from spo.stages import train_spm

        log.info("sweep: training an SPM variant in %s", ws_root)
        with tracking.stage_tracker(spm_cfg, "train_spm"):
            train_spm.run(spm_cfg)
        atomic_write_json(done, {"key": key})
    metrics_file = artifact_path(spm_cfg, "spm_metrics")
    metrics = json.loads(metrics_file.read_text()) if metrics_file.exists() else None
    return artifact_path(spm_cfg, "spm_model"), metrics


def _variant_overrides(project: Config, cfg: Config, *sections: str) -> list[str]:
    """``key=value`` overrides turning the project config into ``cfg`` on ``sections``."""
    flat_p, flat_c = project.flat(), cfg.flat()
    return [
        f"{k}={json.dumps(v)}"
        for k, v in flat_c.items()
        if k.split(".")[0] in sections and flat_p.get(k) != v
    ]


def run_one(
    project: Config,
    spec: SweepSpec,
    group: Group,
    variant: Variant,
    seed: int,
    name: str,
    base_key: str,
    force: bool,
    finished: dict[str, RunResult] | None = None,
    hashes: dict[Path, str] | None = None,
) -> RunResult:
    """One (variant, seed): train + evaluate in its workspace, unless an identical config already ran in this
    sweep (``finished``, by key: the paper's default recurs in every group) or in an earlier one (its done file)."""
    from spo import tracking
    from spo.pipeline_spec import artifact_path
    from spo.stages import evaluate, train_spo

    root = (
        project.paths.root / RUNS_DIR / "sweeps" / name / group.name / variant.name / f"seed{seed}"
    ).resolve()
    seeds = [f"{k}={seed}" for k in spec.seed_keys]
    cfg = _workspace(project, root, [*spec.set, *variant.set, *seeds], link=False)
    judge, spm_metrics = _spm_for(project, cfg, base_key)
    no_spm_judge = cfg.spo.step_judge == "plain" or cfg.spo.method == "dpo"
    if no_spm_judge:
        spm_metrics = None
    key = json_digest(
        {
            "config": {k: v for k, v in cfg.to_dict().items() if k not in ("paths", "tracking")},
            "inputs": base_key,
            "judge": _tree_hash(judge, hashes) if judge.exists() else None,
        }
    )
    done = root / DONE_FILE
    same = (finished or {}).get(key)
    if same is not None:
        cfg = _workspace(project, Path(same.root), [*spec.set, *variant.set, *seeds], link=False)
    else:
        _workspace(project, root, [], link=True)
    cached = same is not None or (
        not force and done.exists() and json.loads(done.read_text()).get("key") == key
    )
    label = f"{group.name}/{variant.name} seed{seed}"
    params = {"sweep.group": group.name, "sweep.variant": variant.name, "sweep.seed": seed}
    tags = {
        "spo.sweep": name,
        "spo.sweep.cached": str(cached).lower(),
        "spo.sweep.workspace": str(cfg.paths.root),
    }
    with tracking.group_run(cfg, label, tags) as run:
        run.log_params({**params, "sweep.overrides": " ".join(variant.set) or "(none)"})
        if not cached:
            done.unlink(missing_ok=True)
            if not no_spm_judge and judge.exists():
                _link(judge, root / "models" / "spm")
            with tracking.stage_tracker(cfg, "train_spo"):
                train_spo.run(cfg)
            # One judge for every evaluation, whatever judged the training.
            _link(artifact_path(project, "spm_model"), root / "models" / "spm")
            with tracking.stage_tracker(cfg, "evaluate"):
                evaluate.run(cfg)
            atomic_write_json(done, {"key": key, "finished": time.strftime("%Y-%m-%dT%H:%M:%S")})
        metrics = json.loads(artifact_path(cfg, "eval_metrics").read_text())
        train = json.loads(artifact_path(cfg, "spo_summary").read_text())
        run.log_metrics(_run_metrics(metrics, train))
    result = RunResult(
        group.name, variant.name, seed, str(cfg.paths.root), cached, metrics, train, spm_metrics
    )
    if finished is not None:
        finished.setdefault(key, result)
    return result


def _run_metrics(metrics: dict[str, Any], train: dict[str, Any]) -> dict[str, float]:
    out: dict[str, float] = {}
    for scorer, m in metrics.items():
        if scorer.startswith("_"):
            continue
        out[f"{scorer}/gain"] = m["diff_mean"]
        out[f"{scorer}/gain_ci95_low"], out[f"{scorer}/gain_ci95_high"] = m["diff_ci95"]
    for k in ("kept_fraction", "pairs_trained", "optimizer_steps"):
        if isinstance(train.get(k), int | float):
            out[f"train/{k}"] = float(train[k])
    out["train/unet_rows"] = float(unet_rows(train))
    return out


def unet_rows(train: dict[str, Any]) -> float:
    """UNet work of a training run in forward-row equivalents: rows without grad (sampling, the reference)
    count 1, rows with grad 3 (forward + backward ~ 2 forwards). SPO and Diffusion-DPO train the same UNet, so
    this is proportional to the UNet FLOPs each used."""
    return float(train.get("unet_rows_no_grad", 0)) + 3 * float(train.get("unet_rows_with_grad", 0))


# ----------------------------------------------------------------------------------------------------------
# Pooling and the report
# ----------------------------------------------------------------------------------------------------------
def pooled_gain(results: list[RunResult], scorer: str, n_boot: int = 2000, seed: int = 0) -> dict[str, Any]:
    """Seeds pooled: the mean paired difference over every seed's images, CI by resampling prompts."""
    import pandas as pd

    from spo.stats import cluster_bootstrap_means, percentile_ci

    frames = []
    for r in results:
        df = pd.read_parquet(Path(r.root) / "reports" / "eval" / "per_image.parquet")
        frames.append(
            pd.DataFrame({"prompt": df["prompt_index"], "diff": df[f"{scorer}_spo"] - df[f"{scorer}_base"]})
        )
    data = pd.concat(frames)
    per_seed = [r.metrics[scorer]["diff_mean"] for r in results]
    reps = cluster_bootstrap_means(data["diff"].to_numpy(float), data["prompt"].to_numpy(), n_boot, seed)
    return {
        "gain": float(data["diff"].mean()),
        "ci95": percentile_ci(reps),
        "per_seed": per_seed,
        "seed_sd": float(np.std(per_seed, ddof=1)) if len(per_seed) > 1 else None,
        "n_images": len(data),
    }


def summarize(spec: SweepSpec, results: list[RunResult]) -> dict[str, Any]:
    scorers = [s for s in results[0].metrics if not s.startswith("_")] if results else []
    groups = []
    for group in spec.groups:
        rows = []
        for variant in group.variants:
            runs = [r for r in results if r.group == group.name and r.variant == variant.name]
            if not runs:
                continue
            row = {
                "variant": variant.name,
                "set": variant.set,
                "seeds": [r.seed for r in runs],
                "gains": {s: pooled_gain(runs, s) for s in scorers},
                "kept_fraction": _mean(r.train.get("kept_fraction") for r in runs),
                "pairs_trained": _mean(r.train.get("pairs_trained") for r in runs),
                "unet_rows": _mean(unet_rows(r.train) for r in runs),
                "method": runs[0].train.get("method", "spo"),
                "paper": variant.paper,
                "paper_gain": None
                if variant.paper is None or spec.paper_base is None
                else variant.paper - spec.paper_base,
                "spm_accuracy_t0": _spm_acc_t0(runs[0].spm),
                "note": variant.note,
            }
            rows.append(row)
        if rows:
            groups.append(
                {
                    "name": group.name,
                    "title": group.title,
                    "paper": group.paper,
                    "rows": rows,
                    "ordering": _ordering(rows, spec.metric),
                }
            )
    return {
        "metric": spec.metric,
        "paper_metric": spec.paper_metric,
        "paper_base": spec.paper_base,
        "seeds": spec.seeds,
        "groups": groups,
    }


def _mean(values) -> float | None:
    vals = [float(v) for v in values if isinstance(v, int | float)]
    return float(np.mean(vals)) if vals else None


def _spm_acc_t0(spm_metrics: dict[str, Any] | None) -> float | None:
    if not spm_metrics:
        return None
    acc = spm_metrics.get("accuracy", {})
    value = acc.get("0", acc.get(0)) if isinstance(acc, dict) else None
    return float(value) if isinstance(value, int | float) else None


def _ordering(rows: list[dict[str, Any]], metric: str) -> dict[str, Any]:
    ours = (
        [r["variant"] for r in sorted(rows, key=lambda r: -r["gains"][metric]["gain"])]
        if metric in rows[0]["gains"]
        else []
    )
    with_paper = [r for r in rows if r["paper"] is not None]
    paper = [r["variant"] for r in sorted(with_paper, key=lambda r: -r["paper"])]
    ours_paper = [v for v in ours if v in paper]
    return {
        "ours": ours,
        "paper": paper,
        "same_best": bool(paper) and bool(ours_paper) and ours_paper[0] == paper[0],
        "same_order": bool(paper) and ours_paper == paper,
    }


def _fmt(x: float | None, digits: int = 3) -> str:
    return "—" if x is None else f"{x:+.{digits}f}"


def _with_ci(d: dict[str, Any] | None) -> str:
    return f"{_fmt(d['gain'])} [{_fmt(d['ci95'][0])}, {_fmt(d['ci95'][1])}]" if d else "—"


def _plain(x: float | None, spec: str) -> str:
    return "—" if x is None else format(x, spec)


def _executed(summary: dict[str, Any]) -> int:
    return sum(not r["cached"] for r in summary.get("runs", []))


def render_table(name: str, spec: SweepSpec, summary: dict[str, Any], seconds: float) -> str:
    metric = summary["metric"]
    lines = [f"# Sweep `{name}`", "", spec.description.strip(), ""]
    lines.append(
        f"Gains are SPO-LoRA − base on paired seeds ({metric} and the SPM score; the SPM is this project's for "
        f"every variant), pooled over seeds {summary['seeds']} with a 95 % CI that resamples prompts; 'per seed' "
        "lists each training seed's gain. Judge acc. t=0: the validation accuracy on clean images of the SPM "
        "that judged the variant's training (none for the plain judge and DPO). The paper column is the published "
        f"{spec.paper_metric or 'number'} and its gain over the paper's base ({spec.paper_base}). "
        "UNet rows: training UNet work in forward-row equivalents (no-grad rows + 3 x rows with grad). "
        f"This call: {seconds / 60:.1f} min, {_executed(summary)} of {len(summary.get('runs', []))} runs "
        "executed (the others reused an identical finished run)."
    )
    for group in summary["groups"]:
        lines += ["", f"## {group['name']}: {group['title']}", ""]
        if group["paper"]:
            lines += [f"Paper: {group['paper']}", ""]
        lines.append(
            f"| variant | {metric} gain [95 % CI] | per seed | SPM-score gain [95 % CI] | judge acc. t=0 | kept "
            "| pairs | UNet rows | paper | paper gain |"
        )
        lines.append("|---|---|---|---|---|---|---|---|---|---|")
        for r in group["rows"]:
            g = r["gains"].get(metric, {})
            cells = [
                r["variant"],
                _with_ci(g),
                ", ".join(_fmt(x) for x in g.get("per_seed", [])),
                _with_ci(r["gains"].get("spm")),
                _plain(r["spm_accuracy_t0"], ".3f"),
                _plain(r["kept_fraction"], ".2f"),
                _plain(r["pairs_trained"], ".0f"),
                _plain(r["unet_rows"], ".0f"),
                _plain(r["paper"], ""),
                _fmt(r["paper_gain"], 2),
            ]
            lines.append("| " + " | ".join(cells) + " |")
        o = group["ordering"]
        if o["paper"]:
            lines += [
                "",
                f"Ordering by gain — ours: {' > '.join(o['ours'])}; paper: {' > '.join(o['paper'])}. "
                f"Same best: {'yes' if o['same_best'] else 'no'}; same order: {'yes' if o['same_order'] else 'no'}.",
            ]
    return "\n".join(lines) + "\n"


def plot_gains(summary: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = summary["groups"]
    metric = summary["metric"]
    # At least 4.8 inches wide: the title must fit over a one-group sweep.
    width = max(3.2 * max(len(groups), 1), 4.8)
    fig, axes = plt.subplots(1, max(len(groups), 1), figsize=(width, 3.4), squeeze=False)
    for ax, group in zip(axes[0], groups, strict=False):
        rows = [r for r in group["rows"] if metric in r["gains"]]
        for i, r in enumerate(rows):
            g = r["gains"][metric]
            ax.errorbar(
                [i],
                [g["gain"]],
                yerr=[[g["gain"] - g["ci95"][0]], [g["ci95"][1] - g["gain"]]],
                fmt="o",
                capsize=4,
                color="C0",
            )
            ax.scatter([i + 0.15] * len(g["per_seed"]), g["per_seed"], s=10, color="C1", zorder=3)
        ax.axhline(0, color="grey", lw=0.8)
        ax.set_xticks(range(len(rows)), [r["variant"] for r in rows], rotation=30, ha="right", fontsize=8)
        ax.set_title(group["name"], fontsize=9)
    axes[0][0].set_ylabel(f"{metric} gain over the base")
    fig.suptitle("seeds pooled with 95 % CI (blue); each training seed (orange)", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------------------
# The sweep
# ----------------------------------------------------------------------------------------------------------
def _tree_hash(path: Path, hashes: dict[Path, str] | None) -> str:
    """hash_tree, once per folder per sweep call (a real SPM is gigabytes; every run's key names its judge)."""
    path = Path(path).resolve()
    if hashes is None:
        return hash_tree(path)
    if path not in hashes:
        hashes[path] = hash_tree(path)
    return hashes[path]


def _shared_inputs_key(project: Config, hashes: dict[Path, str] | None = None) -> str:
    from spo.pipeline_spec import artifact_path

    missing = [a for a in ("prepared", "base_model", "spm_model") if not artifact_path(project, a).exists()]
    needed = [a for a in missing if not (a == "base_model" and not project.ref("model.pretrained").is_local)]
    if needed:
        raise SPOError(
            f"the sweep shares this project's {', '.join(needed)}, which do not exist yet "
            f"({', '.join(str(artifact_path(project, a)) for a in needed)}). Run `make run` (or `spo pipeline`) first."
        )
    return json_digest(
        {
            a: _tree_hash(artifact_path(project, a), hashes)
            for a in ("prepared", "base_model", "spm_model")
            if artifact_path(project, a).exists()
        }
    )


def run_sweep(
    project: Config, name: str, only: list[str] | None = None, force: bool = False
) -> dict[str, Any]:
    """Run sweep ``name`` (a file or ``sweeps/<name>.yaml``) on the project ``project``; returns the summary."""
    from spo import tracking
    from spo.progress import tqdm

    path = find_sweep(name, project.paths.root)
    spec = load_sweep(path)
    sweep_name = path.stem
    if only:
        unknown = sorted(set(only) - {g.name for g in spec.groups})
        if unknown:
            raise ConfigError(
                f"--only {unknown}: not a group of {path} ({', '.join(g.name for g in spec.groups)})"
            )
        spec = spec.model_copy(update={"groups": [g for g in spec.groups if g.name in only]})
    hashes: dict[Path, str] = {}
    base_key = _shared_inputs_key(project, hashes)
    jobs = [(g, v, s) for g in spec.groups for v in g.variants for s in spec.seeds]
    log.info(
        "sweep %s: %d variants x %d seeds = %d runs",
        sweep_name,
        len(jobs) // len(spec.seeds),
        len(spec.seeds),
        len(jobs),
    )
    started = time.time()
    out_dir = project.paths.root / "reports" / "sweeps" / sweep_name
    results: list[RunResult] = []
    tags = {"spo.sweep": sweep_name, "spo.sweep.file": str(path)}
    with tracking.group_run(project, f"sweep {sweep_name}", tags) as parent:
        parent.log_params(
            {
                "sweep.name": sweep_name,
                "sweep.seeds": spec.seeds,
                "sweep.groups": [g.name for g in spec.groups],
            }
        )
        finished: dict[str, RunResult] = {}
        for group, variant, seed in tqdm(jobs, desc=f"sweep {sweep_name}", unit="run"):
            results.append(
                run_one(project, spec, group, variant, seed, sweep_name, base_key, force, finished, hashes)
            )
        seconds = time.time() - started
        summary = {"name": sweep_name, **summarize(spec, results)}
        summary["runs"] = [
            {"group": r.group, "variant": r.variant, "seed": r.seed, "root": r.root, "cached": r.cached}
            for r in results
        ]
        summary["wall_time_s"] = round(seconds, 1)
        table = render_table(sweep_name, spec, summary, seconds)
        atomic_write_text(out_dir / "table.md", table)
        atomic_write_json(out_dir / "results.json", summary)
        plot_gains(summary, out_dir / "gains.png")
        metrics = {}
        for group in summary["groups"]:
            for r in group["rows"]:
                for scorer, g in r["gains"].items():
                    metrics[f"{group['name']}.{r['variant']}/{scorer}/gain"] = g["gain"]
                    metrics[f"{group['name']}.{r['variant']}/{scorer}/gain_ci95_low"] = g["ci95"][0]
                    metrics[f"{group['name']}.{r['variant']}/{scorer}/gain_ci95_high"] = g["ci95"][1]
        parent.log_metrics(metrics)
        for f in ("table.md", "results.json", "gains.png"):
            parent.log_artifact(out_dir / f, "sweep")
    summary["table_markdown"] = table
    log.info("sweep %s done in %.1f min: %s", sweep_name, seconds / 60, out_dir / "table.md")
    return summary
