"""Benchmark the SPO trainer against the official training step, in the same run.

    .venv/bin/python bench/bench_spo.py                          # tiny preset and full-size SD-1.5 UNet @ 256 px
    .venv/bin/python bench/bench_spo.py --size tiny --iters 3
    .venv/bin/python bench/bench_spo.py --size sd15-256 --train-pairs 4 --threads 1
    .venv/bin/python bench/bench_spo.py --size tiny --whole-iteration 3 --threads 1
    .venv/bin/python bench/bench_spo.py --size sd15-256 --whole-iteration 3 --threads 1 --ref-copy shared

``--whole-iteration R`` (one process, untimed warm-up round, then R rounds interleaved official, ours (vae),
ours (tiny)) times one whole SPO iteration = sampling (k candidates per step, each decoded and judged by the
SPM) + training on the kept pairs, for ours with ``spm.decoder=vae`` and ``spm.decoder=tiny`` (the trainer's
own ``sample_iteration`` / ``train_pool``) and a bench-local re-implementation of the official algorithm
(``official_sample`` / ``official_train``, each part naming the official file it mirrors). It counts UNet
rows, VAE / tiny decodes and SPM image / text forwards per variant with forward hooks and prints
``spo.plan``'s FLOP ratios next to the measured ones. At ``sd15-256`` the models are the real SD-1.5,
TAESD and PickScore ViT-H/14 architectures (random weights) and the scorer is that full-size SPM.

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


# ----------------------------------------------------------------------------------------------------------
# Whole iteration: sampling + training, ours (vae / tiny decoder) vs the official algorithm, interleaved
# ----------------------------------------------------------------------------------------------------------
WHOLE_PROMPTS = (
    "a red circle on a blue background",
    "a green square",
    "a yellow star at the top left",
    "a large purple ring",
)
# Threshold 0: every comparison yields a pair, so all three variants train on the same number of pairs.
# checkpoint_every is out of reach: the trainer's periodic checkpoint is not part of an iteration's work.
WHOLE_COMMON = ["spo.threshold=0.0", "spo.checkpoint_every=1000000", "spo.grad_accum=1"]
WHOLE_SIZES = {
    # the tiny preset's spo section: 16 prompts, 10 DDIM steps, divert 2, k 4 -> 8 comparisons per prompt
    "tiny": {"preset": "tiny", "resolution": 32, "overrides": [*WHOLE_COMMON, "spo.num_prompts=16"]},
    # the SD-1.5 architecture at 256 px, 1 prompt, k 4 as in the paper; 3 DDIM steps, divert 2 -> 1
    # comparison judged at t = 0 (the paper: 20 steps, divert 4 -> 16), so an iteration fits the shared CPU
    "sd15-256": {
        "preset": "sd15",
        "resolution": 256,
        "overrides": [
            *WHOLE_COMMON,
            "spo.num_steps=3",
            "spo.divert_start_step=2",
            "spo.num_candidates=4",
            "spo.sample_batch_size=1",
            "spo.train_batch_size=1",
            "spo.num_prompts=1",
        ],
    },
}
# The paper's resolution: the UNet and VAE calls cost 4x those at 256 px while the SPM still sees 224 px, so the
# (identical) SPM forwards weigh less -- at 256 px they are ~45 % of our sampling FLOPs.
WHOLE_SIZES["sd15-512"] = {**WHOLE_SIZES["sd15-256"], "resolution": 512}


class CallCounter:
    """Batch rows through modules, by name, split by phase (forward hooks; counts do not depend on load)."""

    def __init__(self):
        self.phase = "sampling"
        self.rows: dict[str, int] = {}

    def watch(self, module, name: str, split_grad: bool = False, latent_pixels: bool = False) -> None:
        """Count the batch rows through ``module``; ``latent_pixels``: also the rows' latent pixels (H x W of the
        input), under ``<name>_latent_px`` -- a decoder's work at any decode size."""
        def hook(mod, args, kwargs, out):
            x = args[0] if args else next(v for v in kwargs.values() if isinstance(v, torch.Tensor))
            key = name
            if split_grad:
                y = out[0] if isinstance(out, tuple) else getattr(out, "sample", out)
                key = f"{name}_{'grad' if y.requires_grad else 'nograd'}"
            key = f"{self.phase}.{key}"
            self.rows[key] = self.rows.get(key, 0) + x.shape[0]
            if latent_pixels:
                px = f"{self.phase}.{name}_latent_px"
                self.rows[px] = self.rows.get(px, 0) + x.shape[0] * x.shape[-2] * x.shape[-1]

        module.register_forward_hook(hook, with_kwargs=True)

    def take(self) -> dict[str, int]:
        out, self.rows = self.rows, {}
        return out


