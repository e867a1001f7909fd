"""Test helpers for the step-aware preference model (shared by unit and integration tests)."""

from __future__ import annotations

import torch


def perturb_time_conditioning(spm, seed: int = 1, scale: float = 0.05) -> None:
    """Move the zero-initialised time conditioning away from the identity (as training would)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in spm.named_parameters():
            if not name.startswith("clip."):
                p.add_(torch.randn(p.shape, generator=g) * scale)


def official_layout(spm) -> dict[str, torch.Tensor]:
    """The model's weights renamed by hand into the released SPM's layout.

    The official ``StepAwarePreferenceModel`` (RockeyCoss/SPO, step_aware_preference_model/trainer/models/
    time_conditioned_clip.py) holds a CLIPModel subclass under ``model.``; each vision layer has
    ``adaLN_modulation`` = (SiLU, Linear), the pooled modulation is ``vision_model.adaLN_modulation``, the
    timestep MLP is ``t_embedder.mlp`` = (Linear, SiLU, Linear); older transformers also stored ``position_ids``.
    """
    sd = {f"model.{name}": value.clone() for name, value in spm.clip.state_dict().items()}
    for i, layer in enumerate(spm.block_adaln):
        sd[f"model.vision_model.encoder.layers.{i}.adaLN_modulation.1.weight"] = (
            layer[1].weight.detach().clone()
        )
        sd[f"model.vision_model.encoder.layers.{i}.adaLN_modulation.1.bias"] = layer[1].bias.detach().clone()
    sd["model.vision_model.adaLN_modulation.1.weight"] = spm.pooled_adaln[1].weight.detach().clone()
    sd["model.vision_model.adaLN_modulation.1.bias"] = spm.pooled_adaln[1].bias.detach().clone()
    for j in (0, 2):
        sd[f"model.t_embedder.mlp.{j}.weight"] = spm.t_embedder.mlp[j].weight.detach().clone()
        sd[f"model.t_embedder.mlp.{j}.bias"] = spm.t_embedder.mlp[j].bias.detach().clone()
    n_pos = spm.clip.vision_model.embeddings.position_embedding.num_embeddings
    sd["model.vision_model.embeddings.position_ids"] = torch.arange(n_pos)[None]
    sd["model.text_model.embeddings.position_ids"] = torch.arange(
        spm.clip.config.text_config.max_position_embeddings
    )[None]
    return sd
