"""``spo plan``: the exact work of a config, per stage, ours next to the official algorithm, and its GPU hours.

Pure: config -> call counts -> FLOPs. Nothing is loaded or run on data.

**Counts** come from reading the code (each function names what it mirrors):

* SPO sampling (:func:`sampling_counts`) walks ``spo.sampling.CandidateSampler.sample`` on step indices: plain
  steps before ``divert_start_step`` (and above κ / below ``min_timestep``), k candidates from a shared x_t,
  MSPO inner steps, the judging UNet call at the next timestep reused as that step's prediction, one VAE
  decode + one SPM image forward per candidate, the ``branches_at_last_step`` rule, and the final image's
  decode when the last step is plain. The official sampler does the same work (peers.md §2.1).
* SPO training (:func:`spo_pair_counts`): ours (``spo.spo_trainer.SPOTrainer.pair_losses``) runs one policy
  call (with grad) and one reference call (no grad) on x_t for a pair that shares x_t, and both on x_t^w and
  x_t^l for an MSPO inner-step pair; each call has 2 rows with ``spo.train_cfg`` and CFG > 1. The official
  trainer always runs 4 calls per pair (policy and reference on win and on lose; peers.md §3.1).
* SPM training (:func:`spm_pair_counts`, ``spo.spm_training.train_micro_step`` / ``PairDenoiser``): per pair
  2 VAE encodes, one CFG UNet call on the 2 noised latents at a random t, 2 VAE decodes of x̂0, the SPM on
  both images (forward + backward, full fine-tune) and its text tower once; ``spm.clean_fraction`` of the
  pairs skip the encode/UNet/decode; ``spm.relabel`` adds the frozen relabeller's 2 image + 1 text forwards.
  The official SPM trainer does the same per pair. Validation passes are not counted.
* Evaluation (``spo.generation.generate_pairs``): base and base + LoRA images, ``eval.num_images_per_prompt``
  per prompt, ``eval.num_steps`` DDIM steps with CFG, one VAE decode and every scorer per image. The official
  code ships no evaluation, so "official" is the same protocol.

**Per-call FLOPs** are counted once per (architecture, resolution) with ``torch.utils.flop_counter`` on the
meta device (no weights, no memory): the real architectures from ``spo.models.realsize``, the tiny preset's
from ``spo.models.tiny`` at its config sizes. Attention runs on SDPA's math backend so that it is counted as
matmuls. Backward passes are *measured* (meta autograd), not assumed to be 2x the forward: the LoRA UNet's
frozen weights need only input gradients (backward = 1.13x forward for SD-1.5), the SPM's full fine-tune
needs both (about 2x). Not counted: the diffusion text encoders (< 0.1 % of any stage), resizing, the DDIM
arithmetic, optimizer steps.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from functools import cache
from pathlib import Path
from typing import Any

# torch is imported inside the functions: the CLI reads GPU_PEAK_TFLOPS while building its parser.

# Peak dense BF16 tensor-core TFLOP/s (no sparsity), vendor datasheets:
GPU_PEAK_TFLOPS = {
    "h100": 989.4,  # NVIDIA H100 SXM5 datasheet: BF16 1,979 TFLOPS "with sparsity" -> 989.4 dense
    "h200": 989.4,  # NVIDIA H200 SXM datasheet: BF16 1,979 TFLOPS with sparsity (same tensor cores as H100 SXM)
    "a100": 312.0,  # NVIDIA A100 datasheet: BF16 312 TFLOPS dense (624 with sparsity)
    "l40s": 362.05,  # NVIDIA L40S datasheet: BF16 362.05 TFLOPS dense (733 with sparsity)
    "a10g": 125.0,  # NVIDIA A10 datasheet: BF16 125 TFLOPS dense; AWS's A10G has no public NVIDIA sheet (approx.)
}
DEFAULT_KEPT_FRACTION = 0.28  # share of comparisons whose pair passes the threshold, at paper scale
EVAL_PROMPTS_DEFAULT = 500  # eval.num_prompts = None means Pick-a-Pic's validation_unique: 500 prompts
STAGE_NAMES = ("train_spm", "train_spo", "evaluate")


# ----------------------------------------------------------------------------------------------------------
# Counts
# ----------------------------------------------------------------------------------------------------------
@dataclass
class SamplingCounts:
    """Per prompt, one SPO sampling trajectory."""

    unet_rows: int = 0  # UNet batch rows (a CFG call is 2 rows per latent)
    vae_decodes: int = 0
    spm_forwards: int = 0  # SPM image forwards (its text tower runs once per prompt besides)
    comparisons: int = 0
    shared_pairs: int = 0  # training pairs if every comparison is kept: sharing x_t ...
    unshared_pairs: int = 0  # ... and MSPO inner-step pairs (x_t^w != x_t^l)


def _timesteps(num_steps: int) -> tuple[list[int], int]:
    from spo.models.tiny import tiny_scheduler  # SD-1.5's / SDXL's DDIM settings (the presets' schedulers)

    sched = tiny_scheduler()
    sched.set_timesteps(num_steps)
    return [int(t) for t in sched.timesteps], int(sched.config.steps_offset)


def sampling_counts(cfg) -> SamplingCounts:
    """What ``CandidateSampler.sample`` computes for one prompt (mirrors its loop on step indices)."""
    from spo.sampling import branches_at_last_step

    s = cfg.spo
    ts, offset = _timesteps(s.num_steps)
    n, k = len(ts), s.num_candidates
    row = 2 if s.cfg_scale > 1.0 else 1
    branch_last = branches_at_last_step(s, cfg.model.arch)

    def trains_at(t: int) -> bool:
        return s.min_timestep <= t - offset <= s.kappa

    c = SamplingCounts()
    eps_known, last_plain, i = False, False, 0
    while i < n:
        if not eps_known:
            c.unet_rows += row
        if i < s.divert_start_step or not trains_at(ts[i]):
            eps_known, last_plain, i = False, True, i + 1
            continue
        chain_t = [ts[i]]
        i += 1
        inner = s.num_inner_steps - 1
        if not branch_last and i + inner == n - 1:
            inner += 1  # the chains take the last step instead of branching there
        for _ in range(inner):
            if i >= n:
                break
            c.unet_rows += row * k
            chain_t.append(ts[i])
            i += 1
        if i < n:  # judged on x̂0 at the next timestep; that call continues the chosen chain
            c.unet_rows += row * k
        eps_known, last_plain = i < n, False
        c.vae_decodes += k
        c.spm_forwards += k
        c.comparisons += 1
        c.shared_pairs += int(trains_at(chain_t[0]))
        c.unshared_pairs += sum(trains_at(t) for t in chain_t[1:])
    if last_plain:  # the final image is decoded and scored at t = 0
        c.vae_decodes += 1
        c.spm_forwards += 1
    return c


def spo_pair_counts(cfg, official: bool) -> dict[str, float]:
    """UNet rows of one training pair: {"shared": (policy rows, ref rows), "unshared": ...}, per pair kind."""
    row = 2 if (cfg.spo.train_cfg and cfg.spo.cfg_scale > 1.0) else 1
    if official:
        return {"shared": (2 * row, 2 * row), "unshared": (2 * row, 2 * row)}
    return {"shared": (row, row), "unshared": (2 * row, 2 * row)}


def spm_pair_counts(cfg) -> dict[str, float]:
    """Per SPM training pair (expected over ``spm.clean_fraction``)."""
    noised = 1.0 - cfg.spm.clean_fraction
    row = 2 if cfg.spm.cfg_scale > 1.0 else 1
    return {
        "unet_rows": 2 * row * noised,
        "vae_encodes": 2 * noised,
        "vae_decodes": 2 * noised,
        "spm_forwards": 2,  # with backward
        "spm_text_forwards": 1,  # with backward
        "relabel_forwards": 2 if cfg.spm.relabel else 0,  # frozen, + 1 text forward
    }


# ----------------------------------------------------------------------------------------------------------
# Per-call FLOPs (meta device)
# ----------------------------------------------------------------------------------------------------------
def _count(fn) -> int:
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def _fwd_bwd(forward) -> tuple[int, int]:
    """(forward, backward) FLOPs of ``forward()`` -> tensor; backward of a scalar reduction of its output."""
    out = []
    fwd = _count(lambda: out.append(forward()))
    bwd = _count(lambda: out[0].float().sum().backward())
    return fwd, bwd


def _empty():
    from accelerate import init_empty_weights

    return init_empty_weights(include_buffers=False)


def _diffusion_modules(kind: str, arch: str):
    """(unet, vae, text_dim, pooled_dim) on the meta device."""
    with _empty():
        if kind == "tiny":
            from spo.models.tiny import build_tiny_sd15, build_tiny_sdxl

            pipe = (build_tiny_sdxl if arch == "sdxl" else build_tiny_sd15)()
            unet, vae = pipe.unet, pipe.vae
        else:
            from spo.models import realsize

            cfgs = realsize.default_configs(arch)
            unet, vae = realsize.build_unet(cfgs["unet"]), realsize.build_vae(cfgs["vae"])
    return unet.eval(), vae.eval()


@cache
def _diffusion_flops(kind: str, arch: str, resolution: int, lora_rank: int) -> dict[str, int]:
    import torch

    from spo.models.lora import add_lora

    unet, vae = _diffusion_modules(kind, arch)
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    side = resolution // factor
    uc = unet.config
    with torch.device("meta"):
        x = torch.zeros(1, uc.in_channels, side, side)
        t = torch.tensor([500])
        kw: dict[str, Any] = {"encoder_hidden_states": torch.zeros(1, 77 if kind != "tiny" else 32,
                                                                   uc.cross_attention_dim)}
        if uc.addition_embed_type == "text_time":
            pooled = uc.projection_class_embeddings_input_dim - 6 * uc.addition_time_embed_dim
            kw["added_cond_kwargs"] = {"text_embeds": torch.zeros(1, pooled), "time_ids": torch.zeros(1, 6)}
        out: dict[str, int] = {}
        with torch.no_grad():
            out["unet_row"] = _count(lambda: unet(x, t, **kw))
            out["vae_decode"] = _count(lambda: vae.decode(torch.zeros(1, vae.config.latent_channels, side, side)))
            out["vae_encode"] = _count(lambda: vae.encode(torch.zeros(1, 3, resolution, resolution)))
        with _empty():
            add_lora(unet, lora_rank)
        unet.train()
        out["unet_lora_row"], out["unet_lora_backward_row"] = _fwd_bwd(lambda: unet(x, t, **kw).sample)
    return out


def _clip_model(kind: str, which: str, resolution: int):
    """A CLIPModel on meta: ``pickscore`` (ViT-H/14, the SPM / PickScore / HPSv2.1), ``vit_l`` (OpenAI
    CLIP ViT-L/14: the CLIP score and aesthetic scorers; ImageReward's BLIP ViT-L is counted as this), or the
    tiny preset's CLIP at its image size."""
    from transformers import CLIPConfig, CLIPModel

    from spo.models import realsize

    with _empty():
        if kind == "tiny":
            from spo.models.tiny import build_tiny_clip

            return build_tiny_clip(image_size=resolution)[0], 32
        if which == "pickscore":
            config = realsize.clip_config()
        else:
            vision = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                          image_size=224, patch_size=14, hidden_act="quick_gelu", projection_dim=768)
            config = CLIPConfig(text_config=dict(realsize.CLIP_L_TEXT), vision_config=vision, projection_dim=768)
        return CLIPModel(config), realsize.MAX_LENGTH