def _whole_models(size: str, cfg, root: str | None, tmp: Path):
    """(pipeline, SPM, tiny-decoder folder): the tiny preset's models, or SD-1.5 + PickScore ViT-H/14 + TAESD
    architectures with random weights (spo.models.realsize; a byte-level tokenizer, as the real BPE vocabulary
    is not shipped; token counts stay at 77 for the diffusion text encoder)."""
    from diffusers import AutoencoderTiny

    from spo.models.preference import TimeConditionedCLIP

    if size == "tiny":
        from spo.models.tiny import build_tiny_clip, build_tiny_sd15, tiny_decoder

        if root:
            from spo.models.diffusion import load_pipeline

            base = Path(root) / "models" / "base"
            pipe = load_pipeline(cfg.model.model_copy(update={"pretrained": str(base)}))
        else:
            pipe = build_tiny_sd15(seed=0)
        clip, processor = build_tiny_clip(image_size=cfg.spm_resolution, seed=0)
        decoder = tiny_decoder()
    else:
        from spo.models import realsize
        from spo.models.tiny import build_tiny_tokenizer

        tok = build_tiny_tokenizer(model_max_length=realsize.MAX_LENGTH)
        pipe = realsize.build_sd15(torch.float32, tokenizer=tok)
        clip, processor = realsize.build_pickscore(torch.float32, tokenizer=tok)
        decoder = AutoencoderTiny()  # TAESD's architecture (madebyollin/taesd's config is the default)
    torch.manual_seed(0)
    spm = TimeConditionedCLIP(clip, processor, time_embed_dim=cfg.spm.time_embed_dim)
    decoder.save_pretrained(tmp / "tiny_decoder")
    pipe.set_progress_bar_config(disable=True)
    return pipe, spm.eval().requires_grad_(False), tmp / "tiny_decoder"


