"""The step-aware preference model as a scorer of finished images (t = 0).

Scores with this run's SPM (``models/spm``, written by ``spo train-spm``) or, when there is none and
``spm.source`` names a released SPM (``pretrained:...``), with that one. Like PickScore, the scale is
``logit_scale.exp() * cos``. Note it is the model SPO was trained against, so it measures how well SPO
optimised its own judge, not independent quality.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from spo.errors import ModelLoadError
from spo.rewards import Scorer


class SPMScorer(Scorer):
    def __init__(self, model):
        self.model = model

    @torch.no_grad()
    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        t0 = torch.zeros(images.shape[0], dtype=torch.long, device=self.model.device)
        return self.model.score(images, list(prompts), t0).float().cpu()


def _source(cfg) -> str:
    from spo.models.preference import SPM_CONFIG_NAME

    if (Path(cfg.paths.spm_model) / SPM_CONFIG_NAME).exists() or not cfg.spm.source.startswith("pretrained:"):
        return str(cfg.paths.spm_model)
    return cfg.spm.source


def preflight(cfg) -> None:
    src = _source(cfg)
    if not src.startswith("pretrained:") and not Path(src).exists():
        raise ModelLoadError(
            f"the spm scorer needs a trained SPM at {src}: run `spo train-spm` first, or drop spm from "
            "eval.scorers (--set eval.scorers=[...])."
        )


def load(cfg, device="cpu") -> SPMScorer:
    from spo.models.preference import load_spm

    preflight(cfg)
    model = load_spm(
        _source(cfg),
        device,
        clip_ref=cfg.spm.init,
        processor_ref=cfg.spm.processor,
        time_embed_dim=cfg.spm.time_embed_dim,
    )
    return SPMScorer(model)
