"""Scorers on tiny stand-ins of their real architectures, checked against hand computations and against
transformers' own CLIP forward pass (the stock PIL processor path) as an independent oracle."""

from __future__ import annotations

import math
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from spo.errors import MissingExtraError, ModelLoadError, SPOError
from spo.hub import local_file_or_download
from spo.rewards import SCORER_NAMES, get_scorer, to_pil_images, to_tensor_images

PROMPTS = ["a red circle on a blue background", "a small green square at the top", "a large star"]


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    from spo.models.tiny import build_tiny_clip

    d = tmp_path_factory.mktemp("clip")
    model, processor = build_tiny_clip(seed=1)
    model.save_pretrained(d)
    processor.save_pretrained(d)
    return d


@pytest.fixture
def cfg(tiny_cfg, clip_dir):
    return tiny_cfg.model_copy(
        update={
            "eval": tiny_cfg.eval.model_copy(
                update={
                    "clip_model": str(clip_dir),
                    "pickscore_model": str(clip_dir),
                    "pickscore_processor": str(clip_dir),
                    "aesthetic_clip_model": str(clip_dir),
                }
            )
        }
    )


def _pil_batch(n=3, size=32, seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(n)]


def _stock_clip_logits(clip_dir, pils, prompts):
    """Oracle: transformers' CLIPModel forward on the CLIPProcessor's PIL preprocessing."""
    from transformers import CLIPModel, CLIPProcessor

    model = CLIPModel.from_pretrained(clip_dir).eval()
    processor = CLIPProcessor.from_pretrained(clip_dir)
    inputs = processor(text=prompts, images=pils, return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model(**inputs)
    return out.logits_per_image.diagonal(), model.logit_scale.exp().item()


# -- image conversion --------------------------------------------------------------------------------
def test_image_conversions_are_exact():
    pils = _pil_batch(2)
    x = to_tensor_images(pils)
    assert x.shape == (2, 3, 32, 32) and x.dtype == torch.float32
    raw = np.asarray(pils[0]).astype(np.float64)
    np.testing.assert_allclose(x[0].permute(1, 2, 0).numpy(), raw / 127.5 - 1, atol=1e-6)
    nhwc = np.stack([np.asarray(p) for p in pils])
    assert torch.equal(to_tensor_images(nhwc), x)
    assert torch.equal(to_tensor_images(torch.from_numpy(nhwc).permute(0, 3, 1, 2)), x)
    back = to_pil_images(x)
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(back, pils, strict=True))
    assert to_tensor_images(x) is x  # float input is taken as [-1, 1] already
    with pytest.raises(ValueError, match="uint8"):
        to_tensor_images(nhwc.astype(np.int32))


# -- CLIP score and PickScore --------------------------------------------------------------------------
def test_clip_score_and_pickscore_match_stock_clip_forward(cfg, clip_dir):
    pils = _pil_batch(3)
    logits, logit_scale = _stock_clip_logits(clip_dir, pils, PROMPTS)
    cos = logits / logit_scale
    clip_scores = get_scorer("clip", cfg)(pils, PROMPTS)
    pick_scores = get_scorer("pickscore", cfg)(pils, PROMPTS)
    assert clip_scores.shape == (3,) and clip_scores.dtype == torch.float32
    torch.testing.assert_close(clip_scores, 100 * cos, atol=1e-3, rtol=1e-4)
    torch.testing.assert_close(pick_scores, logits, atol=1e-3, rtol=1e-4)


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_clip_score_of_identical_embeddings(cfg, sign):
    """Zero LayerNorm gains make both towers output their bias; equal (or opposite) projections then give
    identical (or opposite) embeddings for any input: cos = +-1, so CLIP score = +-100 and PickScore =
    +-exp(logit_scale)."""
    scorers = [get_scorer(n, cfg) for n in ("clip", "pickscore")]
    for scorer in scorers:
        m = scorer.model
        with torch.no_grad():
            for ln in (m.vision_model.post_layernorm, m.text_model.final_layer_norm):
                ln.weight.zero_()
                ln.bias.fill_(1.0)
            m.text_projection.weight.copy_(sign * m.visual_projection.weight)
            m.logit_scale.fill_(math.log(30.0))
    images = to_tensor_images(_pil_batch(2, seed=3))
    torch.testing.assert_close(scorers[0].score(images, PROMPTS[:2]), torch.full((2,), 100.0 * sign))
    torch.testing.assert_close(scorers[1].score(images, PROMPTS[:2]), torch.full((2,), 30.0 * sign))