@torch.no_grad()
def official_sample(trainer, ref_unet, spm, prompts: list[str], generator: torch.Generator):
    """The official sampler, RockeyCoss/SPO spo/custom_diffusers/multi_sample_pipeline.py
    (``multi_sample_pipeline``), driven as train_scripts/train_spo.py drives it. Returns PairBatch of the
    pairs ``compare_fn`` keeps. The DDIM maths is ours (ddim_step_with_logprob = the official
    ddim_step_fetch_x0 / ddim_step_fetch_x_t_1 formulas); the layout is the official sample-major (k, b)."""
    from diffusers.utils.torch_utils import randn_tensor

    from spo.models.diffusion import PromptEmbeddings
    from spo.models.preference import preprocess_images
    from spo.sampling import PairBatch, ddim_step_with_logprob, predict_x0

    adapter, sched, scfg = trainer.adapter, trainer.sampler.scheduler, trainer.scfg
    unet, vae, k, b = trainer.base_unet, adapter.vae, scfg.num_candidates, len(prompts)
    sched.set_timesteps(scfg.num_steps)
    timesteps = [int(t) for t in sched.timesteps]
    # train_spo.py: prompt_embeds = text_encoder(prompt_ids); neg_prompt_embed repeated per prompt.
    cond, uncond = adapter.encode_prompts(list(prompts))
    # train_spo.py repeats extra_info['input_ids'] (the SPM tokens, padded to max_length) k times; the SPM's
    # get_preference_score then runs its text tower on every candidate at every comparison.
    tok = spm.tokenizer(
        list(prompts) * k, padding="max_length", max_length=spm.tokenizer.model_max_length,
        truncation=True, return_tensors="pt",
    )
    spm_ids = tok["input_ids"]

    def preference_fn(images, t):  # preference_model_fns.py -> StepAwarePreferenceModel.get_preference_score
        pixels = preprocess_images(images.float(), spm.image_processor, resize="official")
        ts = torch.full((images.shape[0],), int(t), dtype=torch.long)
        image = spm.image_features(pixels, ts)
        text = spm.text_features(spm_ids)  # get_text_features(input_ids) without a mask, normalised
        return spm.clip.logit_scale.exp() * (image * text).sum(-1)

    def compare_fn(scores):  # compare_funcs.py: preference_score_compare (scores: k, b)
        s, idx = torch.sort(scores, dim=0, descending=True)
        idx, s = idx[[0, -1], :], s[[0, -1], :].softmax(dim=0)
        return idx, s[0] - s[1] > scfg.threshold

    def decode(latents):  # self.vae.decode(x / scaling_factor) on all k*b candidates at once
        return vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor, return_dict=False)[0]

    def rep(e, n):  # sample-major repeat of prompt embeddings: (k*b, ...)
        return PromptEmbeddings(e.embeds.repeat(n, 1, 1))

    x = randn_tensor(adapter.latent_shape(b), generator=generator, dtype=adapter.dtype) * sched.init_noise_sigma
    c_now, u_now = cond, uncond
    pairs, current, all_prev, last_t = [], None, None, None

    def record(scores, t):
        idx, valid = compare_fn(scores.view(k, b))
        cols = valid.nonzero().flatten()
        if len(cols):
            pairs.append(PairBatch(
                xt_win=current[cols], xt_lose=current[cols],
                prev_win=all_prev[idx[0, cols], cols], prev_lose=all_prev[idx[1, cols], cols],
                timesteps=torch.full((len(cols),), last_t, dtype=torch.long),
                shared=torch.ones(len(cols), dtype=torch.bool), embeds=cond.embeds[cols],
            ))

    for i, t in enumerate(timesteps):
        eps = adapter.predict_noise(x, t, c_now, u_now, scfg.cfg_scale, unet=unet)  # one CFG call
        if i < scfg.divert_start_step:
            x = ddim_step_with_logprob(sched, eps, t, x, scfg.eta, generator=generator).prev_sample
            if i == scfg.divert_start_step - 1:
                current = x
            continue
        if i > scfg.divert_start_step:
            # Judge the k candidates of the previous step on their x̂0 here (VAE decode + SPM), pair, then
            # continue from a random candidate (denoise_idx) whose UNet output this call already holds.
            record(preference_fn(decode(predict_x0(sched, eps, t, x)), t), t)
            choice = torch.randint(0, k, (b,), generator=generator)
            cols = torch.arange(b)
            eps = eps.view(k, b, *eps.shape[1:])[choice, cols]
            x = x.view(k, b, *x.shape[1:])[choice, cols]
            current = x
        else:
            c_now, u_now = rep(cond, k), rep(uncond, k)
        # k next candidates from the chosen x_t (ddim_step_fetch_x_t_1 with num_sample_per_step = k)
        step = ddim_step_with_logprob(sched, eps.repeat(k, 1, 1, 1), t, x.repeat(k, 1, 1, 1), scfg.eta,
                                      generator=generator)
        all_prev = step.prev_sample.view(k, b, *x.shape[1:])
        x, last_t = step.prev_sample, t
        if i == len(timesteps) - 1:  # the last candidates are judged on x_0 at t = 0
            record(preference_fn(decode(x), 0), 0)
    return PairBatch.cat(pairs) if pairs else None


