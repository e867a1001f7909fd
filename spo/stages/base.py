"""``spo base``: pretrain the tiny world's base model and CLIP on CPU (tiny preset only).

Real presets load ``model.pretrained`` (a hub id); the tiny preset has no hub, so this stage trains, from
random init and in a few CPU minutes, a tiny model of the *real* SD-1.5 architecture on the synthetic
Pick-a-Pic images and captions:

1. the VAE (AutoencoderKL) as an autoencoder (L1 + L2 + a small KL), then its ``scaling_factor`` set so
   latents have unit variance, as SD's 0.18215 does for SD's VAE;
2. a tiny CLIPModel, contrastively: the SPM's initialisation, the tiny stand-in for PickScore, and -- as
   CLIP ViT-L is for SD-1.5 -- the frozen text encoder of the diffusion model (a UNet conditions far
   sooner on a contrastively trained text tower than on one learnt jointly from scratch);
3. the UNet with the standard ε-prediction loss, dropping 10 % of captions so that classifier-free
   guidance works.

Everything is saved as ordinary folders (``models/base`` via ``save_pretrained``; ``models/base/clip``)
and read back afterwards only through ``from_pretrained`` -- the same call the real presets use.
"""

from __future__ import annotations

import io
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from spo import tracking
from spo.errors import SPOError
from spo.utils import (
    atomic_dir,
    atomic_write_bytes,
    atomic_write_json,
    get_logger,
    hash_tree,
    read_json,
    seed_everything,
)

log = get_logger(__name__)

INFO_FILE = "spo_base.json"
GRID_FILE = "base_samples.png"


def _fingerprint(cfg) -> str:
    return cfg.section_hash("base", "synthetic", "model")


def is_up_to_date(cfg) -> bool:
    info = cfg.paths.base_model / INFO_FILE
    if not info.exists() or not (cfg.paths.base_clip / "config.json").exists():
        return False
    return read_json(info).get("fingerprint") == _fingerprint(cfg)


def load_training_images(cfg, limit: int) -> tuple[torch.Tensor, list[str]]:
    """Decode up to ``limit`` images (both images of each train pair) with their captions, as [-1, 1]."""
    import itertools

    import pyarrow.parquet as pq

    from spo.data.pickapic import decode_image

    shards = sorted((cfg.paths.raw_data / "data").glob(f"{cfg.data.train_split}-*.parquet"))
    if not shards:
        raise SPOError(
            f"no training shards under {cfg.paths.raw_data / 'data'}; run `spo synth` first to generate the tiny world"
        )

    def images_with_captions():
        for shard in shards:
            for batch in pq.ParquetFile(shard).iter_batches(columns=["caption", "jpg_0", "jpg_1"], batch_size=1024):
                rows = zip(*(batch.column(c).to_pylist() for c in ("caption", "jpg_0", "jpg_1")), strict=True)
                for caption, jpg_0, jpg_1 in rows:
                    yield jpg_0, caption
                    yield jpg_1, caption

    pairs = list(itertools.islice(images_with_captions(), limit))
    pixels = torch.stack([decode_image(jpg, cfg.model.resolution) for jpg, _ in pairs])
    return pixels, [caption for _, caption in pairs]


def _batches(n: int, batch_size: int, steps: int, generator: torch.Generator):
    for _ in range(steps):
        yield torch.randint(0, n, (batch_size,), generator=generator)


