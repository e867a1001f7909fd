"""LoRA on the UNet: add it, run the frozen reference with the adapters switched off, save/load/export.

The SPO reference policy π_ref is the base UNet. Because only LoRA weights train, the base UNet is the same
module with its adapters disabled; there is never a second UNet in memory (the official code deep-copies it).

Files are written in the stock diffusers format (``pytorch_lora_weights.safetensors`` with the adapter
metadata, so that ``lora_alpha != rank`` survives ``load_lora_weights``) and, for webui / ComfyUI users,
in kohya's ``lora_unet_*`` format with per-module ``.alpha`` tensors.

For inference, :func:`resolve_lora` turns a reference (file, folder, hub id, ``models:/name@alias``) into the
local file and :func:`load_lora_into_pipeline` loads it into a stock diffusers pipeline.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from spo.errors import ModelLoadError
from spo.utils import atomic_dir, get_logger

log = get_logger(__name__)

LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
ADAPTER = "default"


def add_lora(unet, rank: int, alpha: float | None = None, targets=LORA_TARGETS) -> list[torch.nn.Parameter]:
    """Freeze ``unet``, add a peft LoRA (gaussian init, as the paper) on the attention projections, keep the
    LoRA parameters in fp32 (whatever the frozen weights' dtype) and return them, as a list.

    A list, not a generator: the official code passed a ``filter`` iterator to both the optimizer and the
    gradient clipper, so clipping silently saw no parameters.
    """
    from peft import LoraConfig

    unet.requires_grad_(False)
    unet.add_adapter(
        LoraConfig(
            r=rank,
            lora_alpha=alpha if alpha is not None else rank,
            init_lora_weights="gaussian",
            target_modules=list(targets),
        ),
        adapter_name=ADAPTER,
    )
    params = lora_parameters(unet)
    for p in params:
        p.data = p.data.float()
    if not params:
        raise ModelLoadError(
            f"no LoRA target modules {list(targets)} found in the UNet; is this an SD-1.5 / SDXL UNet?"
        )
    return params


def lora_parameters(unet) -> list[torch.nn.Parameter]:
    return [p for n, p in unet.named_parameters() if "lora_" in n and p.requires_grad]


@contextlib.contextmanager
def reference_unet(unet) -> Iterator:
    """The reference policy: the same UNet with its LoRA adapters disabled, under ``no_grad``.

    ``unet`` may be an accelerate/DDP wrapper; adapters are toggled on the underlying module and re-enabled
    even if the body raises.
    """
    base = getattr(unet, "module", unet)
    base.disable_adapters()
    try:
        with torch.no_grad():
            yield unet
    finally:
        base.enable_adapters()


def lora_state_dict(unet) -> dict[str, torch.Tensor]:
    """The UNet's LoRA weights in diffusers' key format (``...to_q.lora.down.weight``), on CPU, contiguous."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    base = getattr(unet, "module", unet)
    sd = convert_state_dict_to_diffusers(get_peft_model_state_dict(base, adapter_name=ADAPTER))
    return {k: v.detach().cpu().contiguous() for k, v in sd.items()}


def lora_metadata(unet) -> dict:
    """The adapter config stored in the file. peft keeps ``target_modules`` as a set, which JSON would list
    in hash-seed order: identical weights would give different bytes (a new registry version, a cache miss).
    Sets become sorted lists, so the file is byte-deterministic."""
    base = getattr(unet, "module", unet)
    return _sorted_sets(base.peft_config[ADAPTER].to_dict())


def _sorted_sets(node):
    if isinstance(node, set | frozenset):
        return sorted(node, key=str)
    if isinstance(node, dict):
        return {k: _sorted_sets(v) for k, v in sorted(node.items())}
    if isinstance(node, list | tuple):
        return [_sorted_sets(v) for v in node]
    return node


def write_lora(unet, directory: str | Path, arch: str) -> Path:
    """Write ``directory/pytorch_lora_weights.safetensors`` (not atomic; see :func:`save_lora`)."""
    from spo.models.diffusion import pipeline_class

    pipeline_class(arch).save_lora_weights(
        str(directory),
        unet_lora_layers=lora_state_dict(unet),
        safe_serialization=True,
        unet_lora_adapter_metadata=lora_metadata(unet),
    )
    path = Path(directory) / LORA_WEIGHT_NAME
    canonicalize_safetensors(path)
    path.chmod(0o644)  # safetensors creates it 0600; shared model stores need it readable
    return path


def canonicalize_safetensors(path: str | Path) -> None:
    """Rewrite a .safetensors header with sorted keys. safetensors writes its ``__metadata__`` map in a
    random per-process order, so identical weights would hash differently (a new registry version, an
    evaluation-cache miss, a DVC change). Tensor bytes and offsets are untouched."""
    import json
    import struct

    path = Path(path)
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    if "__metadata__" in header:
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the format pads the header with spaces to 8-byte alignment
    path.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n :])


