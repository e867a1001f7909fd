"""A tiny random ImageReward in the released ``ImageReward.pt`` layout, built by our own code.

Shared by tests/unit/test_imagereward.py and the cross-check against the original ImageReward code
(tests/data/make_imagereward_reference.py, run in a scratch environment; see docs/METRICS.md). Everything is
derived from fixed seeds with torch's CPU generator, so the same checkpoint and images come out on any machine
(``checkpoint_checksum`` guards that).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

# BERT-style vocabulary: the specials at BERT's ids, then every word of PROMPTS and a few word pieces.
VOCAB = ["[PAD]", "[unused0]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
WORDS = "a red circle blue square on white background cat two green stars photo of the ##s dog , .".split()
PROMPTS = [
    "a red circle",
    "a blue square on a white background",
    "a photo of the cat",
    "two green stars, a dog.",
    "zebra unknown words",  # out-of-vocabulary -> [UNK]
]
# (height, width): portrait, landscape, square, smaller than the ViT input (upscaled), larger.
IMAGE_SIZES = [(48, 40), (40, 56), (32, 32), (20, 24), (70, 64)]

MED_CONFIG = {
    "architectures": ["BertModel"],
    "attention_probs_dropout_prob": 0.1,
    "hidden_act": "gelu",
    "hidden_dropout_prob": 0.1,
    "hidden_size": 64,
    "initializer_range": 0.02,
    "intermediate_size": 96,
    "layer_norm_eps": 1e-12,
    "max_position_embeddings": 64,
    "model_type": "bert",
    "num_attention_heads": 4,
    "num_hidden_layers": 2,
    "pad_token_id": 0,
    "type_vocab_size": 2,
    "vocab_size": len(VOCAB) + len(WORDS) + 2,  # + [DEC] and [ENC], as upstream's 30522 + 2
    "encoder_width": 128,
    "add_cross_attention": True,
}
VISION = {"hidden_size": 128, "patch_size": 8, "image_size": 32, "layers": 2, "mlp": 160}


def write_tokenizer(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(VOCAB + WORDS) + "\n")
    (folder / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": True}))
    return folder


def released_state_dict(seed: int = 0) -> dict:
    """Random weights, perturbed away from the init (LayerNorms and biases included), in the released layout."""
    from transformers import BlipTextConfig, BlipVisionConfig

    from spo.rewards.imagereward import ImageRewardModel, to_released_state_dict

    m = MED_CONFIG
    vision = BlipVisionConfig(
        hidden_size=VISION["hidden_size"],
        intermediate_size=VISION["mlp"],
        num_hidden_layers=VISION["layers"],
        num_attention_heads=VISION["hidden_size"] // 64,
        image_size=VISION["image_size"],
        patch_size=VISION["patch_size"],
        layer_norm_eps=1e-6,
    )
    text = BlipTextConfig(
        vocab_size=m["vocab_size"],
        hidden_size=m["hidden_size"],
        encoder_hidden_size=VISION["hidden_size"],
        intermediate_size=m["intermediate_size"],
        num_hidden_layers=m["num_hidden_layers"],
        num_attention_heads=m["num_attention_heads"],
        max_position_embeddings=m["max_position_embeddings"],
        is_decoder=True,
        bos_token_id=None,  # generation-only ids; BLIP's defaults fall outside a small vocabulary
        eos_token_id=None,
        sep_token_id=None,
    )
    model = ImageRewardModel(vision, text)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            # Fresh values rather than the init: transformers' init differs by version, the generator does not.
            scale = 0.08
            if name.startswith("head."):  # keep the reward O(1): ~unit gain per (activation-free) layer
                scale = p.shape[1] ** -0.5 if p.ndim == 2 else 0.05
            base = 1.0 if "norm" in name.lower() and name.endswith("weight") else 0.0
            p.copy_(base + scale * torch.randn(p.shape, generator=gen))
    return to_released_state_dict(model)


def checkpoint_checksum(state: dict) -> float:
    return float(sum((v.double() * (i + 1)).sum() for i, (_, v) in enumerate(sorted(state.items()))))


def write_checkpoint(folder: Path, seed: int = 0) -> Path:
    """``folder/ImageReward.pt`` + ``med_config.json`` (+ a ``tokenizer/``); returns the .pt path."""
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(released_state_dict(seed), folder / "ImageReward.pt")
    (folder / "med_config.json").write_text(json.dumps(MED_CONFIG, indent=2))
    write_tokenizer(folder / "tokenizer")
    return folder / "ImageReward.pt"


def images_uint8(seed: int = 1) -> list:
    """Smooth random images (upsampled noise, so resizing matters) as uint8 HWC numpy arrays."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for h, w in IMAGE_SIZES:
        low = torch.rand(1, 3, max(h // 4, 2), max(w // 4, 2), generator=gen)
        img = torch.nn.functional.interpolate(low, size=(h, w), mode="bilinear", align_corners=False)[0]
        img = (img + 0.15 * torch.rand(3, h, w, generator=gen)).clamp(0, 1)
        out.append((img * 255).round().to(torch.uint8).permute(1, 2, 0).numpy())
    return out
