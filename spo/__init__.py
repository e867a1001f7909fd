"""spo: step-by-step preference optimization for Stable Diffusion, with an MLOps layer."""

import logging as _logging

__version__ = "0.1.0"

# Library warnings that every run printed and that say nothing about this run: without torchvision,
# transformers 5 falls back to the PIL image processors (the ones spo's preprocessing mirrors) and says so on
# import of diffusers; diffusers reports that a UNet-only LoRA has no text-encoder keys (spo never trains them).
KNOWN_NOISE: dict[str, tuple[str, ...]] = {
    "transformers.utils.import_utils": ("requires torchvision (not installed); falling back to",),
    "diffusers.loaders.lora_base": ("No LoRA keys associated to CLIPTextModel",),
    # Python warnings, once logging captures them (spo's setup_logging, Prefect): MLflow asks for type hints on
    # PythonModel.predict to infer a signature (spo logs an explicit one). Its own "once" filter overrides any
    # warnings filter, so it is dropped here.
    "py.warnings": ("Add type hints to the `predict` method",),
}


def _drop_known_noise(record: _logging.LogRecord) -> bool:
    return not any(text in record.getMessage() for text in KNOWN_NOISE.get(record.name, ()))


for _name in KNOWN_NOISE:
    _logging.getLogger(_name).addFilter(_drop_known_noise)
