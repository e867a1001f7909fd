"""The tiny world: a Pick-a-Pic-format preference dataset of procedural images, with a known aesthetic.

Why: no model or dataset can be downloaded here, yet the pipeline must *learn* on a CPU. So the tiny world
is a dataset in the exact Pick-a-Pic schema (``spo.data.pickapic.PICKAPIC_SCHEMA``, HF parquet layout)
whose preferences follow a hidden score that we know -- and can therefore use to check that the SPM learns
it and that SPO raises it.

Captions
    ``"a {small|large} {colour} {shape} on a(n) {colour} background at the {position}"``; every word is in
    :data:`VOCABULARY` (the tiny tokenizer keeps each one as a single token).

Images (``image_size`` px JPEG)
    The two images of a pair render the same caption (same colours, shape, size class and anchor; the
    object is jittered by a pixel or two and by a few percent in size, like two seeds of one prompt) but
    in a different *style*. A pair draws a latent quality ``q0 ~ U(0,1)`` and ``q1 = (q0 + U(0.25,0.75))
    mod 1`` -- so the two are always clearly apart -- and each image derives its style from its q with
    independent jitter (``N(0, 0.2)``, clipped to [0, 1]):

    - vividness ``v ≈ q``: colours are pulled towards their luma, keeping a share ``0.1 + 0.9 v`` of chroma;
    - contrast ``c ≈ q``: pixels are pulled towards the mean luma, keeping a share ``0.35 + 0.65 c``;
    - grain ``g ≈ 1 - q``: luma noise of standard deviation ``0.08 g`` (same on all channels).

Hidden score (:func:`toy_aesthetic`), a pure function of pixels
    On RGB in [0, 1], area-downsampled to at most 32×32::

        chroma   C = mean over pixels of (max(R,G,B) - min(R,G,B))
        luma     Y = 0.299 R + 0.587 G + 0.114 B,   Ȳ = mean of Y over the 3×3 neighbourhood (edges replicated)
        contrast K = standard deviation over pixels of Ȳ     (smoothed, so grain does not count as contrast)
        grain    N = median over pixels of |Y - Ȳ|             (the median keeps object edges out)

        toy_aesthetic = 3.5 * C + 14 * K - 16 * N - 1.0

    Global, smooth properties (vivid colour, object/background contrast, clean flat areas) that a small
    ViT can read and a small LoRA can move. The constants put the tiny world's images at roughly mean 0
    and standard deviation 1 (``bench/RESULTS.md`` has the measured distribution and pair differences).

Labels
    The score is computed on the *stored* (JPEG-decoded) images, so the evaluation scorer and the labels
    agree exactly. ``P(image 0 preferred) = sigmoid((s0 - s1) / label_temperature)``; the drawn winner is
    then flipped with probability ``label_noise``. A share ``tie_fraction`` becomes ties (0.5/0.5,
    ``best_image_uid = ""``). A share ``unlabeled_fraction`` gets ``has_label = False``; like ties they
    carry 0.5/0.5 and an empty ``best_image_uid`` (so every row satisfies "labels in {0, 0.5, 1} summing
    to 1"). A share ``identical_fraction`` of pairs shows the same image twice (distinct uids, identical
    bytes, ``are_different = False``); their labels are coin flips, as a real user's would be.

Splits
    ``train`` / ``validation`` / ``test``: captions come in groups of 1 .. 2*pairs_per_caption - 1 pairs
    (mean ``pairs_per_caption``), rows shuffled so a caption's pairs spread over shards;
    ``num_example_per_prompt`` counts the rows with the same caption in the split.
    ``validation_unique`` / ``test_unique``: ``unique_rows`` pairs with distinct captions (one pair each).
    Each split has its own random stream (``seed`` + split index), so resizing one leaves the others as
    they were. Same config -> byte-identical files.
"""

from __future__ import annotations

import io
import math
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch

    from spo.config import SyntheticConfig

