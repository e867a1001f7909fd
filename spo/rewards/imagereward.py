"""ImageReward (Xu et al. 2023): BLIP's image-grounded text encoder + an MLP head, trained on human preferences.

Runs on transformers' BLIP modules (``BlipVisionModel`` and ``BlipTextModel`` with cross-attention), so no
``image-reward`` package is needed (it pins timm 0.6.13 / fairscale and its BLIP code predates transformers 5).
The released checkpoint (``ImageReward.pt``: the state dict of upstream's ``ImageReward`` module, keys
``blip.visual_encoder.*`` (a timm-style ViT), ``blip.text_encoder.*`` (BLIP's ``med.py`` BERT) and ``mlp.layers.*``)
is mapped key by key onto those modules (:func:`map_released_state_dict`) and loaded with
``torch.load(weights_only=True)``; ``med_config.json`` beside it gives the text encoder's shape, the state dict
the vision tower's.

Weights (``eval.imagereward_model``): a hub id holding ``ImageReward.pt`` and ``med_config.json`` (default
``THUDM/ImageReward``; ``@<sha>`` pins the revision) or a local ``ImageReward.pt`` (or a folder holding it)
with ``med_config.json`` beside it. The tokenizer (``eval.imagereward_tokenizer``) is BERT's uncased one, as
upstream (which loads ``bert-base-uncased`` and adds ``[DEC]``/``[ENC]``), from the hub or a local folder.

Scoring follows upstream ``ImageReward.score``: the prompt padded to 35 tokens, the image (rounded to uint8
as a saved PNG would be) resized with PIL bicubic so its short side is the ViT's input size, centre-cropped,
CLIP-normalised; the [CLS] output of the text encoder cross-attending to the image goes through the MLP and
is standardised with upstream's constants. Checked against the original code in docs/METRICS.md.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from spo.errors import ModelLoadError
from spo.hub import download_file, download_repo, local_file_or_download
from spo.refs import ModelRef, RefError
from spo.rewards import Scorer, to_pil_images

# Upstream ImageReward's constants: CLIP normalisation, the standardisation of the raw MLP output, the
# prompt length, and the MLP head's widths.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
REWARD_MEAN = 0.16717362830052426
REWARD_STD = 1.0333394966054072
MAX_PROMPT_TOKENS = 35
MLP_WIDTHS = (1024, 128, 64, 16, 1)
VIT_HEAD_DIM = 64  # BLIP's ViT-B/16 and ViT-L/16 both use 64-wide heads (12 and 16 heads)
VIT_LAYER_NORM_EPS = 1e-6  # BLIP's timm ViT: partial(nn.LayerNorm, eps=1e-6)

# released key prefix -> ours (regexes applied in order, first match wins).
_VISION_MAP = (
    (r"blip\.visual_encoder\.cls_token", "vision.embeddings.class_embedding"),
    (r"blip\.visual_encoder\.pos_embed", "vision.embeddings.position_embedding"),
    (r"blip\.visual_encoder\.patch_embed\.proj\.", "vision.embeddings.patch_embedding."),
    (r"blip\.visual_encoder\.blocks\.(\d+)\.norm1\.", r"vision.encoder.layers.\1.layer_norm1."),
    (r"blip\.visual_encoder\.blocks\.(\d+)\.norm2\.", r"vision.encoder.layers.\1.layer_norm2."),
    (r"blip\.visual_encoder\.blocks\.(\d+)\.attn\.qkv\.", r"vision.encoder.layers.\1.self_attn.qkv."),
    (r"blip\.visual_encoder\.blocks\.(\d+)\.attn\.proj\.", r"vision.encoder.layers.\1.self_attn.projection."),
    (r"blip\.visual_encoder\.blocks\.(\d+)\.mlp\.fc(\d)\.", r"vision.encoder.layers.\1.mlp.fc\2."),
    (r"blip\.visual_encoder\.norm\.", "vision.post_layernorm."),
    # med.py's BERT and transformers' BlipTextModel (ported from it) share their module names.
    (r"blip\.text_encoder\.", "text."),
    (r"mlp\.layers\.", "head."),
)
# Parts of the released file that scoring does not use (BLIP's contrastive projections, buffers).
_UNUSED = re.compile(r"^blip\.(vision_proj|text_proj)\.|position_ids$")


class RewardHead(nn.Sequential):
    """Upstream's MLP: Linear layers with dropout between (no activations), laid out so that the released
    ``mlp.layers.<i>`` indices (0, 2, 4, 6, 7) line up."""

    def __init__(self, width: int):
        layers: list[nn.Module] = []
        dims = (width, *MLP_WIDTHS)
        for i in range(len(MLP_WIDTHS)):
            layers.append(nn.Linear(dims[i], dims[i + 1]))
            if i < 3:
                layers.append(nn.Dropout(0.2 if i < 2 else 0.1))
        super().__init__(*layers)


class ImageRewardModel(nn.Module):
    """BLIP vision tower + image-grounded text encoder + reward head, on transformers' modules."""

    def __init__(self, vision_config, text_config):
        super().__init__()
        from transformers import BlipTextModel, BlipVisionModel

        self.vision = BlipVisionModel(vision_config)
        self.text = BlipTextModel(text_config, add_pooling_layer=False)
        self.head = RewardHead(text_config.hidden_size)

    @property
    def image_size(self) -> int:
        return self.vision.config.image_size

    def forward(self, pixel_values, input_ids, attention_mask) -> torch.Tensor:
        image_embeds = self.vision(pixel_values=pixel_values).last_hidden_state
        image_atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
        out = self.text(
            input_ids=input_ids,
            attention_mask=attention_mask,
            encoder_hidden_states=image_embeds,
            encoder_attention_mask=image_atts,
            is_decoder=False,
        )
        raw = self.head(out.last_hidden_state[:, 0, :].float()).squeeze(-1)
        return (raw - REWARD_MEAN) / REWARD_STD


