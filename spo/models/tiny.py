"""Builders for tiny SD-1.5 / SDXL / CLIP models of the real architectures, with no downloads.

The tiny preset's base model and CLIP are built here, trained by ``spo base`` and saved as ordinary
diffusers / transformers folders, then loaded only through ``from_pretrained(path)``. Tests use the same
builders with random weights.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
# Words the tokenizer keeps whole (others fall back to byte-level pieces). The tiny world's captions only
# use words like these, so a caption is ~10 tokens instead of ~50 characters.
DEFAULT_WORDS = (
    "a an the of on in at with and",
    "red orange yellow green blue purple pink white black gray brown cyan",
    "circle square triangle diamond ring cross star",
    "small large big tiny background top bottom left right center middle corner",
)


def build_tiny_tokenizer(words: Iterable[str] = (), model_max_length: int = 32):
    """A CLIPTokenizer built in memory: byte-level vocab + whole-word merges for ``words``.

    transformers 5 accepts an in-memory vocab; ``model_max_length`` must be set (the default of ~1e30 breaks
    diffusers pipelines).
    """
    from transformers import CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    chars = list(bytes_to_unicode().values())
    vocab_list = chars + [c + "</w>" for c in chars]
    seen = set(vocab_list)
    ranks: dict[tuple[str, str], int] = {}
    all_words = sorted({w for chunk in (*DEFAULT_WORDS, *words) for w in chunk.lower().split()})
    for word in all_words:
        # Add merges until BPE (with every merge so far) turns the word into one token. A merge appended
        # later has a higher rank, so it never changes how an earlier word is merged.
        while len(pieces := _bpe(list(word[:-1]) + [word[-1] + "</w>"], ranks)) > 1:
            ranks[(pieces[0], pieces[1])] = len(ranks)
            if pieces[0] + pieces[1] not in seen:
                vocab_list.append(pieces[0] + pieces[1])
                seen.add(pieces[0] + pieces[1])
    merges = sorted(ranks, key=ranks.get)
    vocab_list += [BOS, EOS]
    vocab = {tok: i for i, tok in enumerate(vocab_list)}
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length)


def _bpe(pieces: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Byte-pair merging as the BPE tokenizer does it: repeatedly join the adjacent pair of lowest rank."""
    while len(pieces) > 1:
        ranked = [(ranks.get(pair, len(ranks) + 1), i) for i, pair in enumerate(zip(pieces, pieces[1:], strict=False))]
        rank, i = min(ranked)
        if rank > len(ranks):
            break
        pieces = pieces[:i] + [pieces[i] + pieces[i + 1]] + pieces[i + 2 :]
    return pieces


def tiny_text_config(tokenizer, hidden_size: int = 64, layers: int = 3, projection_dim: int = 64):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_attention_heads=4,
        num_hidden_layers=layers,
        max_position_embeddings=tokenizer.model_max_length,
        projection_dim=projection_dim,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        hidden_act="gelu",
        layer_norm_eps=1e-5,
    )


def tiny_vae(latent_channels: int = 4, down_levels: int = 3):
    """AutoencoderKL with factor 2**(down_levels-1) (4 by default: 32 px images -> 8x8 latents).

    The posterior's log-variance starts at -6 (std 0.05) instead of 0: with unit noise on fresh latents a
    from-scratch VAE spends most of a CPU-minute budget learning to ignore it.
    """
    from diffusers import AutoencoderKL

    channels = [16, 32, 32, 32][:down_levels]
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * down_levels,
        up_block_types=["UpDecoderBlock2D"] * down_levels,
        block_out_channels=channels,
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=8,
        sample_size=32,
    )
    with torch.no_grad():
        vae.quant_conv.bias[latent_channels:] = -6.0
    return vae


def tiny_decoder(latent_channels: int = 4, up_levels: int = 3):
    """A diffusers ``AutoencoderTiny`` (TAESD's architecture, narrowed) whose decoder maps the tiny VAE's scaled
    latents to images with the same factor as :func:`tiny_vae`; ``spo base`` distils it from the VAE decoder."""
    from diffusers import AutoencoderTiny

    return AutoencoderTiny(
        encoder_block_out_channels=(8,) * up_levels,
        decoder_block_out_channels=(16,) * up_levels,
        num_encoder_blocks=(1,) * up_levels,
        num_decoder_blocks=(1,) * up_levels,
        latent_channels=latent_channels,
    )


