"""Fault injection, part 5: numerical faults. An exploded run fails (exit code of NonFiniteError) and
publishes nothing; an exploded or NaN LoRA file is refused by evaluation and generation."""

from __future__ import annotations

import pytest
import torch
from spo_standin import BrightnessScorer
from test_train_spo import spo_cfg

from spo.errors import NonFiniteError
from spo.models.lora import check_lora_weights, read_lora_file
from spo.stages import train_spo


@pytest.mark.parametrize(
    "steps, words",
    [
        # one optimizer step: the weights are finite but ~1e9 -- the explosion gate catches it
        (["spo.train_batch_size=64"], "exploded: a weight of magnitude"),
        # several steps: the loss turns NaN and the non-finite guard stops the run
        ([], "non-finite loss"),
    ],
)
def test_an_exploding_learning_rate_fails_and_writes_no_lora(tmp_path, tiny_models_root, steps, words):
    cfg = spo_cfg(tmp_path, tiny_models_root, "spo.lr=1e9", "spo.threshold=0.0", *steps)
    with pytest.raises(NonFiniteError, match=words) as err:
        train_spo.run(cfg, scorer=BrightnessScorer())
    assert err.value.exit_code == 5
    assert not cfg.paths.lora.exists()
    assert not (cfg.paths.reports / "spo_train.json").exists()


@pytest.mark.parametrize("poison, words", [(float("nan"), "NaN/inf"), (1e9, "exploded")])
def test_a_broken_lora_file_is_refused(tmp_path, tiny_models_root, poison, words):
    from e2e_helpers import make_lora, project_cfg
    from safetensors.torch import save_file

    cfg = project_cfg(tmp_path, "sqlite:///unused.db")
    cfg.paths.base_model.parent.mkdir(parents=True, exist_ok=True)
    import shutil

    shutil.copytree(tiny_models_root / "models" / "base", cfg.paths.base_model)
    path = make_lora(cfg, seed=0)
    check_lora_weights(path)  # a healthy one passes
    tensors, _ = read_lora_file(path)
    first = next(iter(tensors))
    tensors[first] = torch.full_like(tensors[first], poison)
    save_file(tensors, str(path))
    with pytest.raises(NonFiniteError, match=words):
        check_lora_weights(path)