def configs_from(released: dict, med_config: dict):
    """transformers BLIP configs for a released state dict (vision shape) and its med_config.json (text)."""
    from transformers import BlipTextConfig, BlipVisionConfig

    try:
        width = released["blip.visual_encoder.cls_token"].shape[-1]
        patch = released["blip.visual_encoder.patch_embed.proj.weight"].shape[-1]
        n_pos = released["blip.visual_encoder.pos_embed"].shape[1]
        mlp = released["blip.visual_encoder.blocks.0.mlp.fc1.weight"].shape[0]
    except KeyError as exc:
        raise ModelLoadError(f"ImageReward: the checkpoint has no {exc.args[0]!r}; is it an ImageReward.pt?") from exc
    depth = 1 + max(int(m.group(1)) for k in released if (m := re.match(r"blip\.visual_encoder\.blocks\.(\d+)\.", k)))
    grid = math.isqrt(n_pos - 1)
    if grid * grid != n_pos - 1 or width % VIT_HEAD_DIM:
        raise ModelLoadError(f"ImageReward: unexpected ViT shape (width {width}, {n_pos} positions)")
    vision = BlipVisionConfig(
        hidden_size=width,
        intermediate_size=mlp,
        num_hidden_layers=depth,
        num_attention_heads=width // VIT_HEAD_DIM,
        image_size=grid * patch,
        patch_size=patch,
        hidden_act="gelu",
        layer_norm_eps=VIT_LAYER_NORM_EPS,
    )
    m = med_config
    text = BlipTextConfig(
        vocab_size=m["vocab_size"],
        hidden_size=m["hidden_size"],
        encoder_hidden_size=width,  # upstream overrides med_config's encoder_width with the ViT's width
        intermediate_size=m["intermediate_size"],
        num_hidden_layers=m["num_hidden_layers"],
        num_attention_heads=m["num_attention_heads"],
        max_position_embeddings=m["max_position_embeddings"],
        hidden_act=m.get("hidden_act", "gelu"),
        layer_norm_eps=m.get("layer_norm_eps", 1e-12),
        pad_token_id=m.get("pad_token_id", 0),
        is_decoder=True,
        bos_token_id=None,  # generation-only ids; BLIP's defaults fall outside a small vocabulary
        eos_token_id=None,
        sep_token_id=None,  # builds the cross-attention layers; forward runs it bidirectionally (is_decoder=False)
    )
    return vision, text


def map_released_state_dict(released: dict) -> dict:
    """Released ``ImageReward.pt`` keys -> :class:`ImageRewardModel` keys (unused parts dropped)."""
    out = {}
    for key, value in released.items():
        if _UNUSED.search(key):
            continue
        for pattern, repl in _VISION_MAP:
            new, n = re.subn("^" + pattern, repl, key)
            if n:
                out[new] = value
                break
    return out


def to_released_state_dict(model: ImageRewardModel) -> dict:
    """The inverse of :func:`map_released_state_dict` (used to write test checkpoints in the released layout)."""
    inverse = (
        (r"vision\.embeddings\.class_embedding", "blip.visual_encoder.cls_token"),
        (r"vision\.embeddings\.position_embedding", "blip.visual_encoder.pos_embed"),
        (r"vision\.embeddings\.patch_embedding\.", "blip.visual_encoder.patch_embed.proj."),
        (r"vision\.encoder\.layers\.(\d+)\.layer_norm1\.", r"blip.visual_encoder.blocks.\1.norm1."),
        (r"vision\.encoder\.layers\.(\d+)\.layer_norm2\.", r"blip.visual_encoder.blocks.\1.norm2."),
        (r"vision\.encoder\.layers\.(\d+)\.self_attn\.qkv\.", r"blip.visual_encoder.blocks.\1.attn.qkv."),
        (r"vision\.encoder\.layers\.(\d+)\.self_attn\.projection\.", r"blip.visual_encoder.blocks.\1.attn.proj."),
        (r"vision\.encoder\.layers\.(\d+)\.mlp\.fc(\d)\.", r"blip.visual_encoder.blocks.\1.mlp.fc\2."),
        (r"vision\.post_layernorm\.", "blip.visual_encoder.norm."),
        (r"text\.", "blip.text_encoder."),
        (r"head\.", "mlp.layers."),
    )
    out = {}
    for key, value in model.state_dict().items():
        for pattern, repl in inverse:
            new, n = re.subn("^" + pattern, repl, key)
            if n:
                out[new] = value.detach().clone()
                break
        else:
            raise AssertionError(f"unmapped ImageReward key {key}")
    return out