def official_train(trainer, ref_unet, pairs) -> None:
    """The official training loop (train_scripts/train_spo.py, "Training" block, train.cfg=True): per batch
    of train_batch_size pairs, the policy UNet on sample_0 and on sample_1 and the deep-copied reference on
    each (4 CFG calls; sample_0/1 share x_t), DDIM log-probs, clamped ratios, the loss, backward, step."""
    from spo.sampling import ddim_step_with_logprob

    sched, scfg, unet, opt = trainer.sampler.scheduler, trainer.scfg, trainer.unet, trainer.optimizer
    neg = trainer.uncond.embeds
    bs = scfg.train_batch_size

    def guided(model, x, t, embeds):
        out = model(torch.cat([x] * 2), torch.cat([t] * 2), embeds).sample
        u, c = out.chunk(2)
        return u + scfg.cfg_scale * (c - u)

    unet.train()
    for s in range(0, len(pairs), bs):
        p = pairs.index(slice(s, s + bs))
        embeds = torch.cat([neg.expand(len(p), *neg.shape[1:]), p.embeds])  # embeds_0 == embeds_1 for SD-1.5
        lp = {}
        for side, xt, prev in (("0", p.xt_win, p.prev_win), ("1", p.xt_lose, p.prev_lose)):
            eps, eps_ref = guided(unet, xt, p.timesteps, embeds), guided(ref_unet, xt, p.timesteps, embeds)
            lp[side] = ddim_step_with_logprob(sched, eps, p.timesteps, xt, scfg.eta, prev_sample=prev).log_prob
            lp["ref" + side] = ddim_step_with_logprob(
                sched, eps_ref, p.timesteps, xt, scfg.eta, prev_sample=prev
            ).log_prob
        r0 = torch.clamp(torch.exp(lp["0"] - lp["ref0"]), 1 - scfg.eps, 1 + scfg.eps)
        r1 = torch.clamp(torch.exp(lp["1"] - lp["ref1"]), 1 - scfg.eps, 1 + scfg.eps)
        loss = -torch.log(torch.sigmoid(scfg.beta * torch.log(r0) - scfg.beta * torch.log(r1))).mean()
        trainer.accelerator.backward(loss)
        # (the official clip_grad_norm_ gets an exhausted filter iterator and clips nothing: omitted)
        opt.step()
        opt.zero_grad()


def rss_watchdog(limit_gb: float) -> None:
    """Exit the process (code 3) when its resident memory passes ``limit_gb``: the CPU box is shared."""
    import threading

    def watch():
        while True:
            kb = int(next(ln for ln in Path("/proc/self/status").read_text().splitlines()
                          if ln.startswith("VmRSS")).split()[1])
            if kb > limit_gb * 1024**2:
                print(f"RSS {kb / 1024**2:.1f} GB > --max-rss-gb {limit_gb}: stopping", file=sys.stderr, flush=True)
                os._exit(3)
            time.sleep(0.5)

    if Path("/proc/self/status").exists():
        threading.Thread(target=watch, daemon=True).start()


