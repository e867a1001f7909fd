"""spo.models.realsize: the real architectures' numbers (on the meta device), the real tokenizer against
open_clip's, and a save -> load_pipeline round trip of the builders at shrunken widths."""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path

import pytest
import torch

from spo.models import realsize as rs


def _has_vocab() -> bool:
    try:
        rs.bpe_vocab_path()
        return True
    except FileNotFoundError:
        return False


needs_vocab = pytest.mark.skipif(
    not _has_vocab(), reason="open_clip's bpe vocab is missing: pip install --no-deps open-clip-torch"
)


def _approx(n: int, expected: float, rel: float = 1e-3) -> bool:
    return abs(n - expected) <= rel * expected


def test_sd15_parameter_counts_match_the_published_models():
    counts = rs.meta_parameter_counts("sd15")
    assert counts["unet"] == rs.PARAM_COUNTS["sd15.unet"] and _approx(counts["unet"], 859.5e6)
    assert counts["vae"] == rs.PARAM_COUNTS["vae"] and _approx(counts["vae"], 83.65e6)
    assert counts["text_encoder"] == rs.PARAM_COUNTS["clip_l.text"] and _approx(counts["text_encoder"], 123.1e6)


def test_sdxl_parameter_counts_match_the_published_models():
    counts = rs.meta_parameter_counts("sdxl")
    assert counts["unet"] == rs.PARAM_COUNTS["sdxl.unet"] and _approx(counts["unet"], 2.567e9)
    assert counts["vae"] == rs.PARAM_COUNTS["vae"]
    assert counts["text_encoder"] == rs.PARAM_COUNTS["clip_l.text"]
    assert counts["text_encoder_2"] == rs.PARAM_COUNTS["bigg.text"] and _approx(counts["text_encoder_2"], 694.7e6)


def test_pickscore_architecture_is_vit_h_14():
    cfg = rs.clip_config()
    v, t = cfg.vision_config, cfg.text_config
    assert (v.hidden_size, v.num_hidden_layers, v.num_attention_heads, v.patch_size, v.image_size) == (
        1280, 32, 16, 14, 224,
    )
    assert (t.hidden_size, t.num_hidden_layers, t.num_attention_heads, t.vocab_size) == (1024, 24, 16, 49408)
    assert cfg.projection_dim == 1024
    counts = rs.meta_parameter_counts("pickscore")
    assert _approx(counts["total"], 986.1e6)  # ViT-H/14 CLIP (open_clip: 986.1 M)


def test_sdxl_unet_conditioning_dims_are_consistent():
    c = rs.SDXL_UNET
    # pooled bigG projection + 6 time ids x 256
    assert c["projection_class_embeddings_input_dim"] == rs.BIGG_TEXT["projection_dim"] + 6 * c["addition_time_embed_dim"]
    # penultimate states of ViT-L (768) and bigG (1280) are concatenated
    assert c["cross_attention_dim"] == rs.CLIP_L_TEXT["hidden_size"] + rs.BIGG_TEXT["hidden_size"]
    assert rs.SDXL_VAE["scaling_factor"] == 0.13025 and rs.SDXL_VAE["force_upcast"] is False


# -- tokenizer ---------------------------------------------------------------------------------------------
PROMPTS = [
    "a painting of a squirrel eating a burger",
    "A photo of an astronaut riding a horse on Mars, 4k, trending on artstation!!",
    "close-up portrait, 85mm lens; golden hour (bokeh) — cinematic",
    "don't stop: 3 cats & 2 dogs",
]


