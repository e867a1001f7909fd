"""Loading SD-1.5 / SDXL and the one adapter that hides their differences.

Everything downstream (SPM training, the SPO sampler and trainer, evaluation) talks to a
:class:`DiffusionAdapter`: prompt encoding (one or two text encoders, pooled embeds), the UNet call with
classifier-free guidance (SDXL's ``time_ids``), and VAE encode/decode (scaling factor, fp16-fix VAE).
Real presets load a hub id, the tiny preset a local folder, through the same ``from_pretrained`` call.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from spo.errors import ModelLoadError
from spo.refs import ModelRef, RefError
from spo.utils import get_logger

log = get_logger(__name__)


@dataclass
class PromptEmbeddings:
    """Text conditioning for a batch: token embeddings, plus SDXL's pooled embedding."""

    embeds: torch.Tensor  # (B, L, D)
    pooled: torch.Tensor | None = None  # (B, P), SDXL only

    def __len__(self) -> int:
        return self.embeds.shape[0]

    def index(self, idx: torch.Tensor | slice | list[int]) -> PromptEmbeddings:
        return PromptEmbeddings(self.embeds[idx], None if self.pooled is None else self.pooled[idx])

    def repeat_interleave(self, n: int) -> PromptEmbeddings:
        return PromptEmbeddings(
            self.embeds.repeat_interleave(n, dim=0),
            None if self.pooled is None else self.pooled.repeat_interleave(n, dim=0),
        )

    def to(self, *args, **kwargs) -> PromptEmbeddings:
        return PromptEmbeddings(
            self.embeds.to(*args, **kwargs), None if self.pooled is None else self.pooled.to(*args, **kwargs)
        )

    @staticmethod
    def cat(items: list[PromptEmbeddings]) -> PromptEmbeddings:
        pooled = None if items[0].pooled is None else torch.cat([i.pooled for i in items])
        return PromptEmbeddings(torch.cat([i.embeds for i in items]), pooled)


def pipeline_class(arch: str):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    return {"sd15": StableDiffusionPipeline, "sdxl": StableDiffusionXLPipeline}[arch]


def _load_hint(ref: ModelRef | str) -> str:
    if isinstance(ref, str):
        try:
            ref = ModelRef.parse(ref)
        except RefError as exc:
            return f"{exc}. Set model.pretrained to a diffusers folder or hub id."
    if ref.is_local:
        return (
            f"No model folder at {str(ref.path)!r}. For the tiny preset run `spo base` first (or `make run`); "
            "otherwise set model.pretrained to a diffusers folder or hub id."
        )
    return (
        f"Could not load {str(ref)!r} from the Hugging Face hub. Check the id, your network and HF_TOKEN; with "
        "HF_HUB_OFFLINE=1 the model must already be in the local HF cache (huggingface-cli download "
        f"{ref.repo_id or ref}), or point the config at a local copy with --set model.pretrained=/path/to/folder."
    )


def _model_ref(text: str, root, revision: str | None = None) -> ModelRef:
    try:
        ref = ModelRef.parse(text, root=root).with_revision(revision)
        ref.pretrained_args()  # a hub file or a registry URI is not a diffusers model
    except RefError as exc:
        raise ModelLoadError(f"{exc}. Set model.pretrained to a diffusers folder or hub id.") from exc
    return ref


def load_pipeline(model_cfg, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, cfg=None):
    """Load the base pipeline named by ``model_cfg`` (a :class:`spo.config.ModelConfig`) with DDIM.

    The same call serves a hub id (``org/name``, pinned by ``model.revision`` or ``org/name@<revision>``) and the
    tiny preset's local folder; pass the full ``cfg`` so that project paths such as ``models/base`` resolve
    against ``paths.root`` (:meth:`spo.refs.ModelRef.parse`). The safety checker is never loaded: evaluation
    must score what the model produced, not blacked-out images.
    """
    from diffusers import AutoencoderKL, DDIMScheduler

    root = cfg.paths.root if cfg is not None else "."
    cls = pipeline_class(model_cfg.arch)
    ref = _model_ref(model_cfg.pretrained, root, model_cfg.revision)
    name, kwargs = ref.pretrained_args()
    kwargs["dtype"] = dtype
    if model_cfg.arch == "sd15":
        kwargs.update(safety_checker=None, requires_safety_checker=False)
    if ref.is_local and not ref.exists():
        raise ModelLoadError(_load_hint(ref))
    if model_cfg.vae:  # loaded on its own, so that a failure names the VAE (model.vae), not the base model
        vae_ref = _model_ref(model_cfg.vae, root)
        vae_name, vae_kwargs = vae_ref.pretrained_args()
        try:
            kwargs["vae"] = AutoencoderKL.from_pretrained(vae_name, dtype=dtype, **vae_kwargs)
        except (OSError, ValueError) as exc:
            hint = _load_hint(vae_ref).replace("model.pretrained", "model.vae")
            raise ModelLoadError(f"the VAE (model.vae): {hint}\n  underlying error: {exc}") from exc
    from spo.progress import quiet_library_bars

    quiet_library_bars()  # diffusers is imported by now: its "Loading pipeline components" bar too
    try:
        pipe = cls.from_pretrained(name, **kwargs)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{_load_hint(ref)}\n  underlying error: {exc}") from exc
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    pipe = pipe.to(device)
    if cfg is not None:
        from spo.models.runtime import apply_runtime

        apply_runtime(cfg.runtime, device, unet=pipe.unet, vae=pipe.vae)
    return pipe


