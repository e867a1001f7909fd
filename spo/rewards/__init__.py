"""Evaluation scorers behind one interface.

Every scorer maps a batch of images and their prompts to one number per image::

    scorer = get_scorer("pickscore", cfg, device)
    scores = scorer.score(images, prompts)   # images: float (N, 3, H, W) in [-1, 1]  ->  Tensor (N,)

Higher is better for every scorer. Each one loads real weights from a hub id or a local path named in
``cfg.eval`` (the tiny preset points the CLIP-family scorers at the tiny CLIP in models/base/clip), so the
same code scores the tiny world and a real SD-1.5/SDXL run.

==============  ==========================================================  =======================
name            what                                                        weights (cfg.eval key)
==============  ==========================================================  =======================
toy_aesthetic   the tiny world's hidden ground-truth aesthetic              none (closed form)
spm             the step-aware preference model at t=0                      models/spm
clip            CLIP score = 100 * cos(image, text)                         clip_model
pickscore       PickScore = logit_scale.exp() * cos(image, text)            pickscore_model/_processor
aesthetic       LAION aesthetic MLP on L2-normalised CLIP image embeddings  aesthetic_clip_model,
                                                                            aesthetic_weights
hpsv21          HPSv2.1 = 100 * cos(image, text), open_clip ViT-H-14        hps_model, hps_weights
                (extra ``spo[metrics]``)
imagereward     ImageReward: BLIP text-image encoder + MLP, on transformers      imagereward_model,
                                                                            imagereward_tokenizer
==============  ==========================================================  =======================

The scorer names are config-owned (:data:`spo.config.SCORER_NAMES`, validated there); this module maps each to
its loader and imports no torch at import time.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from spo.config import SCORER_NAMES
from spo.errors import SPOError

if TYPE_CHECKING:
    import torch

# name -> "module:factory"; factories take (cfg, device) and return a Scorer. Modules load lazily so that
# a scorer's heavy or optional dependencies are imported only when it is asked for.
_FACTORIES: dict[str, str] = {
    "toy_aesthetic": "spo.rewards.toy:load",
    "spm": "spo.rewards.spm:load",
    "clip": "spo.rewards.clip:load",
    "pickscore": "spo.rewards.pickscore:load",
    "aesthetic": "spo.rewards.aesthetic:load",
    "hpsv21": "spo.rewards.hps:load",
    "imagereward": "spo.rewards.imagereward:load",
}
assert tuple(_FACTORIES) == SCORER_NAMES, "spo.config.SCORER_NAMES and the scorer factories disagree"


# cfg.eval keys that name models or weights files.
MODEL_REF_KEYS = (
    "pickscore_model",
    "pickscore_processor",
    "clip_model",
    "aesthetic_clip_model",
    "aesthetic_weights",
    "hps_weights",
    "imagereward_model",
    "imagereward_tokenizer",
)


def resolve_local_refs(cfg):
    """``cfg`` with its model references resolved by :meth:`spo.config.Config.resolve_ref` (the tiny preset's
    relative ``models/base`` and ``models/base/clip`` are taken under ``paths.root``; hub ids stay as they are)."""
    model = cfg.model.model_copy(update={"pretrained": cfg.resolve_ref(cfg.model.pretrained)})
    refs = {k: cfg.resolve_ref(getattr(cfg.eval, k)) for k in MODEL_REF_KEYS}
    return cfg.model_copy(update={"model": model, "eval": cfg.eval.model_copy(update=refs)})


class Scorer(ABC):
    """One number per (image, prompt); higher is better."""

    name: str = "scorer"

    @abstractmethod
    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """``images``: float (N, 3, H, W) in [-1, 1]; ``prompts``: N strings. Returns a float32 CPU (N,)."""

    def __call__(self, images, prompts: Sequence[str]) -> torch.Tensor:
        return self.score(to_tensor_images(images), prompts)

    def score_batched(self, images, prompts: Sequence[str], batch_size: int = 32) -> torch.Tensor:
        """Score in chunks (``images`` may be a list of PIL images, loaded chunk by chunk)."""
        import torch

        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        out = [
            self(images[i : i + batch_size], list(prompts[i : i + batch_size]))
            for i in range(0, len(prompts), batch_size)
        ]
        return torch.cat(out) if out else torch.zeros(0)


def to_tensor_images(images: Any) -> torch.Tensor:
    """PIL images, uint8 arrays/tensors (N,H,W,3) or (N,3,H,W), or float tensors -> float (N,3,H,W) in [-1, 1].

    Float tensors are taken to be in [-1, 1] already (the convention of DiffusionAdapter.decode).
    """
    import numpy as np
    import torch

    if isinstance(images, torch.Tensor) and images.is_floating_point():
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected float images of shape (N, 3, H, W), got {tuple(images.shape)}")
        return images
    if isinstance(images, (list, tuple)):
        if not images:
            raise ValueError("no images to score")
        if hasattr(images[0], "convert"):  # PIL
            images = np.stack([np.asarray(im.convert("RGB")) for im in images])
        else:
            images = np.stack([np.asarray(im) for im in images])
    if hasattr(images, "convert"):  # a single PIL image
        images = np.array(images.convert("RGB"))[None]  # a writable copy (torch warns on read-only arrays)
    t = torch.as_tensor(np.asarray(images))
    if t.dtype != torch.uint8:
        raise ValueError(f"integer images must be uint8, got {t.dtype}")
    if t.ndim == 3:
        t = t[None]
    if t.shape[-1] == 3 and t.shape[1] != 3:
        t = t.permute(0, 3, 1, 2)
    return t.float().div(127.5).sub(1.0).contiguous()


def to_pil_images(images: torch.Tensor) -> list:
    """Float (N,3,H,W) in [-1, 1] -> PIL images (rounded like diffusers' numpy_to_pil)."""
    from PIL import Image

    arr = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to("cpu").byte()
    return [Image.fromarray(a.permute(1, 2, 0).numpy()) for a in arr]


def get_scorer(name: str, cfg, device: Any = "cpu") -> Scorer:
    """Build the scorer ``name`` from ``cfg.eval`` on ``device``.

    Raises :class:`spo.errors.MissingExtraError` when an optional package is missing and
    :class:`spo.errors.ModelLoadError` when weights cannot be found, each naming the fix.
    """
    if name not in _FACTORIES:
        raise SPOError(f"unknown scorer {name!r}; choose from {', '.join(SCORER_NAMES)}")
    module, factory = _FACTORIES[name].split(":")
    scorer = getattr(importlib.import_module(module), factory)(resolve_local_refs(cfg), device)
    scorer.name = name
    return scorer


def check_scorer(name: str, cfg) -> None:
    """Cheap availability check (optional packages, local model folders), run before hours of generation.

    Raises what :func:`get_scorer` would for a missing extra or a missing local model; hub downloads are
    only tried when the scorer loads (after generation, whose images are cached, so nothing is lost).
    """
    if name not in _FACTORIES:
        raise SPOError(f"unknown scorer {name!r}; choose from {', '.join(SCORER_NAMES)}")
    module = importlib.import_module(_FACTORIES[name].split(":")[0])
    preflight = getattr(module, "preflight", None)
    if preflight is not None:
        preflight(resolve_local_refs(cfg))


def require_module(module: str, what: str, extra: str):
    """Import an optional dependency, or raise MissingExtraError naming the pip extra."""
    from spo.errors import MissingExtraError

    try:
        return importlib.import_module(module)
    except RuntimeError as exc:
        # torchvision built for another torch (e.g. PyPI's CUDA wheel beside a CPU torch) fails at import
        # with "operator torchvision::nms does not exist".
        if "torchvision" not in str(exc):
            raise
        raise MissingExtraError(what, extra, f"{module} (needs torchvision)", f"whose torchvision does not match torch ({exc})") from exc
    except ImportError as exc:
        if exc.name and exc.name.split(".")[0] != module.split(".")[0]:
            # The package is there but one of *its* dependencies is not (e.g. open_clip without torchvision).
            raise MissingExtraError(what, extra, f"{module} (needs {exc.name})") from exc
        raise MissingExtraError(what, extra, module) from exc