def _open_clip_tokenizer():
    """open_clip's SimpleTokenizer, loaded from its file: importing the open_clip package needs
    torchvision and timm, which this environment does not have."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or spec.origin is None:
        pytest.skip("open_clip is not installed (pip install --no-deps open-clip-torch): no oracle")
    path = Path(spec.origin).parent / "tokenizer.py"
    try:
        import ftfy  # noqa: F401
    except ImportError:
        # ftfy only repairs mojibake (fix_text); for the well-formed prompts below it is the identity.
        sys.modules.setdefault("ftfy", types.SimpleNamespace(fix_text=lambda s: s))
    try:
        mod_spec = importlib.util.spec_from_file_location("_open_clip_tokenizer", path)
        module = importlib.util.module_from_spec(mod_spec)
        mod_spec.loader.exec_module(module)
    except Exception as exc:  # noqa: BLE001 - any import problem means no oracle
        pytest.skip(f"open_clip's tokenizer.py is not importable here: {exc}")
    return module.SimpleTokenizer()


@needs_vocab
def test_tokenizer_has_the_real_vocabulary():
    tok = rs.build_tokenizer()
    assert len(tok) == 49408
    assert tok.model_max_length == 77
    assert tok.bos_token_id == 49406 and tok.eos_token_id == 49407 and tok.pad_token_id == 49407
    assert rs.build_tokenizer("!").pad_token_id == 0
    # SD's ids (shared/reference/ecosystem.md §0.5)
    assert tok("a painting of a squirrel eating a burger").input_ids == [
        49406, 320, 3086, 539, 320, 14004, 4371, 320, 6548, 49407,
    ]


@needs_vocab
def test_tokenizer_matches_open_clip():
    oracle = _open_clip_tokenizer()
    tok = rs.build_tokenizer()  # pad <|endoftext|> (SD-1.5, SDXL tokenizer 1)
    for prompt in PROMPTS + ["word " * 100]:  # the last one is truncated to 77 with eot kept
        expected = oracle(prompt, context_length=77)[0].tolist()
        expected = expected[: expected.index(oracle.eot_token_id) + 1]
        assert tok(prompt, truncation=True, max_length=77).input_ids == expected, prompt


@needs_vocab
def test_bang_padded_tokenizer_matches_open_clip_except_on_bang():
    """With pad_token "!" (SDXL's tokenizer_2 and the ViT-H processor declare it) transformers treats "!" as a
    special token and splits it out of the text ("!!" -> "!", "!" instead of open_clip's "!!</w>"). The padded
    ids match open_clip's (which pads with 0 = "!") for text without "!"."""
    oracle = _open_clip_tokenizer()
    tok = rs.build_tokenizer("!")
    for prompt in [p for p in PROMPTS if "!" not in p]:
        expected = oracle(prompt, context_length=77)[0].tolist()
        assert tok(prompt, padding="max_length", truncation=True, max_length=77).input_ids == expected, prompt
    assert tok("wow!!").input_ids != oracle("wow!!")[0].tolist()[:4]  # the documented divergence


@needs_vocab
def test_tokenizer_files_round_trip(tmp_path):
    from transformers import CLIPTokenizer

    rs.write_tokenizer_files(tmp_path, "!")
    assert (tmp_path / "vocab.json").exists() and (tmp_path / "merges.txt").exists()
    tok = CLIPTokenizer.from_pretrained(tmp_path)
    assert len(tok) == 49408 and tok.pad_token == "!" and tok.model_max_length == 77


# -- builders at shrunken widths: saved folders load through the project's loader --------------------------
def _small(arch: str) -> dict:
    return rs.small_configs(arch)


@needs_vocab
@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_saved_pipeline_loads_with_load_pipeline_and_runs(tmp_path, arch):
    from spo.config import ModelConfig
    from spo.models.diffusion import DiffusionAdapter, load_pipeline
    from spo.sampling import generate_latents

    out = rs.save(arch, tmp_path / arch, torch.float16, configs=_small(arch))
    weights = list(out.rglob("*.safetensors"))
    assert weights and not any(".fp16." in w.name for w in weights)  # default names: no variant needed
    from safetensors import safe_open

    with safe_open(str(out / "unet" / "diffusion_pytorch_model.safetensors"), "pt") as f:
        assert f.get_tensor(next(iter(f.keys()))).dtype == torch.float16
    pipe = load_pipeline(ModelConfig(arch=arch, pretrained=str(out), resolution=64,
                                     vae=str(out / "vae") if arch == "sdxl" else None), dtype=torch.float32)
    assert pipe.unet.dtype == torch.float32 and len(pipe.tokenizer) == 49408
    adapter = DiffusionAdapter(pipe, 64)
    lat = generate_latents(adapter, ["a red circle"], torch.Generator().manual_seed(0), num_steps=2, cfg_scale=5.0)
    assert lat.shape == (1, 4, 8, 8) and torch.isfinite(lat).all()
    assert pipe.scheduler.config.steps_offset == 1 and pipe.scheduler.config.beta_schedule == "scaled_linear"


@needs_vocab
def test_saved_pickscore_loads_as_an_spm_init(tmp_path):
    """An fp16-stored CLIP used to load as fp16 (transformers 5 keeps the stored dtype) and fail against the
    fp32 adaLN layers: spo.models.preference._load_clip now loads fp32 master weights."""
    from spo.models.preference import TimeConditionedCLIP

    out = rs.save("pickscore", tmp_path / "pick", torch.float16, configs=_small("pickscore"))
    spm = TimeConditionedCLIP.from_clip(str(out), str(out), time_embed_dim=16)
    scores = spm.score(torch.rand(2, 3, 64, 64) * 2 - 1, ["a cat", "a dog"], torch.tensor([0, 500]))
    assert scores.shape == (2,) and torch.isfinite(scores).all()
    assert spm.image_processor.crop_size["height"] == 224