def whole_iteration(size: str, repeats: int, root: str | None = None, overrides: list[str] = (),
                    ref_copy: str = "deep", warmup: int = 1, plan: bool = True,
                    decode_resolution: int | None = None) -> dict:
    """Time one SPO iteration (sampling + training) of the official algorithm, ours (spm.decoder vae) and
    ours (tiny), interleaved C A B C A B ... in this process, on the same prompts and seed stream.

    ``ref_copy="shared"``: the official reference is a deep copy of the UNet's module tree that shares the
    frozen weight tensors (same 4 calls, same kernels, without a second 3.4 GB of weights in RAM).
    ``decode_resolution``: also ours with each decoder at ``spm.decode_resolution`` (variants
    ``ours_vae_<R>``, ``ours_tiny_<R>``)."""
    import statistics

    from spo.config import load_config
    from spo.models.diffusion import DiffusionAdapter, attach_spm_decoder
    from spo.spo_trainer import SPOState, SPOTrainer, make_accelerator
    from spo.training import seed_generator

    spec = WHOLE_SIZES[size]
    tmp = Path(tempfile.mkdtemp(prefix="bench_spo_whole_"))
    base = [f"paths.root={tmp}", f"model.resolution={spec['resolution']}", "model.dtype=fp32"]
    cfg = load_config(spec["preset"], [*base, *spec["overrides"], *overrides], params_file=None)
    plan = plan_ratios(cfg, decode_resolution) if plan else None
    tic = time.perf_counter()
    pipe, spm, decoder_dir = _whole_models(size, cfg, root, tmp)
    cfg = load_config(
        spec["preset"],
        [*base, *spec["overrides"], *overrides, "spm.decoder=tiny", f"spm.tiny_decoder={decoder_dir}"],
        params_file=None,
    )
    # The official train_spo.py deep-copies the UNet before adding the LoRA (~l.158).
    memo = {id(p): p for p in pipe.unet.parameters()} if ref_copy == "shared" else {}
    ref_unet = copy.deepcopy(pipe.unet, memo).requires_grad_(False)
    adapter = attach_spm_decoder(DiffusionAdapter(pipe, cfg.spo_resolution), cfg)  # spo train's path
    tiny = adapter.spm_decoder
    prompts = [WHOLE_PROMPTS[i % len(WHOLE_PROMPTS)] for i in range(cfg.spo.num_prompts)]
    trainer = SPOTrainer(cfg, make_accelerator(cfg), adapter, spm, prompts)
    build_s = time.perf_counter() - tic

    counter = CallCounter()
    counter.watch(trainer.base_unet, "unet_rows", split_grad=True)
    counter.watch(ref_unet, "unet_rows", split_grad=True)
    counter.watch(pipe.vae.decoder, "vae_decodes", latent_pixels=True)
    counter.watch(tiny.decoder, "tiny_decodes", latent_pixels=True)
    counter.watch(spm.clip.vision_model.embeddings, "spm_image_forwards")
    counter.watch(spm.clip.text_model, "spm_text_forwards")

    def ours(decoder, resolution=None):
        def run():
            adapter.spm_decoder, adapter.spm_decode_resolution = decoder, resolution
            trainer.state = SPOState()  # epoch 0, iteration 0: the same prompts and seed stream every time
            counter.phase = "sampling"
            t0 = time.perf_counter()
            trainer.sample_iteration()  # spo train: sample_iteration, then train_pool
            t1 = time.perf_counter()
            counter.phase = "training"
            pairs = trainer.state.pending
            trainer.train_pool()
            if trainer.state.pending:
                raise SystemExit(f"{trainer.state.pending} pairs left untrained: make the pair count a "
                                 "multiple of spo.train_batch_size")
            return t1 - t0, time.perf_counter() - t1, pairs
        return run

    def official():
        order = trainer._prompt_order(0)
        batch = [prompts[order[j]] for j in range(cfg.spo.sample_batch_size)]
        counter.phase = "sampling"
        t0 = time.perf_counter()
        trainer.unet.eval()
        pairs = official_sample(trainer, ref_unet, spm, batch, seed_generator(cfg.spo.seed, 0, 0, 0))
        t1 = time.perf_counter()
        counter.phase = "training"
        official_train(trainer, ref_unet, pairs)
        return t1 - t0, time.perf_counter() - t1, len(pairs)

    # The official variant first: if a slow shared CPU cuts the run short, the baseline is there.
    variants = {"official": official, "ours_vae": ours(None), "ours_tiny": ours(tiny)}
    if decode_resolution:
        variants |= {f"ours_vae_{decode_resolution}": ours(None, decode_resolution),
                     f"ours_tiny_{decode_resolution}": ours(tiny, decode_resolution)}
    times = {v: {"sampling_s": [], "training_s": [], "total_s": []} for v in variants}
    counts: dict[str, dict[str, int]] = {}
    # Untimed warm-up rounds first: the first pass through a model pays page faults and kernel set-up, which
    # would otherwise land on whichever variant runs first.
    for r in range(-warmup, repeats):
        for name, run in variants.items():
            sampling_s, training_s, pairs = run()
            c = {"pairs": pairs, **counter.take()}
            if counts.setdefault(name, c) != c:
                raise SystemExit(f"{name}: call counts changed between repeats ({counts[name]} vs {c})")
            if r < 0:
                print(f"warm-up {name}: {sampling_s + training_s:.2f}s", file=sys.stderr, flush=True)
                continue
            for key, value in (("sampling_s", sampling_s), ("training_s", training_s),
                               ("total_s", sampling_s + training_s)):
                times[name][key].append(value)
            print(f"repeat {r + 1}/{repeats} {name}: sampling {sampling_s:.2f}s, training {training_s:.2f}s",
                  file=sys.stderr, flush=True)

    med = {v: {k: statistics.median(x) for k, x in t.items()} for v, t in times.items()}
    ratios = {}
    for v in [name for name in variants if name != "official"]:
        per_repeat = [a / b for a, b in zip(times[v]["total_s"], times["official"]["total_s"], strict=True)]
        ratios[v] = {"of_medians": med[v]["total_s"] / med["official"]["total_s"],
                     "per_repeat": per_repeat, "median_of_per_repeat": statistics.median(per_repeat)}
    return {
        "size": size, "repeats": repeats, "warmup": warmup, "build_s": build_s,
        "config": {"num_steps": cfg.spo.num_steps, "divert_start_step": cfg.spo.divert_start_step,
                   "num_candidates": cfg.spo.num_candidates, "prompts": cfg.spo.sample_batch_size,
                   "train_batch_size": cfg.spo.train_batch_size, "resolution": cfg.spo_resolution,
                   "overrides": [*spec["overrides"], *overrides]},
        "params_m": {"unet": sum(p.numel() for p in ref_unet.parameters()) / 1e6,
                     "vae": sum(p.numel() for p in pipe.vae.parameters()) / 1e6,
                     "tiny_decoder": sum(p.numel() for p in tiny.parameters()) / 1e6,
                     "spm": sum(p.numel() for p in spm.parameters()) / 1e6},
        "counts": counts, "times_s": times, "median_s": med, "ratio_to_official": ratios,
        "plan": plan, "reference": ref_copy, "decode_resolution": decode_resolution,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "torch_threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS", "unset"),
    }


