"""HPSv2.1 against open_clip's own pipeline on a tiny open_clip model (runs where `spo[metrics]` is
installed, as in CI; the missing-extra error is tested in test_rewards.py)."""

from __future__ import annotations

import json

import pytest
import torch

open_clip = pytest.importorskip("open_clip")

TINY = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 4, "layers": 2},
}


def test_hps_scores_match_open_clip_encoders(tmp_path):
    from spo.config import load_config
    from spo.rewards import get_scorer, to_pil_images

    (tmp_path / "cfgs").mkdir()
    (tmp_path / "cfgs" / "spo-tiny-vit.json").write_text(json.dumps(TINY))
    open_clip.add_model_config(tmp_path / "cfgs")
    torch.manual_seed(0)
    model = open_clip.create_model("spo-tiny-vit", pretrained=None)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    torch.save({"state_dict": model.state_dict()}, tmp_path / "HPS_tiny.pt")
    cfg = load_config(
        "tiny", [f"eval.hps_weights={tmp_path / 'HPS_tiny.pt'}", "eval.hps_model=spo-tiny-vit"], params_file=None
    )
    images = torch.rand(4, 3, 48, 40) * 2 - 1
    prompts = ["a red circle", "a blue square on a white background", "a cat", "two green stars"]
    ours = get_scorer("hpsv21", cfg).score(images, prompts)

    _, _, preprocess = open_clip.create_model_and_transforms("spo-tiny-vit", pretrained=None)
    tokenizer = open_clip.get_tokenizer("spo-tiny-vit")
    model.eval()
    with torch.no_grad():
        pixels = torch.stack([preprocess(im) for im in to_pil_images(images)])
        img = model.encode_image(pixels, normalize=True)
        txt = model.encode_text(tokenizer(prompts), normalize=True)
    # open_clip resizes PIL images; we resize tensors (no uint8 round trip): close, not equal, on noise images.
    torch.testing.assert_close(ours, 100 * (img * txt).sum(-1), rtol=0, atol=0.1)
