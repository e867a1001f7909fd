"""Pieces of `spo train-spm`: same noise for both images, relabelling, accuracy counting, global loss weights."""

from __future__ import annotations

import pytest
import torch

from spo.losses import shard_loss, spm_loss
from spo.models.diffusion import DiffusionAdapter, load_pipeline
from spo.models.preference import TimeConditionedCLIP
from spo.spm_training import PairDenoiser, pair_correct, relabel

CAPTIONS = ["a red circle", "a blue square on a green background", "a small star"]


def _adapter(root, arch: str) -> DiffusionAdapter:
    from spo.config import ModelConfig

    folder = root / "models" / ("base" if arch == "sd15" else "base_sdxl")
    pipe = load_pipeline(ModelConfig(arch=arch, pretrained=str(folder), resolution=32, dtype="fp32"))
    return DiffusionAdapter(pipe, 32)


def _images(seed: int, n: int = len(CAPTIONS)) -> torch.Tensor:
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_both_images_get_the_same_noise(tiny_models_root, arch):
    denoiser = PairDenoiser(_adapter(tiny_models_root, arch), cfg_scale=5.0)
    images = _images(0)
    t = torch.tensor([10, 500, 990])

    # Identical images through the pair path give identical x̂0 images: the VAE-posterior noise and the
    # diffusion noise are shared. (With independent noise they would differ: see the seed check below.)
    x0_a, x0_b = denoiser(images, images.clone(), CAPTIONS, t, torch.Generator().manual_seed(1))
    assert x0_a.shape == images.shape and torch.isfinite(x0_a).all()
    torch.testing.assert_close(x0_a, x0_b, rtol=0, atol=0)

    # The noise does matter: another seed gives other x̂0 images...
    x0_c, _ = denoiser(images, images.clone(), CAPTIONS, t, torch.Generator().manual_seed(2))
    assert (x0_c - x0_a).abs().max() > 1e-3
    # ...and a different second image changes only the second output.
    x0_d, x0_e = denoiser(images, _images(5), CAPTIONS, t, torch.Generator().manual_seed(1))
    torch.testing.assert_close(x0_d, x0_a)
    assert (x0_e - x0_a).abs().max() > 1e-3

    # Work counted: 2 images x CFG (uncond + cond) UNet samples per pair, per call.
    assert denoiser.counts["unet_samples"] == 3 * 3 * 2 * 2
    assert denoiser.counts["vae_decode_images"] == 3 * 3 * 2


def test_relabel_follows_the_reference_scorer(tiny_models_root):
    from transformers import CLIPModel, CLIPProcessor

    from spo.models.preference import preprocess_images

    clip_dir = tiny_models_root / "models" / "base" / "clip"
    scorer = TimeConditionedCLIP.from_clip(str(clip_dir)).eval()
    img0, img1 = _images(0, 3), _images(1, 3)
    # Oracle: the plain CLIP's logits, softmax over the pair, by hand.
    clip, proc = CLIPModel.from_pretrained(clip_dir), CLIPProcessor.from_pretrained(clip_dir)
    tok = proc.tokenizer(CAPTIONS, padding=True, return_tensors="pt")
    with torch.no_grad():
        s = [
            clip(
                input_ids=tok.input_ids,
                attention_mask=tok.attention_mask,
                pixel_values=preprocess_images(x, proc),
            ).logits_per_image.diagonal()
            for x in (img0, img1)
        ]
    p0 = torch.softmax(torch.stack(s, -1), -1)[:, 0]
    gaps = (2 * p0 - 1).abs().sort().values
    gap = float(gaps[:2].mean())  # between two examples' gaps: one tie, the others decided
    expected = torch.where(2 * p0 - 1 > gap, 1.0, torch.where(1 - 2 * p0 > gap, 0.0, 0.5))
    label_0, label_1 = relabel(scorer, img0, img1, CAPTIONS, gap)
    torch.testing.assert_close(label_0, expected)
    torch.testing.assert_close(label_0 + label_1, torch.ones(3))
    assert (label_0 == 0.5).any() and (label_0 != 0.5).any()


def test_pair_correct_excludes_ties_and_counts_equal_scores_wrong():
    s0 = torch.tensor([2.0, 1.0, 3.0, 1.0, 5.0])
    s1 = torch.tensor([1.0, 2.0, 3.0, 4.0, 0.0])
    l0 = torch.tensor([1.0, 1.0, 1.0, 0.5, 0.0])
    correct, counted = pair_correct(s0, s1, l0, 1 - l0)
    assert counted.tolist() == [True, True, True, False, True]
    assert correct.tolist() == [True, False, False, False, False]