SPLITS = ("train", "validation", "test", "validation_unique", "test_unique")

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "orange": (245, 140, 30),
    "yellow": (240, 220, 40),
    "green": (50, 170, 70),
    "blue": (40, 90, 220),
    "purple": (140, 60, 190),
    "pink": (240, 130, 180),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
    "gray": (128, 128, 128),
    "brown": (130, 80, 40),
    "cyan": (40, 200, 220),
}
SHAPES = ("circle", "square", "triangle", "diamond", "ring", "cross", "star")
# Object radius as a share of the image side.
SIZES = {"small": 0.17, "large": 0.28}
# Anchor (x, y) of the object centre as shares of the image side.
POSITIONS: dict[str, tuple[float, float]] = {
    "top left": (0.3, 0.3),
    "top": (0.5, 0.3),
    "top right": (0.7, 0.3),
    "left": (0.3, 0.5),
    "center": (0.5, 0.5),
    "right": (0.7, 0.5),
    "bottom left": (0.3, 0.7),
    "bottom": (0.5, 0.7),
    "bottom right": (0.7, 0.7),
}
_TEMPLATE_WORDS = ("a", "an", "on", "background", "at", "the")

VOCABULARY: tuple[str, ...] = tuple(
    sorted(
        {*_TEMPLATE_WORDS, *SIZES, *COLORS, *SHAPES, *(w for p in POSITIONS for w in p.split())},
    )
)

GENERATORS = ("toy-renderer-v1", "toy-renderer-v2", "toy-renderer-xl", "toy-renderer-turbo")
IMAGE_URL = "https://images.pickapic.invalid/{uid}.jpg"  # real URLs are dead too; bytes live in jpg_*
_EPOCH = np.datetime64("2023-04-01T00:00:00", "ns")

# toy_aesthetic's constants (see the module docstring).
W_CHROMA, W_CONTRAST, W_GRAIN, OFFSET = 3.5, 14.0, 16.0, 1.0
SCORE_SIZE = 32


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


@dataclass(frozen=True)
class Scene:
    """What a caption says: the content both images of a pair share."""

    size: str
    color: str
    shape: str
    background: str
    position: str

    @property
    def caption(self) -> str:
        return f"a {self.size} {self.color} {self.shape} on {_article(self.background)} {self.background} background at the {self.position}"


@dataclass(frozen=True)
class Style:
    """What differs between the two images of a pair and drives the hidden score (all in [0, 1])."""

    vividness: float
    contrast: float
    grain: float

    @classmethod
    def from_quality(cls, q: float, rng: np.random.Generator) -> Style:
        j = rng.normal(0.0, 0.2, size=3)
        clip = lambda x: float(min(1.0, max(0.0, x)))  # noqa: E731
        return cls(vividness=clip(q + j[0]), contrast=clip(q + j[1]), grain=clip(1.0 - q + j[2]))


def random_scene(rng: np.random.Generator) -> Scene:
    colors = list(COLORS)
    fg = colors[rng.integers(len(colors))]
    bg = colors[rng.integers(len(colors) - 1)]
    if bg == fg:  # the background never equals the object colour
        bg = colors[-1]
    return Scene(
        size=list(SIZES)[rng.integers(len(SIZES))],
        color=fg,
        shape=SHAPES[rng.integers(len(SHAPES))],
        background=bg,
        position=list(POSITIONS)[rng.integers(len(POSITIONS))],
    )


# ----------------------------------------------------------------------------------------------- render


def _shape_polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if shape == "triangle":
        return [(cx, cy - r), (cx + r * 0.95, cy + r * 0.8), (cx - r * 0.95, cy + r * 0.8)]
    if shape == "diamond":
        return [(cx, cy - r), (cx + r * 0.8, cy), (cx, cy + r), (cx - r * 0.8, cy)]
    if shape == "star":
        pts = []
        for k in range(10):
            rad = r if k % 2 == 0 else r * 0.45
            ang = -math.pi / 2 + k * math.pi / 5
            pts.append((cx + rad * math.cos(ang), cy + rad * math.sin(ang)))
        return pts
    raise ValueError(shape)


def render_content(
    scene: Scene, size: int, jitter: tuple[float, float, float] = (0.0, 0.0, 0.0), supersample: int = 4
) -> np.ndarray:
    """The scene at full saturation and contrast, float RGB in [0, 1], (size, size, 3).

    ``jitter`` = (dx, dy, scale) shifts the object by dx, dy pixels and scales its radius by (1 + scale).
    Drawn at ``supersample``× and box-downsampled, so edges are antialiased like a real image's.
    """
    from PIL import Image, ImageDraw

    big = size * supersample
    img = Image.new("RGB", (big, big), COLORS[scene.background])
    draw = ImageDraw.Draw(img)
    ax, ay = POSITIONS[scene.position]
    cx = (ax * size + jitter[0]) * supersample
    cy = (ay * size + jitter[1]) * supersample
    r = SIZES[scene.size] * size * (1.0 + jitter[2]) * supersample
    color = COLORS[scene.color]
    if scene.shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=color)
    elif scene.shape == "square":
        s = r * 0.85
        draw.rectangle([cx - s, cy - s, cx + s, cy + s], fill=color)
    elif scene.shape == "ring":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=color, width=max(1, round(r * 0.38)))
    elif scene.shape == "cross":
        w = r * 0.33
        draw.rectangle([cx - r, cy - w, cx + r, cy + w], fill=color)
        draw.rectangle([cx - w, cy - r, cx + w, cy + r], fill=color)
    else:
        draw.polygon(_shape_polygon(scene.shape, cx, cy, r), fill=color)
    img = img.resize((size, size), Image.Resampling.BOX)
    return np.asarray(img, dtype=np.float64) / 255.0


