"""bench/bench_spo.py --whole-iteration at tiny size: it runs, and each variant does the work its algorithm
prescribes (counts worked out by hand from the samplers and trainers, not read off the code). No timings."""

from __future__ import annotations

from spo_test_helpers import load_bench


def test_whole_iteration_counts_the_work_of_each_algorithm():
    # 1 prompt, the tiny preset's 10 DDIM steps (nominal t = 900 ... 0), divert 2, k = 4, CFG at sampling
    # and training, threshold 0 (every comparison kept).
    overrides = ["spo.num_prompts=1", "spo.sample_batch_size=1", "spo.train_batch_size=4"]
    bench = load_bench("bench_spo")
    res = bench.whole_iteration("tiny", repeats=1, overrides=overrides, warmup=0, plan=False, decode_resolution=16)
    c = res["counts"]
    assert set(c) == {"official", "ours_vae", "ours_tiny", "ours_vae_16", "ours_tiny_16"}
    # Comparisons at steps 2..9 (t <= kappa = 750): 8 per prompt, one kept pair each.
    assert {v["pairs"] for v in c.values()} == {8}
    # UNet rows while sampling: steps 0, 1 and the first branch's x_t, 2 rows each (CFG), then at steps 3..9
    # the k candidates judged and continued, 2k rows each: 3 * 2 + 7 * 8 = 62, in every variant.
    assert {v["sampling.unet_rows_nograd"] for v in c.values()} == {62}
    # 8 comparisons x 4 candidates: 32 decodes and 32 SPM image forwards.
    assert {v["sampling.spm_image_forwards"] for v in c.values()} == {32}
    assert c["ours_vae"]["sampling.vae_decodes"] == c["official"]["sampling.vae_decodes"] == 32
    assert c["ours_tiny"]["sampling.tiny_decodes"] == 32 and "sampling.vae_decodes" not in c["ours_tiny"]
    # The SPM's text tower: once per prompt in ours, for every candidate in the official sampler.
    assert c["ours_vae"]["sampling.spm_text_forwards"] == 1 and c["official"]["sampling.spm_text_forwards"] == 32
    # Training, 8 pairs: ours 1 policy (grad) + 1 reference (no grad) CFG call per pair; official 2 + 2.
    for name in ("ours_vae", "ours_tiny"):
        assert (c[name]["training.unet_rows_grad"], c[name]["training.unet_rows_nograd"]) == (16, 16)
    assert (c["official"]["training.unet_rows_grad"], c["official"]["training.unet_rows_nograd"]) == (32, 32)
    # spm.decode_resolution=16 (32 px, VAE factor 4): the same decodes, each from 4x4 latents instead of 8x8.
    assert c["ours_vae_16"]["sampling.vae_decodes"] == 32 and c["ours_tiny_16"]["sampling.tiny_decodes"] == 32
    assert c["ours_vae"]["sampling.vae_decodes_latent_px"] == c["official"]["sampling.vae_decodes_latent_px"] == 32 * 8 * 8
    assert c["ours_vae_16"]["sampling.vae_decodes_latent_px"] == c["ours_tiny_16"]["sampling.tiny_decodes_latent_px"] == 32 * 4 * 4
    for name in ("ours_vae_16", "ours_tiny_16"):
        assert {k: v for k, v in c[name].items() if "decodes" not in k} == {
            k: v for k, v in c["ours_vae"].items() if "decodes" not in k}
    assert set(res["ratio_to_official"]) == {"ours_vae", "ours_tiny", "ours_vae_16", "ours_tiny_16"}
    assert all(t > 0 for v in res["median_s"].values() for t in v.values())