def save_lora(unet, dest: str | Path, arch: str, extra_files: dict[str, str] | None = None) -> Path:
    """Atomically replace the folder ``dest`` with the LoRA file (+ small text files such as a model card)."""
    dest = Path(dest)
    with atomic_dir(dest) as tmp:
        write_lora(unet, tmp, arch)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
    return dest / LORA_WEIGHT_NAME


def resolve_lora_file(path: str | Path) -> Path:
    path = Path(path)
    if path.is_dir():
        path = path / LORA_WEIGHT_NAME
    if not path.is_file():
        raise ModelLoadError(
            f"no LoRA file at {path}. Train one with `spo train` (it writes models/spo/lora/{LORA_WEIGHT_NAME}) "
            "or pass the folder / .safetensors file of a diffusers-format LoRA."
        )
    return path


def read_lora_file(path: str | Path) -> tuple[dict[str, torch.Tensor], dict | None]:
    """(state dict, adapter metadata or None) of a diffusers-format LoRA file (the ``unet.`` prefix kept)."""
    from safetensors import safe_open

    path = resolve_lora_file(path)
    tensors: dict[str, torch.Tensor] = {}
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            for k in f.keys():
                tensors[k] = f.get_tensor(k)
    except Exception as exc:  # safetensors raises its own (Rust) error types for every kind of bad file
        raise ModelLoadError(
            f"{path} is not a readable .safetensors LoRA file ({exc}). Pass the LoRA folder written by "
            "`spo train` (models/spo/lora) or a diffusers-format .safetensors file."
        ) from exc
    raw = meta.get("lora_adapter_metadata")
    metadata = None
    if raw:
        # diffusers stores {"unet.r": 4, "unet.lora_alpha": 8, ...}; keep the UNet's entries.
        flat = json.loads(raw)
        metadata = {k.split(".", 1)[1]: v for k, v in flat.items() if k.startswith("unet.")} or flat
    return tensors, metadata


def load_lora_into(unet, path: str | Path) -> None:
    """Load a diffusers-format LoRA file into ``unet``'s existing adapter (used when resuming)."""
    from diffusers.utils import convert_unet_state_dict_to_peft
    from peft.utils import set_peft_model_state_dict

    sd, _ = read_lora_file(path)
    sd = {k.removeprefix("unet."): v for k, v in sd.items()}
    base = getattr(unet, "module", unet)
    result = set_peft_model_state_dict(base, convert_unet_state_dict_to_peft(sd), adapter_name=ADAPTER)
    unexpected = getattr(result, "unexpected_keys", None) or []
    if unexpected:
        raise ModelLoadError(
            f"LoRA file {path} does not match this UNet (unexpected keys, e.g. {unexpected[:3]})"
        )


def to_kohya(path: str | Path) -> dict[str, torch.Tensor]:
    """Convert a diffusers-format LoRA file to kohya's format (``lora_unet_<module>.lora_down/lora_up.weight``
    and ``.alpha``), which AUTOMATIC1111 / Forge / ComfyUI load.

    diffusers' ``convert_state_dict_to_kohya`` writes ``alpha = rank``; the real ``lora_alpha`` from the file's
    adapter metadata is written instead, so that the scale alpha/rank is preserved.
    """
    from diffusers.utils import convert_state_dict_to_kohya, convert_unet_state_dict_to_peft

    sd, metadata = read_lora_file(path)
    unet_sd = {k.removeprefix("unet."): v for k, v in sd.items() if k.startswith("unet.")}
    if len(unet_sd) != len(sd):
        raise ModelLoadError(f"{path}: only UNet LoRAs can be exported (found text-encoder keys)")
    peft_sd = convert_unet_state_dict_to_peft(unet_sd)
    kohya = convert_state_dict_to_kohya({f"unet.{k}": v for k, v in peft_sd.items()})
    metadata = metadata or {}
    if metadata.get("alpha_pattern") or metadata.get("rank_pattern"):
        raise ModelLoadError(
            f"{path}: LoRAs with per-module alpha/rank patterns cannot be exported to kohya yet"
        )
    alpha = metadata.get("lora_alpha")
    for key in list(kohya):
        if key.endswith(".alpha"):
            rank = kohya[key.replace(".alpha", ".lora_down.weight")].shape[0]
            kohya[key] = torch.tensor(float(alpha if alpha is not None else rank))
    return {k: v.contiguous() for k, v in kohya.items()}


