"""Random-weight SD-1.5, SDXL and PickScore-shaped CLIP models of the REAL architectures, built offline.

The tiny preset exercises the code paths at toy sizes; this module builds the published architectures
(real widths, depths, heads, vocabulary, scheduler) with random weights and saves them as ordinary
diffusers / transformers folders, so the stages load them through ``from_pretrained(folder)`` exactly as
they load a hub id::

    python -m spo.models.realsize --arch sd15 --out /tmp/real/sd15         # StableDiffusionPipeline
    python -m spo.models.realsize --arch sdxl --out /tmp/real/sdxl         # StableDiffusionXLPipeline
    python -m spo.models.realsize --arch pickscore --out /tmp/real/pick    # CLIPModel + CLIPProcessor

then e.g. ``--set model.pretrained=/tmp/real/sd15 --set spm.init=/tmp/real/pick
--set spm.processor=/tmp/real/pick`` (SDXL: also ``--set model.vae=/tmp/real/sdxl/vae``).

**Diffusion weights are stored in fp16** (``--dtype bf16|fp32`` also work; the PickScore CLIP defaults to
fp32 like the hub's 3.9 GB ``PickScore_v1``): the models are *constructed* with torch's
default dtype set to fp16, so an SDXL build peaks at ~7 GB of RAM instead of ~14 GB and writes ~7 GB
instead of ~14 GB. The files are the default (non-``variant``) ``*.safetensors`` names, so
:func:`spo.models.diffusion.load_pipeline` loads them unchanged; its ``dtype`` argument (fp32 on CPU)
upcasts them on load. Weights are PyTorch's / transformers' default random init; nothing is pretrained.

Architecture numbers and where they come from (hub ``config.json`` files, read through the public hub
pages and copies of them on 2026-12-02):

- SD-1.5 UNet: ``stable-diffusion-v1-5/stable-diffusion-v1-5/unet/config.json`` (block_out_channels
  320/640/1280/1280, 3 CrossAttnDown + DownBlock2D, attention_head_dim 8, cross_attention_dim 768,
  layers_per_block 2, sample_size 64) -- 859,520,964 parameters.
- SDXL UNet: ``stabilityai/stable-diffusion-xl-base-1.0/unet/config.json`` (320/640/1280, DownBlock2D +
  2 CrossAttnDown, attention_head_dim [5, 10, 20], transformer_layers_per_block [1, 2, 10],
  cross_attention_dim 2048, addition_embed_type text_time, addition_time_embed_dim 256,
  projection_class_embeddings_input_dim 2816 = 6·256 + 1280, use_linear_projection, sample_size 128)
  -- 2,567,463,684 parameters.
- VAE: ``stable-diffusion-v1-5/.../vae/config.json`` (128/256/512/512, 4 down/up blocks,
  layers_per_block 2, latent_channels 4, scaling_factor 0.18215) and, for SDXL,
  ``madebyollin/sdxl-vae-fp16-fix/config.json`` (the SDXL VAE architecture, scaling_factor 0.13025,
  force_upcast false) -- 83,653,863 parameters each.
- Text encoders: ``.../text_encoder/config.json`` of SD-1.5 and SDXL (CLIP ViT-L/14 text: hidden 768,
  intermediate 3072, 12 layers, 12 heads, quick_gelu, 77 positions, vocab 49408 -- 123,060,480 params) and
  SDXL's ``text_encoder_2/config.json`` (OpenCLIP bigG text, ``CLIPTextModelWithProjection``: hidden 1280,
  intermediate 5120, 32 layers, 20 heads, gelu, projection 1280 -- 694,659,840 params). bos/eos/pad ids
  0/2/1 as in the hub files (eos_token_id 2 makes transformers pool at the argmax token, i.e. at
  ``<|endoftext|>`` = 49407, like the originals).
- PickScore: ``yuvalkirstain/PickScore_v1/config.json`` = ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``'s
  architecture (vision: hidden 1280, intermediate 5120, 32 layers, 16 heads, patch 14, 224 px; text:
  hidden 1024, intermediate 4096, 24 layers, 16 heads; gelu; projection_dim 1024) and the laion ViT-H
  ``preprocessor_config.json`` (resize shortest edge 224 bicubic, centre crop 224, OpenAI CLIP mean/std).
- Scheduler: SD-1.5's ``scheduler/scheduler_config.json`` (and SDXL's, same values): 1000 steps,
  scaled_linear betas 0.00085 → 0.012, steps_offset 1, set_alpha_to_one false, clip_sample false,
  epsilon prediction, saved as a ``DDIMScheduler`` (what ``load_pipeline`` uses anyway).
- Tokenizer: the 49,408-token CLIP BPE (48,894 merges + 512 byte tokens + 2 specials) rebuilt from
  open_clip's ``bpe_simple_vocab_16e6.txt.gz`` (``pip install --no-deps open-clip-torch``; the file is
  located without importing open_clip, or given by ``$SPO_BPE_VOCAB``) and saved as a ``CLIPTokenizer``
  with ``vocab.json`` + ``merges.txt``, ``model_max_length`` 77. pad is ``<|endoftext|>`` for SD-1.5 /
  SDXL's first tokenizer and ``!`` for SDXL's second and for the ViT-H processor (as in those repos).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gzip
import importlib.util
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

ARCHS = ("sd15", "sdxl", "pickscore")
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
VOCAB_SIZE = 49408
N_MERGES = 49152 - 256 - 2  # 48894, as open_clip's SimpleTokenizer reads them
MAX_LENGTH = 77
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}

# -- published configs (see the module docstring for the sources) -----------------------------------------
SD15_UNET: dict[str, Any] = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    attention_head_dim=8,
    cross_attention_dim=768,
    norm_num_groups=32,
    norm_eps=1e-5,
    act_fn="silu",
    flip_sin_to_cos=True,
    freq_shift=0,
)
SDXL_UNET: dict[str, Any] = dict(
    sample_size=128,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=(5, 10, 20),
    transformer_layers_per_block=(1, 2, 10),
    cross_attention_dim=2048,
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_embed_type_num_heads=64,
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
    norm_num_groups=32,
    norm_eps=1e-5,
    act_fn="silu",
    flip_sin_to_cos=True,
    freq_shift=0,
)
SD15_VAE: dict[str, Any] = dict(
    in_channels=3,
    out_channels=3,
    latent_channels=4,
    layers_per_block=2,
    block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    norm_num_groups=32,
    act_fn="silu",
    sample_size=512,
    scaling_factor=0.18215,
)
# madebyollin/sdxl-vae-fp16-fix: the SDXL VAE architecture (= SD's) with SDXL's scaling and no fp32 upcast.
SDXL_VAE: dict[str, Any] = {**SD15_VAE, "scaling_factor": 0.13025, "force_upcast": False}

_TEXT_COMMON: dict[str, Any] = dict(
    vocab_size=VOCAB_SIZE,
    max_position_embeddings=MAX_LENGTH,
    layer_norm_eps=1e-5,
    bos_token_id=0,
    eos_token_id=2,
    pad_token_id=1,
    attention_dropout=0.0,
    dropout=0.0,
    initializer_factor=1.0,
    initializer_range=0.02,
)
CLIP_L_TEXT: dict[str, Any] = dict(
    _TEXT_COMMON,
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    hidden_act="quick_gelu",
    projection_dim=768,
)
BIGG_TEXT: dict[str, Any] = dict(
    _TEXT_COMMON,
    hidden_size=1280,
    intermediate_size=5120,
    num_hidden_layers=32,
    num_attention_heads=20,
    hidden_act="gelu",
    projection_dim=1280,
)
PICKSCORE_TEXT: dict[str, Any] = dict(
    _TEXT_COMMON,
    hidden_size=1024,
    intermediate_size=4096,
    num_hidden_layers=24,
    num_attention_heads=16,
    hidden_act="gelu",
    projection_dim=1024,
)
PICKSCORE_VISION: dict[str, Any] = dict(
    hidden_size=1280,
    intermediate_size=5120,
    num_hidden_layers=32,
    num_attention_heads=16,
    patch_size=14,
    image_size=224,
    num_channels=3,
    hidden_act="gelu",
    layer_norm_eps=1e-5,
    projection_dim=1024,
)
PICKSCORE_PROJECTION = 1024
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]

# Published parameter counts (the unit test checks the builders against them, on the meta device).
PARAM_COUNTS = {
    "sd15.unet": 859_520_964,
    "sdxl.unet": 2_567_463_684,
    "vae": 83_653_863,
    "clip_l.text": 123_060_480,
    "bigg.text": 694_659_840,
}


def default_configs(arch: str) -> dict[str, dict[str, Any]]:
    """The component configs of ``arch`` (copies; shrink them for tests, the builders take any)."""
    if arch == "sd15":
        out = {"unet": SD15_UNET, "vae": SD15_VAE, "text_encoder": CLIP_L_TEXT}
    elif arch == "sdxl":
        out = {"unet": SDXL_UNET, "vae": SDXL_VAE, "text_encoder": CLIP_L_TEXT, "text_encoder_2": BIGG_TEXT}
    elif arch == "pickscore":
        out = {"text": PICKSCORE_TEXT, "vision": PICKSCORE_VISION, "projection_dim": {"dim": PICKSCORE_PROJECTION}}
    else:
        raise ValueError(f"arch must be one of {ARCHS}, got {arch!r}")
    return copy.deepcopy(out)


def small_configs(arch: str) -> dict[str, dict[str, Any]]:
    """The same block structure at toy widths (tests, ``bench/realsize.py --small``, GPU-check dry runs):
    every code path of the real architecture (SDXL's two encoders, text_time embedding, fp16-fix VAE config,
    224 px ViT with patch 14) at a few hundred kB."""
    cfgs = default_configs(arch)
    if arch == "pickscore":
        for key in ("text", "vision"):
            cfgs[key].update(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                             projection_dim=16)
        cfgs["projection_dim"]["dim"] = 16
        return cfgs
    cfgs["vae"].update(block_out_channels=(8, 8, 8, 8), norm_num_groups=4, layers_per_block=1)
    for key in ("text_encoder", "text_encoder_2"):
        if key in cfgs:
            cfgs[key].update(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                             projection_dim=16)
    if arch == "sd15":
        cfgs["unet"].update(block_out_channels=(8, 8, 16, 16), attention_head_dim=4, cross_attention_dim=16,
                            norm_num_groups=4, layers_per_block=1)
    else:
        cfgs["unet"].update(block_out_channels=(8, 16, 16), attention_head_dim=(2, 4, 4),
                            transformer_layers_per_block=(1, 1, 2), cross_attention_dim=32,
                            addition_time_embed_dim=8, projection_class_embeddings_input_dim=16 + 6 * 8,
                            norm_num_groups=4, layers_per_block=1)
    return cfgs


# -- tokenizer -------------------------------------------------------------------------------------------
def bpe_vocab_path() -> Path:
    """open_clip's ``bpe_simple_vocab_16e6.txt.gz`` ($SPO_BPE_VOCAB, else found without importing open_clip)."""
    env = os.environ.get("SPO_BPE_VOCAB")
    if env:
        return Path(env)
    spec = importlib.util.find_spec("open_clip")  # a top-level find_spec does not execute the package
    if spec is not None and spec.origin:
        p = Path(spec.origin).parent / "bpe_simple_vocab_16e6.txt.gz"
        if p.exists():
            return p
    raise FileNotFoundError(
        "The real CLIP vocabulary needs open_clip's bpe_simple_vocab_16e6.txt.gz: "
        "`pip install --no-deps open-clip-torch` (it is never imported), or set SPO_BPE_VOCAB=/path/to/the.gz"
    )


