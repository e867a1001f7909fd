"""The one-command GPU check (issue #10 item 3): real SD-1.5 (512 px) and SDXL (1024 px) architectures with
random weights, on one GPU, inside a fixed time budget. Run it through ``bench/gpu/check.sh`` (which installs
the carried wheels first); ``--dry-run`` runs every section at toy sizes on the CPU in seconds (``make test``).

Sections, in order (each has a time share; one that cannot start inside the budget is recorded as
``"skipped: time budget"``, a failing one as ``"error: ..."``, and the rest still run):

* ``env``: GPU, versions, and the measured bf16 matmul rate (the ceiling MFU is also quoted against);
* ``sd15_spo`` / ``sdxl_spo``: SPO iterations of the preset's recipe with every comparison kept (ties too, so
  the pair count is known): sampling vs training seconds, pairs per second, training FLOPs per pair counted
  with ``torch.utils.flop_counter`` on a real optimizer step, training-phase MFU, peak GPU memory, and the
  share of comparisons whose candidates got the same SPM score;
* ``sd15_eval`` / ``sdxl_eval``: evaluation images per second (``spo.generation.sample_images``: DDIM, CFG,
  VAE decode, PIL) and SPM scoring images per second;
* ``spm_train``: SPM (PickScore-shaped ViT-H/14 with adaLN) training pairs per second on SD-1.5 x̂0 images;
* ``sd15_agreement`` / ``sdxl_agreement``: the same pairs through ``SPOTrainer.pair_losses`` in fp32, under
  bf16 autocast (fp32 weights) and with bf16 frozen weights: differences of the log-probs, log-ratios and loss
  (the fp32 reference runs with TF32 off; LoRA B is perturbed so that policy and reference differ).

Precision: one ``Accelerator(mixed_precision="no")`` serves every section (accelerate cannot change its mixed
precision inside a process, and the agreement section needs fp32), and bf16 is applied as accelerate's bf16
mode applies it, with ``torch.autocast(..., bfloat16)`` around sampling and training. The diffusion and
scorer weights are bf16 (``model.dtype=bf16``), the LoRA fp32. ``--dry-run --bf16`` runs that arithmetic on
the CPU (the dry run itself is fp32, which the test uses: its "bf16" variants must then agree exactly).

Writes ``gpu_check.json`` (after every section, so a killed run keeps what it measured) and ``gpu_check.md``
under ``--out`` (default ``$OUT`` or ./gpu_check_out).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import math
import os
import platform
import resource
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

T0 = time.perf_counter()  # the budget counts imports too

import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

# Packages the lent GPU does not have and that must never be needed here (device KINDS.md); diffusers and
# pydantic travel as wheels, these do not.
NOT_ON_DEVICE = ("mlflow", "prefect", "dvc", "great_expectations", "open_clip")
PROMPTS = [
    "a red fox in the snow, photograph",
    "an astronaut riding a horse on mars",
    "a bowl of ramen, studio lighting",
    "a watercolor painting of a lighthouse",
    "a futuristic city at night, neon",
    "a cat wearing a tiny hat",
    "a mountain lake at sunrise",
    "a portrait of an old sailor, oil painting",
    "a vintage car on a desert road",
    "a cozy library with a fireplace",
]
# Seconds per section on the GPU (sums to 440 of the default 480 s budget; imports and model builds count).
SHARES = {
    "env": 10,
    "sd15_spo": 75,
    "sd15_eval": 30,
    "spm_train": 45,
    "sd15_agreement": 35,
    "sdxl_spo": 135,
    "sdxl_eval": 60,
    "sdxl_agreement": 50,
}


# ------------------------------------------------------------------------------------------------------
# time, memory, output
# ------------------------------------------------------------------------------------------------------
class Budget:
    def __init__(self, total_s: float, scale: float):
        self.start = T0
        self.end = self.start + total_s
        self.scale = scale  # shares are GPU seconds; a dry run scales them down

    def left(self) -> float:
        return self.end - time.perf_counter()

    def section_deadline(self, name: str) -> float:
        return min(time.perf_counter() + SHARES[name] * self.scale, self.end)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(device: torch.device, fn, *args):
    sync(device)
    tic = time.perf_counter()
    out = fn(*args)
    sync(device)
    return out, time.perf_counter() - tic


def peak_memory(device: torch.device) -> dict[str, float]:
    if device.type == "cuda":
        return {"peak_gpu_mem_gib": torch.cuda.max_memory_allocated() / 2**30,
                "peak_gpu_reserved_gib": torch.cuda.max_memory_reserved() / 2**30}
    return {"peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


class Report:
    def __init__(self, out: Path, meta: dict):
        self.out = out
        self.data = {"meta": meta, "sections": {}}
        out.mkdir(parents=True, exist_ok=True)

    def put(self, name: str, result: dict) -> None:
        self.data["sections"][name] = result
        self.save()

    def save(self) -> None:
        self.data["meta"]["not_on_device_imported"] = sorted(m for m in NOT_ON_DEVICE if m in sys.modules)
        (self.out / "gpu_check.json").write_text(json.dumps(self.data, indent=2, default=float))

    def markdown(self) -> str:
        m = self.data["meta"]
        lines = [f"GPU check ({'dry run, CPU, toy sizes' if m['dry_run'] else 'real sizes'}) on {m['device_name']}, "
                 f"torch {m['torch']}, {m['date']}, budget {m['budget_s']:.0f} s, total {m.get('total_s', 0):.0f} s",
                 "", "| section | status | s | metric | value |", "|---|---|---|---|---|"]
        for name, sec in self.data["sections"].items():
            numbers = [(k, v) for k, v in sec.items() if k not in ("status", "seconds") and isinstance(v, int | float)]
            head = f"| {name} | {sec['status']} | {sec.get('seconds', 0):.1f} |"
            if not numbers:
                lines.append(f"{head} | | |")
            for i, (k, v) in enumerate(numbers):
                value = f"{v:.4g}" if isinstance(v, float) else str(v)
                lines.append(f"{head if i == 0 else '| | | |'} {k} | {value} |")
        return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------------
# models and config
# ------------------------------------------------------------------------------------------------------
class World:
    """Everything the sections share: device, sizes, accelerator, tokenizers, budget."""

    def __init__(self, args):
        from accelerate import Accelerator

        self.dry = args.dry_run
        self.device = torch.device("cpu" if self.dry else "cuda")
        self.acc = Accelerator(mixed_precision="no", cpu=self.dry)
        # bf16 weights + bf16 autocast on the GPU; --dry-run --bf16 runs that arithmetic on the CPU as well.
        self.bf16 = not self.dry or args.bf16
        self.weights = torch.bfloat16 if self.bf16 else torch.float32
        self.max_reps = 2 if self.dry else 6  # timed repetitions per loop (the first one is the warm-up)
        self.budget = Budget(args.budget_s, scale=args.budget_s / 480.0)
        self.tmp = Path(tempfile.mkdtemp(prefix="spo_gpu_check_"))
        self.tokenizer_kind, self.tokenizers = self._tokenizers()
        self.pipes: dict[str, object] = {}
        self.pairs: dict[str, object] = {}

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16)

    def _tokenizers(self):
        from spo.models import realsize

        if not self.dry:
            try:
                return "real CLIP BPE (49,408)", (realsize.build_tokenizer(realsize.EOS), realsize.build_tokenizer("!"))
            except FileNotFoundError:
                pass  # the vocabulary does not change any shape or FLOP: a byte-level tokenizer will do
        from spo.models.tiny import build_tiny_tokenizer

        tok = build_tiny_tokenizer(PROMPTS, model_max_length=realsize.MAX_LENGTH)
        return "byte-level stand-in (real vocab file not found)" if not self.dry else "byte-level (dry run)", (tok, tok)

    def configs(self, arch: str):
        from spo.models import realsize

        return realsize.small_configs(arch) if self.dry else None

    def cfg(self, arch: str):
        from spo.config import load_config

        o = [f"paths.root={self.tmp}", "model.dtype=bf16", "spo.mixed_precision=bf16", "spm.mixed_precision=bf16",
             "spo.threshold=0.0"]  # and the sampler keeps ties too (section_spo)
        if self.dry:
            o += ["model.resolution=64", "spo.num_steps=4", "spo.divert_start_step=1", "spo.num_candidates=2",
                  "spo.sample_batch_size=1", "spo.train_batch_size=1", "spo.grad_accum=1", "spm.batch_size=2",
                  "eval.num_steps=2", "eval.batch_size=2"]
            if arch == "sdxl":
                o += ["spo.num_inner_steps=2"]
        if arch == "sdxl":
            o += ["spo.gradient_checkpointing=true"]  # 1024 px without it may not fit; FLOPs include recompute
        return load_config(arch, o, params_file=None)

    def pipe(self, arch: str, dtype: torch.dtype | None = None):
        from spo.models import realsize

        dtype = dtype or self.weights
        if arch == "sd15":
            p = realsize.build_sd15(dtype, self.device, self.configs(arch), tokenizer=self.tokenizers[0])
        else:
            p = realsize.build_sdxl(dtype, self.device, self.configs(arch), tokenizers=self.tokenizers)
        p.set_progress_bar_config(disable=True)
        for part in ("unet", "vae", "text_encoder", "text_encoder_2"):
            m = getattr(p, part, None)
            if m is not None:
                m.requires_grad_(False).eval()
        return p

    def scorer(self, cfg, dtype: torch.dtype | None = None, trainable: bool = False):
        from spo.models import realsize
        from spo.models.preference import TimeConditionedCLIP

        clip, processor = realsize.build_pickscore(dtype or self.weights, self.device, self.configs("pickscore"),
                                                   tokenizer=self.tokenizers[1])
        spm = TimeConditionedCLIP(clip, processor, cfg.spm.time_embed_dim).to(self.device, dtype or self.weights)
        return spm if trainable else spm.requires_grad_(False).eval()


# ------------------------------------------------------------------------------------------------------
# sections
# ------------------------------------------------------------------------------------------------------
def section_env(w: World, deadline: float) -> dict:
    import accelerate
    import diffusers
    import peft
    import transformers

    out = {"torch": torch.__version__, "diffusers": diffusers.__version__, "transformers": transformers.__version__,
           "accelerate": accelerate.__version__, "peft": peft.__version__, "tokenizer": w.tokenizer_kind}
    n, dtype = (8192, torch.bfloat16) if not w.dry else (256, torch.float32)
    a = torch.randn(n, n, device=w.device, dtype=dtype)
    b = torch.randn(n, n, device=w.device, dtype=dtype)
    for _ in range(3):
        a @ b
    reps = 10
    _, s = timed(w.device, lambda: [a @ b for _ in range(reps)])
    out["matmul_n"] = n
    out["matmul_tflops"] = 2 * n**3 * reps / s / 1e12
    if w.device.type == "cuda":
        out["gpu_name"] = torch.cuda.get_device_name()
        out["gpu_mem_gib"] = torch.cuda.get_device_properties(0).total_memory / 2**30
    return out


def _peak_flops(w: World) -> tuple[float | None, float]:
    from spo.plan import GPU_PEAK_TFLOPS

    env = w.report.data["sections"].get("env", {})
    measured = env.get("matmul_tflops", float("nan")) * 1e12
    datasheet = None
    if w.device.type == "cuda" and "H200" in torch.cuda.get_device_name():
        datasheet = GPU_PEAK_TFLOPS["h200"] * 1e12
    elif w.device.type == "cuda" and "H100" in torch.cuda.get_device_name():
        datasheet = GPU_PEAK_TFLOPS["h100"] * 1e12
    return datasheet, measured


def section_spo(w: World, arch: str, deadline: float) -> dict:
    from torch.utils.flop_counter import FlopCounterMode

    from spo.models.diffusion import DiffusionAdapter
    from spo.sampling import PairBatch
    from spo.spo_trainer import SPOTrainer, set_tf32

    cfg = w.cfg(arch)
    set_tf32(cfg.spo.allow_tf32)  # as spo train sets it
    (pipe, scorer), build_s = timed(w.device, lambda: (w.pipe(arch), w.scorer(cfg)))
    adapter = DiffusionAdapter(pipe, cfg.spo_resolution)
    trainer = SPOTrainer(cfg, w.acc, adapter, scorer, PROMPTS)
    # Every comparison yields a pair, ties included (the config's threshold is >= 0 and keeps gap > threshold:
    # a random SPM in bf16 can score both candidates alike), so the pair count is known.
    trainer.sampler.threshold = -1.0
    w.pipes[arch] = (pipe, scorer, cfg)
    per_step = trainer.pairs_per_step
    max_steps = 1 if w.dry else 4  # optimizer steps timed per iteration (the rest of the pool is projected)
    b = cfg.spo.sample_batch_size
    rows: list[dict] = []
    kept: list[PairBatch] = []
    def sample(prompts, gen):
        with w.autocast():
            return trainer.sampler.sample(prompts, gen, unet=trainer.base_unet)

    def train(chunks):
        with w.autocast():
            return [trainer.optimizer_step(c) for c in chunks]

    it = 0
    while True:
        prompts = [PROMPTS[(it * b + j) % len(PROMPTS)] for j in range(b)]
        trainer.unet.eval()
        (pairs, stats), sampling_s = timed(w.device, sample, prompts, torch.Generator().manual_seed(it))
        trainer.unet.train()
        if pairs is None:
            raise RuntimeError("the sampler produced no comparison (num_steps <= divert_start_step?)")
        scores = stats.candidate_scores.view(-1, cfg.spo.num_candidates)
        ties = (scores.max(1).values == scores.min(1).values).float().mean().item()
        kept.append(pairs.index(slice(0, 8)).to("cpu"))
        steps = max(1, min(max_steps, len(pairs) // per_step))
        chunks = [pairs.index(slice(s * per_step, (s + 1) * per_step)) for s in range(steps)]
        metrics, training_s = timed(w.device, train, chunks)
        trained = sum(len(c) for c in chunks)
        rows.append({"sampling_s": sampling_s, "training_s": training_s, "pairs": len(pairs), "trained": trained,
                     "unet_samples": stats.unet_samples, "finite": all(m is not None for m in metrics),
                     "ties": ties})
        it += 1
        # Room for one more iteration and the counted step, else stop (at least one iteration runs).
        if it >= w.max_reps or time.perf_counter() + sampling_s + 2 * training_s > deadline:
            break
    w.pairs[arch] = PairBatch.cat(kept)

    # Counted FLOPs of one real optimizer step (untimed: the counter's dispatch costs time).
    one = pairs.index(slice(0, per_step))
    counter = FlopCounterMode(display=False)
    with counter, w.autocast():
        trainer.optimizer_step(one)
    flops_per_pair = counter.get_total_flops() / len(one)

    steady = rows[1:] or rows  # the first iteration carries kernel selection and allocator warm-up
    mean = lambda k: sum(r[k] for r in steady) / len(steady)  # noqa: E731
    sampling_s, training_s, trained = mean("sampling_s"), mean("training_s"), mean("trained")
    pairs_per_iter = mean("pairs")
    training_s_full = training_s * pairs_per_iter / trained
    datasheet, measured = _peak_flops(w)
    achieved = flops_per_pair * trained / training_s
    out = {
        "resolution": cfg.spo_resolution,
        "prompts_per_iteration": b,
        "num_steps": cfg.spo.num_steps,
        "num_candidates": cfg.spo.num_candidates,
        "num_inner_steps": cfg.spo.num_inner_steps,
        "pairs_per_optimizer_step": per_step,
        "gradient_checkpointing": cfg.spo.gradient_checkpointing,
        "build_s": build_s,
        "iterations": len(rows),
        "first_iteration_sampling_s": rows[0]["sampling_s"],
        "sampling_s_per_iteration": sampling_s,
        "sampler_unet_samples_per_iteration": mean("unet_samples"),
        "pairs_per_iteration": pairs_per_iter,
        "optimizer_steps_timed_per_iteration": trained / per_step,
        "training_s_per_pair": training_s / trained,
        "training_pairs_per_s": trained / training_s,
        "iteration_s_projected": sampling_s + training_s_full,
        "sampling_share_of_iteration": sampling_s / (sampling_s + training_s_full),
        "training_tflop_per_pair": flops_per_pair / 1e12,
        "training_tflops_achieved": achieved / 1e12,
        "training_mfu_vs_matmul": achieved / measured,
        "all_steps_finite": int(all(r["finite"] for r in rows)),
        # Comparisons whose k candidates got the same SPM score (dropped by any threshold >= 0).
        "score_ties_fraction": sum(r["ties"] for r in rows) / len(rows),
    }
    if datasheet:
        out["training_mfu_vs_datasheet"] = achieved / datasheet
    return out


def section_eval(w: World, arch: str, deadline: float) -> dict:
    from spo.generation import protocol, sample_images

    pipe, scorer, cfg = w.pipes[arch]
    proto = protocol(cfg)
    bs = cfg.eval.batch_size if arch == "sd15" or w.dry else 4
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(bs)]
    gen_times, it = [], 0

    def generate():
        with w.autocast():  # the LoRA the SPO section added is fp32 (base + LoRA, as evaluate runs)
            return sample_images(pipe, prompts, [it * bs + j for j in range(bs)], proto)

    while True:
        _, s = timed(w.device, generate)
        gen_times.append(s)
        it += 1
        if time.perf_counter() + 2 * s > deadline or it >= min(4, w.max_reps):
            break
    steady = gen_times[1:] or gen_times
    res = cfg.eval_resolution
    images = torch.rand(bs, 3, res, res, device=w.device) * 2 - 1
    text = scorer.encode_text(prompts)

    def score():
        with torch.no_grad(), w.autocast():
            return scorer.score_with_text(images, text)

    score()
    scores, score_s = timed(w.device, score)
    return {
        "resolution": res,
        "num_steps": cfg.eval.num_steps,
        "batch_size": bs,
        "batches": len(gen_times),
        "first_batch_s": gen_times[0],
        "generation_images_per_s": bs * len(steady) / sum(steady),
        "spm_scoring_images_per_s": bs / score_s,
        "scores_finite": int(bool(torch.isfinite(scores).all())),
    }


def section_spm(w: World, deadline: float) -> dict:
    from spo.models.diffusion import DiffusionAdapter
    from spo.spm_training import PairDenoiser

    pipe, _, cfg = w.pipes["sd15"]
    res = cfg.spm_resolution
    model, build_s = timed(w.device, lambda: w.scorer(cfg, dtype=torch.float32, trainable=True).train())
    model.enable_gradient_checkpointing(cfg.spm.gradient_checkpointing)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.spm.lr)
    denoiser = PairDenoiser(DiffusionAdapter(pipe, res), cfg.spm.cfg_scale)
    for bs in (cfg.spm.batch_size, cfg.spm.batch_size // 2, cfg.spm.batch_size // 4):
        try:
            return {**_spm_steps(w, cfg, model, optimizer, denoiser, bs, deadline), "build_s": build_s,
                    "preset_batch_size": cfg.spm.batch_size}
        except torch.OutOfMemoryError:
            optimizer.zero_grad(set_to_none=True)
            free(w.device)
            if bs <= 1:
                raise
    raise RuntimeError("unreachable")


def _spm_steps(w: World, cfg, model, optimizer, denoiser, bs: int, deadline: float) -> dict:
    from spo.spm_training import NO_TIMER, train_micro_step

    res = cfg.spm_resolution
    g = torch.Generator().manual_seed(0)
    batch = {
        "caption": [PROMPTS[i % len(PROMPTS)] for i in range(bs)],
        "image_0": torch.rand(bs, 3, res, res, generator=g) * 2 - 1,
        "image_1": torch.rand(bs, 3, res, res, generator=g) * 2 - 1,
        "label_0": torch.ones(bs),
        "label_1": torch.zeros(bs),
        "weight": torch.ones(bs),
    }

    def one(gen):
        with w.autocast():
            loss, _, _ = train_micro_step(model, model, denoiser, None, batch, gen, cfg, w.acc, NO_TIMER)
        w.acc.backward(loss)
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.spm.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    times, losses = [], []
    step = 0
    while True:
        loss, s = timed(w.device, one, torch.Generator(device=w.device).manual_seed(step))
        times.append(s)
        losses.append(loss)
        step += 1
        if time.perf_counter() + 2 * s > deadline or step >= 4 * w.max_reps:
            break
    steady = times[1:] or times
    return {
        "resolution": res,
        "batch_size": bs,
        "gradient_checkpointing": cfg.spm.gradient_checkpointing,
        "steps": len(times),
        "first_step_s": times[0],
        "step_s": sum(steady) / len(steady),
        "pairs_per_s": bs * len(steady) / sum(steady),
        "losses_finite": int(all(math.isfinite(v) for v in losses)),
    }


def _as_fp32(t: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    if t is None:
        return None
    return (t.float() if t.is_floating_point() else t).to(device)


def section_agreement(w: World, arch: str, deadline: float) -> dict:
    """The same pairs through pair_losses: fp32, bf16 autocast on fp32 weights, bf16 frozen weights."""
    import spo.spo_trainer as spo_trainer
    from spo.models.diffusion import DiffusionAdapter
    from spo.sampling import PairBatch
    from spo.spo_trainer import SPOTrainer, set_tf32

    _, scorer, cfg = w.pipes.pop(arch)
    w.acc.free_memory()  # the SPO section's UNet and optimizer, still referenced by the accelerator
    free(w.device)
    pipe = w.pipe(arch, torch.float32)
    trainer = SPOTrainer(cfg, w.acc, DiffusionAdapter(pipe, cfg.spo_resolution), scorer)
    # A trained-looking policy: LoRA B is zero at init (policy = reference, every ratio 1); small fixed noise.
    g = torch.Generator().manual_seed(1)
    for name, p in trainer.base_unet.named_parameters():
        if "lora_B" in name:
            p.data = (torch.randn(p.shape, generator=g) * 0.01).to(p.device, p.dtype)
    n = 4 if not w.dry else 2
    pairs = w.pairs.pop(arch).index(slice(0, n))
    pairs = PairBatch(**{f.name: _as_fp32(getattr(pairs, f.name), w.device) for f in dataclasses.fields(pairs)})

    seen: list[tuple] = []
    real_loss = spo_trainer.spo_loss

    def recording_loss(*args, **kwargs):
        seen.append(tuple(a.detach().double() for a in args[:4]))
        return real_loss(*args, **kwargs)

    def run(ctx) -> tuple[torch.Tensor, torch.Tensor]:
        seen.clear()
        spo_trainer.spo_loss = recording_loss
        try:
            with torch.no_grad(), ctx:
                out = trainer.pair_losses(pairs)
        finally:
            spo_trainer.spo_loss = real_loss
        return torch.stack(seen[0]), out.per_pair.double()  # (4: logp_w, ref_w, logp_l, ref_l, N), (N,)

    variants = {}
    set_tf32(False)  # the reference is true fp32
    (ref_logp, ref_loss), s32 = timed(w.device, lambda: run(contextlib.nullcontext()))
    set_tf32(cfg.spo.allow_tf32)
    variants["bf16_autocast"] = run(w.autocast())
    pipe.unet.to(w.weights)
    for p in trainer.params:
        p.data = p.data.float()  # as add_lora keeps them
    variants["bf16_weights"] = run(w.autocast())

    def log_ratios(logp):
        return torch.stack([logp[0] - logp[1], logp[2] - logp[3]])

    out = {"pairs": n, "fp32_s": s32, "fp32_logp_abs_mean": float(ref_logp.abs().mean()),
           "fp32_log_ratio_abs_mean": float(log_ratios(ref_logp).abs().mean()),
           "fp32_loss_mean": float(ref_loss.mean())}
    for name, (logp, loss) in variants.items():
        margin = lambda lp: (lp[0] - lp[1]) - (lp[2] - lp[3])  # noqa: E731
        out[f"{name}_logp_max_abs_diff"] = float((logp - ref_logp).abs().max())
        out[f"{name}_log_ratio_max_abs_diff"] = float((log_ratios(logp) - log_ratios(ref_logp)).abs().max())
        out[f"{name}_loss_max_abs_diff"] = float((loss - ref_loss).abs().max())
        out[f"{name}_margin_sign_agreement"] = float((margin(logp).sign() == margin(ref_logp).sign()).double().mean())
    return out


# ------------------------------------------------------------------------------------------------------
# driver
# ------------------------------------------------------------------------------------------------------
def run_section(w: World, name: str, fn) -> None:
    left = w.budget.left()
    need = SHARES[name] * w.budget.scale * 0.5
    if left < need:
        w.report.put(name, {"status": "skipped: time budget", "seconds": 0.0, "budget_left_s": left})
        print(f"[gpu-check] {name}: skipped (time budget: {left:.0f} s left, needs ~{need:.0f})", flush=True)
        return
    free(w.device)
    tic = time.perf_counter()
    try:
        result = {"status": "ok", **fn(w.budget.section_deadline(name))}
    except Exception as exc:  # one broken section must not cost the others their numbers
        result = {"status": f"error: {type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}",
                  "traceback": traceback.format_exc()[-3000:]}
    sync(w.device)
    result["seconds"] = time.perf_counter() - tic
    result.update(peak_memory(w.device))
    w.report.put(name, result)
    print(f"[gpu-check] {name}: {result['status']} in {result['seconds']:.1f} s", flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="toy sizes on the CPU (seconds); what make test runs")
    ap.add_argument("--out", default=os.environ.get("OUT") or "gpu_check_out", help="output folder")
    ap.add_argument("--bf16", action="store_true", help="with --dry-run: bf16 weights and autocast on the CPU")
    ap.add_argument("--budget-s", type=float, default=None, help="time budget (default 480 s; dry run 60 s)")
    ap.add_argument("--only", default=None, help="comma-separated section names (default: all)")
    args = ap.parse_args(argv)
    args.budget_s = args.budget_s or (60.0 if args.dry_run else 480.0)
    if not args.dry_run and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run this on the lent GPU (see bench/RESULTS.md), or use --dry-run")
    import logging

    logging.disable(logging.WARNING)  # library chatter; every failure is recorded in the JSON
    if not args.dry_run:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    t0 = time.perf_counter()
    w = World(args)
    meta = {"dry_run": args.dry_run, "budget_s": args.budget_s, "torch": torch.__version__,
            "python": platform.python_version(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "device_name": torch.cuda.get_device_name() if w.device.type == "cuda" else f"CPU ({platform.machine()})",
            "tokenizer": w.tokenizer_kind}
    w.report = Report(Path(args.out), meta)
    sections = {
        "env": lambda d: section_env(w, d),
        "sd15_spo": lambda d: section_spo(w, "sd15", d),
        "sd15_eval": lambda d: section_eval(w, "sd15", d),
        "spm_train": lambda d: section_spm(w, d),
        "sd15_agreement": lambda d: section_agreement(w, "sd15", d),
        "sdxl_spo": lambda d: section_spo(w, "sdxl", d),
        "sdxl_eval": lambda d: section_eval(w, "sdxl", d),
        "sdxl_agreement": lambda d: section_agreement(w, "sdxl", d),
    }
    only = set(args.only.split(",")) if args.only else set(sections)
    for name, fn in sections.items():
        if name in only:
            run_section(w, name, fn)
        if name == "sd15_agreement":
            w.pipes.pop("sd15", None)
            w.pairs.pop("sd15", None)
            w.acc.free_memory()  # drops the accelerator's references to the SD-1.5 UNet and optimizers
    w.report.data["meta"]["total_s"] = time.perf_counter() - t0
    shutil.rmtree(w.tmp, ignore_errors=True)
    w.report.save()
    (Path(args.out) / "gpu_check.md").write_text(w.report.markdown())
    print(w.report.markdown())
    bad = [n for n, s in w.report.data["sections"].items() if s["status"].startswith("error")]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