def apply_style(content: np.ndarray, style: Style, rng: np.random.Generator) -> np.ndarray:
    """Vividness, contrast and grain applied to float RGB in [0, 1]; returns uint8 HWC."""
    luma = content @ np.array([0.299, 0.587, 0.114])
    x = luma[..., None] + (0.1 + 0.9 * style.vividness) * (content - luma[..., None])
    mean = float(luma.mean())
    x = mean + (0.35 + 0.65 * style.contrast) * (x - mean)
    # Luma-only grain: it leaves chroma (max - min per pixel) unchanged, so each term reads one style knob.
    x = x + (0.08 * style.grain) * rng.standard_normal(x.shape[:2])[..., None]
    return np.clip(np.rint(x * 255.0), 0, 255).astype(np.uint8)


def encode_jpeg(pixels: np.ndarray, quality: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def decode_jpeg_uint8(data: bytes) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(img.convert("RGB"))


# -------------------------------------------------------------------------------------- hidden score


def _as_unit_tensor(images: Any) -> tuple[torch.Tensor, bool]:
    """Any accepted image batch -> float (N, 3, H, W) in [0, 1]; flag = return a torch tensor."""
    import torch

    if isinstance(images, torch.Tensor):
        x = images.detach().float()
        if x.ndim == 3:
            x = x.unsqueeze(0)
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"toy_aesthetic expects (N, 3, H, W) in [-1, 1]; got shape {tuple(x.shape)}")
        return ((x + 1.0) / 2.0).clamp(0.0, 1.0), True
    try:
        from PIL import Image

        if isinstance(images, Image.Image):
            images = [images]
        if isinstance(images, Sequence) and images and isinstance(images[0], Image.Image):
            images = np.stack([np.asarray(im.convert("RGB")) for im in images])
    except ImportError:  # pragma: no cover - pillow is a dependency
        pass
    arr = np.asarray(images)
    if arr.ndim == 3:
        arr = arr[None]
    if arr.ndim != 4 or arr.shape[-1] != 3:
        raise ValueError(f"toy_aesthetic expects uint8 (N, H, W, 3), PIL images or a tensor; got {arr.shape}")
    scale = 255.0 if arr.dtype == np.uint8 else 1.0
    x = torch.from_numpy(arr.astype(np.float32) / scale).permute(0, 3, 1, 2)
    return x.clamp(0.0, 1.0), False


def aesthetic_terms(images: Any) -> dict[str, torch.Tensor]:
    """The three terms of :func:`toy_aesthetic` (chroma, contrast, grain), one value per image."""
    return _terms(_as_unit_tensor(images)[0])