def spm_latent_size(height: int, width: int, vae_scale: int, decode_resolution: int | None) -> tuple[int, int]:
    """The latent (height, width) that the SPM's images are decoded from, for latents of (height, width):
    scaled so that the decoded image's shorter side is ``decode_resolution`` (``spm.decode_resolution``), or
    unchanged when that is None or not smaller than the image (never upsampled)."""
    short = vae_scale * min(height, width)
    if decode_resolution is None or decode_resolution >= short:
        return height, width
    scale = decode_resolution / short
    return max(1, round(height * scale)), max(1, round(width * scale))


def _box_filter(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``x`` area-interpolated (box-filtered) to (height, width) ``size`` in fp32; ``x`` itself when already that
    size."""
    if tuple(size) == tuple(x.shape[-2:]):
        return x
    return F.interpolate(x.float(), size=size, mode="area").to(x.dtype)


class DiffusionAdapter:
    """The SD-1.5 / SDXL differences behind one interface (see module docstring)."""

    def __init__(self, pipe, resolution: int):
        from diffusers import StableDiffusionXLPipeline

        self.pipe = pipe
        self.is_sdxl = isinstance(pipe, StableDiffusionXLPipeline)
        self.arch = "sdxl" if self.is_sdxl else "sd15"
        self.resolution = resolution
        # spm.decoder=tiny: an AutoencoderTiny that renders the images the SPM judges (attach_spm_decoder).
        self.spm_decoder = None
        # spm.decode_resolution: the shorter side the SPM's images are decoded at (None: the image size).
        self.spm_decode_resolution: int | None = None
        self.vae_scale = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
        if resolution % self.vae_scale:
            raise ValueError(f"resolution {resolution} is not a multiple of the VAE factor {self.vae_scale}")

    # -- components -------------------------------------------------------------------------------
    @property
    def unet(self):
        return self.pipe.unet

    @property
    def vae(self):
        return self.pipe.vae

    @property
    def scheduler(self):
        return self.pipe.scheduler

    @property
    def device(self) -> torch.device:
        return self.pipe.unet.device

    @property
    def dtype(self) -> torch.dtype:
        return self.pipe.unet.dtype

    def latent_shape(self, batch: int) -> tuple[int, int, int, int]:
        side = self.resolution // self.vae_scale
        return (batch, self.unet.config.in_channels, side, side)

    # -- text -------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> tuple[PromptEmbeddings, PromptEmbeddings]:
        """(conditional, unconditional) embeddings, exactly as the stock pipeline builds them for CFG."""
        if self.is_sdxl:
            cond, uncond, pooled, uncond_pooled = self.pipe.encode_prompt(
                prompts, device=self.device, num_images_per_prompt=1, do_classifier_free_guidance=True
            )
            return PromptEmbeddings(cond, pooled), PromptEmbeddings(uncond, uncond_pooled)
        cond, uncond = self.pipe.encode_prompt(
            prompts, device=self.device, num_images_per_prompt=1, do_classifier_free_guidance=True
        )
        return PromptEmbeddings(cond), PromptEmbeddings(uncond)

    def time_ids(self, batch: int) -> torch.Tensor:
        """SDXL size conditioning: (orig_h, orig_w, crop_top, crop_left, target_h, target_w)."""
        r = self.resolution
        ids = torch.tensor([[r, r, 0, 0, r, r]], dtype=self.dtype, device=self.device)
        return ids.repeat(batch, 1)

    # -- UNet -------------------------------------------------------------------------------------
    def unet_call(self, unet, latents: torch.Tensor, t: torch.Tensor, emb: PromptEmbeddings) -> torch.Tensor:
        """One UNet forward on a batch. ``t`` is a scalar or a per-sample (B,) tensor."""
        t = torch.as_tensor(t, device=latents.device)
        if t.ndim == 0:
            t = t.expand(latents.shape[0])
        kwargs = {}
        if self.is_sdxl:
            kwargs["added_cond_kwargs"] = {"text_embeds": emb.pooled, "time_ids": self.time_ids(latents.shape[0])}
        return unet(latents, t, encoder_hidden_states=emb.embeds, return_dict=False, **kwargs)[0]

    def predict_noise(
        self,
        latents: torch.Tensor,
        t: torch.Tensor | int,
        cond: PromptEmbeddings,
        uncond: PromptEmbeddings | None,
        cfg_scale: float,
        unet=None,
    ) -> torch.Tensor:
        """ε prediction with classifier-free guidance as ONE UNet call on the [uncond; cond] batch.

        ``uncond=None`` or ``cfg_scale <= 1`` gives the plain conditional prediction (one UNet sample per
        latent instead of two).
        """
        unet = unet if unet is not None else self.unet
        if uncond is None or cfg_scale <= 1.0:
            return self.unet_call(unet, latents, t, cond)
        t = torch.as_tensor(t, device=latents.device)
        t2 = t.repeat(2) if t.ndim == 1 else t
        both = PromptEmbeddings.cat([uncond, cond])
        eps_uncond, eps_cond = self.unet_call(unet, torch.cat([latents, latents]), t2, both).chunk(2)
        return eps_uncond + cfg_scale * (eps_cond - eps_uncond)

    # -- VAE --------------------------------------------------------------------------------------
    def _vae_factors(self) -> tuple[float, float]:
        cfg = self.vae.config
        shift = getattr(cfg, "shift_factor", None) or 0.0
        return cfg.scaling_factor, shift

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> images in [-1, 1] (differentiable; wrap in no_grad when not needed)."""
        scale, shift = self._vae_factors()
        latents = latents / scale + shift
        images = self.vae.decode(latents.to(self.vae.dtype), return_dict=False)[0]
        return images.float().clamp(-1, 1)

    def latents_for_spm(self, latents: torch.Tensor) -> torch.Tensor:
        """The latents box-filtered (area interpolation) so that they decode at ``spm_decode_resolution`` on the
        shorter side; unchanged when that is unset or not smaller than the image."""
        size = spm_latent_size(latents.shape[-2], latents.shape[-1], self.vae_scale, self.spm_decode_resolution)
        return _box_filter(latents, size)

    def images_for_spm(self, images: torch.Tensor) -> torch.Tensor:
        """Clean images (e.g. ``spm.clean_fraction``'s, or the t = 0 validation images) at the size
        :meth:`decode_for_spm` renders latents of their size at, box-filtered: the SPM then sees every image at
        one resolution."""
        f = self.vae_scale
        h, w = spm_latent_size(images.shape[-2] // f, images.shape[-1] // f, f, self.spm_decode_resolution)
        return _box_filter(images, (h * f, w * f))

    def decode_for_spm(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> the images the SPM judges: the VAE's (:meth:`decode`), or the tiny decoder's when one is
        attached, at ``spm_decode_resolution`` when set (:meth:`latents_for_spm`). TAESD-style decoders take
        the UNet's scaled latents as they are (their scaling_factor is 1)."""
        latents = self.latents_for_spm(latents)
        if self.spm_decoder is None:
            return self.decode(latents)
        tiny = self.spm_decoder
        images = tiny.decode(latents.to(tiny.dtype) / tiny.config.scaling_factor, return_dict=False)[0]
        return images.float().clamp(-1, 1)

    def encode(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Images in [-1, 1] -> scaled latents (a sample of the VAE posterior, as in SD training)."""
        scale, shift = self._vae_factors()
        dist = self.vae.encode(images.to(self.vae.dtype)).latent_dist
        return ((dist.sample(generator) - shift) * scale).to(self.dtype)


def load_tiny_decoder(cfg, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """The ``spm.tiny_decoder`` AutoencoderTiny (hub id or local folder), frozen."""
    from diffusers import AutoencoderTiny

    ref = _model_ref(cfg.spm.tiny_decoder, cfg.paths.root)
    if ref.is_local and not ref.exists():
        raise ModelLoadError(
            f"spm.decoder=tiny needs the tiny decoder spm.tiny_decoder={cfg.spm.tiny_decoder}, which does not exist "
            f"({ref.path}). For the tiny preset `spo base` writes it; else point spm.tiny_decoder at TAESD."
        )
    name, kwargs = ref.pretrained_args()
    try:
        tiny = AutoencoderTiny.from_pretrained(name, dtype=dtype, **kwargs)
    except (OSError, ValueError) as exc:
        hint = _load_hint(ref).replace("model.pretrained", "spm.tiny_decoder")
        raise ModelLoadError(f"the tiny decoder (spm.tiny_decoder): {hint}\n  underlying error: {exc}") from exc
    return tiny.requires_grad_(False).eval().to(device)


def attach_spm_decoder(adapter: DiffusionAdapter, cfg) -> DiffusionAdapter:
    """The adapter renders the SPM's images as ``spm`` says: with the tiny decoder under ``spm.decoder=tiny``,
    at ``spm.decode_resolution`` when set."""
    adapter.spm_decode_resolution = cfg.spm.decode_resolution
    if cfg.spm.decoder == "tiny":
        adapter.spm_decoder = load_tiny_decoder(cfg, adapter.device, adapter.vae.dtype)
    return adapter


def load_adapter(cfg, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """Config -> (pipeline, adapter) for the configured base model."""
    pipe = load_pipeline(cfg.model, device=device, dtype=dtype, cfg=cfg)
    return pipe, DiffusionAdapter(pipe, cfg.model.resolution)
