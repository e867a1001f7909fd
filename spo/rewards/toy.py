"""The tiny world's ground truth: the hidden aesthetic that labelled its synthetic preference pairs.

Only meaningful for the tiny preset's procedural images (see spo/data/synthetic.py); it needs no weights.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from spo.rewards import Scorer


class ToyAestheticScorer(Scorer):
    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        from spo.data.synthetic import toy_aesthetic

        return torch.as_tensor(toy_aesthetic(images.detach().cpu())).float()


def load(cfg, device="cpu") -> ToyAestheticScorer:
    return ToyAestheticScorer()
