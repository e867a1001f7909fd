"""Config resolution and validation: presets, params file, --set overrides, readable errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from spo.config import Config, ConfigError, load_config, parse_override

REPO = Path(__file__).resolve().parents[2]


def test_presets_carry_the_paper_recipe():
    sd15 = load_config("sd15", params_file=None)
    sdxl = load_config("sdxl", params_file=None)
    assert (sd15.spo.lora_rank, sd15.spo.lr, sd15.spo.num_candidates, sd15.spo.threshold) == (4, 6e-5, 4, 0.3)
    assert (sdxl.spo.lora_rank, sdxl.spo.lr, sdxl.spo.num_candidates, sdxl.spo.threshold) == (64, 1e-5, 2, 0.4)
    for cfg in (sd15, sdxl):
        assert (cfg.spo.beta, cfg.spo.eps, cfg.spo.divert_start_step, cfg.spo.num_steps) == (10.0, 0.1, 4, 20)
        assert (cfg.spo.eta, cfg.spo.cfg_scale, cfg.spo.kappa) == (1.0, 5.0, 750)
        assert cfg.spm.init == "yuvalkirstain/PickScore_v1"
        assert cfg.spm.processor == "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
        assert cfg.data.source == "pickapic-anonymous/pickapic_v1"
        assert cfg.registry.primary_metric == "pickscore"
    assert (sd15.spm.lr, sdxl.spm.lr) == (3e-6, 1e-6)
    assert sd15.model.pretrained == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert sdxl.model.pretrained == "stabilityai/stable-diffusion-xl-base-1.0"
    assert sdxl.model.vae == "madebyollin/sdxl-vae-fp16-fix"
    assert sdxl.spo.num_inner_steps == 4 and sd15.spo.num_inner_steps == 1
    assert sdxl.spm.relabel and not sd15.spm.relabel
    assert sd15.registered_model_name == "spo-sd15"


def test_overrides_are_typed_and_win(tmp_path):
    cfg = load_config("sd15", ["spo.lr=1e-4", "eval.scorers=[pickscore,clip]", "model.pretrained=/x/y"], params_file=None)
    assert cfg.spo.lr == pytest.approx(1e-4)
    assert cfg.eval.scorers == ["pickscore", "clip"]
    assert cfg.model.pretrained == "/x/y"


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("spo.lr=-1", "spo.lr"),
        ("spo.threshold=1.5", "spo.threshold"),
        ("spo.lora_rank=abc", "spo.lora_rank"),
        ("spo.learning_rate=1", "unknown key"),
        ("model.resolution=100", "multiple of 8"),
        ("spm.eval_timesteps=[0,1000]", "[0, 1000)"),
        ("spo.divert_start_step=20", "divert_start_step"),
        ("spm.source=weights.bin", "pretrained:"),
    ],
)
def test_invalid_values_give_readable_errors(override, fragment):
    with pytest.raises(ConfigError) as err:
        load_config("sd15", [override], params_file=None)
    message = str(err.value)
    assert fragment in message
    assert "Traceback" not in message and "pydantic" not in message.lower()


@pytest.mark.parametrize("rendering", ["spm.decoder=tiny", "spm.decode_resolution=224"])
def test_a_released_spm_is_used_only_on_the_images_it_was_trained_on(rendering):
    released = "spm.source=pretrained:SPO-Diffusion-Models/Step-Aware_Preference_Models"
    with pytest.raises(ConfigError, match="spm.decoder=vae and spm.decode_resolution=null"):
        load_config("sd15", [released, rendering], params_file=None)
    assert load_config("sd15", [released], params_file=None).spm.decode_resolution is None


def test_bad_override_syntax_and_unknown_preset():
    with pytest.raises(ConfigError, match="section.key=value"):
        parse_override("spo.lr")
    with pytest.raises(ConfigError, match="unknown preset"):
        load_config("sd3", params_file=None)


def test_params_file_applies_only_to_its_own_preset(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"preset": "tiny", "spo": {"lr": 0.123}}))
    assert load_config(None, params_file=params).spo.lr == pytest.approx(0.123)
    assert load_config("tiny", params_file=params).spo.lr == pytest.approx(0.123)
    # A params file written for the tiny world must not leak tiny values into a real preset.
    assert load_config("sd15", params_file=params).spo.lr == pytest.approx(6e-5)
    # --set beats the params file.
    assert load_config(None, ["spo.lr=0.5"], params_file=params).spo.lr == pytest.approx(0.5)


def test_params_file_errors_are_readable(tmp_path):
    bad = tmp_path / "params.yaml"
    bad.write_text("preset: tiny\nspo: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(None, params_file=bad)
    bad.write_text(yaml.safe_dump({"preset": "tiny", "spo": {"nonsense": 1}}))
    with pytest.raises(ConfigError, match=r"spo\.nonsense: unknown key"):
        load_config(None, params_file=bad)


def test_repo_params_yaml_is_the_resolved_tiny_preset():
    """params.yaml (the DVC params file) must match the tiny preset, so `dvc repro` and `make run` agree.
    Regenerate with: spo config --preset tiny --params /dev/null > params.yaml"""
    from_file = load_config(None, params_file=REPO / "params.yaml")
    from_preset = load_config("tiny", params_file=None)
    assert from_file.to_dict() == from_preset.to_dict()


def test_dump_round_trips(tmp_path):
    cfg = load_config("sdxl", ["spo.lr=2e-5"], params_file=None)
    dumped = tmp_path / "params.yaml"
    dumped.write_text(cfg.to_yaml())
    again = load_config(None, params_file=dumped)
    assert again == cfg
    assert isinstance(again, Config)
    assert cfg.flat()["spo.lr"] == pytest.approx(2e-5)
    assert cfg.section_hash("spo") != load_config("sdxl", params_file=None).section_hash("spo")
    assert cfg.section_hash("spm") == load_config("sdxl", params_file=None).section_hash("spm")


def test_cli_reports_config_errors_with_exit_code_2(capsys):
    from spo.cli import main

    assert main(["config", "--preset", "sd15", "--params", "/dev/null", "--set", "spo.lr=-3"]) == 2
    err = capsys.readouterr().err
    assert "spo.lr" in err and "greater than 0" in err


def test_yaml_1_2_like_dvc(tmp_path):
    """`dvc exp run -S` rewrites params.yaml in YAML 1.2, unquoting strings such as 'no'; we read it the same way."""
    params = tmp_path / "params.yaml"
    params.write_text("preset: tiny\nspm:\n  mixed_precision: no\nspo:\n  lr: 1e-4\n")
    cfg = load_config(None, ["spo.mixed_precision=no"], params_file=params)
    assert cfg.spm.mixed_precision == "no" and cfg.spo.mixed_precision == "no"
    assert cfg.spo.lr == pytest.approx(1e-4)