def test_missing_clip_names_the_config_key(cfg, tmp_path):
    bad = cfg.model_copy(update={"eval": cfg.eval.model_copy(update={"clip_model": str(tmp_path / "nope")})})
    with pytest.raises(ModelLoadError, match="eval.clip_model"):
        get_scorer("clip", bad)


# -- LAION aesthetic ---------------------------------------------------------------------------------------
def _hand_mlp(dim):
    """An MLP whose output is 2 * e[0] + 0.5: each layer passes unit 0 on, the last doubles and shifts."""
    from spo.rewards.aesthetic import AestheticMLP

    mlp = AestheticMLP(dim)
    with torch.no_grad():
        for layer in mlp.layers:
            if isinstance(layer, torch.nn.Linear):
                layer.weight.zero_()
                layer.bias.zero_()
                layer.weight[0, 0] = 1.0
        mlp.layers[-1].weight[0, 0] = 2.0
        mlp.layers[-1].bias[0] = 0.5
    return mlp


def test_aesthetic_mlp_on_a_fixed_embedding():
    from spo.rewards.aesthetic import AestheticMLP

    mlp = _hand_mlp(4).eval()
    e = torch.tensor([[0.6, 0.8, 0.0, 0.0], [-0.5, 0.5, 0.5, 0.5]])
    torch.testing.assert_close(mlp(e), torch.tensor([1.7, -0.5]))
    # The published layout: Linear layers at indices 0, 2, 4, 6, 7 (what the .pth files' keys name).
    assert sorted(AestheticMLP(768).state_dict()) == sorted(
        f"layers.{i}.{p}" for i in (0, 2, 4, 6, 7) for p in ("weight", "bias")
    )