def clip_vocab_and_merges(path: str | Path | None = None) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """The 49,408-token vocab and 48,894 merges, built as open_clip's SimpleTokenizer builds them."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    lines = gzip.open(path or bpe_vocab_path()).read().decode("utf-8").split("\n")
    merges = [tuple(m.split()) for m in lines[1 : N_MERGES + 1]]
    chars = list(bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges] + [BOS, EOS]
    vocab = {t: i for i, t in enumerate(tokens)}
    if len(vocab) != VOCAB_SIZE:
        raise ValueError(f"{path}: built {len(vocab)} tokens, expected {VOCAB_SIZE}")
    return vocab, merges


def write_tokenizer_files(folder: str | Path, pad_token: str = EOS, path: str | Path | None = None) -> Path:
    """Write vocab.json + merges.txt + tokenizer_config.json / special_tokens_map.json (the hub layout)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = clip_vocab_and_merges(path)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    specials = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": pad_token}
    (folder / "special_tokens_map.json").write_text(json.dumps(specials, indent=2))
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": MAX_LENGTH,
        "do_lower_case": True,
        "errors": "replace",
        "add_prefix_space": False,
        **specials,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return folder


def build_tokenizer(pad_token: str = EOS, path: str | Path | None = None):
    """A ``CLIPTokenizer`` with the real vocabulary, loaded from vocab.json + merges.txt."""
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        write_tokenizer_files(tmp, pad_token, path)
        tok = CLIPTokenizer.from_pretrained(tmp)
    tok.model_max_length = MAX_LENGTH
    return tok


