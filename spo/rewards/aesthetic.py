"""LAION aesthetic predictor ("improved aesthetic predictor", sac+logos+ava1-l14-linearMSE).

A 5-layer MLP without activations on the L2-normalised CLIP ViT-L/14 image embedding (768-d). The weights are
a plain ``.pth`` state dict (keys ``layers.{0,2,4,6,7}.{weight,bias}``), loaded with ``weights_only=True``
from a local path or ``hub_id:filename``. Any CLIP works as the embedder as long as its projection
dimension matches the MLP's input (the tiny stand-in uses the tiny CLIP's 64-d projection).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from spo.errors import ModelLoadError
from spo.hub import local_file_or_download
from spo.rewards import Scorer
from spo.rewards.clip import CLIPSimilarityScorer, load_clip


class AestheticMLP(nn.Module):
    """The predictor head; the layer layout matches the published state dict."""

    def __init__(self, input_dim: int = 768):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(input_dim, 1024),
            nn.Dropout(0.2),
            nn.Linear(1024, 128),
            nn.Dropout(0.2),
            nn.Linear(128, 64),
            nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, embeds: torch.Tensor) -> torch.Tensor:
        return self.layers(embeds).squeeze(-1)


class AestheticScorer(Scorer):
    """Prompts are ignored: the predictor judges the image alone."""

    def __init__(self, clip: CLIPSimilarityScorer, mlp: AestheticMLP):
        self.clip = clip
        self.mlp = mlp.eval().requires_grad_(False).to(clip.device)

    @torch.no_grad()
    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        return self.mlp(self.clip.embed_images(images)).float().cpu()


def load_mlp(path, input_dim: int) -> AestheticMLP:
    state = torch.load(path, map_location="cpu", weights_only=True)
    mlp = AestheticMLP(input_dim)
    try:
        mlp.load_state_dict(state)
    except RuntimeError as exc:
        raise ModelLoadError(
            f"aesthetic predictor: {path} does not fit an MLP on {input_dim}-d CLIP embeddings "
            f"(eval.aesthetic_clip_model's projection_dim). Use the weights trained for that CLIP. ({exc})"
        ) from exc
    return mlp


def load(cfg, device="cpu") -> AestheticScorer:
    ref = cfg.eval.aesthetic_clip_model
    weights = local_file_or_download(
        cfg.eval.aesthetic_weights, "aesthetic predictor", config_key="eval.aesthetic_weights"
    )
    model, processor = load_clip(ref, ref, "aesthetic predictor", "eval.aesthetic_clip_model")
    mlp = load_mlp(weights, model.config.projection_dim)
    return AestheticScorer(CLIPSimilarityScorer(model, processor, device), mlp)
