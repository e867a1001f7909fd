"""ImageReward (Xu et al. 2023): a BLIP image-text model with an MLP head, trained on human preferences.

Behind the optional extra ``spo[imagereward]`` (the ``image-reward`` package, imported as ``ImageReward``).
Weights: a hub id holding ``ImageReward.pt`` and ``med_config.json`` (default ``THUDM/ImageReward``) or a
local ``ImageReward.pt`` (or a folder holding it) with ``med_config.json`` beside it; ``THUDM/ImageReward@<sha>``
pins the hub revision. The model is built directly from those two files
rather than through ``ImageReward.load``, which always contacts the hub for the config.
ImageReward scores PIL images one at a time (its own preprocessing), so tensors are rounded to uint8 first,
exactly as a saved PNG would be.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from spo.errors import ModelLoadError
from spo.hub import download_file, local_file_or_download
from spo.refs import ModelRef, RefError
from spo.rewards import Scorer, require_module, to_pil_images


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

    key = "eval.imagereward_model"
    try:
        ref = ModelRef.parse(cfg.eval.imagereward_model)
    except RefError as exc:
        raise ModelLoadError(f"ImageReward: {exc} (--set {key}=...)") from exc
    if ref.is_hub:
        weights = download_file(ref.with_filename(ref.filename or "ImageReward.pt"), "ImageReward", key)
        med_config = download_file(ref.with_filename("med_config.json"), "ImageReward", key)
    else:
        weights = local_file_or_download(ref, "ImageReward", "ImageReward.pt", config_key=key)
        med_config = weights.with_name("med_config.json")
        if not med_config.is_file():
            raise ModelLoadError(
                f"ImageReward: {med_config} is missing (it ships with ImageReward.pt on the hub)."
            )
    model = ImageReward(med_config=str(med_config), device=device).to(device)
    # strict=False, as upstream ImageReward.load does.
    model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True), strict=False)
    return ImageRewardScorer(model)


def preflight(cfg) -> None:
    require_module("ImageReward", "the ImageReward scorer", "imagereward")