def test_aesthetic_scorer_loads_pth_and_uses_normalised_clip_embeddings(cfg, clip_dir, tmp_path):
    from transformers import CLIPModel, CLIPProcessor

    from spo.rewards.aesthetic import AestheticMLP

    torch.manual_seed(0)
    mlp = AestheticMLP(64)
    weights = tmp_path / "aesthetic.pth"
    torch.save(mlp.state_dict(), weights)
    scorer_cfg = cfg.model_copy(
        update={"eval": cfg.eval.model_copy(update={"aesthetic_weights": str(weights)})}
    )
    pils = _pil_batch(3, seed=5)
    got = get_scorer("aesthetic", scorer_cfg)(pils, PROMPTS)

    # Oracle: stock processor + CLIP image features, L2-normalised, through the linear MLP in float64.
    model = CLIPModel.from_pretrained(clip_dir).eval()
    pixels = CLIPProcessor.from_pretrained(clip_dir)(images=pils, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        emb = model.get_image_features(pixel_values=pixels).pooler_output.double()
    emb = emb / emb.norm(dim=-1, keepdim=True)
    x = emb
    for layer in mlp.layers:
        if isinstance(layer, torch.nn.Linear):
            x = x @ layer.weight.double().T + layer.bias.double()
    torch.testing.assert_close(got.double(), x.squeeze(-1), atol=1e-4, rtol=1e-4)


def test_aesthetic_weights_of_the_wrong_size_are_refused(cfg, tmp_path):
    from spo.rewards.aesthetic import AestheticMLP

    weights = tmp_path / "l14.pth"
    torch.save(AestheticMLP(768).state_dict(), weights)
    bad = cfg.model_copy(update={"eval": cfg.eval.model_copy(update={"aesthetic_weights": str(weights)})})
    with pytest.raises(ModelLoadError, match="64-d"):
        get_scorer("aesthetic", bad)


def test_uncached_hub_weights_fail_with_the_fix(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="huggingface-cli download"):
        local_file_or_download("spo-test-owner/no-such-repo:weights.pth", "aesthetic predictor")
    with pytest.raises(ModelLoadError, match="eval.aesthetic_weights"):
        local_file_or_download("missing/file.pth", "aesthetic predictor", config_key="eval.aesthetic_weights")


# -- toy aesthetic and SPM --------------------------------------------------------------------------------
def test_toy_aesthetic_on_hand_checkable_images(cfg):
    """Flat images have no contrast and no grain, so the score is W_CHROMA * chroma - OFFSET with chroma =
    (max - min) / 255 of the colour (weights: the tiny world's, spo/data/synthetic.py)."""
    from spo.data.synthetic import OFFSET, W_CHROMA

    colours = [(255, 0, 0), (128, 128, 128), (200, 100, 100)]
    images = [Image.fromarray(np.full((32, 32, 3), c, np.uint8)) for c in colours]
    scores = get_scorer("toy_aesthetic", cfg)(images, PROMPTS)
    expected = torch.tensor([W_CHROMA * (max(c) - min(c)) / 255 - OFFSET for c in colours])
    torch.testing.assert_close(scores, expected, atol=1e-5, rtol=0)


def test_spm_scorer_at_t0_equals_its_source_clip(cfg, clip_dir):
    """A freshly initialised SPM is exactly its source CLIP (zero-init adaLN): its t=0 score must equal the
    stock CLIP's logits."""
    from spo.models.preference import TimeConditionedCLIP, save_spm

    save_spm(TimeConditionedCLIP.from_clip(str(clip_dir), time_embed_dim=16), cfg.paths.spm_model)
    pils = _pil_batch(3, seed=9)
    logits, _ = _stock_clip_logits(clip_dir, pils, PROMPTS)
    torch.testing.assert_close(get_scorer("spm", cfg)(pils, PROMPTS), logits, atol=1e-3, rtol=1e-4)


def test_spm_scorer_without_a_trained_spm(cfg):
    with pytest.raises(ModelLoadError, match="spo train-spm"):
        get_scorer("spm", cfg)


# -- optional extras and the registry ------------------------------------------------------------------------
@pytest.mark.parametrize(("name", "module", "extra"), [("hpsv21", "open_clip", "metrics")])
def test_missing_optional_extra_names_the_pip_extra(cfg, monkeypatch, name, module, extra):
    monkeypatch.setitem(sys.modules, module, None)  # import fails as if not installed
    with pytest.raises(MissingExtraError, match=rf"make install EXTRAS=dev,{extra}") as err:
        get_scorer(name, cfg)
    assert module in str(err.value)


def test_registry_names_and_unknown_scorer(cfg):
    assert set(SCORER_NAMES) == {
        "toy_aesthetic",
        "spm",
        "clip",
        "pickscore",
        "aesthetic",
        "hpsv21",
        "imagereward",
    }
    with pytest.raises(SPOError, match="unknown scorer"):
        get_scorer("fid", cfg)
    from spo.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="unknown scorer"):
        load_config("tiny", ["eval.scorers=[pickscore,fid]"], params_file=None)


def test_score_batched_matches_one_batch(cfg):
    scorer = get_scorer("clip", cfg)
    pils = _pil_batch(5, seed=11)
    prompts = (PROMPTS * 2)[:5]
    torch.testing.assert_close(
        scorer.score_batched(pils, prompts, batch_size=2), scorer(pils, prompts), atol=1e-4, rtol=0
    )