def _cosine_lr(step: int, total: int, warmup: int = 50) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def _train_loop(name: str, params, steps: int, lr: float, loss_fn, batch_indices) -> float:
    """AdamW with warm-up + cosine decay; returns the mean loss of the last 10 % of steps."""
    params = [p for p in params if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _cosine_lr(s, steps))
    tail: list[float] = []
    bar = tqdm(batch_indices, total=steps, desc=f"base/{name}", leave=False, mininterval=1.0)
    for step, idx in enumerate(bar):
        loss = loss_fn(idx)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        value = loss.item()
        if not math.isfinite(value):
            raise SPOError(f"base/{name}: loss became {value} at step {step}; lower base.lr and retry")
        if step >= steps - max(1, steps // 10):
            tail.append(value)
        if step % 25 == 0:
            bar.set_postfix(loss=f"{value:.4f}")
            tracking.active().log_metrics({f"base/{name}_loss": value}, step=step)
    return float(np.mean(tail)) if tail else float("nan")


def train_vae(vae, pixels: torch.Tensor, cfg, gen: torch.Generator) -> float:
    def loss_fn(idx):
        x = pixels[idx]
        dist = vae.encode(x).latent_dist
        recon = vae.decode(dist.sample(gen)).sample
        kl = dist.kl().mean() / x[0].numel()
        return F.l1_loss(recon, x) + F.mse_loss(recon, x) + 1e-3 * kl

    vae.train()
    loss = _train_loop("vae", vae.parameters(), cfg.base.vae_steps, cfg.base.vae_lr, loss_fn,
                       _batches(len(pixels), cfg.base.vae_batch_size, cfg.base.vae_steps, gen))
    vae.eval()
    with torch.no_grad():
        sample = torch.cat([vae.encode(pixels[i : i + 256]).latent_dist.mean for i in range(0, min(len(pixels), 1024), 256)])
    vae.register_to_config(scaling_factor=float(1.0 / sample.std()))
    return loss


def train_unet(pipe, pixels: torch.Tensor, captions: list[str], cfg, gen: torch.Generator) -> float:
    vae, unet, text_encoder, tokenizer, sched = pipe.vae, pipe.unet, pipe.text_encoder, pipe.tokenizer, pipe.scheduler
    scale = vae.config.scaling_factor
    with torch.no_grad():
        latents = torch.cat([vae.encode(pixels[i : i + 256]).latent_dist.mean for i in range(0, len(pixels), 256)]) * scale
        # The text encoder is frozen, so each distinct caption is encoded once; "" is CFG's unconditional prompt.
        vocab = sorted(set(captions)) + [""]
        tokens = tokenizer(vocab, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                           return_tensors="pt").input_ids
        text_states = torch.cat([text_encoder(tokens[i : i + 256])[0] for i in range(0, len(vocab), 256)])
    caption_ids = _index(vocab, captions)
    empty_id = len(vocab) - 1
    alphas = sched.alphas_cumprod

    def loss_fn(idx):
        x0 = latents[idx]
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, sched.config.num_train_timesteps, (len(idx),), generator=gen)
        a = alphas[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        ids = caption_ids[idx].clone()
        ids[torch.rand(len(idx), generator=gen) < 0.1] = empty_id
        pred = unet(xt, t, encoder_hidden_states=text_states[ids]).sample
        return F.mse_loss(pred, noise)

    unet.train()
    loss = _train_loop("unet", unet.parameters(), cfg.base.unet_steps, cfg.base.lr, loss_fn,
                       _batches(len(latents), cfg.base.batch_size, cfg.base.unet_steps, gen))
    unet.eval()
    return loss


def clip_text_encoder(clip):
    """The CLIP's text tower as a standalone ``CLIPTextModel`` (what SD-1.5 pipelines hold)."""
    from transformers import CLIPTextModel

    text_encoder = CLIPTextModel(clip.config.text_config)
    text_encoder.load_state_dict(clip.text_model.state_dict())
    return text_encoder.requires_grad_(False).eval()


def _index(vocab: list[str], items: list[str]) -> torch.Tensor:
    pos = {c: i for i, c in enumerate(vocab)}
    return torch.tensor([pos[c] for c in items])


def train_clip(model, processor, pixels: torch.Tensor, captions: list[str], cfg, gen: torch.Generator) -> float:
    from spo.models.preference import preprocess_images

    vocab = sorted(set(captions))
    tokens = processor.tokenizer(vocab, padding="max_length", max_length=processor.tokenizer.model_max_length,
                                 truncation=True, return_tensors="pt")
    caption_ids = _index(vocab, captions)
    by_caption: dict[int, list[int]] = {}
    for i, c in enumerate(caption_ids.tolist()):
        by_caption.setdefault(c, []).append(i)
    groups = list(by_caption.values())
    bs = min(cfg.base.batch_size, len(groups))

    def sample_batch():
        # Distinct captions within a batch, so the contrastive targets are unambiguous.
        for _ in range(cfg.base.clip_steps):
            chosen = torch.randperm(len(groups), generator=gen)[:bs].tolist()
            yield torch.tensor([groups[g][int(torch.randint(len(groups[g]), (1,), generator=gen))] for g in chosen])

    def loss_fn(idx):
        images = preprocess_images(pixels[idx], processor.image_processor)
        ids = caption_ids[idx]
        img = F.normalize(model.get_image_features(pixel_values=images).pooler_output, dim=-1)
        txt = F.normalize(model.get_text_features(input_ids=tokens.input_ids[ids],
                                                  attention_mask=tokens.attention_mask[ids]).pooler_output, dim=-1)
        logits = model.logit_scale.exp() * img @ txt.T
        target = torch.arange(len(idx))
        return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))

    model.train()
    loss = _train_loop("clip", model.parameters(), cfg.base.clip_steps, cfg.base.lr, loss_fn, sample_batch())
    model.eval()
    return loss


