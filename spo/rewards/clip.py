"""CLIP score: ``100 * cos(image embedding, text embedding)`` with any transformers CLIP.

This is torchmetrics' CLIPScore without its clamp at 0 (a clamp turns every negative similarity into a tie,
which would bias a paired win rate; real CLIPs on real images are never below 0 anyway).
:class:`CLIPSimilarityScorer` is shared with PickScore, which differs only in its scale and weights.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from spo.errors import ModelLoadError
from spo.refs import ModelRef
from spo.rewards import Scorer


def load_clip(model_ref: str, processor_ref: str, what: str, config_key: str):
    """(CLIPModel, CLIPProcessor) from hub ids (``org/name[@revision]``) or local folders, with an error that
    names the config key."""
    from transformers import CLIPModel, CLIPProcessor

    try:
        name, kwargs = ModelRef.parse(model_ref).pretrained_args()
        model = CLIPModel.from_pretrained(name, **kwargs)
        name, kwargs = ModelRef.parse(processor_ref).pretrained_args()
        processor = CLIPProcessor.from_pretrained(name, **kwargs)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(
            f"{what}: could not load CLIP {model_ref!r} / processor {processor_ref!r} ({exc}). Use a hub id "
            f"(cached when HF_HUB_OFFLINE=1) or a local transformers folder: --set {config_key}=PATH"
        ) from exc
    return model.eval().requires_grad_(False), processor


class CLIPSimilarityScorer(Scorer):
    """``scale * cos(image, text)``; ``scale=None`` uses the model's own ``logit_scale.exp()`` (PickScore)."""

    def __init__(self, model, processor, device="cpu", scale: float | None = 100.0):
        from spo.models.preference import preprocess_images

        self._preprocess = preprocess_images
        self.model = model.to(device)
        self.processor = processor
        self.device = torch.device(device)
        self.scale = scale

    @torch.no_grad()
    def embed_images(self, images: torch.Tensor) -> torch.Tensor:
        pixels = self._preprocess(images.to(self.device), self.processor).to(self.model.dtype)
        emb = self.model.get_image_features(pixel_values=pixels).pooler_output.float()
        return emb / emb.norm(dim=-1, keepdim=True)

    @torch.no_grad()
    def embed_texts(self, prompts: Sequence[str]) -> torch.Tensor:
        tok = self.processor.tokenizer
        inputs = tok(
            list(prompts), padding=True, truncation=True, max_length=tok.model_max_length, return_tensors="pt"
        ).to(self.device)
        emb = self.model.get_text_features(**inputs).pooler_output.float()
        return emb / emb.norm(dim=-1, keepdim=True)

    def similarity_scale(self) -> float:
        return float(self.model.logit_scale.exp()) if self.scale is None else self.scale

    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        cos = (self.embed_images(images) * self.embed_texts(prompts)).sum(-1)
        return (self.similarity_scale() * cos).cpu()


def load(cfg, device="cpu") -> CLIPSimilarityScorer:
    model, processor = load_clip(cfg.eval.clip_model, cfg.eval.clip_model, "CLIP score", "eval.clip_model")
    return CLIPSimilarityScorer(model, processor, device, scale=100.0)