def load_released(weights: Path, med_config: Path) -> ImageRewardModel:
    """An :class:`ImageRewardModel` from a released-layout ``ImageReward.pt`` and its ``med_config.json``."""
    try:
        released = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ModelLoadError(f"ImageReward: cannot read {weights} as a state dict ({type(exc).__name__}: {exc})") from exc
    if isinstance(released, dict) and "state_dict" in released:
        released = released["state_dict"]
    vision_cfg, text_cfg = configs_from(released, json.loads(Path(med_config).read_text()))
    model = ImageRewardModel(vision_cfg, text_cfg)
    missing, _unexpected = model.load_state_dict(map_released_state_dict(released), strict=False)
    if missing:
        raise ModelLoadError(
            f"ImageReward: {weights} lacks {len(missing)} weights the model needs (e.g. {missing[0]!r}); "
            "is it the released ImageReward.pt?"
        )
    return model.eval().requires_grad_(False)


def preprocess(pil_images: Sequence, size: int) -> torch.Tensor:
    """Upstream's transform (torchvision Resize(size, BICUBIC) + CenterCrop(size) on PIL images, ToTensor,
    CLIP Normalize), written with PIL directly so that torchvision is not needed."""
    import numpy as np
    from PIL import Image

    out = []
    for im in pil_images:
        im = im.convert("RGB")
        w, h = im.size
        # torchvision's size rule: the short side becomes `size`, the long one int(size * long / short).
        if w <= h:
            new_w, new_h = size, int(size * h / w)
        else:
            new_w, new_h = int(size * w / h), size
        im = im.resize((new_w, new_h), Image.BICUBIC)
        top, left = int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))
        im = im.crop((left, top, left + size, top + size))
        out.append(torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0).permute(2, 0, 1))
    x = torch.stack(out)
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def load_tokenizer(path):
    """BERT uncased with upstream's two added special tokens (they do not change how prompts tokenise)."""
    from transformers import BertTokenizer

    tok = BertTokenizer.from_pretrained(str(path))
    tok.add_special_tokens({"bos_token": "[DEC]", "additional_special_tokens": ["[ENC]"]})
    return tok


class ImageRewardScorer(Scorer):
    def __init__(self, model: ImageRewardModel, tokenizer, device="cpu"):
        self.device = torch.device(device)
        self.model = model.eval().requires_grad_(False).to(self.device)
        self.tokenizer = tokenizer

    @torch.no_grad()
    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        pixels = preprocess(to_pil_images(images), self.model.image_size).to(self.device)
        text = self.tokenizer(
            list(prompts), padding="max_length", truncation=True, max_length=MAX_PROMPT_TOKENS, return_tensors="pt"
        ).to(self.device)
        return self.model(pixels, text.input_ids, text.attention_mask).float().cpu()


def _files(cfg) -> tuple[Path, Path]:
    key = "eval.imagereward_model"
    try:
        ref = ModelRef.parse(cfg.eval.imagereward_model)
    except RefError as exc:
        raise ModelLoadError(f"ImageReward: {exc} (--set {key}=...)") from exc
    if ref.is_hub:
        weights = download_file(ref.with_filename(ref.filename or "ImageReward.pt"), "ImageReward", key)
        med_config = download_file(ref.with_filename("med_config.json"), "ImageReward", key)
        return weights, med_config
    weights = local_file_or_download(ref, "ImageReward", "ImageReward.pt", config_key=key)
    med_config = weights.with_name("med_config.json")
    if not med_config.is_file():
        raise ModelLoadError(f"ImageReward: {med_config} is missing (it ships with ImageReward.pt on the hub).")
    return weights, med_config


def _tokenizer_dir(cfg) -> Path:
    key = "eval.imagereward_tokenizer"
    try:
        ref = ModelRef.parse(cfg.eval.imagereward_tokenizer)
    except RefError as exc:
        raise ModelLoadError(f"ImageReward tokenizer: {exc} (--set {key}=...)") from exc
    if ref.is_hub:
        return download_repo(ref, "ImageReward tokenizer", ["vocab.txt", "tokenizer_config.json"], key)
    path = ref.path or Path(str(cfg.eval.imagereward_tokenizer))
    if not (path / "vocab.txt").is_file():
        raise ModelLoadError(f"ImageReward tokenizer: no vocab.txt in {path} (--set {key}=...)")
    return path


def load(cfg, device="cpu") -> ImageRewardScorer:
    weights, med_config = _files(cfg)
    return ImageRewardScorer(load_released(weights, med_config), load_tokenizer(_tokenizer_dir(cfg)), device)


def preflight(cfg) -> None:
    """Local files are checked before generation; hub files are downloaded when the scorer loads."""
    if not ModelRef.parse(cfg.eval.imagereward_model).is_hub:
        _files(cfg)
    if not ModelRef.parse(cfg.eval.imagereward_tokenizer).is_hub:
        _tokenizer_dir(cfg)
