"""``spo plan``: call counts against hand-derived formulas and against the real sampler, per-call FLOPs against
a direct measurement, and the CLI's JSON."""

from __future__ import annotations

import json

import pytest
import torch

from spo import cli
from spo.config import load_config
from spo.plan import sampling_counts, spm_pair_counts, spo_pair_counts


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # per-call FLOPs are recounted, not read


def _cfg(preset, *overrides):
    return load_config(preset, list(overrides), params_file=None)


# -- (1) counts against formulas derived by hand ------------------------------------------------------------
def _spo_formula(n, divert, k, cfg_rows=2):
    """SD-1.5 rule (j = 1, branch at the last step, every step from ``divert`` on has t <= kappa): ``divert``
    plain steps of one CFG call each; B = n - divert branching steps; the first branch needs its own call on
    x_t, every later one reuses the judging call of the previous branch (k candidates x 1 CFG call at the next
    timestep); the last branch is judged on x0 at t = 0 without a call. Each branch decodes and scores k."""
    branches = n - divert
    return {"unet_rows": cfg_rows * divert + cfg_rows + cfg_rows * k * (branches - 1),
            "vae_decodes": k * branches, "spm_forwards": k * branches, "comparisons": branches}


def test_counts_sd15_paper_settings():
    # 20 steps, divert 4 (t = 751 is the first with nominal t <= 750), k = 4, CFG 5:
    # 4·2 + 2 + 2·4·15 = 130 UNet rows, 16 branches × 4 = 64 decodes and 64 SPM forwards (issue #12).
    c = sampling_counts(_cfg("sd15"))
    assert _spo_formula(20, 4, 4) == {"unet_rows": 130, "vae_decodes": 64, "spm_forwards": 64, "comparisons": 16}
    assert (c.unet_rows, c.vae_decodes, c.spm_forwards, c.comparisons) == (130, 64, 64, 16)
    assert (c.shared_pairs, c.unshared_pairs) == (16, 0)
    assert spo_pair_counts(_cfg("sd15"), official=False)["shared"] == (2, 2)
    assert spo_pair_counts(_cfg("sd15"), official=True)["shared"] == (4, 4)
    # SPM training per pair: 2 encodes, one CFG call on 2 latents (4 rows), 2 decodes, 2 SPM images.
    assert spm_pair_counts(_cfg("sd15"))["unet_rows"] == 4 and spm_pair_counts(_cfg("sd15"))["vae_decodes"] == 2


def test_counts_sdxl_paper_settings():
    # MSPO, k = 2, j = 4, no branch at the last step: 4 plain steps (8 rows) + the first branch's own call (2);
    # 4 comparisons of 4 transitions each: 3 inner steps × 2 candidates × 2 rows = 12 rows, plus a judging call
    # (4 rows) for the first 3 (the 4th is judged on x0 at t = 0): 8 + 2 + 4·12 + 3·4 = 70 rows; 4 × 2 decodes.
    c = sampling_counts(_cfg("sdxl"))
    assert (c.unet_rows, c.vae_decodes, c.spm_forwards, c.comparisons) == (70, 8, 8, 4)
    assert (c.shared_pairs, c.unshared_pairs) == (4, 12)  # 1 pair in 4 shares x_t
    ours, official = (spo_pair_counts(_cfg("sdxl"), official=o) for o in (False, True))
    assert ours == {"shared": (2, 2), "unshared": (4, 4)} and official["unshared"] == (4, 4)
    mean = (4 * sum(ours["shared"]) + 12 * sum(ours["unshared"])) / 16
    assert mean == 7.0  # 3.5 policy + 3.5 reference rows per pair (issue #12), official 4 + 4


def test_counts_tiny_preset():
    # 10 steps (t = 901, 801, 701, ...): divert 2, t = 701 already <= kappa: 8 branches of k = 4.
    c = sampling_counts(_cfg("tiny"))
    want = _spo_formula(10, 2, 4)
    assert (c.unet_rows, c.vae_decodes, c.spm_forwards, c.comparisons) == tuple(want.values()) == (62, 32, 32, 8)


