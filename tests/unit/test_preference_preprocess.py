"""preprocess_images against the CLIPImageProcessor's own PIL path (the independent oracle)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import CLIPImageProcessor

from spo.models.preference import preprocess_images

# The processor rounds to uint8 after each of PIL's two separable passes (±0.5/255 each) and PIL resamples in
# fixed point; after normalisation by std ≈ 0.27 one grey level is ≈ 0.015. So the tensor path may differ by
# about one grey level per pixel (measured: ≤ 1.07 levels, mean ≈ 0.27), and on average by much less.
MAX_ABS = 1.5 / 255 / 0.26
MEAN_ABS = 0.5 / 255 / 0.26


def _smooth_image(h: int, w: int, seed: int) -> np.ndarray:
    """A uint8 RGB image with edges and gradients (flat images would hide resampling errors).

    Values stay in [32, 223]: bicubic overshoots at sharp edges, and PIL clamps to uint8 *between* its
    horizontal and vertical passes while a one-shot tensor resize clamps only at the end. Near saturated
    edges that alone makes up to ~8 grey levels of difference at single pixels, a property of PIL, not of
    the code under test; keeping clear of 0/255 isolates what this test checks.
    """
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    chans = []
    for _ in range(3):
        a, b, c = rng.uniform(2, 9, size=3)
        chans.append(127.5 + 90 * np.sin(a * xx + b * yy + c))
    img = np.stack(chans, -1)
    y0, x0 = rng.integers(0, h // 2), rng.integers(0, w // 2)
    img[y0 : y0 + h // 3, x0 : x0 + w // 3] = rng.uniform(32, 223, size=3)  # a sharp-edged block
    img = np.clip(img, 32, 223)
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


def _as_tensor(arr: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(arr).permute(2, 0, 1).float() / 127.5 - 1.0


@pytest.mark.parametrize(
    ("shortest_edge", "hw"),
    [
        (32, [(32, 32), (32, 32)]),  # no resize: must be exact up to float rounding
        (32, [(64, 48), (64, 48)]),  # downscale, portrait: crop of the long side
        (32, [(40, 96), (40, 96)]),  # downscale, landscape
        (48, [(24, 36), (24, 36)]),  # upscale
        (224, [(300, 260)]),  # real CLIP sizes
    ],
)
def test_matches_processor_pil_path(shortest_edge, hw):
    proc = CLIPImageProcessor(
        size={"shortest_edge": shortest_edge}, crop_size={"height": shortest_edge, "width": shortest_edge}
    )
    arrays = [_smooth_image(h, w, seed) for seed, (h, w) in enumerate(hw)]
    expected = proc(images=[Image.fromarray(a) for a in arrays], return_tensors="pt")["pixel_values"]
    got = preprocess_images(torch.stack([_as_tensor(a) for a in arrays]), proc)
    assert got.shape == expected.shape
    diff = (got - expected).abs()
    if hw[0] == (shortest_edge, shortest_edge):
        assert diff.max() < 1e-5
    else:
        assert diff.max() < MAX_ABS, diff.max()
        assert diff.mean() < MEAN_ABS, diff.mean()


def test_differentiable_batched_and_accepts_clip_processor():
    from transformers import CLIPProcessor

    from spo.models.tiny import build_tiny_tokenizer

    image_proc = CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})
    proc = CLIPProcessor(image_processor=image_proc, tokenizer=build_tiny_tokenizer())
    images = (torch.rand(3, 3, 40, 24) * 2 - 1).requires_grad_(True)
    out = preprocess_images(images, proc)
    assert out.shape == (3, 3, 16, 16)
    out.square().sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0
    # Each image is processed independently of the others in the batch.
    single = preprocess_images(images[1:2].detach(), image_proc)
    torch.testing.assert_close(out[1:2].detach(), single)


def test_rejects_wrong_shape():
    proc = CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})
    with pytest.raises(ValueError, match="N, 3, H, W"):
        preprocess_images(torch.zeros(3, 16, 16), proc)
