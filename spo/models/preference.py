"""The step-aware preference model (SPM): a CLIP whose vision tower is conditioned on the diffusion timestep.

Also home of :func:`preprocess_images`, the differentiable tensor version of a ``CLIPImageProcessor`` that every
CLIP-based scorer in the project uses (no PIL round trip, batched, any device).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from spo.errors import ModelLoadError
from spo.hub import local_file_or_download
from spo.refs import ModelRef, RefError
from spo.utils import atomic_dir, atomic_write_json, get_logger

log = get_logger(__name__)


def _image_processor(processor):
    """Accept a CLIPImageProcessor or a CLIPProcessor (which wraps one)."""
    return getattr(processor, "image_processor", processor)


def _size_value(size, key: str):
    # transformers 5 keeps SizeDict objects (attributes) on processors and plain dicts in configs.
    if isinstance(size, dict):
        return size.get(key)
    return getattr(size, key, None)


RESIZE_MODES = ("pil", "official")


def preprocess_images(images: torch.Tensor, image_processor, resize: str = "pil") -> torch.Tensor:
    """Float images (N, 3, H, W) in [-1, 1] -> CLIP ``pixel_values``, differentiably.

    Mirrors ``CLIPImageProcessor``: bicubic resize of the shortest side to ``size["shortest_edge"]`` (the
    long side becomes ``int(short_target * long / short)``, as transformers computes it), centre crop to
    ``crop_size``, then normalisation with ``image_mean``/``image_std``. ``antialias=True`` makes torch's
    bicubic use PIL's kernel (a=-0.5 with a widened support when downscaling), so results match the
    processor's PIL path up to its uint8 quantisation.

    ``resize="official"`` reproduces the official SPO code, with which the released SPMs were trained and
    are used: plain (not antialiased) bicubic to target sizes ``int(x·s + 0.5)``, no clamping. With the same
    weights the two differ by up to ~0.2 in score when images are downscaled, so a model is always used with
    the preprocessing it was trained with (``TimeConditionedCLIP.resize_mode``, saved in spm_config.json).
    """
    if resize not in RESIZE_MODES:
        raise ValueError(f"resize must be one of {RESIZE_MODES}, got {resize!r}")
    official = resize == "official"
    proc = _image_processor(image_processor)
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images of shape (N, 3, H, W), got {tuple(images.shape)}")
    x = images.float()
    h, w = x.shape[-2:]
    short_target = _size_value(proc.size, "shortest_edge")
    if short_target is None:  # processors configured with an explicit (height, width)
        new_h, new_w = _size_value(proc.size, "height"), _size_value(proc.size, "width")
    elif official:
        scale = short_target / min(h, w)
        new_h, new_w = int(h * scale + 0.5), int(w * scale + 0.5)
    elif w <= h:
        new_w, new_h = short_target, int(short_target * h / w)
    else:
        new_h, new_w = short_target, int(short_target * w / h)
    if (new_h, new_w) != (h, w):
        x = F.interpolate(x, size=(new_h, new_w), mode="bicubic", align_corners=False, antialias=not official)
        if not official:  # the processor resizes uint8 pixels, which clamps bicubic overshoot; do the same
            x = x.clamp(-1, 1)
    crop_h, crop_w = _size_value(proc.crop_size, "height"), _size_value(proc.crop_size, "width")
    if crop_h is not None and (crop_h, crop_w) != (new_h, new_w):
        if crop_h > new_h or crop_w > new_w:
            # The processor pads in this case; CLIP configs never ask for it, so refuse rather than guess.
            raise ValueError(f"crop {crop_h}x{crop_w} is larger than the resized image {new_h}x{new_w}")
        top, left = (new_h - crop_h) // 2, (new_w - crop_w) // 2
        x = x[..., top : top + crop_h, left : left + crop_w]
    x = (x + 1) / 2  # [-1, 1] -> [0, 1], what the processor sees after rescaling uint8 by 1/255
    mean = torch.tensor(proc.image_mean, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
    std = torch.tensor(proc.image_std, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
    return (x - mean) / std


# ------------------------------------------------------------------------------------------------------------
# The time-conditioned CLIP
# ------------------------------------------------------------------------------------------------------------
SPM_CONFIG_NAME = "spm_config.json"
SPM_WEIGHTS_NAME = "model.safetensors"
SPM_FORMAT = "spo-step-aware-preference-model"
# The released checkpoints of SPO-Diffusion-Models/Step-Aware_Preference_Models, by base architecture.
RELEASED_SPM_FILES = {
    "sd15": "sd-v1-5_step-aware_preference_model.bin",
    "sdxl": "sdxl_step-aware_preference_model.bin",
}


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding (N,) -> (N, dim) as [cos, sin] (GLIDE/DiT order, as the released SPM uses)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class TimestepEmbedder(nn.Module):
    """t -> sinusoid(freq_dim) -> Linear -> SiLU -> Linear (width = the vision tower's hidden size)."""

    def __init__(self, hidden_size: int, freq_dim: int):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(
            nn.Linear(freq_dim, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size)
        )
        nn.init.normal_(self.mlp[0].weight, std=0.02)
        nn.init.normal_(self.mlp[2].weight, std=0.02)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(timestep_embedding(t, self.freq_dim).to(self.mlp[0].weight.dtype))


def _adaln(hidden: int, chunks: int, gates: tuple[int, ...] = ()) -> nn.Sequential:
    """SiLU -> Linear(hidden, chunks*hidden), zero weights; bias 0 except 1 on the gate chunks.

    With zero weights the modulation is the identity (shift 0, scale 0, gate 1) whatever t is: the SPM starts
    as exactly the source CLIP, and training moves away from it only as far as the data asks.
    """
    layer = nn.Linear(hidden, chunks * hidden)
    nn.init.zeros_(layer.weight)
    with torch.no_grad():
        layer.bias.zero_()
        for g in gates:
            layer.bias[g * hidden : (g + 1) * hidden] = 1.0
    return nn.Sequential(nn.SiLU(), layer)


def _modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


class TimeConditionedCLIP(nn.Module):
    """A transformers ``CLIPModel`` whose vision tower is modulated by the diffusion timestep (DiT adaLN).

    Per vision block: ``h += gate_a·Attn(LN1(h)·(1+scale_a)+shift_a)`` and ``h += gate_m·MLP(LN2(h)·(1+scale_m)
    +shift_m)``; the pooled output gets ``·(1+scale)+shift``. The modulations come from one timestep embedding
    and are zero-initialised, so a fresh model scores exactly like its source CLIP for every t. The CLIP itself
    is stock (its weights, text tower and projections are used as they are), so any CLIP checkpoint works.

    ``score = logit_scale.exp() · cos(image_emb, text_emb)``, the PickScore scale.
    """

    def __init__(
        self,
        clip,
        processor,
        time_embed_dim: int = 256,
        source: str | None = None,
        processor_source: str | None = None,
        resize_mode: str = "pil",
        step_conditioned: bool = True,
    ):
        super().__init__()
        if resize_mode not in RESIZE_MODES:
            raise ValueError(f"resize_mode must be one of {RESIZE_MODES}, got {resize_mode!r}")
        self.resize_mode = resize_mode  # the image preprocessing the model was trained with
        # False: every image is embedded as at t = 0, whatever timestep it comes with (the "SPM w/o step
        # condition" ablation, paper Table 5); trained and used that way, saved in spm_config.json.
        self.step_conditioned = step_conditioned
        self.clip = clip
        self.processor = processor
        self.time_embed_dim = time_embed_dim
        self.source = source
        self.processor_source = processor_source
        hidden = clip.config.vision_config.hidden_size
        num_layers = len(clip.vision_model.encoder.layers)
        self.t_embedder = TimestepEmbedder(hidden, time_embed_dim)
        # chunks: shift_attn, scale_attn, gate_attn, shift_mlp, scale_mlp, gate_mlp (the released SPM's order)
        self.block_adaln = nn.ModuleList([_adaln(hidden, 6, gates=(2, 5)) for _ in range(num_layers)])
        self.pooled_adaln = _adaln(hidden, 2)  # shift, scale
        self.gradient_checkpointing = False

    # -- construction ------------------------------------------------------------------------------------
    @classmethod
    def from_clip(cls, ref: str, processor_ref: str | None = None, time_embed_dim: int = 256):
        """Initialise from a CLIP checkpoint folder or hub id (e.g. ``yuvalkirstain/PickScore_v1``)."""
        clip = _load_clip(ref)
        processor = _load_processor(processor_ref or ref)
        return cls(
            clip, processor, time_embed_dim, source=str(ref), processor_source=str(processor_ref or ref)
        )

    @property
    def device(self) -> torch.device:
        return self.clip.logit_scale.device

    @property
    def tokenizer(self):
        return self.processor.tokenizer

    @property
    def image_processor(self):
        return self.processor.image_processor

    def enable_gradient_checkpointing(self, enabled: bool = True) -> None:
        self.gradient_checkpointing = enabled

    # -- text ----------------------------------------------------------------------------------------------
    def tokenize(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        tok = self.tokenizer(
            list(prompts),
            padding=True,
            truncation=True,
            max_length=self.tokenizer.model_max_length,
            return_tensors="pt",
        )
        return {
            "input_ids": tok["input_ids"].to(self.device),
            "attention_mask": tok["attention_mask"].to(self.device),
        }

    def text_features(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        # transformers >= 5.6 returns an output object; the projected embedding is its pooler_output.
        out = self.clip.get_text_features(input_ids=input_ids, attention_mask=attention_mask)
        return F.normalize(getattr(out, "pooler_output", out).float(), dim=-1)

    def encode_text(self, prompts: list[str]) -> torch.Tensor:
        """Normalised text embeddings (N, D)."""
        return self.text_features(**self.tokenize(prompts))

    # -- images --------------------------------------------------------------------------------------------
    def _timesteps(self, timesteps, n: int) -> torch.Tensor:
        if timesteps is None:
            return torch.zeros(n, dtype=torch.long, device=self.device)
        t = torch.as_tensor(timesteps, device=self.device)
        return t.expand(n) if t.ndim == 0 else t

    def image_features(self, pixel_values: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """Preprocessed pixel values + timesteps -> normalised image embeddings (N, D)."""
        vision = self.clip.vision_model
        if not self.step_conditioned:
            timesteps = torch.zeros_like(torch.as_tensor(timesteps, device=pixel_values.device))
        temb = self.t_embedder(timesteps)
        h = vision.pre_layrnorm(vision.embeddings(pixel_values.to(self.clip.visual_projection.weight.dtype)))
        for layer, adaln in zip(vision.encoder.layers, self.block_adaln, strict=True):
            mods = adaln(temb).unsqueeze(1)
            if self.gradient_checkpointing and self.training:
                h = torch.utils.checkpoint.checkpoint(_block, layer, h, mods, use_reentrant=False)
            else:
                h = _block(layer, h, mods)
        shift, scale = self.pooled_adaln(temb).chunk(2, dim=-1)
        pooled = _modulate(vision.post_layernorm(h[:, 0]), shift, scale)
        # The embeddings are normalised and scored in fp32 whatever the weights: a bf16 score
        # (logit_scale·cos ≈ 20, spacing 0.125) ties most of the k candidates of a step, and a tie is no pair.
        return F.normalize(self.clip.visual_projection(pooled).float(), dim=-1)

    def encode_images(self, images: torch.Tensor, timesteps: torch.Tensor | None = None) -> torch.Tensor:
        """Images (N, 3, H, W) in [-1, 1], any size -> normalised image embeddings (N, D)."""
        t = self._timesteps(timesteps, images.shape[0])
        pixels = preprocess_images(images.to(self.device), self.image_processor, self.resize_mode)
        return self.image_features(pixels, t)

    # -- scores --------------------------------------------------------------------------------------------
    def forward(
        self,
        images: torch.Tensor,
        timesteps: torch.Tensor | None,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Scores for ``images`` (k·N) against N tokenised prompts; image i uses prompt ``i mod N``.

        Training goes through ``forward`` (so DDP/DeepSpeed see it) with the two images of each pair stacked as
        ``[images_0; images_1]``: the text tower runs once per pair instead of once per image.
        """
        text = self.text_features(input_ids, attention_mask)
        image = self.encode_images(images, timesteps)
        if image.shape[0] % text.shape[0]:
            raise ValueError(f"{image.shape[0]} images do not split into groups of {text.shape[0]} prompts")
        text = text.repeat(image.shape[0] // text.shape[0], 1)
        return self.clip.logit_scale.float().exp() * (image * text).sum(-1)

    def score_with_text(
        self, images: torch.Tensor, text_embeds: torch.Tensor, timesteps: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Scores (N,) for images against precomputed normalised text embeddings (N, D) (or (1, D))."""
        image = self.encode_images(images, timesteps)
        return self.clip.logit_scale.float().exp() * (image * text_embeds.to(image)).sum(-1)

    def score(
        self, images: torch.Tensor, prompts: list[str], timesteps: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Scores (N,) = logit_scale · cos(image, prompt); ``timesteps=None`` means t = 0 (clean images)."""
        return self(images, timesteps, **self.tokenize(prompts))


def _block(layer, h: torch.Tensor, mods: torch.Tensor) -> torch.Tensor:
    """One CLIP encoder layer with adaLN modulation (``mods``: (N, 1, 6·hidden))."""
    shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = mods.chunk(6, dim=-1)
    attn, _ = layer.self_attn(
        hidden_states=_modulate(layer.layer_norm1(h), shift_a, scale_a), attention_mask=None
    )
    h = h + gate_a * attn
    return h + gate_m * layer.mlp(_modulate(layer.layer_norm2(h), shift_m, scale_m))


# ------------------------------------------------------------------------------------------------------------
# Loading and saving
# ------------------------------------------------------------------------------------------------------------
def _parse_ref(ref: str, what: str) -> ModelRef:
    try:
        return ModelRef.parse(ref)
    except RefError as exc:
        raise ModelLoadError(f"{what}: {exc}") from exc


def _load_hint(ref: str, what: str) -> str:
    try:
        local = ModelRef.parse(ref).is_local
    except RefError:
        local = False
    if local:
        return f"No {what} at {ref!r}. For the tiny preset run `spo base` first; otherwise fix the path."
    return (
        f"Could not load the {what} {ref!r} from the Hugging Face hub. Check the id, your network and HF_TOKEN; "
        f"with HF_HUB_OFFLINE=1 it must already be in the local HF cache (huggingface-cli download {ref}), "
        "or point the config at a local copy."
    )


def _pretrained(ref: str, what: str) -> tuple[str, dict[str, Any]]:
    """``from_pretrained`` arguments for a CLIP folder or ``org/name[@revision]``; a missing folder fails here."""
    parsed = _parse_ref(ref, what)
    if parsed.is_local and not parsed.exists():
        raise ModelLoadError(_load_hint(ref, what))
    try:
        return parsed.pretrained_args()
    except RefError as exc:
        raise ModelLoadError(f"{what}: {exc}") from exc


def _load_clip(ref: str):
    from transformers import CLIPModel

    name, kwargs = _pretrained(ref, "CLIP model")
    try:
        # fp32 master weights whatever the stored dtype: transformers 5 loads in the checkpoint's dtype by
        # default, and an fp16-stored CLIP would meet the fp32 adaLN layers ("mat1 and mat2 must have the
        # same dtype"). Callers cast the whole SPM (``.to(dtype)``) afterwards.
        return CLIPModel.from_pretrained(name, dtype=torch.float32, **kwargs)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{_load_hint(ref, 'CLIP model')}\n  underlying error: {exc}") from exc


def _load_processor(ref: str):
    from transformers import CLIPProcessor

    name, kwargs = _pretrained(ref, "CLIP processor")
    try:
        return CLIPProcessor.from_pretrained(name, **kwargs)
    except (OSError, ValueError, TypeError) as exc:
        raise ModelLoadError(f"{_load_hint(ref, 'CLIP processor')}\n  underlying error: {exc}") from exc


def save_spm(
    model: TimeConditionedCLIP, out_dir: str | Path, extra_config: dict[str, Any] | None = None
) -> Path:
    """Write ``out_dir`` atomically: model.safetensors + spm_config.json + the processor's files.

    The folder is self-contained: :func:`load_spm` needs neither the source CLIP nor the hub.
    """
    from safetensors.torch import save_file

    config = {
        "format": SPM_FORMAT,
        "format_version": 1,
        "source_clip": model.source,
        "processor": model.processor_source,
        "time_embed_dim": model.time_embed_dim,
        "preprocess_resize": model.resize_mode,
        "step_conditioned": model.step_conditioned,
        "clip_config": model.clip.config.to_dict(),
        **(extra_config or {}),
    }
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    with atomic_dir(out_dir) as tmp:
        save_file(state, str(tmp / SPM_WEIGHTS_NAME), metadata={"format": "pt"})
        model.processor.save_pretrained(tmp)
        atomic_write_json(tmp / SPM_CONFIG_NAME, config)
    return Path(out_dir)


def load_spm(
    path_or_ref: str | Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    *,
    clip_ref: str = "yuvalkirstain/PickScore_v1",
    processor_ref: str = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
    time_embed_dim: int = 256,
    pretrained_file: str | None = None,
) -> TimeConditionedCLIP:
    """Load an SPM for scoring (eval mode, no grad): a ``models/spm/`` folder written by :func:`save_spm`, or
    ``pretrained:<hub id | folder | .bin file>`` for the released SPO checkpoints.

    The keyword arguments only matter for ``pretrained:``: the released ``.bin`` holds weights only, so the
    architecture comes from ``clip_ref`` (PickScore for both released SPMs) and the tokenizer/image settings
    from ``processor_ref``; ``pretrained_file`` picks the file inside a hub repo or folder (default: the SD-1.5
    SPM, ``sd-v1-5_step-aware_preference_model.bin``).
    """
    ref = str(path_or_ref)
    if ref.startswith("pretrained:"):
        model = load_released_spm(
            ref.removeprefix("pretrained:"), clip_ref, processor_ref, time_embed_dim, pretrained_file
        )
    else:
        model = _load_saved_spm(Path(ref))
    model.requires_grad_(False)
    return model.to(device=device, dtype=dtype).eval()


def _load_saved_spm(path: Path) -> TimeConditionedCLIP:
    from accelerate import init_empty_weights
    from safetensors.torch import load_file
    from transformers import CLIPConfig, CLIPModel

    cfg_file, weights = path / SPM_CONFIG_NAME, path / SPM_WEIGHTS_NAME
    if not cfg_file.exists() or not weights.exists():
        raise ModelLoadError(
            f"No trained SPM at {path} (expected {SPM_CONFIG_NAME} and {SPM_WEIGHTS_NAME}). Run `spo train-spm`, "
            "or use spm.source=pretrained:SPO-Diffusion-Models/Step-Aware_Preference_Models for the released one."
        )
    config = json.loads(cfg_file.read_text())
    if config.get("format") != SPM_FORMAT:
        raise ModelLoadError(f"{cfg_file} is not an SPM config (format {config.get('format')!r})")
    # Parameters are created empty and then take the stored tensors (a ViT-H has ~1e9 of them to not init).
    with init_empty_weights():
        clip = CLIPModel(CLIPConfig.from_dict(config["clip_config"]))
        model = TimeConditionedCLIP(
            clip,
            _load_processor(str(path)),
            int(config["time_embed_dim"]),
            source=config.get("source_clip"),
            processor_source=config.get("processor"),
            resize_mode=config.get("preprocess_resize", "pil"),
            step_conditioned=bool(config.get("step_conditioned", True)),
        )
    _load_state_strict(model, load_file(str(weights)), str(weights))
    return model


def _load_state_strict(model: nn.Module, state: dict[str, torch.Tensor], origin: str) -> None:
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise ModelLoadError(_key_report(origin, missing, unexpected))
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as exc:  # shape mismatches: the weights belong to another architecture
        raise ModelLoadError(f"{origin} does not fit the model architecture: {exc}") from exc


def _key_report(origin: str, missing: list[str], unexpected: list[str], limit: int = 20) -> str:
    def show(keys: list[str]) -> str:
        more = f" ... and {len(keys) - limit} more" if len(keys) > limit else ""
        return ", ".join(keys[:limit]) + more

    lines = [f"{origin} does not match the step-aware preference model:"]
    if missing:
        lines.append(f"  missing keys ({len(missing)}): {show(missing)}")
    if unexpected:
        lines.append(f"  unexpected keys ({len(unexpected)}): {show(unexpected)}")
    lines.append(
        "  Check that the checkpoint is an SPO step-aware preference model and that spm.init names the CLIP it "
        "was trained from (yuvalkirstain/PickScore_v1 for the released SPMs)."
    )
    return "\n".join(lines)


# The released SPM is a pickled state dict of the official ``StepAwarePreferenceModel`` (RockeyCoss/SPO,
# step_aware_preference_model/trainer/models/time_conditioned_clip.py): a CLIPModel subclass under ``model.``
# with the adaLN layers inside the vision tower and the timestep MLP beside it. Ours keeps the CLIP stock, so
# only the time-conditioning keys move.
_RELEASED_KEY_MAP = (
    (re.compile(r"^vision_model\.encoder\.layers\.(\d+)\.adaLN_modulation\.(.+)$"), r"block_adaln.\1.\2"),
    (re.compile(r"^vision_model\.adaLN_modulation\.(.+)$"), r"pooled_adaln.\1"),
    (re.compile(r"^t_embedder\.(.+)$"), r"t_embedder.\1"),
    (re.compile(r"^(.+)$"), r"clip.\1"),
)
# Buffers older transformers versions saved and newer ones recompute; safe to drop.
_IGNORABLE_RELEASED_KEYS = re.compile(r"(^|\.)position_ids$")


def map_released_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official SPM state-dict keys -> :class:`TimeConditionedCLIP` keys."""
    out = {}
    for key, value in state.items():
        key = key.removeprefix("module.").removeprefix("model.")
        if _IGNORABLE_RELEASED_KEYS.search(key):
            continue
        for pattern, repl in _RELEASED_KEY_MAP:
            if pattern.match(key):
                out[pattern.sub(repl, key)] = value
                break
    return out


def load_released_spm(
    ref: str, clip_ref: str, processor_ref: str, time_embed_dim: int = 256, filename: str | None = None
) -> TimeConditionedCLIP:
    """The released SPM (``SPO-Diffusion-Models/Step-Aware_Preference_Models[@revision][:file]``, a folder
    holding ``filename`` or a ``.bin`` file; hub downloads through :func:`spo.hub.local_file_or_download`).

    Read with ``torch.load(weights_only=True)``: tensors only, never arbitrary pickled objects.
    """
    import pickle

    file = local_file_or_download(
        _parse_ref(ref, "released SPM"),
        "released SPM",
        default_filename=filename or RELEASED_SPM_FILES["sd15"],
        config_key="spm.source",
        filename_key="spm.pretrained_file",
    )
    try:
        raw = torch.load(file, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as exc:
        raise ModelLoadError(
            f"{file} could not be read as a plain tensor checkpoint (loaded with weights_only=True, which refuses "
            f"pickled code and objects). Only load checkpoints from sources you trust.\n  underlying error: {exc}"
        ) from exc
    # DeepSpeed / trainer dumps nest the state dict one level down.
    for wrapper in ("module", "state_dict", "model"):
        if isinstance(raw, dict) and isinstance(raw.get(wrapper), dict):
            raw = raw[wrapper]
    if not isinstance(raw, dict) or not all(isinstance(v, torch.Tensor) for v in raw.values()):
        raise ModelLoadError(f"{file} does not hold a state dict of tensors")
    model = TimeConditionedCLIP.from_clip(clip_ref, processor_ref, time_embed_dim)
    _load_state_strict(model, map_released_state_dict(raw), str(file))
    model.source = f"pretrained:{ref}"
    model.resize_mode = "official"  # the preprocessing the released SPMs were trained with
    return model
