"""``spo evaluate``: base vs base + LoRA on the validation prompts, with paired seeds, scored and summarised.

Protocol (``cfg.eval``; the paper's: DDIM 20 steps, CFG 5, eta 0, the model's default resolution):

1. **Prompts**: ``data/prepared/prompts_val.txt`` (Pick-a-Pic v1 ``validation_unique`` for real presets), the
   first ``eval.num_prompts`` of them.
2. **Seeds**: image k of prompt p starts from the noise of ``torch.Generator("cpu").manual_seed(s)`` with
   ``s = eval.seed * 10**9 + p * 1000 + k`` (:func:`spo.generation.image_seed`): one generator per image, on
   the CPU, so neither the batch size, the number of GPUs nor the device changes an image's noise. The base
   and the LoRA images of a pair use the same seed.
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

The components live in the library: spo/generation.py (seeds, protocol, image cache, sampling),
spo/evaluation.py (scoring, statistics), spo/eval_report.py (report files), spo/models/lora.py (LoRA
resolution and loading). This module is the recipe.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from spo import tracking
from spo.errors import SPOError
from spo.eval_report import write_reports
from spo.evaluation import log_to_tracker, pair_table, preflight_scorers, score_pairs, summarise
from spo.generation import generate_pairs, load_prompts, make_jobs, pair_caches, protocol
from spo.models.lora import resolve_lora
from spo.pipeline_spec import artifact_path
from spo.results import StageResult
from spo.utils import get_logger, sha256_file

log = get_logger(__name__)


@dataclass
class EvaluateResult(StageResult):
    """``metrics`` / ``table`` / ``grid``: the report files; ``images``: generated (per side) and total pairs;
    ``scores``: per scorer the mean difference, its 95 % CI and the win rate; ``primary``: the metrics of
    ``registry.primary_metric`` (None when it was not evaluated). Under ``accelerate launch`` the other
    processes return only ``images`` (what they generated) and ``process_index`` (in ``extra``)."""

    stage: ClassVar[str] = "evaluate"
    headline: ClassVar[tuple[str, ...]] = ("primary", "images", "table")
    metrics: str | None = None
    table: str | None = None
    grid: str | None = None
    images: dict[str, Any] = field(default_factory=dict)
    scores: dict[str, dict[str, Any]] = field(default_factory=dict)
    primary: dict[str, Any] | None = None

    def __str__(self) -> str:  # `spo evaluate` prints its result: the JSON it printed as a dict
        return self.to_json().rstrip()


def run(cfg, lora: str | None = None) -> EvaluateResult:
    """Evaluate base vs base + LoRA (``lora``: path, hub id or ``models:/...``; default ``eval.lora`` or
    this run's models/spo/lora). Writes reports/eval/ (see the module docstring)."""
    from accelerate import PartialState

    from spo.rewards import resolve_local_refs

    cfg = resolve_local_refs(cfg)
    state = PartialState()
    prompts = load_prompts(cfg)
    jobs = make_jobs(prompts, cfg.eval.num_images_per_prompt, cfg.eval.seed)
    lora_ref = lora if lora is not None else cfg.eval.lora
    lora_file = resolve_lora(lora_ref, cfg)
    lora_sha = sha256_file(lora_file)
    skipped = preflight_scorers(cfg)

    proto = protocol(cfg)
    caches = pair_caches(cfg, lora_sha, proto)
    # Under `accelerate launch` every process draws its share of the images; the main one does the rest.
    mine = jobs[state.process_index :: state.num_processes]
    generated = generate_pairs(cfg, caches, mine, lora_file, state.device)
    state.wait_for_everyone()
    if not state.is_main_process:
        return EvaluateResult(
            images={"generated": generated, "total_pairs": len(jobs)},
            extra={"process_index": state.process_index},
        )
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
        "lora": str(lora_ref) if lora_ref is not None else str(artifact_path(cfg, "lora")),
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
    log_to_tracker(metrics)
    # Also as an MLflow image (the run page's image view); the file itself is attached with the reports.
    tracking.active().log_image(paths["eval_grid"], "eval_grid")

    primary = cfg.registry.primary_metric
    log.info("evaluation written to %s", artifact_path(cfg, "eval_reports"))
    return EvaluateResult(
        metrics=str(paths["eval_metrics"]),
        table=str(paths["eval_table"]),
        grid=str(paths["eval_grid"]),
        images={"generated": generated, "total_pairs": len(jobs)},
        scores={
            n: {k: m[k] for k in ("diff_mean", "diff_ci95", "win_rate")}
            for n, m in metrics.items()
            if n[0] != "_"
        },
        primary={"metric": primary, **metrics[primary]} if primary in metrics else None,
    )