def _terms(x: torch.Tensor) -> dict[str, torch.Tensor]:
    import torch.nn.functional as F

    if x.shape[-1] > SCORE_SIZE or x.shape[-2] > SCORE_SIZE:
        x = F.adaptive_avg_pool2d(x, (min(SCORE_SIZE, x.shape[-2]), min(SCORE_SIZE, x.shape[-1])))
    chroma = (x.amax(dim=1) - x.amin(dim=1)).flatten(1).mean(dim=1)
    luma = (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1)
    local_mean = F.avg_pool2d(F.pad(luma, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    # Contrast of the 3x3-smoothed luma: pixel noise (std / 3 after smoothing) must not pass for contrast.
    contrast = local_mean.flatten(1).std(dim=1, unbiased=False)
    grain = (luma - local_mean).abs().flatten(1).median(dim=1).values
    return {"chroma": chroma, "contrast": contrast, "grain": grain}


def toy_aesthetic(images: Any) -> torch.Tensor | np.ndarray:
    """The tiny world's hidden aesthetic score, one value per image (formula in the module docstring).

    ``images``: a float tensor (N, 3, H, W) in [-1, 1] (what the diffusion models produce) -> a tensor;
    or uint8 (N, H, W, 3) / (H, W, 3) numpy, or PIL image(s) -> a float64 numpy array.
    """
    x, as_torch = _as_unit_tensor(images)
    t = _terms(x)
    score = W_CHROMA * t["chroma"] + W_CONTRAST * t["contrast"] - W_GRAIN * t["grain"] - OFFSET
    return score if as_torch else score.double().numpy()


def pair_probability(s0: np.ndarray, s1: np.ndarray, temperature: float) -> np.ndarray:
    """P(image 0 preferred) under the hidden score."""
    return 1.0 / (1.0 + np.exp(-(np.asarray(s0) - np.asarray(s1)) / temperature))


# ------------------------------------------------------------------------------------------ generate


def _uid(rng: np.random.Generator) -> str:
    return str(uuid.UUID(bytes=rng.bytes(16), version=4))


def _caption_groups(rng: np.random.Generator, n_rows: int, pairs_per_caption: int) -> list[Scene]:
    """One scene per row: groups of 1 .. 2*ppc-1 rows share a caption (mean ppc)."""
    scenes: list[Scene] = []
    while len(scenes) < n_rows:
        scene = random_scene(rng)
        k = int(rng.integers(1, 2 * pairs_per_caption))
        scenes.extend([scene] * min(k, n_rows - len(scenes)))
    return scenes


def _unique_scenes(rng: np.random.Generator, n_rows: int) -> list[Scene]:
    possible = len(SIZES) * len(COLORS) * len(SHAPES) * (len(COLORS) - 1) * len(POSITIONS)
    if n_rows > possible:
        from spo.errors import SPOError

        raise SPOError(
            f"synthetic.unique_rows={n_rows} exceeds the tiny world's {possible} distinct captions; lower it"
        )
    seen: dict[str, Scene] = {}
    while len(seen) < n_rows:
        scene = random_scene(rng)
        seen.setdefault(scene.caption, scene)
    return list(seen.values())


def _render_pair(scene: Scene, identical: bool, cfg: SyntheticConfig, rng: np.random.Generator):
    q0 = float(rng.random())
    q1 = (q0 + float(rng.uniform(0.25, 0.75))) % 1.0
    out = []
    for q in (q0, q1):
        jitter = (
            float(rng.uniform(-1.5, 1.5)),
            float(rng.uniform(-1.5, 1.5)),
            float(rng.uniform(-0.08, 0.08)),
        )
        content = render_content(scene, cfg.image_size, jitter)
        out.append(encode_jpeg(apply_style(content, Style.from_quality(q, rng), rng), cfg.jpeg_quality))
        if identical:
            return out[0], out[0]
    return out[0], out[1]


def generate_split(split: str, n_rows: int, cfg: SyntheticConfig, split_index: int):
    """One split as a pyarrow Table in the Pick-a-Pic schema (rows already shuffled)."""
    import pyarrow as pa

    from spo.data.pickapic import PICKAPIC_SCHEMA
    from spo.progress import tqdm

    rng = np.random.default_rng([cfg.seed, split_index])
    unique = split.endswith("_unique")
    scenes = _unique_scenes(rng, n_rows) if unique else _caption_groups(rng, n_rows, cfg.pairs_per_caption)
    identical = rng.random(n_rows) < cfg.identical_fraction
    jpg_0, jpg_1 = [], []
    for scene, same in tqdm(
        list(zip(scenes, identical, strict=True)),
        desc=f"synth/{split}",
        leave=False,
        mininterval=1.0,
        disable=None if n_rows >= 2000 else True,
    ):
        a, b = _render_pair(scene, bool(same), cfg, rng)
        jpg_0.append(a)
        jpg_1.append(b)

    s0 = toy_aesthetic(np.stack([decode_jpeg_uint8(b) for b in jpg_0]))
    s1 = toy_aesthetic(np.stack([decode_jpeg_uint8(b) for b in jpg_1]))
    p0 = pair_probability(s0, s1, cfg.label_temperature)
    zero_wins = (rng.random(n_rows) < p0) ^ (rng.random(n_rows) < cfg.label_noise)
    kind = rng.random(n_rows)  # [0, tie) tie, [tie, tie + unlabeled) unlabeled, rest decided
    tie = kind < cfg.tie_fraction
    unlabeled = (kind >= cfg.tie_fraction) & (kind < cfg.tie_fraction + cfg.unlabeled_fraction)
    undecided = tie | unlabeled
    label_0 = np.where(undecided, 0.5, zero_wins.astype(np.float64))
    label_1 = 1.0 - label_0

    uid_0 = [_uid(rng) for _ in range(n_rows)]
    uid_1 = [_uid(rng) for _ in range(n_rows)]
    best = [
        ("" if u else (a if z else b)) for u, z, a, b in zip(undecided, zero_wins, uid_0, uid_1, strict=True)
    ]
    captions = [s.caption for s in scenes]
    counts: dict[str, int] = {}
    for c in captions:
        counts[c] = counts.get(c, 0) + 1
    created = _EPOCH + np.sort(rng.integers(0, 90 * 86_400 * 10**9, n_rows)).astype("timedelta64[ns]")
    gen_idx = rng.integers(len(GENERATORS), size=(n_rows, 2))

    columns = {
        "are_different": ~identical,
        "best_image_uid": best,
        "caption": captions,
        "created_at": created,
        "has_label": ~unlabeled,
        "image_0_uid": uid_0,
        "image_0_url": [IMAGE_URL.format(uid=u) for u in uid_0],
        "image_1_uid": uid_1,
        "image_1_url": [IMAGE_URL.format(uid=u) for u in uid_1],
        "jpg_0": jpg_0,
        "jpg_1": jpg_1,
        "label_0": label_0,
        "label_1": label_1,
        "model_0": [GENERATORS[i] for i in gen_idx[:, 0]],
        "model_1": [GENERATORS[i] for i in gen_idx[:, 1]],
        "ranking_id": split_index * 10_000_000 + np.arange(n_rows, dtype=np.int64),
        "user_id": rng.integers(1, 1 + max(10, n_rows // 8), n_rows, dtype=np.int64),
        "num_example_per_prompt": np.array([counts[c] for c in captions], dtype=np.int64),
        "__index_level_0__": np.arange(n_rows, dtype=np.int64),
    }
    table = pa.table(
        {
            name: pa.array(columns[name], type=PICKAPIC_SCHEMA.field(name).type)
            for name in PICKAPIC_SCHEMA.names
        }
    )
    table = table.cast(PICKAPIC_SCHEMA)
    # Real exports are not grouped by caption: shuffle so a caption's pairs spread over shards.
    order = rng.permutation(n_rows)
    stats = {
        "rows": n_rows,
        "captions": len(counts),
        "ties": int(tie.sum()),
        "unlabeled": int(unlabeled.sum()),
        "identical": int(identical.sum()),
        "score_mean": float(np.mean(np.concatenate([s0, s1]))),
        "score_std": float(np.std(np.concatenate([s0, s1]))),
        "abs_score_diff_median": float(np.median(np.abs(s0 - s1))),
    }
    return table.take(pa.array(order)), stats


def shard_name(split: str, index: int, count: int) -> str:
    return f"{split}-{index:05d}-of-{count:05d}.parquet"


def split_rows(cfg: SyntheticConfig) -> dict[str, int]:
    return {
        "train": cfg.train_rows,
        "validation": cfg.validation_rows,
        "test": cfg.test_rows,
        "validation_unique": cfg.unique_rows,
        "test_unique": cfg.unique_rows,
    }


def generate_dataset(out_dir: Path, cfg: SyntheticConfig) -> dict:
    """Write the tiny world under ``out_dir/data/<split>-<i>-of-<n>.parquet``; returns a summary.

    Deterministic: the same config gives byte-identical files.
    """
    import pyarrow.parquet as pq

    out_dir = Path(out_dir)
    data_dir = out_dir / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = {"splits": {}, "files": []}
    for index, (split, n_rows) in enumerate(split_rows(cfg).items()):
        table, stats = generate_split(split, n_rows, cfg, index)
        n_shards = cfg.train_shards if split == "train" else 1
        n_shards = max(1, min(n_shards, n_rows))
        bounds = np.linspace(0, n_rows, n_shards + 1).round().astype(int)
        for i in range(n_shards):
            name = shard_name(split, i, n_shards)
            # Small row groups, as in HF image datasets: readers can fetch a few rows' images cheaply.
            pq.write_table(
                table.slice(bounds[i], bounds[i + 1] - bounds[i]), data_dir / name, row_group_size=256
            )
            summary["files"].append(f"data/{name}")
        summary["splits"][split] = {**stats, "shards": n_shards}
    return summary