@cache
def _clip_flops(kind: str, which: str, resolution: int, time_embed_dim: int) -> dict[str, int]:
    import torch

    from spo.models.preference import TimeConditionedCLIP

    clip, text_len = _clip_model(kind, which, resolution)
    with _empty():
        spm = TimeConditionedCLIP(clip, None, time_embed_dim)
    size = clip.config.vision_config.image_size
    with torch.device("meta"):
        pixels = torch.zeros(1, 3, size, size)
        ids = torch.zeros(1, text_len, dtype=torch.long)
        t = torch.tensor([500])
        out: dict[str, int] = {}
        out["image"], out["image_backward"] = _fwd_bwd(lambda: spm.image_features(pixels, t))
        out["text"], out["text_backward"] = _fwd_bwd(lambda: spm.text_features(ids))
    return out


def _disk_cached(name: str, key: tuple, compute) -> dict[str, int]:
    """Per-call counts depend only on architecture + resolution: kept in ~/.cache/spo/plan_flops.json. The tiny
    preset's are counted afresh (instant, and its architectures live in this repository's code, which changes)."""
    import torch

    if key and key[0] == "tiny":
        return compute(*key)

    root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "spo"
    path = root / "plan_flops.json"
    entry = json.dumps([name, *key, torch.__version__])
    try:
        cache = json.loads(path.read_text())
    except (OSError, ValueError):
        cache = {}
    if entry not in cache:
        cache[entry] = compute(*key)
        try:
            root.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(cache, indent=1))
            tmp.replace(path)
        except OSError:
            pass
    return cache[entry]


