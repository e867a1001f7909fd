"""Benchmark the SPO trainer against the official training step, in the same run.

    .venv/bin/python bench/bench_spo.py                          # tiny preset and full-size SD-1.5 UNet @ 256 px
    .venv/bin/python bench/bench_spo.py --size tiny --iters 3
    .venv/bin/python bench/bench_spo.py --size sd15-256 --train-pairs 4 --threads 1

Two variants of one SPO iteration (sample a prompt batch with the candidate-pool sampler, then train on the
kept pairs), each in its own subprocess so that peak memory is measured separately:

* ``ours``: spo/spo_trainer.py (``spo train``) as shipped: LoRA reference = the same UNet with adapters off, one policy
  forward (with grad) and one reference forward (no grad) per pair on the shared x_t;
* ``official``: RockeyCoss/SPO's training step: a deep-copied reference UNet and 4 UNet calls per pair
  (policy on win, policy on lose, reference on win, reference on lose, identical x_t), no ``no_grad`` around
  the reference (peers.md §3).

Both use CFG at training (2 UNet samples per call), threshold 0 (every pool yields a pair, so the pair count is
known) and the same sampler, seeds and pairs. Reported per variant: UNet samples per trained pair (with and
without grad, counted by a forward hook), training FLOPs per pair (torch.utils.flop_counter), seconds per
iteration split into sampling and training, and the subprocess's peak RSS.

Sizes: ``tiny`` = the tiny preset's spo section on random-init tiny models (or ``--root`` with a trained tiny
base); ``sd15-256`` = the full SD-1.5 UNet and VAE architectures with random weights at 256 px, batch 1 (one
prompt per iteration; a 1-layer text encoder of SD's width since its cost is negligible), with fewer DDIM
steps than the paper so a CPU run fits in minutes. The scorer is a random-init tiny time-conditioned CLIP in
both (the SPM's cost is not what is compared; the real PickScore-sized SPM adds the same to both variants).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SIZES = {
    # tiny preset spo section (num_steps 10, divert 2, k 4, 16 prompts per iteration)
    "tiny": {"resolution": 32, "overrides": ["spo.threshold=0.0"]},
    # full-size SD-1.5 UNet @ 256 px, batch 1; 6 DDIM steps, divert 2, k 2 to fit a CPU budget
    "sd15-256": {
        "resolution": 256,
        "overrides": [
            "spo.threshold=0.0",
            "spo.num_steps=6",
            "spo.divert_start_step=2",
            "spo.num_candidates=2",
            "spo.sample_batch_size=1",
            "spo.train_batch_size=1",
        ],
    },
}


def build_sd15_full(resolution: int):
    """SD-1.5's UNet and VAE architectures with random weights (no download); a small text encoder."""
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    from spo.models.tiny import build_tiny_tokenizer, tiny_scheduler, tiny_text_config

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=resolution // 8,
        in_channels=4,
        out_channels=4,
        layers_per_block=2,
        block_out_channels=(320, 640, 1280, 1280),
        cross_attention_dim=768,
        attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        layers_per_block=2,
        sample_size=resolution,
        block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
    )
    tokenizer = build_tiny_tokenizer(model_max_length=77)
    text = CLIPTextModel(tiny_text_config(tokenizer, hidden_size=768, layers=1, projection_dim=768))
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=tiny_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        image_encoder=None,
        requires_safety_checker=False,
    )


def tiny_scorer():
    from spo.models.preference import TimeConditionedCLIP
    from spo.models.tiny import build_tiny_clip

    clip, processor = build_tiny_clip(seed=0)
    return TimeConditionedCLIP(clip, processor, time_embed_dim=32).eval().requires_grad_(False)


def official_pair_losses(trainer, ref_unet, pairs):
    """The official training step's forward: 4 UNet calls per pair on identical x_t, deep-copied reference."""
    from spo.losses import spo_loss
    from spo.models.diffusion import PromptEmbeddings
    from spo.sampling import ddim_step_with_logprob

    adapter, sched, scfg = trainer.adapter, trainer.sampler.scheduler, trainer.scfg
    emb = PromptEmbeddings(pairs.embeds, pairs.pooled)
    uncond = trainer._uncond_rows(len(pairs))

    def logp(unet, xt, prev):
        eps = adapter.predict_noise(xt, pairs.timesteps, emb, uncond, scfg.cfg_scale, unet=unet)
        return ddim_step_with_logprob(sched, eps, pairs.timesteps, xt, scfg.eta, prev_sample=prev).log_prob

    lw, ll = (
        logp(trainer.unet, pairs.xt_win, pairs.prev_win),
        logp(trainer.unet, pairs.xt_lose, pairs.prev_lose),
    )
    rw, rl = logp(ref_unet, pairs.xt_win, pairs.prev_win), logp(ref_unet, pairs.xt_lose, pairs.prev_lose)
    return spo_loss(lw, rw, ll, rl, beta=scfg.beta, eps=scfg.eps)


