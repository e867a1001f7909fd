"""``spo generate``: one image from the base model, a LoRA, or a registered model.

``--model`` takes what ``spo evaluate --lora`` takes: a LoRA folder or ``.safetensors`` file, a hub id
(``owner/name`` or ``owner/name:file.safetensors``), or ``models:/spo-<preset>@champion`` (MLflow registry).
Without it the base model draws the image. Sampling follows the evaluation protocol (DDIM, ``eval.cfg_scale``,
``eval.eta``, ``eval.num_steps`` unless ``--steps``), and ``--seed`` seeds a CPU generator exactly as the
evaluation seeds each image, so an evaluation image can be reproduced from its seed (``s`` in its file name).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from spo.utils import atomic_write_bytes, get_logger, torch_device, weight_dtype

log = get_logger(__name__)


def run(
    cfg,
    prompt: str,
    model: str | None = None,
    output: str | Path = "out.png",
    seed: int = 0,
    steps: int | None = None,
) -> dict[str, Any]:
    from spo.errors import SPOError
    from spo.generation import png_bytes, protocol, sample_images
    from spo.models.diffusion import load_pipeline
    from spo.models.lora import load_lora_into_pipeline, resolve_lora
    from spo.rewards import resolve_local_refs

    cfg = resolve_local_refs(cfg)

    if not prompt or not prompt.strip():
        raise SPOError('give a non-empty prompt, e.g. spo generate "a red circle on a blue background"')
    if steps is not None and steps < 1:
        raise SPOError(f"--steps must be at least 1 (got {steps})")
    output = Path(output)
    if output.suffix.lower() != ".png":
        raise SPOError(f"the output must be a .png file (got {output})")

    device = torch_device()
    pipe = load_pipeline(cfg.model, device=device, dtype=weight_dtype(cfg, device), cfg=cfg)
    lora_file = None
    if model is not None:
        lora_file = resolve_lora(model, cfg)
        load_lora_into_pipeline(pipe, lora_file, max_lora_weight=cfg.spo.max_lora_weight)
    proto = protocol(cfg)
    if steps is not None:
        proto["num_steps"] = steps
    image = sample_images(pipe, [prompt], [seed], proto)[0]
    atomic_write_bytes(
        output, png_bytes(image, {"prompt": prompt, "seed": seed, "model": model or "base", **proto})
    )
    log.info("wrote %s (%s, seed %d, %d DDIM steps)", output, model or "base model", seed, proto["num_steps"])
    return {
        "output": str(output),
        "model": model or str(cfg.model.pretrained),
        "lora_file": str(lora_file) if lora_file else None,
        "seed": seed,
        "steps": proto["num_steps"],
        "cfg_scale": proto["cfg_scale"],
        "resolution": proto["resolution"],
    }