def plan_ratios(measured_cfg, decode_resolution: int | None = None) -> dict:
    """spo.plan's train_spo FLOP ratio ours/official: at paper sizes (sd15 preset, kept fraction 0.28 and
    1.0) for each decoder (and each at ``decode_resolution``), and for the measured config (every comparison
    kept, as at threshold 0)."""
    from spo import plan
    from spo.config import load_config

    def ratio(cfg, kept):
        st = plan.make_plan(cfg, kept_fraction=kept)["stages"]["train_spo"]
        return {"ratio": st["ratio"], "ours_flops": st["ours_flops"], "official_flops": st["official_flops"]}

    out = {}
    for decoder in ("vae", "tiny"):
        for res in dict.fromkeys([None, decode_resolution]):
            name = decoder if res is None else f"{decoder}_{res}"
            paper = load_config("sd15", [f"spm.decoder={decoder}", f"spm.decode_resolution={res or 'null'}"],
                                params_file=None)
            out[f"paper_sd15_{name}_kept0.28"] = ratio(paper, plan.DEFAULT_KEPT_FRACTION)
            out[f"paper_sd15_{name}_kept1.0"] = ratio(paper, 1.0)
            here = measured_cfg.model_copy(deep=True)
            here.spm.decoder, here.spm.decode_resolution = decoder, res
            out[f"measured_config_{name}_kept1.0"] = ratio(here, 1.0)
    counts = plan.sampling_counts(measured_cfg)
    out["measured_config_counts_per_prompt"] = {
        "unet_rows": counts.unet_rows, "vae_decodes": counts.vae_decodes, "spm_forwards": counts.spm_forwards,
        "comparisons": counts.comparisons}
    return out


def _label(variant: str) -> str:
    """ours_tiny_224 -> ours (tiny, 224 px)"""
    who, *how = variant.split("_")
    if not how:
        return who
    return f"{who} ({how[0]}{f', {how[1]} px' if len(how) > 1 else ''})"