# -- resolving and loading a LoRA for inference (spo evaluate / spo generate) ------------------------------
def resolve_lora(ref: str | None, cfg) -> Path:
    """A LoRA reference -> the local diffusers-format ``.safetensors`` file.

    ``None``: this run's ``models/spo/lora`` (artifact ``lora``). Otherwise a file, a folder,
    ``models:/name@alias`` (MLflow registry), a hub id (the repo's ``pytorch_lora_weights.safetensors`` or its
    only ``.safetensors``) or ``hub_id:filename``.
    """
    from spo.errors import SPOError
    from spo.pipeline_spec import artifact_path

    if ref is None:
        own = artifact_path(cfg, "lora")
        if not own.exists():
            raise SPOError(
                f"no LoRA at {own}: run `spo train` first, or evaluate another one with "
                "--lora PATH|HUB_ID|models:/NAME@ALIAS."
            )
        return resolve_lora_file(own)
    from spo.refs import ModelRef

    parsed = ModelRef.parse(ref, root=".")  # --lora paths are relative to the working directory
    if parsed.is_registry:
        from spo import tracking

        return resolve_lora_file(tracking.resolve_lora_uri(parsed, cfg))
    if parsed.is_local:
        local = parsed.path
        if not local.exists():
            raise ModelLoadError(f"no LoRA file or folder at {ref!r}, and it is not a hub id (owner/name).")
        if local.is_dir() and not (local / LORA_WEIGHT_NAME).exists():
            candidates = sorted(local.glob("*.safetensors"))
            if len(candidates) == 1:
                return candidates[0]
        return resolve_lora_file(local)
    from spo.hub import lora_file

    return lora_file(parsed, LORA_WEIGHT_NAME)

def check_lora_weights(lora_file: Path, max_abs: float = 1000.0) -> None:
    """Refuse a LoRA file whose weights are NaN/inf or exploded (see spo.training.guard.require_sane)."""
    from spo.training.guard import require_sane

    tensors, _ = read_lora_file(lora_file)
    require_sane(tensors.values(), f"the LoRA {lora_file}", max_abs, "Retrain it (lower spo.lr).")


def load_lora_into_pipeline(
    pipe, lora_file: Path, adapter_name: str = "spo", max_lora_weight: float = 1000.0
) -> None:
    """Stock ``load_lora_weights``, refusing a file that put nothing into the UNet (wrong architecture) or
    whose weights are NaN/inf or exploded (an evaluation of a broken LoRA must not succeed)."""
    check_lora_weights(lora_file, max_lora_weight)
    try:
        pipe.load_lora_weights(str(lora_file.parent), weight_name=lora_file.name, adapter_name=adapter_name)
    except (ValueError, KeyError, RuntimeError, OSError) as exc:
        raise ModelLoadError(
            f"could not load the LoRA {lora_file} into the {type(pipe).__name__}: {exc}"
        ) from exc
    if adapter_name not in pipe.get_list_adapters().get("unet", []):
        raise ModelLoadError(
            f"the LoRA {lora_file} has no UNet weights for this {type(pipe).__name__}; was it trained for another "
            "base model (model.arch / model.pretrained)?"
        )


# ----------------------------------------------------------------------------------------------------------
# The trainable LoRA policy SPO and Diffusion-DPO share: adapters on the base UNet (the reference is the same
# UNet with them disabled), AdamW on the LoRA parameters, warm-up then constant LR, prepared by accelerate,
# and checkpoint hooks that store only the LoRA, in diffusers format.
# ----------------------------------------------------------------------------------------------------------
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
