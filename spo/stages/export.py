"""``spo export``: the trained LoRA in other tools' formats.

``--format kohya`` writes kohya-ss keys (``lora_unet_<module>.lora_down.weight`` / ``.lora_up.weight`` /
``.alpha``) with kohya's ``ss_*`` metadata: the format AUTOMATIC1111 / Forge / ComfyUI load (the community
converts SPO LoRAs for webui by hand today). ``--format diffusers`` copies the stock diffusers file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from spo.errors import SPOError
from spo.models.lora import read_lora_file, resolve_lora_file, to_kohya
from spo.pipeline_spec import artifact_path
from spo.utils import atomic_write_bytes, get_logger

log = get_logger(__name__)

FORMATS = ("kohya", "diffusers")
# kohya's ss_base_model_version values for our architectures.
_BASE_VERSION = {"sd15": "sd_v1", "sdxl": "sdxl_base_v1-0"}


def default_output(cfg, fmt: str) -> Path:
    return artifact_path(cfg, "spo_dir") / "export" / f"spo-{cfg.preset}-lora-{fmt}.safetensors"


def run(cfg, fmt: str = "kohya", lora: str | None = None, output: str | None = None) -> dict[str, Any]:
    """Convert the LoRA (default ``models/spo/lora``) and write it atomically; returns a summary."""
    from safetensors.torch import save

    if fmt not in FORMATS:
        raise SPOError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    source = resolve_lora_file(lora or artifact_path(cfg, "lora"))
    out = Path(output) if output else default_output(cfg, fmt)
    if out.suffix != ".safetensors":
        raise SPOError(f"output {out} must end in .safetensors")
    tensors, metadata = read_lora_file(source)
    metadata = metadata or {}
    rank = metadata.get("r")
    alpha = metadata.get("lora_alpha", rank)
    if fmt == "kohya":
        state = to_kohya(source)
        header = {
            "ss_network_module": "networks.lora",
            "ss_network_dim": str(rank),
            "ss_network_alpha": str(alpha),
            "ss_base_model_version": _BASE_VERSION.get(cfg.model.arch, cfg.model.arch),
            "ss_training_comment": "SPO (step-by-step preference optimization) LoRA exported by `spo export`",
            "format": "pt",
        }
    else:
        state = tensors
        header = {
            "format": "pt",
            "lora_adapter_metadata": json.dumps({f"unet.{k}": v for k, v in metadata.items()}),
        }
    atomic_write_bytes(out, save(state, metadata=header))
    log.info("exported %s (%d tensors, %s format) to %s", source, len(state), fmt, out)
    return {
        "format": fmt,
        "source": str(source),
        "output": str(out),
        "tensors": len(state),
        "rank": rank,
        "alpha": alpha,
    }
