"""HPSv2.1 (Wu et al. 2023): ``100 * cos(image, text)`` of an open_clip ViT-H-14 fine-tuned on HPD v2.

Behind the optional extra ``spo[metrics]`` (open_clip needs torchvision; scripts/install_metrics.sh installs the
build matching torch; the core install stays light).
The HPS checkpoint holds the whole CLIP, so the model is built without pretrained weights and the checkpoint
is loaded over it, as the hpsv2 package itself does. Scores are x100 to match the papers' tables
(SPO's "HPSV2" column is HPSv2.1, see shared/reference/paper.md §1a).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from spo.errors import ModelLoadError
from spo.hub import local_file_or_download
from spo.rewards import Scorer, require_module

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


class HPSScorer(Scorer):
    def __init__(self, model, tokenizer, device="cpu"):
        from transformers import CLIPImageProcessor

        from spo.models.preference import preprocess_images

        self._preprocess = preprocess_images
        self.model = model.eval().requires_grad_(False).to(device)
        self.tokenizer = tokenizer
        self.device = torch.device(device)
        size = model.visual.image_size
        size = size[0] if isinstance(size, (tuple, list)) else size
        # open_clip's eval transform: bicubic resize of the short side, centre crop, CLIP normalisation.
        self.image_processor = CLIPImageProcessor(
            size={"shortest_edge": size},
            crop_size={"height": size, "width": size},
            image_mean=list(getattr(model.visual, "image_mean", None) or OPENAI_MEAN),
            image_std=list(getattr(model.visual, "image_std", None) or OPENAI_STD),
        )

    @torch.no_grad()
    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        pixels = self._preprocess(images.to(self.device), self.image_processor)
        img = self.model.encode_image(pixels, normalize=True).float()
        txt = self.model.encode_text(self.tokenizer(list(prompts)).to(self.device), normalize=True).float()
        return (100.0 * (img * txt).sum(-1)).cpu()


def load(cfg, device="cpu") -> HPSScorer:
    open_clip = require_module("open_clip", "the HPSv2.1 scorer", "metrics")
    weights = local_file_or_download(cfg.eval.hps_weights, "HPSv2.1", config_key="eval.hps_weights")
    model = open_clip.create_model(cfg.eval.hps_model, pretrained=None)
    checkpoint = torch.load(weights, map_location="cpu", weights_only=True)
    try:
        model.load_state_dict(checkpoint.get("state_dict", checkpoint))
    except RuntimeError as exc:
        raise ModelLoadError(
            f"HPSv2.1: {weights} does not fit the open_clip architecture {cfg.eval.hps_model!r} "
            f"(eval.hps_model). ({exc})"
        ) from exc
    return HPSScorer(model, open_clip.get_tokenizer(cfg.eval.hps_model), device)


def preflight(cfg) -> None:
    require_module("open_clip", "the HPSv2.1 scorer", "metrics")
