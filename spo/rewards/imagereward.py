"""ImageReward (Xu et al. 2023): a BLIP image-text model with an MLP head, trained on human preferences.

Behind the optional extra ``spo[imagereward]`` (the ``image-reward`` package, imported as ``ImageReward``).
Weights: a hub id holding ``ImageReward.pt`` and ``med_config.json`` (default ``THUDM/ImageReward``) or a
local ``ImageReward.pt`` with ``med_config.json`` beside it. The model is built directly from those two files
rather than through ``ImageReward.load``, which always contacts the hub for the config.
ImageReward scores PIL images one at a time (its own preprocessing), so tensors are rounded to uint8 first,
exactly as a saved PNG would be.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from spo.errors import ModelLoadError
from spo.rewards import Scorer, require_module, resolve_weights_file, split_hub_ref, to_pil_images


class ImageRewardScorer(Scorer):
    def __init__(self, model):
        self.model = model.eval().requires_grad_(False)

    @torch.no_grad()
    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        pils = to_pil_images(images)
        return torch.tensor(
            [float(self.model.score(p, im)) for p, im in zip(prompts, pils, strict=True)], dtype=torch.float32
        )


def load(cfg, device="cpu") -> ImageRewardScorer:
    require_module("ImageReward", "the ImageReward scorer", "imagereward")
    from ImageReward.ImageReward import ImageReward

    ref = cfg.eval.imagereward_model
    key = "eval.imagereward_model"
    if Path(ref).expanduser().is_file():
        weights = Path(ref).expanduser()
        med_config = weights.with_name("med_config.json")
        if not med_config.is_file():
            raise ModelLoadError(
                f"ImageReward: {med_config} is missing (it ships with ImageReward.pt on the hub)."
            )
    else:
        repo, filename = split_hub_ref(ref)
        weights = resolve_weights_file(
            f"{repo}:{filename or 'ImageReward.pt'}", "ImageReward", config_key=key
        )
        med_config = resolve_weights_file(f"{repo}:med_config.json", "ImageReward", config_key=key)
    model = ImageReward(med_config=str(med_config), device=device).to(device)
    # strict=False, as upstream ImageReward.load does.
    model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True), strict=False)
    return ImageRewardScorer(model)


def preflight(cfg) -> None:
    require_module("ImageReward", "the ImageReward scorer", "imagereward")