# -- model builders --------------------------------------------------------------------------------------
@contextlib.contextmanager
def _construction(dtype: torch.dtype, device: str | torch.device | None = None, meta: bool = False):
    """Construct modules with ``dtype`` as torch's default (half the memory of fp32 then .half()) on
    ``device`` (``cuda``: initialised on the GPU, seconds for SDXL), or on the meta device."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        if meta:
            from accelerate import init_empty_weights

            with init_empty_weights(include_buffers=False):
                yield
        elif device is not None:
            with torch.device(device):
                yield
        else:
            yield
    finally:
        torch.set_default_dtype(old)


def build_unet(config: dict[str, Any]):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(**config)


def build_vae(config: dict[str, Any]):
    from diffusers import AutoencoderKL

    return AutoencoderKL(**config)


def build_text_encoder(config: dict[str, Any], with_projection: bool = False):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    return cls(CLIPTextConfig(**config))


def build_scheduler():
    from diffusers import DDIMScheduler

    from spo.models.tiny import SD_SCHEDULER

    return DDIMScheduler(**SD_SCHEDULER)


def build_sd15(
    dtype: torch.dtype = torch.float16,
    device: str | torch.device | None = None,
    configs: dict[str, dict] | None = None,
    seed: int = 0,
    tokenizer=None,
):
    """A random-weight ``StableDiffusionPipeline`` of the SD-1.5 architecture."""
    from diffusers import StableDiffusionPipeline

    cfgs = configs or default_configs("sd15")
    torch.manual_seed(seed)
    with _construction(dtype, device):
        unet, vae = build_unet(cfgs["unet"]), build_vae(cfgs["vae"])
        text = build_text_encoder(cfgs["text_encoder"])
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text,
        tokenizer=tokenizer or build_tokenizer(EOS),
        unet=unet,
        scheduler=build_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        image_encoder=None,
        requires_safety_checker=False,
    )


def build_sdxl(
    dtype: torch.dtype = torch.float16,
    device: str | torch.device | None = None,
    configs: dict[str, dict] | None = None,
    seed: int = 0,
    tokenizers=None,
):
    """A random-weight ``StableDiffusionXLPipeline``: ViT-L + bigG text encoders, the fp16-fix VAE shape."""
    from diffusers import StableDiffusionXLPipeline

    cfgs = configs or default_configs("sdxl")
    torch.manual_seed(seed)
    with _construction(dtype, device):
        unet, vae = build_unet(cfgs["unet"]), build_vae(cfgs["vae"])
        text = build_text_encoder(cfgs["text_encoder"])
        text_2 = build_text_encoder(cfgs["text_encoder_2"], with_projection=True)
    tok, tok_2 = tokenizers or (build_tokenizer(EOS), build_tokenizer("!"))
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text,
        text_encoder_2=text_2,
        tokenizer=tok,
        tokenizer_2=tok_2,
        unet=unet,
        scheduler=build_scheduler(),
        image_encoder=None,
        feature_extractor=None,
        force_zeros_for_empty_prompt=True,
    )


def clip_config(configs: dict[str, dict] | None = None):
    from transformers import CLIPConfig

    cfgs = configs or default_configs("pickscore")
    return CLIPConfig(
        text_config=dict(cfgs["text"]),
        vision_config=dict(cfgs["vision"]),
        projection_dim=cfgs["projection_dim"]["dim"],
        logit_scale_init_value=2.6592,
    )


def build_processor(image_size: int = 224, tokenizer=None):
    """The laion ViT-H / PickScore ``CLIPProcessor`` (bicubic shortest-edge resize, centre crop, CLIP norm)."""
    from transformers import CLIPImageProcessor, CLIPProcessor

    image_processor = CLIPImageProcessor(
        do_resize=True,
        size={"shortest_edge": image_size},
        resample=3,
        do_center_crop=True,
        crop_size={"height": image_size, "width": image_size},
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
        do_convert_rgb=True,
    )
    return CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer or build_tokenizer("!"))


def build_pickscore(
    dtype: torch.dtype = torch.float16,
    device: str | torch.device | None = None,
    configs: dict[str, dict] | None = None,
    seed: int = 0,
    tokenizer=None,
):
    """(CLIPModel, CLIPProcessor) of the PickScore_v1 / CLIP-ViT-H-14 architecture, random weights."""
    from transformers import CLIPModel

    config = clip_config(configs)
    torch.manual_seed(seed)
    with _construction(dtype, device):
        model = CLIPModel(config)
    return model, build_processor(config.vision_config.image_size, tokenizer)


# -- parameter counts without memory ---------------------------------------------------------------------
def count_parameters(module) -> int:
    return sum(p.numel() for p in module.parameters())


def meta_parameter_counts(arch: str, configs: dict[str, dict] | None = None) -> dict[str, int]:
    """Parameter count per component of ``arch``, built on the meta device (no memory, ~1 s)."""
    cfgs = configs or default_configs(arch)
    out: dict[str, int] = {}
    with _construction(torch.float32, meta=True):
        if arch == "pickscore":
            from transformers import CLIPModel

            model = CLIPModel(clip_config(cfgs))
            out["text"] = count_parameters(model.text_model) + count_parameters(model.text_projection)
            out["vision"] = count_parameters(model.vision_model) + count_parameters(model.visual_projection)
            out["total"] = count_parameters(model)
            return out
        out["unet"] = count_parameters(build_unet(cfgs["unet"]))
        out["vae"] = count_parameters(build_vae(cfgs["vae"]))
        out["text_encoder"] = count_parameters(build_text_encoder(cfgs["text_encoder"]))
        if "text_encoder_2" in cfgs:
            out["text_encoder_2"] = count_parameters(build_text_encoder(cfgs["text_encoder_2"], True))
    out["total"] = sum(out.values())
    return out


# -- saving ----------------------------------------------------------------------------------------------
def save(arch: str, out: str | Path, dtype: torch.dtype | None = None, configs=None, seed: int = 0) -> Path:
    """Build ``arch`` with random weights and save it as a from_pretrained-loadable folder at ``out``.

    ``dtype=None``: fp16 for the diffusion pipelines, fp32 for the PickScore CLIP (what the hub stores).
    """
    if dtype is None:
        dtype = torch.float32 if arch == "pickscore" else torch.float16
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if arch == "pickscore":
        # dtype=None: fp32, as yuvalkirstain/PickScore_v1 stores it (3.9 GB).
        model, processor = build_pickscore(dtype, configs=configs, seed=seed)
        model.save_pretrained(out)
        processor.save_pretrained(out)
        return out
    builder = {"sd15": build_sd15, "sdxl": build_sdxl}.get(arch)
    if builder is None:
        raise ValueError(f"arch must be one of {ARCHS}, got {arch!r}")
    pipe = builder(dtype, configs=configs, seed=seed)
    pipe.save_pretrained(out)
    # The tokenizer folders in the hub layout (vocab.json + merges.txt), whatever save_pretrained wrote.
    write_tokenizer_files(out / "tokenizer", EOS)
    if arch == "sdxl":
        write_tokenizer_files(out / "tokenizer_2", "!")
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m spo.models.realsize",
        description="Save a random-weight model of a real architecture (SD-1.5, SDXL, PickScore CLIP).",
    )
    parser.add_argument("--arch", choices=ARCHS, required=True)
    parser.add_argument("--out", required=True, help="output folder (diffusers / transformers layout)")
    parser.add_argument(
        "--dtype", choices=tuple(DTYPES), default=None, help="stored dtype (default: fp16; pickscore fp32)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--count-only", action="store_true", help="print parameter counts (meta device)")
    parser.add_argument("--small", action="store_true", help="toy widths, same structure (tests, dry runs)")
    args = parser.parse_args(argv)
    if args.count_only:
        print(json.dumps(meta_parameter_counts(args.arch, small_configs(args.arch) if args.small else None), indent=2))
        return
    configs = small_configs(args.arch) if args.small else None
    path = save(args.arch, args.out, DTYPES[args.dtype] if args.dtype else None, configs=configs, seed=args.seed)
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    print(json.dumps({"arch": args.arch, "out": str(path), "dtype": args.dtype, "bytes": size}))


if __name__ == "__main__":
    main()