def tiny_unet(cross_attention_dim: int = 64, sample_size: int = 8, sdxl: bool = False, pooled_dim: int = 64):
    from diffusers import UNet2DConditionModel

    kwargs = dict(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=8,
        norm_num_groups=8,
    )
    if sdxl:
        kwargs.update(
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            transformer_layers_per_block=(1, 1),
            projection_class_embeddings_input_dim=6 * 8 + pooled_dim,
        )
    return UNet2DConditionModel(**kwargs)


# SD-1.5's DDIM settings (its scheduler_config.json); the real-size builders use them too.
SD_SCHEDULER: dict = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
    prediction_type="epsilon",
    timestep_spacing="leading",
)


def tiny_scheduler(**overrides):
    """DDIM with SD-1.5's schedule and settings (``overrides``, e.g. ``prediction_type``, replace them)."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(**{**SD_SCHEDULER, **overrides})


def build_tiny_sd15(words: Iterable[str] = (), seed: int = 0, text_encoder=None, tokenizer=None):
    """A random-init StableDiffusionPipeline of the SD-1.5 architecture (32 px images, 8x8 latents).

    ``text_encoder``/``tokenizer`` default to random ones; ``spo base`` passes a trained CLIP's text tower,
    as SD-1.5 uses CLIP ViT-L's.
    """
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    tokenizer = tokenizer or build_tiny_tokenizer(words)
    text_encoder = text_encoder or CLIPTextModel(tiny_text_config(tokenizer, hidden_size=64))
    return StableDiffusionPipeline(
        vae=tiny_vae(),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=tiny_unet(cross_attention_dim=text_encoder.config.hidden_size),
        scheduler=tiny_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        image_encoder=None,
        requires_safety_checker=False,
    )


def build_tiny_sdxl(words: Iterable[str] = (), seed: int = 0):
    """A random-init StableDiffusionXLPipeline: two text encoders, pooled embeds and time ids."""
    from diffusers import StableDiffusionXLPipeline
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    tokenizer = build_tiny_tokenizer(words)
    tokenizer_2 = build_tiny_tokenizer(words)
    # SDXL concatenates the two encoders' penultimate states: 32 + 32 = cross_attention_dim 64.
    text_encoder = CLIPTextModel(tiny_text_config(tokenizer, hidden_size=32, projection_dim=32))
    text_encoder_2 = CLIPTextModelWithProjection(tiny_text_config(tokenizer_2, hidden_size=32, projection_dim=32))
    return StableDiffusionXLPipeline(
        vae=tiny_vae(),
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=tiny_unet(cross_attention_dim=64, sdxl=True, pooled_dim=32),
        scheduler=tiny_scheduler(),
        image_encoder=None,
        feature_extractor=None,
    )


def build_tiny_clip(words: Iterable[str] = (), image_size: int = 32, seed: int = 0):
    """A random-init CLIPModel + CLIPProcessor (the tiny SPM initialisation and tiny scorer stand-in)."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPVisionConfig

    torch.manual_seed(seed)
    tokenizer = build_tiny_tokenizer(words)
    text_cfg = tiny_text_config(tokenizer, hidden_size=64, layers=2, projection_dim=64)
    vision_cfg = CLIPVisionConfig(
        hidden_size=64,
        intermediate_size=128,
        num_attention_heads=4,
        num_hidden_layers=3,
        image_size=image_size,
        patch_size=4,
        projection_dim=64,
        hidden_act="gelu",
        layer_norm_eps=1e-5,
    )
    config = CLIPConfig(text_config=text_cfg.to_dict(), vision_config=vision_cfg.to_dict(), projection_dim=64)
    model = CLIPModel(config)
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        do_convert_rgb=True,
    )
    processor = CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)
    return model, processor


def save_random_tiny_models(root, sdxl: bool = True) -> None:
    """Random-init tiny models saved as real folders (tests and benchmarks): ``models/base`` (SD-1.5
    architecture), ``models/base/clip`` (CLIP + processor), ``models/base/tiny_decoder`` and, with ``sdxl``,
    ``models/base_sdxl``."""
    from pathlib import Path

    base = Path(root) / "models" / "base"
    build_tiny_sd15(seed=0).save_pretrained(base)
    model, processor = build_tiny_clip(seed=0)
    model.save_pretrained(base / "clip")
    processor.save_pretrained(base / "clip")
    torch.manual_seed(0)
    tiny_decoder().save_pretrained(base / "tiny_decoder")
    if sdxl:
        build_tiny_sdxl(seed=0).save_pretrained(Path(root) / "models" / "base_sdxl")