def setup(size: str, root: str | None, reference_copy: bool):
    """(cfg, trainer, deep-copied reference UNet or None) for one benchmark size."""
    from spo.config import load_config
    from spo.models.diffusion import DiffusionAdapter
    from spo.spo_trainer import SPOTrainer, make_accelerator

    spec = SIZES[size]
    tmp = Path(tempfile.mkdtemp(prefix="bench_spo_"))
    preset = "tiny" if size == "tiny" else "sd15"
    overrides = [f"paths.root={tmp}", f"model.resolution={spec['resolution']}", "model.dtype=fp32"]
    cfg = load_config(preset, [*overrides, *spec["overrides"]], params_file=None)
    if size == "tiny" and root:
        from spo.models.diffusion import load_pipeline

        pipe = load_pipeline(cfg.model.model_copy(update={"pretrained": str(Path(root) / "models" / "base")}))
    elif size == "tiny":
        from spo.models.tiny import build_tiny_sd15

        pipe = build_tiny_sd15(seed=0)
    else:
        pipe = build_sd15_full(spec["resolution"])
    pipe.set_progress_bar_config(disable=True)
    adapter = DiffusionAdapter(pipe, spec["resolution"])
    # The official code deep-copies the UNet before adding the LoRA (the official train_spo.py ~l.158).
    ref_unet = copy.deepcopy(pipe.unet).requires_grad_(False) if reference_copy else None
    trainer = SPOTrainer(cfg, make_accelerator(cfg), adapter, tiny_scorer())
    return cfg, trainer, ref_unet


def worker(size: str, variant: str, iters: int, train_pairs: int | None, root: str | None) -> dict:
    cfg, trainer, ref_unet = setup(size, root, reference_copy=variant == "official")
    unet_params = sum(p.numel() for p in trainer.base_unet.parameters() if not p.requires_grad)
    if variant == "official":
        trainer.pair_losses = lambda pairs: official_pair_losses(trainer, ref_unet, pairs)

    rows = {"grad": 0, "nograd": 0}

    def hook(module, args, out):
        # "with grad" = the output is part of an autograd graph (the official reference runs in grad mode
        # but builds no graph, since neither its weights nor its inputs require grad).
        out = out[0] if isinstance(out, tuple) else out.sample
        rows["grad" if out.requires_grad else "nograd"] += args[0].shape[0]

    hooks = [trainer.base_unet.register_forward_hook(hook)]
    if ref_unet is not None:
        hooks.append(ref_unet.register_forward_hook(hook))

    prompts = [
        "a red circle on a blue background",
        "a green square",
        "a yellow star at the top left",
        "a large purple ring",
    ] * 8
    per_iter = []
    pairs_total = 0
    sampler_unet_samples = 0
    flops_per_pair = None
    for it in range(iters):
        batch = prompts[it * cfg.spo.sample_batch_size : (it + 1) * cfg.spo.sample_batch_size] or prompts[:1]
        tic = time.perf_counter()
        for h in hooks:
            h.remove()
        pairs, stats = trainer.sampler.sample(
            batch, torch.Generator().manual_seed(it), unet=trainer.base_unet
        )
        sampling_s = time.perf_counter() - tic
        sampler_unet_samples += stats.unet_samples
        hooks = [trainer.base_unet.register_forward_hook(hook)]
        if ref_unet is not None:
            hooks.append(ref_unet.register_forward_hook(hook))
        if train_pairs:
            pairs = pairs.index(slice(0, train_pairs))
        if flops_per_pair is None:
            from torch.utils.flop_counter import FlopCounterMode

            one = pairs.index(slice(0, 1))
            counter = FlopCounterMode(display=False)
            saved = dict(rows)
            with counter:
                trainer.optimizer_step(one)
            rows.update(saved)
            flops_per_pair = counter.get_total_flops()
        tic = time.perf_counter()
        bs = cfg.spo.train_batch_size
        for s in range(0, len(pairs), bs):
            trainer.optimizer_step(pairs.index(slice(s, s + bs)))
        training_s = time.perf_counter() - tic
        pairs_total += len(pairs)
        per_iter.append({"sampling_s": sampling_s, "training_s": training_s, "pairs": len(pairs)})

    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    mean = lambda key: sum(r[key] for r in per_iter) / len(per_iter)  # noqa: E731
    return {
        "size": size,
        "variant": variant,
        "iterations": iters,
        "prompts_per_iteration": cfg.spo.sample_batch_size,
        "pairs_per_iteration": pairs_total / iters,
        "unet_params_m": unet_params / 1e6,
        "unet_samples_with_grad_per_pair": rows["grad"] / pairs_total,
        "unet_samples_no_grad_per_pair": rows["nograd"] / pairs_total,
        "sampler_unet_samples_per_iteration": sampler_unet_samples / iters,
        "training_gflops_per_pair": flops_per_pair / 1e9,
        "sampling_s_per_iteration": mean("sampling_s"),
        "training_s_per_iteration": mean("training_s"),
        "training_s_per_pair": sum(r["training_s"] for r in per_iter) / pairs_total,
        "peak_rss_mb": peak_kb / 1024,
        "torch_threads": torch.get_num_threads(),
    }


