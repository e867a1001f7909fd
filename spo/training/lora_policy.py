"""The trainable LoRA policy that SPO and Diffusion-DPO share: LoRA adapters on the base UNet (the reference is
the same UNet with them disabled), AdamW on the LoRA parameters, warm-up then constant LR, everything prepared
by accelerate, and checkpoint hooks that store only the LoRA, in diffusers format."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch


@dataclass
class LoRAPolicy:
    unet: Any  # the prepared (possibly DDP-wrapped) UNet
    base_unet: Any  # the unwrapped UNet holding the adapters
    optimizer: Any
    lr_scheduler: Any
    params: list[torch.nn.Parameter]


def prepare_lora_policy(
    accelerator,
    adapter,
    *,
    rank: int,
    alpha: float | None,
    seed: int,
    lr: float,
    betas: tuple[float, float],
    weight_decay: float,
    eps: float,
    warmup_steps: int,
    gradient_checkpointing: bool,
) -> LoRAPolicy:
    from diffusers.optimization import get_scheduler

    from spo.models.lora import LORA_WEIGHT_NAME, add_lora, load_lora_into, write_lora

    unet = adapter.unet
    # The LoRA's gaussian init draws from the global RNG: seed it here, without side effects elsewhere.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        params = add_lora(unet, rank, alpha)
    if gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    optimizer = torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay, eps=eps)
    lr_scheduler = get_scheduler("constant_with_warmup", optimizer=optimizer, num_warmup_steps=warmup_steps)
    unet, optimizer, lr_scheduler = accelerator.prepare(unet, optimizer, lr_scheduler)
    base_unet = accelerator.unwrap_model(unet)

    def save_hook(models, weights, output_dir):
        if accelerator.is_main_process:
            write_lora(base_unet, output_dir, adapter.arch)
        while weights:
            weights.pop()

    def load_hook(models, input_dir):
        load_lora_into(base_unet, Path(input_dir) / LORA_WEIGHT_NAME)
        while models:
            models.pop()

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)
    return LoRAPolicy(unet, base_unet, optimizer, lr_scheduler, params)