def whole_table(res: dict) -> str:
    c, med, counts = res["config"], res["median_s"], res["counts"]
    lines = [f"\n{res['size']}: {c['prompts']} prompt(s), {c['num_steps']} DDIM steps, divert "
             f"{c['divert_start_step']}, k {c['num_candidates']}, {c['resolution']} px; {res['repeats']} "
             f"repeat(s) interleaved after {res['warmup']} untimed warm-up round(s); params (M): "
             + ", ".join(f"{k} {v:.1f}" for k, v in res["params_m"].items())]
    names = [*(n for n in med if n != "official"), "official"]
    lines += ["| per iteration | " + " | ".join(_label(n) for n in names) + " |", "|---" * (len(names) + 1) + "|"]
    for key, label in (("sampling_s", "sampling s (median)"), ("training_s", "training s (median)"),
                       ("total_s", "whole iteration s (median)")):
        lines.append(f"| {label} | " + " | ".join(f"{med[n][key]:.2f}" for n in names) + " |")
    for n in ("total_s",):
        lines.append("| whole iteration s (min-max) | " + " | ".join(
            f"{min(res['times_s'][v][n]):.2f}-{max(res['times_s'][v][n]):.2f}" for v in names) + " |")
    r = res["ratio_to_official"]
    lines.append("| ratio to official (of medians; median of per-repeat) | " + " | ".join(
        f"{r[v]['of_medians']:.3f}; {r[v]['median_of_per_repeat']:.3f}" for v in names[:-1]) + " | 1 |")
    keys = sorted({k for v in counts.values() for k in v})
    for k in keys:
        lines.append(f"| {k} | " + " | ".join(str(counts[v].get(k, 0)) for v in names) + " |")
    p = res["plan"] or {}
    lines.append("\nspo plan, train_spo ours/official FLOP ratio:")
    for k, v in p.items():
        if "ratio" in v:
            lines.append(f"  {k}: {v['ratio']:.3f}")
    if p:
        lines.append(f"  plan counts per prompt for the measured config: {p['measured_config_counts_per_prompt']}")
    lines.append(f"peak RSS {res['peak_rss_mb']:.0f} MB, torch threads {res['torch_threads']} "
                 f"(OMP_NUM_THREADS={res['omp_num_threads']}), build {res['build_s']:.0f}s")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=[*dict.fromkeys([*SIZES, *WHOLE_SIZES]), "both"], default="both",
                    help="sd15-512: --whole-iteration only")
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
    ap.add_argument(
        "--whole-iteration",
        type=int,
        default=0,
        metavar="R",
        help="instead: time whole iterations (sampling + training) of ours (vae), ours (tiny) and the official "
        "algorithm, interleaved, R repeats, in one process",
    )
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (whole-iteration)")
    ap.add_argument("--ref-copy", choices=["deep", "shared"], default="deep",
                    help="whole-iteration: official reference = deep copy, or a copy sharing the frozen weights")
    ap.add_argument("--warmup", type=int, default=1, help="whole-iteration: untimed rounds before the repeats")
    ap.add_argument("--decode-resolution", type=int, default=None, metavar="PX",
                    help="whole-iteration: also time ours with each decoder at spm.decode_resolution=PX")
    ap.add_argument("--max-rss-gb", type=float, default=13.0, help="whole-iteration: stop above this RSS")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--variant", choices=["ours", "official"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        import logging

        logging.disable(logging.WARNING)
        print(json.dumps(worker(args.size, args.variant, args.iters or 1, args.train_pairs, args.root)))
        return
    sizes = list(SIZES) if args.size == "both" else [args.size]
    if not args.whole_iteration and args.size not in (*SIZES, "both"):
        ap.error(f"--size {args.size} is for --whole-iteration only")
    if args.whole_iteration:
        if args.threads:
            torch.set_num_threads(args.threads)
        rss_watchdog(args.max_rss_gb)
        results = [whole_iteration(size, args.whole_iteration, args.root, args.set, args.ref_copy, args.warmup,
                                   decode_resolution=args.decode_resolution) for size in sizes]
        print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, {time.ctime()}")
        for res in results:
            print(whole_table(res))
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=2))
        return
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
