"""The parts of ``spo base`` (tiny base model and CLIP pretraining): the training images, the three
training phases (CLIP contrastively, the VAE as an autoencoder, the UNet with the ε loss) and the sample grid.

Each phase runs :func:`train_loop`: AdamW, warm-up then cosine decay (:func:`spo.training.warmup_schedule`)
and the kit's non-finite policy (a non-finite loss skips its step; ``base.max_consecutive_nonfinite`` in a
row abort, naming the learning-rate key to lower).
"""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from spo import tracking
from spo.errors import SPOError
from spo.pipeline_spec import artifact_path
from spo.progress import tqdm
from spo.training import NonFiniteGuard, warmup_schedule
from spo.utils import atomic_write_bytes

WARMUP_STEPS = 50


def load_training_images(cfg, limit: int) -> tuple[torch.Tensor, list[str]]:
    """Decode up to ``limit`` images (both images of each train pair) with their captions, as [-1, 1]."""
    import itertools

    import pyarrow.parquet as pq

    from spo.data.pickapic import decode_image

    data = artifact_path(cfg, "raw_data") / "data"
    shards = sorted(data.glob(f"{cfg.data.train_split}-*.parquet"))
    if not shards:
        raise SPOError(f"no training shards under {data}; run `spo synth` first to generate the tiny world")

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


def train_loop(name: str, params, steps: int, lr: float, loss_fn, batch_indices, cfg, lr_key: str = "base.lr") -> float:
    """AdamW with warm-up + cosine decay; returns the mean loss of the last 10 % of steps.

    A non-finite loss skips its step (nothing is applied); ``base.max_consecutive_nonfinite`` in a row abort."""
    if steps == 0:
        return float("nan")
    params = [p for p in params if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_schedule("cosine", WARMUP_STEPS, steps))
    guard = NonFiniteGuard(cfg.base.max_consecutive_nonfinite, f"base/{name}", f"Lower {lr_key} and retry.")
    tail: list[float] = []
    bar = tqdm(batch_indices, total=steps, desc=f"base/{name}", leave=False, mininterval=1.0)
    for step, idx in enumerate(bar):
        loss = loss_fn(idx)
        value = loss.item()
        if not guard.ok(math.isfinite(value), f"base/{name} loss", step=step):
            continue
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
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
    loss = train_loop("vae", vae.parameters(), cfg.base.vae_steps, cfg.base.vae_lr, loss_fn,
                       _batches(len(pixels), cfg.base.vae_batch_size, cfg.base.vae_steps, gen), cfg,
                       "base.vae_lr (base.lr is the UNet's and CLIP's)")
    vae.eval()
    with torch.no_grad():
        sample = torch.cat([vae.encode(pixels[i : i + 256]).latent_dist.mean for i in range(0, min(len(pixels), 1024), 256)])
    vae.register_to_config(scaling_factor=float(1.0 / sample.std()))
    return loss


def train_tiny_decoder(tiny, vae, pixels: torch.Tensor, cfg, gen: torch.Generator) -> float:
    """Distil the tiny autoencoder's decoder from the trained VAE's decoder (both take the scaled latents).

    The SPM judges decoded x̂0, which at high noise lies off the clean-latent manifold, so half of each batch is
    the clean posterior sample and half that sample plus Gaussian noise of a random scale in [0, 1)."""
    scale = float(vae.config.scaling_factor)

    def loss_fn(idx):
        with torch.no_grad():
            z = vae.encode(pixels[idx]).latent_dist.sample(gen) * scale
            half = z.shape[0] // 2
            sigma = torch.rand(z.shape[0] - half, 1, 1, 1, generator=gen)
            z = torch.cat([z[:half], z[half:] + sigma * torch.randn(z[half:].shape, generator=gen)])
            target = vae.decode(z / scale).sample.clamp(-1, 1)
        out = tiny.decode(z).sample
        return F.l1_loss(out, target) + F.mse_loss(out, target)

    tiny.train()
    loss = train_loop("tiny_decoder", tiny.decoder.parameters(), cfg.base.tiny_decoder_steps,
                      cfg.base.tiny_decoder_lr, loss_fn,
                      _batches(len(pixels), cfg.base.vae_batch_size, cfg.base.tiny_decoder_steps, gen), cfg,
                      "base.tiny_decoder_lr")
    tiny.eval()
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
    loss = train_loop("unet", unet.parameters(), cfg.base.unet_steps, cfg.base.lr, loss_fn,
                       _batches(len(latents), cfg.base.batch_size, cfg.base.unet_steps, gen), cfg)
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
    loss = train_loop("clip", model.parameters(), cfg.base.clip_steps, cfg.base.lr, loss_fn, sample_batch(), cfg)
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
