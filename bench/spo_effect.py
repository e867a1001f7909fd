"""Does SPO help? Base vs base+LoRA on the validation prompts with paired seeds, scored by the trained SPM
(t = 0) and, on the tiny world, by the hidden toy aesthetic (the ground truth the SPM was trained to learn).

    .venv/bin/python bench/spo_effect.py --root /path/to/project           # after `spo train` there
    .venv/bin/python bench/spo_effect.py --root P --prompts 50 --seeds 4 --lora P/models/spo/lora

Image k of prompt p uses seed p*1000+k for both models, DDIM (eta.eval, eval.num_steps, eval.cfg_scale of the
resolved config). Prints mean scores, the paired difference with a 95% normal CI, and the win rate.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def paired(a: torch.Tensor, b: torch.Tensor) -> dict:
    d = (b - a).double()
    se = d.std().item() / math.sqrt(len(d))
    return {
        "base": a.mean().item(),
        "spo": b.mean().item(),
        "diff": d.mean().item(),
        "ci95": [d.mean().item() - 1.96 * se, d.mean().item() + 1.96 * se],
        "win_rate": (d > 0).double().mean().item(),
        "n": len(d),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", required=True)
    ap.add_argument("--lora", default=None, help="default: ROOT/models/spo/lora")
    ap.add_argument("--prompts", type=int, default=50)
    ap.add_argument("--seeds", type=int, default=4)
    ap.add_argument("--batch", type=int, default=50)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    from spo.config import load_config
    from spo.data.synthetic import toy_aesthetic
    from spo.models.diffusion import DiffusionAdapter, load_pipeline
    from spo.models.lora import add_lora, load_lora_into, read_lora_file
    from spo.models.preference import load_spm
    from spo.sampling import generate_latents

    root = Path(args.root)
    cfg = load_config(
        "tiny", [f"paths.root={root}", f"model.pretrained={root / 'models' / 'base'}"], params_file=None
    )
    prompts = (cfg.paths.prepared / "prompts_val.txt").read_text().splitlines()[: args.prompts]
    jobs = [(p, i * 1000 + k) for i, p in enumerate(prompts) for k in range(args.seeds)]
    pipe = load_pipeline(cfg.model, cfg=cfg)
    adapter = DiffusionAdapter(pipe, cfg.eval_resolution)
    spm = load_spm(cfg.paths.spm_model)
    lora = Path(args.lora) if args.lora else cfg.paths.lora

    def images() -> torch.Tensor:
        out = []
        for s in range(0, len(jobs), args.batch):
            chunk = jobs[s : s + args.batch]
            gens = [torch.Generator().manual_seed(seed) for _, seed in chunk]
            lat = generate_latents(
                adapter, [p for p, _ in chunk], gens, cfg.eval.num_steps, cfg.eval.cfg_scale, eta=cfg.eval.eta
            )
            with torch.no_grad():
                out.append(adapter.decode(lat))
        return torch.cat(out)

    def scores(imgs: torch.Tensor) -> dict:
        with torch.no_grad():
            text = spm.encode_text([p for p, _ in jobs])
            spm_t0 = spm.score_with_text(imgs, text, torch.zeros(len(imgs), dtype=torch.long))
        return {"spm_t0": spm_t0, "toy_aesthetic": torch.as_tensor(toy_aesthetic(imgs)).float()}

    base = scores(images())
    _, meta = read_lora_file(lora)
    add_lora(pipe.unet, int(meta["r"]), float(meta["lora_alpha"]))
    load_lora_into(pipe.unet, lora)
    tuned = scores(images())
    result = {name: paired(base[name], tuned[name]) for name in base}
    result["setup"] = {
        "prompts": len(prompts),
        "seeds": args.seeds,
        "steps": cfg.eval.num_steps,
        "cfg_scale": cfg.eval.cfg_scale,
        "eta": cfg.eval.eta,
        "lora": str(lora),
    }
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
