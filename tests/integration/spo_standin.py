"""Deterministic stand-ins for the SPM, for SPO tests where the preference model's quality does not matter.

They implement the :class:`spo.sampling.StepScorer` protocol (``encode_text`` + ``score_with_text``), like
the real SPM in spo/models/preference.py.
"""

from __future__ import annotations

import torch


class BrightnessScorer:
    """Prefers brighter images: score = ``scale`` · mean pixel value in [-1, 1] (a logit, like the SPM's).

    The scale is large because random-init tiny VAEs decode nearly uniform images (candidate brightness differs
    by ~5e-4), and the sampler keeps a pair only when the softmax gap of the two scores exceeds the threshold.

    Records every call so tests can check what the sampler scored.
    """

    def __init__(self, scale: float = 2000.0):
        self.scale = scale
        self.calls: list[tuple[int, list[int]]] = []  # (batch size, timesteps)

    def encode_text(self, prompts: list[str]) -> torch.Tensor:
        return torch.zeros(len(prompts), 1)

    def score_with_text(
        self, images: torch.Tensor, text_embeds: torch.Tensor, timesteps: torch.Tensor
    ) -> torch.Tensor:
        assert images.ndim == 4 and images.shape[1] == 3 and text_embeds.shape[0] == images.shape[0]
        assert images.min() >= -1 and images.max() <= 1
        self.calls.append((images.shape[0], torch.as_tensor(timesteps).tolist()))
        return self.scale * images.float().mean(dim=(1, 2, 3))
