"""The time-conditioned CLIP: identity at init, time dependence, save/load, the released-checkpoint layout."""

from __future__ import annotations

import pickle

import pytest
import torch
from spm_helpers import official_layout, perturb_time_conditioning
from transformers import CLIPModel, CLIPProcessor

from spo.errors import ModelLoadError
from spo.models.preference import TimeConditionedCLIP, load_spm, preprocess_images, save_spm

PROMPTS = ["a red circle on a blue background", "a small green square", "a", "a large yellow star top left"]


@pytest.fixture(scope="module")
def clip_dir(tiny_models_root):
    return tiny_models_root / "models" / "base" / "clip"


@pytest.fixture(scope="module")
def images():
    g = torch.Generator().manual_seed(0)
    return torch.rand(len(PROMPTS), 3, 40, 36, generator=g) * 2 - 1  # not the CLIP size: resized inside


def _plain_clip_scores(clip_dir, images, prompts):
    """The oracle: the stock transformers CLIP, its own forward and logit scale."""
    clip, proc = CLIPModel.from_pretrained(clip_dir), CLIPProcessor.from_pretrained(clip_dir)
    tok = proc.tokenizer(prompts, padding=True, return_tensors="pt")
    with torch.no_grad():
        out = clip(
            input_ids=tok.input_ids,
            attention_mask=tok.attention_mask,
            pixel_values=preprocess_images(images, proc),
        )
    return out.logits_per_image.diagonal()


def test_scores_equal_source_clip_at_init_for_every_t(clip_dir, images):
    spm = TimeConditionedCLIP.from_clip(str(clip_dir), time_embed_dim=32).eval()
    expected = _plain_clip_scores(clip_dir, images, PROMPTS)
    with torch.no_grad():
        for t in (0, 1, 250, 501, 999):
            got = spm.score(images, PROMPTS, torch.full((len(PROMPTS),), t))
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
        # Mixed timesteps within a batch, and the t=0 default.
        torch.testing.assert_close(
            spm.score(images, PROMPTS, torch.tensor([0, 300, 700, 999])), expected, atol=1e-5, rtol=1e-5
        )
        torch.testing.assert_close(spm.score(images, PROMPTS), expected, atol=1e-5, rtol=1e-5)


def test_time_conditioning_changes_scores_once_trained(clip_dir, images):
    spm = TimeConditionedCLIP.from_clip(str(clip_dir), time_embed_dim=32).eval()
    perturb_time_conditioning(spm)
    with torch.no_grad():
        s0 = spm.score(images, PROMPTS, torch.zeros(4, dtype=torch.long))
        s9 = spm.score(images, PROMPTS, torch.full((4,), 900))
        s9b = spm.score(images, PROMPTS, torch.full((4,), 900))
    assert (s0 - s9).abs().max() > 1e-3
    torch.testing.assert_close(s9, s9b)


def test_without_step_condition_every_t_scores_as_t0_and_survives_save(clip_dir, images, tmp_path):
    spm = TimeConditionedCLIP.from_clip(str(clip_dir), time_embed_dim=32).eval()
    perturb_time_conditioning(spm)  # a trained-looking modulation: t would matter if it were seen
    with torch.no_grad():
        at_zero = spm.score(images, PROMPTS, torch.zeros(4, dtype=torch.long))
        spm.step_conditioned = False
        at_900 = spm.score(images, PROMPTS, torch.full((4,), 900))
    torch.testing.assert_close(at_900, at_zero)
    loaded = load_spm(save_spm(spm, tmp_path / "spm"))
    assert loaded.step_conditioned is False
    with torch.no_grad():
        torch.testing.assert_close(loaded.score(images, PROMPTS, torch.full((4,), 500)), at_zero)


def test_score_with_text_and_pair_forward_agree_with_score(clip_dir, images):
    spm = TimeConditionedCLIP.from_clip(str(clip_dir), time_embed_dim=32).eval()
    perturb_time_conditioning(spm)
    t = torch.tensor([5, 400, 800, 999])
    with torch.no_grad():
        direct = spm.score(images, PROMPTS, t)
        via_text = spm.score_with_text(images, spm.encode_text(PROMPTS), t)
        # Pair layout: [images_0; images_1] against one copy of the prompts.
        flipped = images.flip(-1)
        pair = spm(torch.cat([images, flipped]), t.repeat(2), **spm.tokenize(PROMPTS))
        flipped_direct = spm.score(flipped, PROMPTS, t)
    torch.testing.assert_close(via_text, direct, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pair, torch.cat([direct, flipped_direct]), atol=1e-5, rtol=1e-5)


def test_text_embeddings_are_normalised(clip_dir):
    spm = TimeConditionedCLIP.from_clip(str(clip_dir), time_embed_dim=32)
    with torch.no_grad():
        emb = spm.encode_text(PROMPTS)
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(len(PROMPTS)))


def test_save_and_load_round_trip(clip_dir, images, tmp_path):
    spm = TimeConditionedCLIP.from_clip(str(clip_dir), time_embed_dim=32).eval()
    perturb_time_conditioning(spm)
    out = save_spm(spm, tmp_path / "spm", {"training_config_hash": "abc"})
    # Self-contained: the source CLIP is not needed to load it.
    loaded = load_spm(out)
    t = torch.tensor([0, 10, 500, 990])
    with torch.no_grad():
        torch.testing.assert_close(loaded.score(images, PROMPTS, t), spm.score(images, PROMPTS, t))
    assert not any(p.requires_grad for p in loaded.parameters())
    assert loaded.time_embed_dim == 32 and loaded.source == str(clip_dir)