def diffusion_flops(cfg, resolution: int) -> dict[str, int]:
    key = ("tiny" if cfg.is_tiny else "real", cfg.model.arch, int(resolution), int(cfg.spo.lora_rank))
    return _disk_cached("diffusion", key, _diffusion_flops)


@cache
def _spm_decode_flops(kind: str, arch: str, decoder: str, resolution: int, decode_resolution: int) -> dict[str, int]:
    """One decode of an x̂0 the SPM judges, of a ``resolution``-px image: by the VAE or the tiny decoder, from
    the latents as ``spm.decode_resolution`` box-filters them (0: not at all)."""
    import torch

    from spo.models.diffusion import spm_latent_size

    _, vae = _diffusion_modules(kind, arch)
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    height, width = spm_latent_size(resolution // factor, resolution // factor, factor, decode_resolution or None)
    module = vae
    if decoder == "tiny":
        with _empty():
            # TAESD and TAESDXL share AutoencoderTiny's default architecture; the tiny preset distils a narrow one.
            if kind == "tiny":
                from spo.models.tiny import tiny_decoder

                module = tiny_decoder()
            else:
                from diffusers import AutoencoderTiny

                module = AutoencoderTiny()
    with torch.device("meta"), torch.no_grad():
        latents = torch.zeros(1, module.config.latent_channels, height, width)
        return {"decode": _count(lambda: module.decode(latents)), "side": factor * min(height, width)}


def spm_decode(cfg, resolution: int) -> dict[str, int]:
    """One decode of an x̂0 the SPM judges (``decode`` FLOPs, shorter ``side`` in px): the VAE's at the image
    size (the paper), or as ``spm.decoder`` / ``spm.decode_resolution`` say."""
    if cfg.spm.decoder == "vae" and cfg.spm.decode_resolution is None:
        return {"decode": diffusion_flops(cfg, resolution)["vae_decode"], "side": int(resolution)}
    key = ("tiny" if cfg.is_tiny else "real", cfg.model.arch, cfg.spm.decoder, int(resolution),
           int(cfg.spm.decode_resolution or 0))
    return _disk_cached("spm_decode", key, _spm_decode_flops)


def spm_decode_flops(cfg, resolution: int) -> float:
    return spm_decode(cfg, resolution)["decode"]


def clip_flops(cfg, which: str = "pickscore") -> dict[str, int]:
    kind = "tiny" if cfg.is_tiny else "real"
    key = (kind, "pickscore" if kind == "tiny" else which, int(cfg.model.resolution), int(cfg.spm.time_embed_dim))
    return _disk_cached("clip", key, _clip_flops)


# Evaluation scorer -> CLIP family (the tiny preset's scorers are all its tiny CLIP; toy_aesthetic is free).
SCORER_FAMILY = {"spm": "pickscore", "pickscore": "pickscore", "hpsv21": "pickscore", "clip": "vit_l",
                 "aesthetic": "vit_l", "imagereward": "vit_l", "toy_aesthetic": None}


# ----------------------------------------------------------------------------------------------------------
# The plan
# ----------------------------------------------------------------------------------------------------------
def make_plan(cfg, gpus: int = 1, gpu: str = "h100", mfu: float = 0.4,
              kept_fraction: float = DEFAULT_KEPT_FRACTION) -> dict[str, Any]:
    """FLOPs of each stage (ours and official), the counts behind them and the projected hours."""
    if gpu not in GPU_PEAK_TFLOPS:
        raise ValueError(f"unknown GPU {gpu!r}; choose one of {', '.join(GPU_PEAK_TFLOPS)}")
    if not 0 < mfu <= 1 or not 0 <= kept_fraction <= 1 or gpus < 1:
        raise ValueError("need gpus >= 1, 0 < mfu <= 1 and 0 <= kept_fraction <= 1")
    stages = {"train_spm": _spm_stage(cfg, gpus), "train_spo": _spo_stage(cfg, kept_fraction),
              "evaluate": _eval_stage(cfg)}
    rate = gpus * GPU_PEAK_TFLOPS[gpu] * 1e12 * mfu
    for st in stages.values():
        st["ratio"] = st["ours_flops"] / st["official_flops"] if st["official_flops"] else 1.0
        st["hours"] = st["ours_flops"] / rate / 3600
        st["official_hours"] = st["official_flops"] / rate / 3600
    total = {key: sum(st[key] for st in stages.values()) for key in ("ours_flops", "official_flops", "hours",
                                                                      "official_hours")}
    total["ratio"] = total["ours_flops"] / total["official_flops"]
    return {
        "preset": cfg.preset, "arch": cfg.model.arch,
        "assumptions": {"gpus": gpus, "gpu": gpu, "peak_tflops_bf16": GPU_PEAK_TFLOPS[gpu], "mfu": mfu,
                        "kept_fraction": kept_fraction, "backward": "measured (meta autograd)",
                        "flop": "2 per multiply-add (torch.utils.flop_counter)"},
        "stages": stages, "total": total,
    }


def _spo_stage(cfg, kept: float) -> dict[str, Any]:
    d, spm = diffusion_flops(cfg, cfg.spo_resolution), clip_flops(cfg)
    c = sampling_counts(cfg)
    prompts = (cfg.spo.num_prompts or cfg.data.num_train_prompts) * cfg.spo.num_epochs
    # The policy samples: rows through the LoRA UNet (no grad); one SPM text forward per prompt.
    # The official sampler decodes with the VAE; ours with spm.decoder's decoder.
    rows_and_scores = c.unet_rows * d["unet_lora_row"] + c.spm_forwards * spm["image"] + spm["text"]
    sampling_for = {
        "ours": rows_and_scores + c.vae_decodes * spm_decode_flops(cfg, cfg.spo_resolution),
        "official": rows_and_scores + c.vae_decodes * d["vae_decode"],
    }
    sampling = sampling_for["ours"]
    pol = d["unet_lora_row"] + d["unet_lora_backward_row"]
    out: dict[str, Any] = {"prompts": prompts, "per_prompt": asdict(c), "sampling_flops_per_prompt": sampling}
    pairs = {"shared": c.shared_pairs * kept, "unshared": c.unshared_pairs * kept}
    for who in ("ours", "official"):
        rows = spo_pair_counts(cfg, official=who == "official")
        train = sum(n * (rows[kind][0] * pol + rows[kind][1] * d["unet_row"]) for kind, n in pairs.items())
        n_pairs = sum(pairs.values())
        policy = sum(n * rows[kind][0] for kind, n in pairs.items())
        ref = sum(n * rows[kind][1] for kind, n in pairs.items())
        out[f"{who}_per_pair"] = {
            "policy_unet_rows": policy / n_pairs if n_pairs else 0.0,
            "reference_unet_rows": ref / n_pairs if n_pairs else 0.0,
            "unet_rows": (policy + ref) / n_pairs if n_pairs else 0.0,
            "flops": train / n_pairs if n_pairs else 0.0,
        }
        out[f"{who}_training_flops_per_prompt"] = train
        out[f"{who}_flops"] = float(prompts * (sampling_for[who] + train))
    out["pairs_per_prompt"] = sum(pairs.values())
    return out


def _spm_stage(cfg, gpus: int) -> dict[str, Any]:
    if cfg.spm.source != "init":  # a released SPM is loaded, nothing is trained
        return {"pairs": 0, "per_pair": {}, "ours_flops": 0.0, "official_flops": 0.0}
    d, spm = diffusion_flops(cfg, cfg.spm_resolution), clip_flops(cfg)
    c = spm_pair_counts(cfg)
    rest = (c["unet_rows"] * d["unet_row"] + c["vae_encodes"] * d["vae_encode"]
            + c["spm_forwards"] * (spm["image"] + spm["image_backward"])
            + c["spm_text_forwards"] * (spm["text"] + spm["text_backward"])
            + (c["relabel_forwards"] * spm["image"] + spm["text"] if c["relabel_forwards"] else 0))
    decode = c["vae_decodes"] * spm_decode_flops(cfg, cfg.spm_resolution)
    per_pair, official_per_pair = rest + decode, rest + c["vae_decodes"] * d["vae_decode"]
    # spm.batch_size is per process: a step takes batch_size x grad_accum x gpus pairs.
    pairs = cfg.spm.max_steps * cfg.spm.batch_size * cfg.spm.grad_accum * gpus
    return {"pairs": pairs, "per_pair": {**c, "flops": per_pair, "decode_share": decode / per_pair},
            "ours_flops": float(pairs * per_pair), "official_flops": float(pairs * official_per_pair)}


def _eval_stage(cfg) -> dict[str, Any]:
    e = cfg.eval
    d = diffusion_flops(cfg, cfg.eval_resolution)
    row = 2 if e.cfg_scale > 1.0 else 1
    scorer = 0
    for name in e.scorers:
        family = SCORER_FAMILY.get(name, "pickscore")
        if family is not None:
            f = clip_flops(cfg, family)
            scorer += f["image"] + (0 if name == "aesthetic" else f["text"])
    images = 2 * e.num_images_per_prompt  # base and base + LoRA
    per_prompt_counts = {"unet_rows": images * e.num_steps * row, "vae_decodes": images,
                         "scorer_forwards": images * len(e.scorers), "spm_forwards": images * ("spm" in e.scorers)}
    per_image_unet = e.num_steps * row * (d["unet_row"] + d["unet_lora_row"]) / 2
    per_prompt = images * (per_image_unet + d["vae_decode"] + scorer)
    prompts = e.num_prompts or EVAL_PROMPTS_DEFAULT
    return {"prompts": prompts, "per_prompt": per_prompt_counts, "flops_per_prompt": per_prompt,
            "ours_flops": float(prompts * per_prompt), "official_flops": float(prompts * per_prompt)}


def per_call_flops(cfg) -> dict[str, dict[str, Any]]:
    d, decode = diffusion_flops(cfg, cfg.spo_resolution), spm_decode(cfg, cfg.spo_resolution)
    spm_decode_how = f"spm.decoder={cfg.spm.decoder}, {decode['side']} px"
    return {"diffusion": {**d, "spm_decode": decode["decode"], "spm_decode_how": spm_decode_how},
            "spm": clip_flops(cfg)}


# ----------------------------------------------------------------------------------------------------------
# Human output
# ----------------------------------------------------------------------------------------------------------
def _si(flops: float) -> str:
    for unit, scale in (("EFLOP", 1e18), ("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6)):
        if abs(flops) >= scale:
            return f"{flops / scale:.3g} {unit}"
    return f"{flops:.3g} FLOP"


def format_plan(plan: dict[str, Any], calls: dict[str, dict[str, int]] | None = None) -> str:
    a = plan["assumptions"]
    lines = [f"spo plan: preset {plan['preset']} ({plan['arch']}), {a['gpus']} x {a['gpu']} "
             f"({a['peak_tflops_bf16']:g} TFLOP/s bf16 dense) at MFU {a['mfu']:.0%}, kept fraction "
             f"{a['kept_fraction']:g}", ""]
    lines += ["| stage | ours | official | ours / official | hours (ours) | hours (official) |",
              "|---|---|---|---|---|---|"]
    for name, st in [*plan["stages"].items(), ("total", plan["total"])]:
        lines.append(f"| {name} | {_si(st['ours_flops'])} | {_si(st['official_flops'])} | {st['ratio']:.3f} | "
                     f"{st['hours']:.3g} | {st['official_hours']:.3g} |")
    spo, spm, ev = (plan["stages"][k] for k in ("train_spo", "train_spm", "evaluate"))
    c = spo["per_prompt"]
    lines += ["", f"train_spo, per prompt ({spo['prompts']:,} prompt-epochs): {c['unet_rows']} UNet rows, "
              f"{c['vae_decodes']} VAE decodes, {c['spm_forwards']} SPM forwards, {c['comparisons']} comparisons "
              f"-> {spo['pairs_per_prompt']:.3g} pairs ({c['shared_pairs']} shared + {c['unshared_pairs']} "
              f"unshared x kept); sampling {_si(spo['sampling_flops_per_prompt'])}"]
    for who in ("ours", "official"):
        p = spo[f"{who}_per_pair"]
        lines.append(f"  training per pair, {who}: {p['policy_unet_rows']:.3g} policy + "
                     f"{p['reference_unet_rows']:.3g} reference UNet rows = {_si(p['flops'])}")
    if spm["pairs"]:
        p = spm["per_pair"]
        lines.append(f"train_spm, per pair ({spm['pairs']:,} pairs): {p['unet_rows']:.3g} UNet rows, "
                     f"{p['vae_encodes']:.3g} VAE encodes, {p['vae_decodes']:.3g} decodes, {p['spm_forwards']} "
                     f"SPM forward+backward = {_si(p['flops'])} ({p['decode_share']:.0%} in the decodes)")
    e = ev["per_prompt"]
    lines.append(f"evaluate, per prompt ({ev['prompts']:,} prompts): {e['unet_rows']} UNet rows, "
                 f"{e['vae_decodes']} VAE decodes, {e['scorer_forwards']} scorer forwards = "
                 f"{_si(ev['flops_per_prompt'])}")
    if calls:
        d, s = calls["diffusion"], calls["spm"]
        lines.append(f"per call: UNet row {_si(d['unet_row'])} (LoRA fwd {_si(d['unet_lora_row'])}, bwd "
                     f"{_si(d['unet_lora_backward_row'])}), VAE decode {_si(d['vae_decode'])} "
                     f"= {d['vae_decode'] / (2 * d['unet_row']):.2f}x a CFG call, VAE encode "
                     f"{_si(d['vae_encode'])}, SPM image {_si(s['image'])} (bwd {_si(s['image_backward'])}), "
                     f"text {_si(s['text'])}"
                     + (f", SPM decode ({d['spm_decode_how']}) {_si(d['spm_decode'])}"
                        if d["spm_decode"] != d["vae_decode"] else ""))
    return "\n".join(lines)
