"""Benchmark `spo train-spm` on the tiny preset: training pairs/s and where the time goes.

    .venv/bin/python bench/bench_spm.py                       # scratch tiny world with random models
    .venv/bin/python bench/bench_spm.py --root /tmp/spm_run   # a project with the trained tiny base + data
    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_spm.py --threads 1

Reports (1) wall time per section of the training step (VAE encode / UNet / VAE decode / text encode / CLIP
forward / CLIP backward / optimizer / data), from the stage's own SectionTimer, evaluation excluded, and (2) the
work per pair, hardware-independent: UNet/VAE/CLIP samples and FLOPs (torch.utils.flop_counter) of each part.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SMALL_WORLD = [
    "synthetic.train_rows=600",
    "synthetic.validation_rows=60",
    "synthetic.test_rows=20",
    "synthetic.unique_rows=12",
    "data.num_train_prompts=16",
    "data.gx_jpeg_sample=16",
]


def scratch_project(root: Path) -> list[str]:
    """Random-init tiny models + synthetic data + prepared pairs (no trained base needed)."""
    from spo.config import load_config
    from spo.models.tiny import build_tiny_clip, build_tiny_sd15
    from spo.stages import prepare, synth

    build_tiny_sd15(seed=0).save_pretrained(root / "models" / "base")
    clip, processor = build_tiny_clip(seed=0)
    clip.save_pretrained(root / "models" / "base" / "clip")
    processor.save_pretrained(root / "models" / "base" / "clip")
    cfg = load_config("tiny", [f"paths.root={root}", *SMALL_WORLD], params_file=None)
    synth.run(cfg)
    prepare.run(cfg)
    return SMALL_WORLD


def flops_per_pair(cfg) -> dict[str, float]:
    """FLOPs of one pair through each part of a training step (forward; CLIP forward + backward)."""
    from torch.utils.flop_counter import FlopCounterMode

    from spo.models.preference import TimeConditionedCLIP
    from spo.spm_training import base_model

    adapter = base_model(cfg, torch.device("cpu"))
    spm = TimeConditionedCLIP.from_clip(
        cfg.resolve_ref(cfg.spm.init), cfg.resolve_ref(cfg.spm.processor), cfg.spm.time_embed_dim
    )
    res = cfg.spm_resolution
    images = torch.rand(2, 3, res, res) * 2 - 1
    t = torch.tensor([500, 500])
    g = torch.Generator().manual_seed(0)
    out: dict[str, float] = {}

    def count(name, fn):
        with FlopCounterMode(display=False) as fc:
            result = fn()
        out[name] = float(fc.get_total_flops())
        return result

    with torch.no_grad():
        latents = count("vae_encode", lambda: adapter.encode(images, g))
        cond, uncond = count("text_encode", lambda: adapter.encode_prompts(["a red circle"] * 2))
        eps = count("unet", lambda: adapter.predict_noise(latents, t, cond, uncond, cfg.spm.cfg_scale))
        count("vae_decode", lambda: adapter.decode(latents - eps))
    tokens = spm.tokenize(["a red circle"])

    def clip_step():
        spm(images, t, **tokens).sum().backward()

    count("clip_forward_backward", clip_step)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", type=Path, default=None, help="existing project (trained base + prepared data)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=None, help="default: the tiny preset's spm.batch_size")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    ap.add_argument("--json", type=Path, default=None, help="also write the result here")
    args = ap.parse_args()

    from spo.config import load_config
    from spo.spm_training import SectionTimer
    from spo.stages import train_spm
    from spo.utils import setup_logging

    setup_logging("WARNING")
    if args.threads:
        torch.set_num_threads(args.threads)
    tmp = None
    if args.root is None:
        tmp = Path(tempfile.mkdtemp(prefix="bench_spm_"))
        root, extra = tmp, scratch_project(tmp)
        world = "scratch tiny world (random-init tiny SD-1.5 + CLIP)"
    else:
        root, extra = args.root, []
        world = f"project at {root}"
    overrides = [
        f"paths.root={root}",
        *extra,
        f"spm.max_steps={args.steps}",
        "spm.eval_timesteps=[0]",  # evaluation is not what is measured here
        "spm.eval_every=1000000000",
        "spm.checkpoint_every=1000000000",
        "tracking.enabled=false",
    ]
    if args.batch_size:
        overrides.append(f"spm.batch_size={args.batch_size}")
    cfg = load_config("tiny", overrides, params_file=None)
    try:
        timer = SectionTimer()
        start = time.perf_counter()
        result = train_spm.run(cfg, timer=timer)
        stage_seconds = time.perf_counter() - start
        pairs = args.steps * cfg.spm.batch_size
        train_seconds = pairs / result["train_pairs_per_s"]
        sections = dict(sorted(timer.seconds.items(), key=lambda kv: -kv[1]))
        sections["other"] = max(0.0, train_seconds - sum(sections.values()))
        flops = flops_per_pair(cfg)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)

    groups = {
        "VAE encode+decode": sections.get("vae_encode", 0) + sections.get("vae_decode", 0),
        "UNet (CFG)": sections.get("unet", 0),
        "CLIP (SPM fwd+bwd)": sections.get("clip_forward", 0) + sections.get("clip_backward", 0),
        "base text encoders": sections.get("text_encode", 0),
        "optimizer": sections.get("optimizer", 0),
        "data": sections.get("data", 0),
        "other": sections["other"],
    }
    report = {
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "torch_threads": torch.get_num_threads(),
        "world": world,
        "steps": args.steps,
        "batch_size": cfg.spm.batch_size,
        "train_pairs_per_s": result["train_pairs_per_s"],
        "train_seconds": train_seconds,
        "stage_seconds_incl_load_and_eval": stage_seconds,
        "time_share": {k: v / train_seconds for k, v in groups.items()},
        "section_seconds": sections,
        "work_per_pair": {
            "unet_samples": 4 if cfg.spm.cfg_scale > 1 else 2,
            "vae_encoded_images": 2,
            "vae_decoded_images": 2,
            "spm_images_fwd_bwd": 2,
            "gflops": {k: v / 1e9 for k, v in flops.items()},
        },
    }
    total_flops = sum(flops.values())
    report["work_per_pair"]["flop_share"] = {k: v / total_flops for k, v in flops.items()}
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