def test_load_spm_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(ModelLoadError, match="spo train-spm"):
        load_spm(tmp_path / "nothing")


def test_gradients_reach_time_conditioning_and_clip(clip_dir, images):
    spm = TimeConditionedCLIP.from_clip(str(clip_dir), time_embed_dim=32).train()
    spm(images, torch.tensor([1, 2, 3, 4]), **spm.tokenize(PROMPTS)).sum().backward()
    grads = {n: p.grad for n, p in spm.named_parameters()}
    # Zero-initialised adaLN output layers get gradients at once; the text tower trains too.
    assert grads["block_adaln.0.1.weight"].abs().sum() > 0
    assert grads["pooled_adaln.1.weight"].abs().sum() > 0
    assert grads["clip.text_projection.weight"].abs().sum() > 0


# ---------------------------------------------------------------------------------------------------------
# The released checkpoint layout (RockeyCoss/SPO step_aware_preference_model, time_conditioned_clip.py)
# ---------------------------------------------------------------------------------------------------------
def test_released_layout_loads_with_weights_only(clip_dir, images, tmp_path):
    spm = TimeConditionedCLIP.from_clip(str(clip_dir), time_embed_dim=32).eval()
    perturb_time_conditioning(spm, seed=3)
    with torch.no_grad():
        spm.clip.logit_scale.fill_(
            3.0
        )  # differs from the source CLIP: proves CLIP weights come from the file
    ckpt = tmp_path / "sd-v1-5_step-aware_preference_model.bin"
    torch.save(official_layout(spm), ckpt)
    spm.resize_mode = "official"  # released SPMs are used with the official code's preprocessing

    loaded = load_spm(
        f"pretrained:{ckpt}", clip_ref=str(clip_dir), processor_ref=str(clip_dir), time_embed_dim=32
    )
    t = torch.tensor([0, 251, 701, 951])
    with torch.no_grad():
        torch.testing.assert_close(loaded.score(images, PROMPTS, t), spm.score(images, PROMPTS, t))
    # A folder holding the released file name works too.
    from_dir = load_spm(
        f"pretrained:{tmp_path}", clip_ref=str(clip_dir), processor_ref=str(clip_dir), time_embed_dim=32
    )
    torch.testing.assert_close(from_dir.clip.logit_scale, loaded.clip.logit_scale)


def test_released_checkpoint_with_missing_keys_lists_them(clip_dir, tmp_path):
    spm = TimeConditionedCLIP.from_clip(str(clip_dir), time_embed_dim=32)
    sd = official_layout(spm)
    del sd["model.vision_model.adaLN_modulation.1.weight"]
    del sd["model.t_embedder.mlp.0.bias"]
    sd["model.something_else.weight"] = torch.zeros(2)
    ckpt = tmp_path / "broken.bin"
    torch.save(sd, ckpt)
    with pytest.raises(ModelLoadError) as err:
        load_spm(f"pretrained:{ckpt}", clip_ref=str(clip_dir), processor_ref=str(clip_dir), time_embed_dim=32)
    msg = str(err.value)
    assert "missing keys (2)" in msg and "pooled_adaln.1.weight" in msg and "t_embedder.mlp.0.bias" in msg
    assert "unexpected keys (1)" in msg and "something_else" in msg


class _NotATensor:
    def __reduce__(self):  # unpickling this would run code; weights_only must refuse it
        return (print, ("this must never run",))


def test_released_checkpoint_with_pickled_objects_is_refused(clip_dir, tmp_path, capsys):
    ckpt = tmp_path / "evil.bin"
    with open(ckpt, "wb") as f:
        pickle.dump({"model.logit_scale": _NotATensor()}, f)
    with pytest.raises(ModelLoadError, match="weights_only=True"):
        load_spm(f"pretrained:{ckpt}", clip_ref=str(clip_dir), processor_ref=str(clip_dir))
    assert "must never run" not in capsys.readouterr().out


def test_bf16_weights_still_score_in_fp32_without_ties(clip_dir):
    # realsize SDXL (runtime.cpu_bf16): the bf16 SPM scored both candidates of its only comparison 1.046875,
    # a tie, so no pair was kept. Near-identical candidates, as the k branches of one step are.
    g = torch.Generator().manual_seed(0)
    base = torch.rand(1, 3, 64, 64, generator=g) * 2 - 1
    candidates = (base + 0.02 * torch.randn(8, 3, 64, 64, generator=g)).clamp(-1, 1)
    spm = TimeConditionedCLIP.from_clip(str(clip_dir), time_embed_dim=32).eval()
    with torch.no_grad():
        fp32 = spm.score(candidates, ["a cat"] * 8)
        spm.to(torch.bfloat16)
        bf16 = spm.score(candidates, ["a cat"] * 8)
        with_text = spm.score_with_text(candidates, spm.encode_text(["a cat"]))
    assert bf16.dtype == with_text.dtype == torch.float32
    assert len(set(bf16.tolist())) == 8  # bf16 scores (spacing 0.0625 at 8.6) took 3 distinct values
    torch.testing.assert_close(bf16, fp32, atol=0.05, rtol=0)  # bf16 weights' error, not the score's rounding
    torch.testing.assert_close(with_text, bf16)