def save_sample_grid(pipe, prompts: list[str], path: Path, cfg, per_prompt: int = 4) -> None:
    """Rows of ``per_prompt`` samples (fixed seeds, CFG 5), each row labelled with its prompt."""
    from PIL import Image, ImageDraw

    rows = []
    for i, prompt in enumerate(prompts):
        gens = [torch.Generator().manual_seed(1000 * i + j) for j in range(per_prompt)]
        out = pipe([prompt] * per_prompt, num_inference_steps=cfg.base.sample_steps, guidance_scale=5.0,
                   height=cfg.model.resolution, width=cfg.model.resolution, generator=gens, output_type="np")
        rows.append(np.concatenate(list(out.images), axis=1))
    grid = (np.concatenate(rows, axis=0) * 255).round().astype(np.uint8)
    scale = max(1, 128 // cfg.model.resolution)
    cell = cfg.model.resolution * scale
    samples = Image.fromarray(grid).resize((grid.shape[1] * scale, grid.shape[0] * scale), Image.NEAREST)
    label_width = 420
    canvas = Image.new("RGB", (label_width + samples.width, samples.height), "white")
    canvas.paste(samples, (label_width, 0))
    draw = ImageDraw.Draw(canvas)
    for i, prompt in enumerate(prompts):
        draw.text((6, i * cell + cell // 2 - 6), prompt, fill="black")
    buf = io.BytesIO()
    canvas.save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())


def run(cfg, force: bool = False) -> dict:
    if not cfg.is_tiny:
        msg = f"base pretraining is only for the tiny preset; preset {cfg.preset} loads {cfg.model.pretrained}"
        log.info(msg)
        # dvc.yaml declares models/base for every preset: leave a placeholder rather than a missing output.
        if not cfg.paths.base_model.exists():
            with atomic_dir(cfg.paths.base_model) as tmp:
                (tmp / "README.txt").write_text(f"Placeholder: {msg}.\n")
        return {"skipped": msg}
    if not force and is_up_to_date(cfg):
        log.info("models/base is up to date (fingerprint %s); use --force to retrain", _fingerprint(cfg))
        return {"skipped": "up to date", **read_json(cfg.paths.base_model / INFO_FILE)}

    from spo.data.synthetic import VOCABULARY
    from spo.models.tiny import build_tiny_clip, build_tiny_sd15

    seed_everything(cfg.base.seed)
    gen = torch.Generator().manual_seed(cfg.base.seed)
    t0 = time.perf_counter()
    pixels, captions = load_training_images(cfg, cfg.base.num_images)
    log.info("base: %d training images, %d distinct captions", len(pixels), len(set(captions)))

    timings, losses = {}, {}
    clip, processor = build_tiny_clip(words=VOCABULARY, image_size=cfg.model.resolution, seed=cfg.base.seed)
    t = time.perf_counter()
    losses["clip"] = train_clip(clip, processor, pixels, captions, cfg, gen)
    timings["clip_s"] = time.perf_counter() - t

    pipe = build_tiny_sd15(seed=cfg.base.seed, text_encoder=clip_text_encoder(clip), tokenizer=processor.tokenizer)
    t = time.perf_counter()
    losses["vae"] = train_vae(pipe.vae, pixels, cfg, gen)
    timings["vae_s"] = time.perf_counter() - t
    t = time.perf_counter()
    losses["unet"] = train_unet(pipe, pixels, captions, cfg, gen)
    timings["unet_s"] = time.perf_counter() - t
    timings["total_s"] = time.perf_counter() - t0

    info = {
        "fingerprint": _fingerprint(cfg),
        "final_loss": {k: round(v, 5) for k, v in losses.items()},
        "seconds": {k: round(v, 1) for k, v in timings.items()},
        "num_images": len(pixels),
        "data_hash": hash_tree(cfg.paths.raw_data / "data"),
    }
    with atomic_dir(cfg.paths.base_model) as tmp:
        pipe.save_pretrained(tmp)
        clip.save_pretrained(tmp / "clip")
        processor.save_pretrained(tmp / "clip")
        atomic_write_json(tmp / INFO_FILE, info)

    # The grid is drawn from the saved folder, through the same loader every later stage uses.
    from spo.models.diffusion import load_pipeline

    saved = load_pipeline(cfg.model, cfg=cfg)
    prompts = sorted(set(captions))[:: max(1, len(set(captions)) // 6)][:6]
    save_sample_grid(saved, prompts, cfg.paths.reports / GRID_FILE, cfg)
    info["grid_prompts"] = prompts
    atomic_write_json(cfg.paths.reports / "base_train.json", info)
    tracking.active().log_metrics({f"base/final_{k}_loss": v for k, v in losses.items()})
    tracking.active().log_artifact(cfg.paths.reports / GRID_FILE)
    log.info("base: trained in %.0f s (vae %.4f, unet %.4f, clip %.4f); grid at %s", timings["total_s"],
             losses["vae"], losses["unet"], losses["clip"], cfg.paths.reports / GRID_FILE)
    return info
