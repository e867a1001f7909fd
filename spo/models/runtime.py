"""Speed switches (config ``runtime``): memory layout and ``torch.compile`` of the UNet, the VAE decoder and
the scoring SPM. They change how fast the networks run, not what they compute (within float tolerance:
tests/unit/test_runtime.py). Mixed precision is ``spo.mixed_precision`` (accelerate autocast over fp32 LoRA
parameters) and TF32 ``spo.allow_tf32``; attention is PyTorch SDPA by default in diffusers and transformers.
"""

from __future__ import annotations

import torch


def wants_channels_last(runtime, device: str | torch.device) -> bool:
    if runtime.channels_last is not None:
        return runtime.channels_last
    return torch.device(device).type == "cuda"


def compile_in_place(module: torch.nn.Module, runtime) -> None:
    # In place (nn.Module.compile) rather than a wrapper: peft adds LoRA layers to this same object later,
    # and the trainer toggles them for the reference; dynamo re-traces on those changes.
    if runtime.compile_backend == "inductor":
        module.compile(mode=runtime.compile_mode, backend="inductor")
    else:
        module.compile(backend=runtime.compile_backend)


def apply_runtime(runtime, device: str | torch.device, *, unet=None, vae=None, spm=None) -> None:
    """Apply ``runtime`` to whichever of the networks are given (None: not loaded here)."""
    if wants_channels_last(runtime, device):
        for module in (unet, vae):
            if module is not None:
                module.to(memory_format=torch.channels_last)
    if runtime.compile:
        for module in (unet, getattr(vae, "decoder", None), spm):
            if module is not None:
                compile_in_place(module, runtime)