def ab_timing(size: str, repeats: int, root: str | None) -> dict:
    """Training-step time of both variants on the same pair, interleaved (ours, official, ours, ...) in one
    process, so that load changes on a shared CPU hit both alike. Medians over ``repeats``."""
    import statistics

    cfg, trainer, ref_unet = setup(size, root, reference_copy=True)
    pairs, _ = trainer.sampler.sample(["a red circle on a blue background"], torch.Generator().manual_seed(0))
    one = pairs.index(slice(0, 1))
    ours_losses = trainer.pair_losses
    official_losses = lambda p: official_pair_losses(trainer, ref_unet, p)  # noqa: E731
    times: dict[str, list[float]] = {"ours": [], "official": []}
    for _ in range(repeats):
        for name, fn in (("ours", ours_losses), ("official", official_losses)):
            trainer.pair_losses = fn
            tic = time.perf_counter()
            trainer.optimizer_step(one)
            times[name].append(time.perf_counter() - tic)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "size": size,
        "repeats": repeats,
        "times_s": times,
        "median_s": med,
        "ratio": med["ours"] / med["official"],
        "torch_threads": torch.get_num_threads(),
    }


def run_variant(size: str, variant: str, args) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        "--size",
        size,
        "--variant",
        variant,
        "--iters",
        str(args.iters),
    ]
    if args.train_pairs:
        cmd += ["--train-pairs", str(args.train_pairs)]
    if args.root:
        cmd += ["--root", args.root]
    env = dict(os.environ)
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if out.returncode:
        sys.stderr.write(out.stderr[-4000:])
        raise SystemExit(f"worker {size}/{variant} failed")
    return json.loads(out.stdout.strip().splitlines()[-1])


def table(results: list[dict]) -> str:
    keys = [
        ("unet_samples_with_grad_per_pair", "UNet samples w/ grad / pair", "{:.2f}"),
        ("unet_samples_no_grad_per_pair", "UNet samples no grad / pair", "{:.2f}"),
        ("training_gflops_per_pair", "training GFLOPs / pair", "{:.2f}"),
        ("sampling_s_per_iteration", "sampling s / iteration", "{:.2f}"),
        ("training_s_per_iteration", "training s / iteration", "{:.2f}"),
        ("training_s_per_pair", "training s / pair", "{:.3f}"),
        ("pairs_per_iteration", "pairs / iteration", "{:.1f}"),
        ("peak_rss_mb", "peak RSS (MB)", "{:.0f}"),
    ]
    lines = []
    for size in dict.fromkeys(r["size"] for r in results):
        rs = {r["variant"]: r for r in results if r["size"] == size}
        lines.append(
            f"\n{size} (UNet {rs['ours']['unet_params_m']:.1f} M params, "
            f"{rs['ours']['prompts_per_iteration']} prompt(s)/iteration, {rs['ours']['iterations']} iteration(s))"
        )
        lines.append("| metric | ours | official | ours / official |")
        lines.append("|---|---|---|---|")
        for key, name, fmt in keys:
            a, b = rs["ours"][key], rs["official"][key]
            ratio = f"{a / b:.2f}" if b else "-"
            lines.append(f"| {name} | {fmt.format(a)} | {fmt.format(b)} | {ratio} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=[*SIZES, "both"], default="both")
    ap.add_argument(
        "--iters", type=int, default=None, help="SPO iterations per variant (default 3 tiny, 1 sd15-256)"
    )
    ap.add_argument(
        "--train-pairs", type=int, default=None, help="train on at most this many pairs per iteration"
    )
    ap.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS for the workers")
    ap.add_argument(
        "--root", default=None, help="project with a trained tiny base (models/base) for --size tiny"
    )
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument(
        "--ab",
        type=int,
        default=0,
        metavar="R",
        help="instead: time one training step of each variant R times, interleaved, in one process",
    )
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--variant", choices=["ours", "official"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        import logging

        logging.disable(logging.WARNING)
        print(json.dumps(worker(args.size, args.variant, args.iters or 1, args.train_pairs, args.root)))
        return
    sizes = list(SIZES) if args.size == "both" else [args.size]
    if args.ab:
        if args.threads:
            torch.set_num_threads(args.threads)
        for size in sizes:
            print(json.dumps(ab_timing(size, args.ab, args.root)))
        return
    results = []
    for size in sizes:
        a = argparse.Namespace(**vars(args))
        a.iters = args.iters or (3 if size == "tiny" else 1)
        a.train_pairs = args.train_pairs or (None if size == "tiny" else 2)
        for variant in ("ours", "official"):
            t0 = time.time()
            results.append(run_variant(size, variant, a))
            print(f"{size}/{variant}: done in {time.time() - t0:.0f}s", file=sys.stderr)
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"OMP_NUM_THREADS={args.threads or os.environ.get('OMP_NUM_THREADS', 'default')}"
    )
    print(table(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
