"""bench/bench_decode_resolution.py on the tiny project: the three renderings are what they claim to be (checked
against avg_pool2d and against each other), and every SPM scores each of them. No timings."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from spo_test_helpers import load_bench


def test_renderings_and_scores(tiny_project):
    from spo.models.preference import TimeConditionedCLIP, save_spm
    from spo.spm_training import PairDenoiser, base_model

    bench, root = load_bench("bench_decode_resolution"), tiny_project.paths.root
    adapter = base_model(tiny_project, "cpu")
    denoiser = PairDenoiser(adapter, tiny_project.spm.cfg_scale)
    g = torch.Generator().manual_seed(0)
    img0, img1 = (torch.rand(2, 3, 32, 32, generator=g) * 2 - 1 for _ in range(2))
    state = torch.Generator().manual_seed(1).get_state()
    clean = bench.render(adapter, denoiser, img0, img1, ["a", "b"], 0, state, 16)
    torch.testing.assert_close(clean["pixel"][0], F.avg_pool2d(img0, 2))
    assert torch.equal(clean["latent"][1], clean["pixel"][1]) and clean["full"][0] is img0
    noisy = bench.render(adapter, denoiser, img0, img1, ["a", "b"], 501, state, 16)
    torch.testing.assert_close(noisy["pixel"][1], F.avg_pool2d(noisy["full"][1], 2))
    assert noisy["latent"][0].shape == (2, 3, 16, 16) and not torch.allclose(noisy["latent"][0], noisy["pixel"][0])
    assert adapter.spm_decode_resolution is None  # render leaves the adapter as it found it

    save_spm(TimeConditionedCLIP.from_clip(str(root / "models" / "base" / "clip")), root / "spm_plain")
    res = bench.measure(root, 16, {"plain": "spm_plain"}, max_batches=1)
    acc = res["accuracy"]["plain"]
    assert res["decisive_pairs"] > 0 and set(acc) == {"full", "pixel", "latent"}
    assert acc["pixel"]["0"] == acc["latent"]["0"]  # t = 0: the same box-filtered clean images
    assert all(0 <= a <= 1 for by_t in acc.values() for a in by_t.values())
    assert set(res["psnr_latent_vs_pixel_db"]) == {str(t) for t in res["timesteps"] if t}
    assert all(math.isfinite(v) for v in res["psnr_latent_vs_pixel_db"].values())
    assert "| plain | latent |" in bench.table(res)