def test_sharded_loss_gradients_average_to_the_global_batch_loss():
    """Two simulated processes with unequal weight sums: DDP's gradient average equals the global loss's."""
    g = torch.Generator().manual_seed(0)
    s0, s1 = torch.randn(6, generator=g), torch.randn(6, generator=g)
    l0 = torch.tensor([1.0, 0.0, 0.5, 1.0, 1.0, 0.0])
    w = torch.tensor([1.0, 0.5, 0.25, 1.0, 1 / 3, 1 / 8])  # 1/num_example_per_prompt

    s0g, s1g = s0.clone().requires_grad_(True), s1.clone().requires_grad_(True)
    spm_loss(s0g, s1g, l0, 1 - l0, w).backward()

    shards = [slice(0, 2), slice(2, 6)]  # uneven, as with 1/num_examples weights
    mean_w = torch.stack([w[sh].sum() for sh in shards]).mean()
    grads0, grads1 = torch.zeros(6), torch.zeros(6)
    losses = []
    for sh in shards:
        a, b = s0[sh].clone().requires_grad_(True), s1[sh].clone().requires_grad_(True)
        loss = shard_loss(a, b, l0[sh], 1 - l0[sh], w[sh], mean_w)
        loss.backward()
        losses.append(loss.detach())
        grads0[sh], grads1[sh] = a.grad / len(shards), b.grad / len(shards)  # DDP averages over processes
    torch.testing.assert_close(grads0, s0g.grad)
    torch.testing.assert_close(grads1, s1g.grad)
    # The averaged shard losses are the global loss too (what gets logged).
    torch.testing.assert_close(torch.stack(losses).mean(), spm_loss(s0, s1, l0, 1 - l0, w))


def test_clean_fraction_shows_some_pairs_clean_at_t0(tiny_models_root):
    from spo.spm_training import NO_TIMER, training_images

    denoiser = PairDenoiser(_adapter(tiny_models_root, "sd15"), cfg_scale=5.0)
    img0, img1 = _images(0, 8), _images(1, 8)
    captions = ["a red circle"] * 8

    t = torch.full((8,), 700)
    x0, x1 = training_images(
        denoiser, img0, img1, captions, t, torch.Generator().manual_seed(0), 1.0, NO_TIMER
    )
    assert torch.equal(x0, img0) and torch.equal(x1, img1) and (t == 0).all()
    assert denoiser.counts["pairs"] == 0  # nothing rendered

    t = torch.full((8,), 700)
    x0, x1 = training_images(
        denoiser, img0, img1, captions, t, torch.Generator().manual_seed(3), 0.5, NO_TIMER
    )
    clean = t == 0
    assert 0 < clean.sum() < 8
    assert torch.equal(x0[clean], img0[clean]) and torch.equal(x1[clean], img1[clean])
    assert ((x0[~clean] - img0[~clean]).abs().amax(dim=(1, 2, 3)) > 1e-3).all()
    assert denoiser.counts["pairs"] == int((~clean).sum())


def test_with_a_decode_resolution_clean_and_rendered_training_images_share_its_size(tiny_models_root):
    """spm.decode_resolution=16 with clean_fraction: the clean pairs are the images averaged over 2x2 pixel
    blocks (oracle: avg_pool2d), the rendered ones 16-px decodes, so one batch holds one image size."""
    import torch.nn.functional as F

    from spo.spm_training import NO_TIMER, training_images

    adapter = _adapter(tiny_models_root, "sd15")
    adapter.spm_decode_resolution = 16
    denoiser = PairDenoiser(adapter, cfg_scale=5.0)
    img0, img1 = _images(0, 8), _images(1, 8)
    t = torch.full((8,), 700)
    x0, x1 = training_images(
        denoiser, img0, img1, ["a red circle"] * 8, t, torch.Generator().manual_seed(3), 0.5, NO_TIMER
    )
    clean = t == 0
    assert 0 < clean.sum() < 8 and x0.shape == x1.shape == (8, 3, 16, 16)
    torch.testing.assert_close(x0[clean], F.avg_pool2d(img0[clean], 2))
    torch.testing.assert_close(x1[clean], F.avg_pool2d(img1[clean], 2))
    assert ((x0[~clean] - F.avg_pool2d(img0[~clean], 2)).abs().amax(dim=(1, 2, 3)) > 1e-3).all()
