"""Does decoding the SPM's images straight at a reduced resolution keep what the SPM judges? (issue #12 item 2)

On a trained tiny world (``make run``), the validation pairs' x̂0 images at each evaluation timestep are rendered
three ways from the same latents (the same seeds as ``spo train-spm``'s validation):

* ``full``   -- decoded at the image size (the paper);
* ``pixel``  -- decoded at the image size, then box-filtered to ``--resolution`` (what an SPM whose processor
  resizes to that size sees: SD-1.5's 512-px decode reaching PickScore's 224 px);
* ``latent`` -- the latents box-filtered first, then decoded at ``--resolution`` (``spm.decode_resolution``).

At t = 0 the images are the clean ones (``pixel`` = ``latent``: both box-filtered). Reported: the PSNR of
``latent`` against ``pixel`` per t (the decode path's own error, with the resolution held fixed), and the
pair accuracy (ties excluded) of each SPM given with ``--spm NAME=PATH`` on each rendering. The tiny SPM sees
32 px, so 16 px also removes detail it could use (``full`` vs ``pixel``); at real sizes the SPM never sees more
than 224 px, so only ``pixel`` vs ``latent`` carries over.

    .venv/bin/python bench/bench_decode_resolution.py --root . --resolution 16 \\
        --spm project=models/spm --spm vae_16px=runs/spm/<hash>/models/spm
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
from pathlib import Path

import torch

RENDERINGS = ("full", "pixel", "latent")


def render(adapter, denoiser, img0, img1, captions, t: int, gen_state, resolution: int) -> dict[str, tuple]:
    """The three renderings of one validation batch at nominal timestep ``t`` (same noise for each)."""
    try:
        adapter.spm_decode_resolution = resolution
        if t == 0:
            clean = tuple(adapter.images_for_spm(x) for x in (img0, img1))
            return {"full": (img0, img1), "pixel": clean, "latent": clean}
        ts = torch.full((len(captions),), t, dtype=torch.long)
        latent = denoiser(img0, img1, captions, ts, torch.Generator().set_state(gen_state))
        adapter.spm_decode_resolution = None
        full = denoiser(img0, img1, captions, ts, torch.Generator().set_state(gen_state))
        adapter.spm_decode_resolution = resolution
        return {"full": full, "pixel": tuple(adapter.images_for_spm(x) for x in full), "latent": latent}
    finally:
        adapter.spm_decode_resolution = None


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of images in [-1, 1] (peak-to-peak 2)."""
    mse = float(((a - b) ** 2).mean())
    return math.inf if mse == 0 else 10 * math.log10(4 / mse)


@torch.no_grad()
def measure(root: Path, resolution: int, spms: dict[str, str], max_batches: int | None = None,
            overrides: tuple[str, ...] = ()) -> dict:
    from spo.config import load_config
    from spo.models.preference import load_spm
    from spo.spm_training import VALIDATION_STREAM, PairDenoiser, base_model, pair_correct, pair_streams
    from spo.training import seed_generator

    params = root / "params.yaml"
    cfg = load_config("tiny", [f"paths.root={root}", *overrides], params_file=params if params.exists() else None)
    adapter = base_model(cfg, "cpu")
    denoiser = PairDenoiser(adapter, cfg.spm.cfg_scale)
    _, val = pair_streams(cfg)
    models = {name: load_spm(root / path) for name, path in spms.items()}
    timesteps = list(cfg.spm.eval_timesteps)
    correct = {(m, r, t): 0 for m in models for r in RENDERINGS for t in timesteps}
    errors = {t: [] for t in timesteps}
    counted = 0
    for i, batch in enumerate(val.iter_epoch(0, process_index=0, num_processes=1)):
        if max_batches is not None and i >= max_batches:
            break
        captions = list(batch["caption"])
        label_0, label_1 = batch["label_0"], batch["label_1"]
        if not (label_0 != label_1).any():
            continue
        counted += int((label_0 != label_1).sum())
        for t in timesteps:
            state = seed_generator(cfg.spm.seed, VALIDATION_STREAM, t, i, 0).get_state()
            images = render(adapter, denoiser, batch["image_0"], batch["image_1"], captions, t, state, resolution)
            if t:
                errors[t].append(psnr(torch.cat(images["latent"]), torch.cat(images["pixel"])))
            for name, model in models.items():
                tokens = model.tokenize(captions)
                ts = torch.full((2 * len(captions),), t, dtype=torch.long)
                for r, (x0, x1) in images.items():
                    s0, s1 = model(torch.cat([x0, x1]), ts, **tokens).float().chunk(2)
                    ok, _ = pair_correct(s0, s1, label_0, label_1)
                    correct[(name, r, t)] += int(ok.sum())
    return {
        "resolution": resolution, "image_size": cfg.spm_resolution, "decisive_pairs": counted,
        "timesteps": timesteps, "spms": spms,
        "psnr_latent_vs_pixel_db": {str(t): sum(v) / len(v) for t, v in errors.items() if v},
        "accuracy": {m: {r: {str(t): correct[(m, r, t)] / counted for t in timesteps} for r in RENDERINGS}
                     for m in models},
    }


def table(res: dict) -> str:
    ts = res["timesteps"]
    lines = [f"decode resolution {res['resolution']} px of {res['image_size']} px images, "
             f"{res['decisive_pairs']} decisive validation pairs", "",
             "| SPM | rendering | " + " | ".join(f"t={t}" for t in ts) + " |", "|---|---|" + "---|" * len(ts)]
    for m, by_r in res["accuracy"].items():
        for r in RENDERINGS:
            lines.append(f"| {m} | {r} | " + " | ".join(f"{by_r[r][str(t)]:.3f}" for t in ts) + " |")
    p = res["psnr_latent_vs_pixel_db"]
    lines.append("\nPSNR latent vs pixel (dB): " + ", ".join(f"t={t}: {v:.1f}" for t, v in p.items()))
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", type=Path, default=Path("."), help="a project with a trained tiny world")
    ap.add_argument("--resolution", type=int, default=16, help="the reduced decode resolution (px)")
    ap.add_argument("--spm", action="append", default=[], metavar="NAME=PATH",
                    help="an SPM folder (relative to --root) to score every rendering with; repeatable")
    ap.add_argument("--max-batches", type=int, default=None, help="only the first N validation batches")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args()
    spms = dict(item.split("=", 1) for item in args.spm) or {"project": "models/spm"}
    tic = time.perf_counter()
    res = measure(args.root.resolve(), args.resolution, spms, args.max_batches)
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}; "
          f"{time.perf_counter() - tic:.0f} s")
    print(table(res))
    if args.json:
        args.json.write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