# -- (2) oracle: the real sampler on the tiny models ---------------------------------------------------------
class _CountingScorer:
    """Candidate 0 of every pool scores far above the rest, so every comparison is kept."""

    def __init__(self, k: int):
        self.k, self.images = k, 0

    def encode_text(self, prompts):
        return torch.zeros(len(prompts), 1)

    def score_with_text(self, images, text_embeds, timesteps):
        self.images += images.shape[0]
        return torch.tensor([10.0] + [0.0] * (self.k - 1)).repeat(images.shape[0] // self.k or 1)[: images.shape[0]]


@pytest.mark.parametrize(
    "arch,k,inner", [("sd15", 2, 1), ("sd15", 4, 1), ("sdxl", 2, 3), ("sdxl", 4, 1), ("sdxl", 2, 1)]
)
def test_sampling_counts_match_the_real_sampler(tiny_models_root, arch, k, inner):
    from spo.models.diffusion import DiffusionAdapter, load_pipeline
    from spo.sampling import CandidateSampler

    folder = "base" if arch == "sd15" else "base_sdxl"
    cfg = _cfg("tiny", f"model.arch={arch}", f"model.pretrained={tiny_models_root / 'models' / folder}",
               "spo.num_steps=8", "spo.divert_start_step=2", f"spo.num_candidates={k}",
               f"spo.num_inner_steps={inner}")
    adapter = DiffusionAdapter(load_pipeline(cfg.model), cfg.model.resolution)
    rows, decodes = [], []
    handle = adapter.unet.register_forward_hook(lambda m, args, out: rows.append(args[0].shape[0]))
    decode = adapter.decode
    adapter.decode = lambda x: (decodes.append(x.shape[0]), decode(x))[1]
    scorer = _CountingScorer(k)
    prompts = ["a red circle", "a blue square"]
    try:
        pairs, _ = CandidateSampler.from_config(adapter, scorer, cfg.spo).sample(prompts, torch.Generator().manual_seed(0))
    finally:
        handle.remove()
    c = sampling_counts(cfg)
    b = len(prompts)
    assert sum(rows) == b * c.unet_rows
    assert sum(decodes) == b * c.vae_decodes
    assert scorer.images == b * c.spm_forwards
    assert int(pairs.shared.sum()) == b * c.shared_pairs and int((~pairs.shared).sum()) == b * c.unshared_pairs


# -- (3) per-call FLOPs: meta count == direct CPU measurement -----------------------------------------------
def test_tiny_unet_and_decode_flops_match_a_cpu_measurement():
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from spo.models.tiny import build_tiny_sd15
    from spo.plan import diffusion_flops

    cfg = _cfg("tiny")
    planned = diffusion_flops(cfg, cfg.model.resolution)
    pipe = build_tiny_sd15()
    side = cfg.model.resolution // 4
    x, t = torch.randn(2, 4, side, side), torch.tensor([500, 500])
    emb = torch.randn(2, 32, pipe.unet.config.cross_attention_dim)
    # The math backend makes CPU attention visible to the counter (its flash-for-CPU kernel is not registered).
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        pipe.unet(x, t, encoder_hidden_states=emb)  # one CFG call = 2 rows
    assert counter.get_total_flops() == 2 * planned["unet_row"]
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        pipe.vae.decode(torch.randn(1, 4, side, side))
    assert counter.get_total_flops() == planned["vae_decode"]
    assert planned["unet_lora_row"] > planned["unet_row"] and planned["unet_lora_backward_row"] > 0


def test_tiny_decoder_flops_replace_only_the_spm_decodes(capsys):
    """spm.decoder=tiny: each SPM decode costs the tiny decoder's FLOPs (oracle: a CPU count of the tiny preset's
    decoder), in SPM training and SPO sampling only; the official algorithm and evaluation keep the VAE."""
    from torch.utils.flop_counter import FlopCounterMode

    from spo.models.tiny import tiny_decoder
    from spo.plan import diffusion_flops, spm_decode_flops

    cfg = _cfg("tiny", "spm.decoder=tiny")
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        tiny_decoder().decode(torch.randn(1, 4, 8, 8))
    per_decode = spm_decode_flops(cfg, cfg.model.resolution)
    assert per_decode == counter.get_total_flops() < diffusion_flops(cfg, cfg.model.resolution)["vae_decode"]
    vae, tiny = _plan_json(capsys), _plan_json(capsys, "--set", "spm.decoder=tiny")
    saved = diffusion_flops(cfg, cfg.model.resolution)["vae_decode"] - per_decode
    for stage, decodes in (
        ("train_spo", vae["stages"]["train_spo"]["prompts"] * vae["stages"]["train_spo"]["per_prompt"]["vae_decodes"]),
        ("train_spm", vae["stages"]["train_spm"]["pairs"] * vae["stages"]["train_spm"]["per_pair"]["vae_decodes"]),
    ):
        assert vae["stages"][stage]["ours_flops"] - tiny["stages"][stage]["ours_flops"] == pytest.approx(saved * decodes)
        assert tiny["stages"][stage]["official_flops"] == vae["stages"][stage]["official_flops"]
    assert tiny["stages"]["evaluate"] == vae["stages"]["evaluate"]


def test_decode_resolution_costs_the_decode_of_the_reduced_latents(capsys):
    """spm.decode_resolution=16 on the 32-px tiny preset: each SPM decode costs the VAE's decode of 4x4 latents
    (oracle: a CPU count of the tiny preset's VAE at that size), in SPM training and SPO sampling only."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from spo.models.tiny import build_tiny_sd15
    from spo.plan import diffusion_flops, spm_decode

    cfg = _cfg("tiny", "spm.decode_resolution=16")
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        build_tiny_sd15().vae.decode(torch.randn(1, 4, 4, 4))
    decode = spm_decode(cfg, cfg.model.resolution)
    assert decode == {"decode": counter.get_total_flops(), "side": 16}
    assert decode["decode"] < diffusion_flops(cfg, cfg.model.resolution)["vae_decode"]
    full, reduced = _plan_json(capsys), _plan_json(capsys, "--set", "spm.decode_resolution=16")
    saved = diffusion_flops(cfg, cfg.model.resolution)["vae_decode"] - decode["decode"]
    spo, spm = full["stages"]["train_spo"], full["stages"]["train_spm"]
    for stage, decodes in (("train_spo", spo["prompts"] * spo["per_prompt"]["vae_decodes"]),
                           ("train_spm", spm["pairs"] * spm["per_pair"]["vae_decodes"])):
        assert full["stages"][stage]["ours_flops"] - reduced["stages"][stage]["ours_flops"] == pytest.approx(
            saved * decodes)
        assert reduced["stages"][stage]["official_flops"] == full["stages"][stage]["official_flops"]
    assert reduced["stages"]["evaluate"] == full["stages"]["evaluate"]
    # Not smaller than the image: the paper's decode.
    assert spm_decode(_cfg("tiny", "spm.decode_resolution=64"), 32)["decode"] == diffusion_flops(cfg, 32)["vae_decode"]


# -- (4) the CLI --------------------------------------------------------------------------------------------
def _plan_json(capsys, *args):
    assert cli.main(["plan", "--preset", "tiny", "--params", "/dev/null", "--json", *args]) == 0
    return json.loads(capsys.readouterr().out)


def test_plan_json_shape_and_overrides(capsys):
    base = _plan_json(capsys, "--gpus", "2", "--gpu", "a100")
    assert set(base["stages"]) == {"train_spm", "train_spo", "evaluate"}
    for st in base["stages"].values():
        assert isinstance(st["ours_flops"], float) and isinstance(st["official_flops"], float)
        assert st["hours"] > 0 and st["ours_flops"] <= st["official_flops"]
    spo = base["stages"]["train_spo"]
    assert {"unet_rows", "vae_decodes", "spm_forwards"} <= set(spo["per_prompt"])
    assert {"unet_rows", "vae_decodes", "spm_forwards"} <= set(base["stages"]["train_spm"]["per_pair"])
    assert {"unet_rows", "vae_decodes", "spm_forwards"} <= set(base["stages"]["evaluate"]["per_prompt"])
    assert base["assumptions"]["gpus"] == 2 and base["assumptions"]["kept_fraction"] == 0.28
    rate = 2 * 312e12 * 0.4
    assert spo["hours"] == pytest.approx(spo["ours_flops"] / rate / 3600)

    k8 = _plan_json(capsys, "--gpus", "2", "--gpu", "a100", "--set", "spo.num_candidates=8")
    assert k8["stages"]["train_spo"]["per_prompt"] == {**spo["per_prompt"], **_spo_formula(10, 2, 8)}
    assert k8["stages"]["train_spo"]["ours_flops"] > spo["ours_flops"]
    for name in ("train_spm", "evaluate"):  # k is an SPO sampling setting only
        assert k8["stages"][name]["ours_flops"] == base["stages"][name]["ours_flops"]
    kept = _plan_json(capsys, "--kept-fraction", "1.0")["stages"]["train_spo"]
    assert kept["pairs_per_prompt"] == 8 and kept["ours_flops"] > spo["ours_flops"]


def test_plan_human_output(capsys):
    assert cli.main(["plan", "--preset", "tiny", "--params", "/dev/null"]) == 0
    out = capsys.readouterr().out
    assert "| train_spo |" in out and "ours / official" in out and "per call: UNet row" in out
