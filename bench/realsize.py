"""Every stage once at the REAL architectures (random weights), on CPU, with the smallest work that still
exercises each code path -- the run issue #10 asked for. Not part of ``make test``.

    OMP_NUM_THREADS=2 .venv/bin/python bench/realsize.py --arch sd15 --resolution 256
    OMP_NUM_THREADS=2 .venv/bin/python bench/realsize.py --arch sdxl --resolution 512
    OMP_NUM_THREADS=1 .venv/bin/python bench/realsize.py --arch sd15 --small     # toy widths, ~2 min

What it does (``--work``, default /tmp/spo_realsize/<arch>-<res>):

1. builds the models with ``python -m spo.models.realsize`` (fp16 folders; reused when present): the SD-1.5
   or SDXL pipeline and a PickScore-shaped ViT-H/14 CLIP, used as ``spm.init`` / ``spm.processor``, as the
   relabelling model and (SD-1.5) as the ``pickscore`` scorer;
2. makes the data with the tiny world's generator (``spo.stages.synth.run(cfg, force=True)`` with
   ``synthetic.image_size`` = the resolution, a few rows) and ``spo.stages.prepare.run``;
3. runs ``train_spm`` (2 steps; Adafactor, as fp32 AdamW on the 1.3 B SPM does not fit 24 GB beside the
   base model), ``train_spo`` (1 iteration, 1 prompt, 4 DDIM steps, k = 2, threshold 0 so pairs are kept,
   gradient checkpointing on; SDXL: MSPO inner steps j = 2), ``evaluate`` (1 prompt x 2 images per model)
   and ``register`` -- each in its own subprocess, exactly as the CLI does:
   ``load_config(preset, --set overrides)`` + ``tracking.stage_tracker(cfg, stage)`` + ``stage.run(cfg)``,
   MLflow on a temporary sqlite store. SDXL runs with ``runtime.cpu_bf16`` (bf16 frozen weights, bf16
   autocast: the accelerator's mixed-precision path), SD-1.5 in fp32.

Per stage it records peak RSS (the child's ``ru_maxrss``), seconds, UNet batch rows, VAE decoder / encoder
rows and CLIP vision-tower rows (global forward hooks, so no stage internals are touched), selected numbers
of the stage's own report, every warning (``warnings`` and log records >= WARNING, deduplicated) and, on a
failure, the traceback summary. Writes ``<out>.json`` and ``<out>.md`` (default bench/realsize_<arch>).
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STAGES = ("synth", "prepare", "train_spm", "train_spo", "evaluate", "register")
LOGGERS = ("", "spo", "transformers", "diffusers", "accelerate", "peft", "mlflow", "py.warnings", "alembic")


# ------------------------------------------------------------------------------------------------------
# configuration
# ------------------------------------------------------------------------------------------------------
def overrides(arch: str, res: int, work: Path, models: Path, small: bool) -> list[str]:
    pipe, pick = models / arch, models / "pickscore"
    o = [
        f"paths.root={work}",
        f"model.pretrained={pipe}",
        f"model.resolution={res}",
        # data: the tiny world's generator at the model's resolution, a handful of rows
        "data.source=data/raw/pickapic_tiny",
        "data.num_train_prompts=2",
        "data.gx_jpeg_sample=4",
        "data.max_spm_train_pairs=4",
        "data.max_spm_val_pairs=1",
        f"synthetic.image_size={min(res, 512)}",
        "synthetic.train_rows=12",
        "synthetic.validation_rows=6",
        "synthetic.test_rows=2",
        "synthetic.unique_rows=2",
        "synthetic.train_shards=1",
        # SPM: PickScore-shaped ViT-H with adaLN, 2 steps of batch 1, accuracy at two timesteps
        f"spm.init={pick}",
        f"spm.processor={pick}",
        f"spm.relabel_model={pick}",
        "spm.max_steps=2",
        "spm.batch_size=1",
        "spm.warmup_steps=0",
        "spm.eval_timesteps=[0,501]",
        "spm.eval_every=1000",
        "spm.checkpoint_every=1000",
        "spm.gradient_checkpointing=true",
        # SPO: one iteration of one prompt, k = 2, every comparison kept
        "spo.num_steps=4",
        "spo.divert_start_step=1",
        "spo.num_candidates=2",
        "spo.threshold=0.0",
        "spo.num_prompts=1",
        "spo.sample_batch_size=1",
        "spo.train_batch_size=1",
        "spo.grad_accum=1",
        "spo.num_epochs=1",
        "spo.checkpoint_every=1000",
        "spo.gradient_checkpointing=true",
        # evaluation: 1 prompt x 2 images, base and LoRA
        "eval.num_prompts=1",
        "eval.num_images_per_prompt=2",
        "eval.num_steps=3",
        "eval.batch_size=2",
        "eval.grid_prompts=1",
        "eval.grid_seeds=1",
        "eval.bootstrap_samples=100",
        f"eval.pickscore_model={pick}",
        f"eval.pickscore_processor={pick}",
        "tracking.enabled=true",
        f"tracking.tracking_uri=sqlite:///{work}/mlflow/mlflow.db",
    ]
    if not small:
        # fp32 AdamW on the 1.3 B-parameter SPM needs 21 GB (weights, gradients, two moments) beside the base
        # model: over a 24 GB host. Adafactor's factored state is a few MB.
        o += ["spm.optimizer=adafactor", "spm.lr=1e-3"]
    if arch == "sdxl":
        # the separate (fp16-fix) VAE path; MSPO inner steps; no third ViT-H in memory at evaluation
        o += [f"model.vae={pipe}/vae", "spo.num_inner_steps=2", "eval.scorers=[spm]",
              "registry.primary_metric=spm"]
        if not small:
            # SDXL's 3.4 B frozen parameters are 13.9 GB in fp32: bf16 weights and autocast (the GPU's
            # mixed-precision path) leave room for the SPM.
            o += ["runtime.cpu_bf16=true"]
    else:
        o += ["eval.scorers=[spm,pickscore]", "registry.primary_metric=pickscore"]
    return o


# ------------------------------------------------------------------------------------------------------
# child: one stage, measured
# ------------------------------------------------------------------------------------------------------
class _Recorder:
    """Counts rows through the UNet / VAE / CLIP vision towers and records warnings."""

    def __init__(self):
        self.counts = collections.Counter()
        self.warnings: collections.Counter[str] = collections.Counter()

    def install(self):
        import logging
        import warnings

        import torch
        from diffusers import UNet2DConditionModel
        from diffusers.models.autoencoders.vae import Decoder, Encoder
        from transformers.models.clip.modeling_clip import CLIPTextEmbeddings, CLIPVisionEmbeddings

        kinds = (
            (UNet2DConditionModel, "unet_rows"),
            (Decoder, "vae_decode_rows"),
            (Encoder, "vae_encode_rows"),
            (CLIPVisionEmbeddings, "clip_vision_rows"),
            (CLIPTextEmbeddings, "clip_text_rows"),
        )

        def hook(module, args, out):
            for cls, name in kinds:
                if isinstance(module, cls):
                    x = args[0] if args else None
                    if torch.is_tensor(x):
                        self.counts[name] += int(x.shape[0])
                        if name == "unet_rows" and torch.is_grad_enabled():
                            self.counts["unet_rows_with_grad"] += int(x.shape[0])
                    break

        torch.nn.modules.module.register_module_forward_hook(hook)

        rec = self

        class Handler(logging.Handler):
            def emit(self, record):
                rec.warnings[f"{record.name}: {record.getMessage()}"[:400]] += 1

        handler = Handler(level=logging.WARNING)
        for name in LOGGERS:
            logging.getLogger(name).addHandler(handler)
        logging.captureWarnings(True)
        warnings.simplefilter("always")  # every warning reaches py.warnings (deduplicated in the report)


def _jsonable(obj):
    if dataclasses.is_dataclass(obj):
        return dataclasses.asdict(obj)
    return obj


def child(spec_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    rec = _Recorder()
    out: dict = {"stage": spec["stage"], "ok": False}
    start = time.perf_counter()
    try:
        import importlib

        import torch

        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
        rec.install()
        from spo import tracking
        from spo.config import load_config

        cfg = load_config(spec["preset"], spec["overrides"], params_file=None)
        stage = importlib.import_module(f"spo.stages.{spec['stage']}")
        kwargs = {"force": True} if spec["stage"] == "synth" else {}
        with tracking.stage_tracker(cfg, spec["stage"]):
            result = stage.run(cfg, **kwargs)
        out["result"] = json.loads(json.dumps(_jsonable(result), default=str))
        out["ok"] = True
    except BaseException as exc:  # noqa: BLE001 - the bench records every failure
        tb = traceback.extract_tb(exc.__traceback__)
        out["error"] = f"{type(exc).__name__}: {str(exc)[:2000]}"
        out["traceback"] = [f"{Path(f.filename).name}:{f.lineno} {f.name}: {f.line}" for f in tb[-12:]]
    out["seconds"] = round(time.perf_counter() - start, 1)
    out["peak_rss_gb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
    out["counts"] = dict(rec.counts)
    out["warnings"] = [{"message": m, "count": c} for m, c in rec.warnings.most_common()]
    Path(spec["result"]).write_text(json.dumps(out, indent=2))
    return 0 if out["ok"] else 1


# ------------------------------------------------------------------------------------------------------
# parent
# ------------------------------------------------------------------------------------------------------
def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = f"{REPO}{os.pathsep}{env.get('PYTHONPATH', '')}".rstrip(os.pathsep)
    env.setdefault("OMP_NUM_THREADS", "2")
    for k, v in {"HF_HUB_OFFLINE": "1", "DO_NOT_TRACK": "true", "MLFLOW_DISABLE_TELEMETRY": "true",
                 "TOKENIZERS_PARALLELISM": "false", "MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING": "false"}.items():
        env.setdefault(k, v)
    return env


def build_models(arch: str, models: Path, small: bool, log) -> list[dict]:
    rows = []
    for what in (arch, "pickscore"):
        folder = models / what
        if (folder / ("config.json" if what == "pickscore" else "model_index.json")).exists():
            continue
        cmd = [sys.executable, "-m", "spo.models.realsize", "--arch", what, "--out", str(folder)]
        if small:
            cmd.append("--small")
        log(f"building {what} -> {folder}")
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True)
        usage = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20
        row = {"stage": f"build {what}", "ok": proc.returncode == 0, "seconds": round(time.perf_counter() - t0, 1),
               "peak_rss_gb": round(usage, 2), "counts": {}, "warnings": []}
        if proc.returncode:
            row["error"] = proc.stderr[-2000:]
        rows.append(row)
        if proc.returncode:
            raise SystemExit(f"building {what} failed:\n{proc.stderr[-3000:]}")
    return rows


REPORT_KEYS = {
    "train_spm": ("reports/spm_metrics.json", ("steps", "pairs_seen", "train_pairs_per_s", "accuracy", "final_loss")),
    "train_spo": ("reports/spo_train.json", None),  # every unet_samples_* / pairs / comparisons number
    "evaluate": ("reports/eval/metrics.json", None),
}


def report_numbers(stage: str, work: Path) -> dict:
    if stage not in REPORT_KEYS:
        return {}
    rel, keys = REPORT_KEYS[stage]
    path = work / rel
    if not path.exists():
        return {}
    data = json.loads(path.read_text())
    if stage == "train_spo":
        return {k: v for k, v in data.items() if isinstance(v, (int, float)) and any(
            s in k for s in ("unet_samples", "pairs", "comparisons", "optimizer_steps", "seconds", "loss"))}
    if stage == "evaluate":
        return {k: {kk: v[kk] for kk in ("base_mean", "lora_mean", "diff_mean", "n_images") if kk in v}
                for k, v in data.items() if isinstance(v, dict) and not k.startswith("_")}
    return {k: data.get(k) for k in keys if k in data}


def run_stage(stage: str, preset: str, ovr: list[str], work: Path, log) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        spec = Path(tmp) / "spec.json"
        result = Path(tmp) / "result.json"
        spec.write_text(json.dumps({"stage": stage, "preset": preset, "overrides": ovr, "result": str(result)}))
        log(f"stage {stage} ...")
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, __file__, "--child", str(spec)], env=_env(),
                              capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if result.exists():
            row = json.loads(result.read_text())
        else:  # killed (OOM) or crashed before writing
            row = {"stage": stage, "ok": False, "seconds": round(wall, 1), "counts": {}, "warnings": [],
                   "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20, 2),
                   "error": f"child exited with {proc.returncode} without a result (killed? OOM?)",
                   "stderr_tail": proc.stderr[-3000:]}
    row["wall_seconds"] = round(wall, 1)
    row["report"] = report_numbers(stage, work)
    status = "ok" if row["ok"] else f"FAILED: {row.get('error', '')[:300]}"
    log(f"stage {stage}: {status} ({row['seconds']} s, peak RSS {row['peak_rss_gb']} GB)")
    return row


def markdown(meta: dict, rows: list[dict]) -> str:
    lines = [
        f"**{meta['arch']} at {meta['resolution']} px{' (--small toy widths)' if meta['small'] else ''}**, "
        f"{meta['threads']} torch threads, {meta['machine']}; `{meta['command']}`",
        "",
        "| stage | ok | s | peak RSS GB | UNet rows (grad) | VAE dec / enc rows | CLIP vision / text rows | "
        "warnings | notes |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        c = r.get("counts", {})
        n_warn = sum(w["count"] for w in r.get("warnings", []))
        notes = []
        if not r.get("ok"):
            notes.append(r.get("error", "")[:160].replace("|", "/").replace("\n", " "))
        rep = r.get("report") or {}
        for k in ("unet_samples_sampling", "unet_samples_training", "pairs_kept", "optimizer_steps",
                  "train_pairs_per_s", "steps"):
            if k in rep and rep[k] is not None:
                notes.append(f"{k}={rep[k]:.3g}" if isinstance(rep[k], float) else f"{k}={rep[k]}")
        lines.append(
            f"| {r['stage']} | {'yes' if r.get('ok') else '**no**'} | {r.get('seconds')} | {r.get('peak_rss_gb')} | "
            f"{c.get('unet_rows', 0)} ({c.get('unet_rows_with_grad', 0)}) | "
            f"{c.get('vae_decode_rows', 0)} / {c.get('vae_encode_rows', 0)} | "
            f"{c.get('clip_vision_rows', 0)} / {c.get('clip_text_rows', 0)} | {n_warn} | {'; '.join(notes)} |"
        )
    warned = [(r["stage"], w) for r in rows for w in r.get("warnings", [])]
    if warned:
        lines += ["", "Warnings (distinct, per stage):", ""]
        for stage, w in warned[:60]:
            msg = w["message"].replace("\n", " ")[:240]
            lines.append(f"- {stage} ×{w['count']}: {msg}")
    failed = [r for r in rows if not r.get("ok")]
    for r in failed:
        lines += ["", f"Failure in {r['stage']}: `{r.get('error', '')[:600]}`", ""]
        lines += [f"    {t}" for t in r.get("traceback", [])]
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--arch", choices=("sd15", "sdxl"), default="sd15")
    p.add_argument("--resolution", type=int, default=None, help="default 256 (sd15) / 512 (sdxl); 64 with --small")
    p.add_argument("--small", action="store_true", help="toy widths of the same architectures (develop the bench)")
    p.add_argument("--models", type=Path, default=None, help="model folders (default /tmp/spo_realsize/models[-small])")
    p.add_argument("--work", type=Path, default=None, help="paths.root of the run")
    p.add_argument("--out", type=Path, default=None, help="results prefix (default bench/realsize_<arch>[_small])")
    p.add_argument("--stages", default=",".join(STAGES), help="comma-separated subset, in order")
    args = p.parse_args()
    if args.child:
        return child(args.child)

    res = args.resolution or (64 if args.small else {"sd15": 256, "sdxl": 512}[args.arch])
    suffix = "-small" if args.small else ""
    models = args.models or Path(f"/tmp/spo_realsize/models{suffix}")
    work = args.work or Path(f"/tmp/spo_realsize/{args.arch}-{res}{suffix}")
    out = args.out or REPO / "bench" / f"realsize_{args.arch}{'_small' if args.small else ''}"
    work.mkdir(parents=True, exist_ok=True)

    def log(msg):
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)

    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
    mem = next((int(ln.split()[1]) for ln in open("/proc/meminfo") if ln.startswith("MemTotal")), 0) / 2**20
    meta = {
        "arch": args.arch, "resolution": res, "small": args.small,
        "threads": int(_env()["OMP_NUM_THREADS"]),
        "machine": f"{cpu}, {os.cpu_count()} CPUs, {mem:.0f} GiB RAM, Python {platform.python_version()}",
        "command": "OMP_NUM_THREADS={} python bench/realsize.py {}".format(_env()["OMP_NUM_THREADS"],
                                                                          " ".join(sys.argv[1:])),
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "models": str(models), "work": str(work),
    }
    rows = build_models(args.arch, models, args.small, log)
    ovr = overrides(args.arch, res, work, models, args.small)
    meta["overrides"] = ovr
    for stage in [s for s in args.stages.split(",") if s]:
        rows.append(run_stage(stage, args.arch, ovr, work, log))
        Path(f"{out}.json").write_text(json.dumps({"meta": meta, "stages": rows}, indent=2, default=str))
        Path(f"{out}.md").write_text(markdown(meta, rows))
        if not rows[-1]["ok"] and stage in ("synth", "prepare"):
            log("data stage failed; later stages need its output")
            break
    log(f"wrote {out}.json and {out}.md")
    return 0 if all(r.get("ok") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
