"""PickScore (Kirstain et al. 2023): ``logit_scale.exp() * cos(image, text)`` of the PickScore CLIP-H.

The weights are ``yuvalkirstain/PickScore_v1`` with the processor of ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``;
the scale is the model's learned logit scale (100 for PickScore_v1), which is what the papers' ~20-23 numbers
are in.
"""

from __future__ import annotations

from spo.rewards.clip import CLIPSimilarityScorer, load_clip


def load(cfg, device="cpu") -> CLIPSimilarityScorer:
    model, processor = load_clip(
        cfg.eval.pickscore_model, cfg.eval.pickscore_processor, "PickScore", "eval.pickscore_model"
    )
    return CLIPSimilarityScorer(model, processor, device, scale=None)
