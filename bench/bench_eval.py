"""Benchmark of `spo evaluate`'s two costs on the tiny preset: generation and scoring throughput.

    .venv/bin/python bench/bench_eval.py [--root DIR] [--threads N] [--images 64] [--json out.json]

Generation: the evaluation's own ``sample_images`` (stock diffusers pipeline, DDIM, CFG) at the tiny preset's
protocol (``eval.num_steps`` steps, 32 px, ``eval.batch_size`` images per call); work is also counted as UNet
samples (2 per image per step with CFG: the [uncond; cond] batch). Scoring: every scorer that can run here,
on the same images, in ``eval.batch_size`` chunks. With ``--root`` pointing at a project that has trained
models (models/base, models/base/clip, models/spm) those are used; otherwise random-init tiny models of the
same architecture are built in a temp dir (throughput does not depend on the weights). HPSv2.1 and
ImageReward are reported as unavailable unless their extras are installed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _build_random_project(root: Path) -> None:
    from spo.models.preference import TimeConditionedCLIP, save_spm
    from spo.models.tiny import save_random_tiny_models

    save_random_tiny_models(root, sdxl=False)
    base = root / "models" / "base"
    save_spm(TimeConditionedCLIP.from_clip(str(base / "clip"), time_embed_dim=64), root / "models" / "spm")


def _timed(fn, repeats: int = 1):
    best = float("inf")
    out = None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return out, best


def run(root: Path, n_images: int, repeats: int) -> dict:
    import torch

    from spo.config import load_config
    from spo.generation import make_jobs, protocol, sample_images
    from spo.models.diffusion import load_pipeline
    from spo.rewards import SCORER_NAMES, get_scorer, resolve_local_refs, to_tensor_images
    from spo.rewards.aesthetic import AestheticMLP

    aesthetic = root / "aesthetic_tiny.pth"
    torch.manual_seed(0)
    torch.save(AestheticMLP(64).state_dict(), aesthetic)
    cfg = resolve_local_refs(
        load_config("tiny", [f"paths.root={root}", f"eval.aesthetic_weights={aesthetic}"], params_file=None)
    )
    proto = protocol(cfg)
    bs = cfg.eval.batch_size
    pipe = load_pipeline(cfg.model)
    prompts = [
        "a small red circle on a blue background at the center",
        "a large green star on a white background",
    ]
    jobs = make_jobs(prompts * (n_images // 2), 1, cfg.eval.seed)[:n_images]
    sample_images(pipe, [jobs[0].prompt], [jobs[0].seed], proto)  # warm-up

    def generate():
        images = []
        for i in range(0, len(jobs), bs):
            chunk = jobs[i : i + bs]
            images += sample_images(pipe, [j.prompt for j in chunk], [j.seed for j in chunk], proto)
        return images

    images, gen_s = _timed(generate, repeats)
    unet_samples = len(jobs) * proto["num_steps"] * (2 if proto["cfg_scale"] > 1 else 1)
    result = {
        "generation": {
            "images": len(jobs),
            "batch_size": bs,
            "steps": proto["num_steps"],
            "resolution": proto["resolution"],
            "seconds": gen_s,
            "images_per_s": len(jobs) / gen_s,
            "unet_samples": unet_samples,
            "unet_samples_per_s": unet_samples / gen_s,
        },
        "scoring": {},
    }
    batch = to_tensor_images(images)
    texts = [j.prompt for j in jobs]
    for name in SCORER_NAMES:
        try:
            scorer = get_scorer(name, cfg)
        except Exception as exc:  # a missing extra or weights: report, do not fail the benchmark
            result["scoring"][name] = {"unavailable": f"{type(exc).__name__}: {str(exc)[:120]}"}
            continue
        scorer.score(batch[:2], texts[:2])  # warm-up

        def score_all(scorer=scorer):
            return torch.cat(
                [scorer.score(batch[i : i + bs], texts[i : i + bs]) for i in range(0, len(texts), bs)]
            )

        _, s = _timed(score_all, repeats)
        result["scoring"][name] = {"seconds": s, "images_per_s": len(texts) / s}
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--root", type=Path, default=None, help="project with trained tiny models (default: random)"
    )
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2, help="best of N timings")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        root = args.root
        if root is None:
            root = Path(tmp)
            _build_random_project(root)
        result = run(root.resolve(), args.images, args.repeats)
    result["machine"] = {
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "load_avg_1m": os.getloadavg()[0],
        "models": "trained" if args.root else "random-init tiny",
    }
    g = result["generation"]
    print(
        f"generation: {g['images']} images in {g['seconds']:.2f} s = {g['images_per_s']:.1f} img/s "
        f"({g['unet_samples_per_s']:.0f} UNet samples/s; {g['steps']} DDIM steps, CFG, batch {g['batch_size']})"
    )
    for name, r in result["scoring"].items():
        print(
            f"score {name:14s}: "
            + (f"{r['images_per_s']:.0f} img/s" if "images_per_s" in r else r["unavailable"])
        )
    print(f"(torch threads {torch.get_num_threads()}, load average {result['machine']['load_avg_1m']:.1f})")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
