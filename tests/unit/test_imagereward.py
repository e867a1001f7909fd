"""ImageReward on transformers' BLIP, checked against the original ImageReward code.

The tiny checkpoint (released ``ImageReward.pt`` layout) is built by our own code from fixed seeds
(tests/imagereward_tiny.py); tests/data/imagereward_tiny_reference.json holds the scores the ORIGINAL code
(github.com/THUDM/ImageReward, run in a scratch venv by tests/data/imagereward_original_scores.py; recipe in
docs/METRICS.md) gave for the same checkpoint, images and prompts.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import imagereward_tiny as tiny  # noqa: E402

REFERENCE = Path(__file__).resolve().parents[1] / "data" / "imagereward_tiny_reference.json"
# Float32 on both sides; identical here, a little slack for other CPUs/thread counts.
ATOL = 2e-6  # observed: 0.0; a LayerNorm eps of 1e-5 instead of 1e-6 alone moves scores by 1.1e-5


def write_case(folder: Path) -> Path:
    """Checkpoint + tokenizer + PNG images + prompts: the input of both our scorer and the original code."""
    from PIL import Image

    tiny.write_checkpoint(folder)
    state = torch.load(folder / "ImageReward.pt", weights_only=True)
    (folder / "checksum.json").write_text(json.dumps({"checkpoint_checksum": tiny.checkpoint_checksum(state)}))
    for i, arr in enumerate(tiny.images_uint8()):
        Image.fromarray(arr).save(folder / f"img{i}.png")
    (folder / "prompts.json").write_text(json.dumps(tiny.PROMPTS))
    return folder


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    return write_case(tmp_path_factory.mktemp("imagereward"))


def _cfg(case: Path, weights: str | None = None):
    from spo.config import load_config

    return load_config(
        "tiny",
        [
            f"eval.imagereward_model={weights or case / 'ImageReward.pt'}",
            f"eval.imagereward_tokenizer={case / 'tokenizer'}",
        ],
        params_file=None,
    )


def _pngs_as_tensors(case: Path) -> list:
    from PIL import Image

    from spo.rewards import to_tensor_images

    return [to_tensor_images(Image.open(f)) for f in sorted(case.glob("img*.png"))]


def test_checkpoint_is_the_one_the_reference_was_made_from():
    ref = json.loads(REFERENCE.read_text())
    assert tiny.checkpoint_checksum(tiny.released_state_dict()) == pytest.approx(ref["checkpoint_checksum"], rel=1e-9)


def test_scores_match_original_imagereward(case):
    from spo.rewards import get_scorer

    ref = json.loads(REFERENCE.read_text())
    scorer = get_scorer("imagereward", _cfg(case))
    # Images of different sizes: one call each (the scorer batches within a call).
    ours = torch.cat([scorer(img, [p]) for img, p in zip(_pngs_as_tensors(case), tiny.PROMPTS, strict=True)])
    expected = torch.tensor(ref["scores"], dtype=torch.float32)
    assert expected.std() > 0.05  # the reference is not degenerate (scores differ between cases)
    torch.testing.assert_close(ours, expected, rtol=0, atol=ATOL)


def test_batched_equals_single_and_folder_ref(case):
    from spo.rewards import get_scorer

    # Same-size images in one batch (padding to 35 tokens makes batching exact up to float rounding).
    scorer = get_scorer("imagereward", _cfg(case, weights=str(case)))  # a folder holding ImageReward.pt
    imgs = torch.rand(3, 3, 40, 36) * 2 - 1
    prompts = tiny.PROMPTS[:3]
    batched = scorer(imgs, prompts)
    single = torch.cat([scorer(imgs[i : i + 1], [p]) for i, p in enumerate(prompts)])
    torch.testing.assert_close(batched, single, rtol=0, atol=1e-5)
    # The prompt matters (cross-attention is wired): swapping prompts changes scores.
    assert not torch.allclose(batched, scorer(imgs, prompts[::-1]), atol=1e-4)


def test_released_layout_round_trip_and_missing_weights(case, tmp_path):
    from spo.errors import ModelLoadError
    from spo.rewards.imagereward import load_released, map_released_state_dict, to_released_state_dict

    model = load_released(case / "ImageReward.pt", case / "med_config.json")
    saved = torch.load(case / "ImageReward.pt", weights_only=True)
    again = to_released_state_dict(model)
    assert set(again) == set(saved)
    assert all(torch.equal(again[k], saved[k]) for k in saved)
    assert set(map_released_state_dict(saved)) == set(model.state_dict())

    broken = {k: v for k, v in saved.items() if ".crossattention." not in k}
    torch.save(broken, tmp_path / "ImageReward.pt")
    (tmp_path / "med_config.json").write_text((case / "med_config.json").read_text())
    with pytest.raises(ModelLoadError, match="lacks"):
        load_released(tmp_path / "ImageReward.pt", tmp_path / "med_config.json")


def test_missing_med_config_is_a_clear_error(case, tmp_path):
    from spo.errors import ModelLoadError
    from spo.rewards import get_scorer

    (tmp_path / "ImageReward.pt").write_bytes((case / "ImageReward.pt").read_bytes())
    with pytest.raises(ModelLoadError, match="med_config.json is missing"):
        get_scorer("imagereward", _cfg(case, weights=str(tmp_path / "ImageReward.pt")))
