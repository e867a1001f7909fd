"""The evaluation table puts a run beside the papers' numbers for its preset."""

from __future__ import annotations

from spo.config import load_config
from spo.eval_report import markdown_table


def _metrics():
    entry = {
        "base_mean": 20.5,
        "spo_mean": 21.0,
        "diff_mean": 0.5,
        "diff_ci95": [0.3, 0.7],
        "win_rate": 0.7,
        "win_rate_ci95": [0.6, 0.8],
        "n": 2000,
    }
    info = {
        "base_model": "stable-diffusion-v1-5/stable-diffusion-v1-5",
        "lora": "x",
        "lora_sha256": "ab" * 32,
        "num_prompts": 500,
        "images_per_prompt": 4,
        "num_steps": 20,
        "cfg_scale": 5.0,
        "eta": 0.0,
        "resolution": 512,
        "seed": 0,
        "bootstrap_samples": 2000,
        "skipped_scorers": [],
    }
    return {"pickscore": entry, "_protocol": info}, info


def test_sd15_table_lists_the_papers_numbers_beside_the_run():
    metrics, info = _metrics()
    text = markdown_table(load_config("sd15", params_file=None), metrics, info)
    assert "| pickscore | 20.5 | 21 | 0.5 * | [0.3, 0.7] | 0.700 | [0.600, 0.800] | 2000 |" in text
    assert "| **this run** | base | 20.5 | - | - | - |" in text
    assert "| **this run** | SPO (LoRA) | 21 | - | - | - |" in text
    # SPO Table 2 and LPO's re-evaluation, SD-1.5 rows.
    assert "Table 2 | SPO | 21.43 | 26.45 | 0.1712 | 5.887 |" in text
    assert "| SPO | 21.22 | 25.83 | 0.1678 | 5.927 |" in text
    assert "23.06" not in text  # SDXL numbers stay out of an SD-1.5 table


def test_sdxl_and_tiny_tables():
    metrics, info = _metrics()
    sdxl = markdown_table(load_config("sdxl", params_file=None), metrics, info)
    assert "Table 1 | SPO | 23.06 | 31.8 | 1.0803 | 6.364 |" in sdxl and "21.43" not in sdxl
    tiny = markdown_table(load_config("tiny", params_file=None), metrics, info)
    assert "tiny world is synthetic" in tiny and "21.43" not in tiny


def test_tiny_table_marks_scorers_that_run_on_the_projects_own_clip_as_stand_ins():
    metrics, info = _metrics()
    metrics = {"toy_aesthetic": metrics["pickscore"], **metrics}
    tiny = markdown_table(load_config("tiny", params_file=None), metrics, info)
    assert "| pickscore † | 20.5 |" in tiny
    assert "| toy_aesthetic | 20.5 |" in tiny  # the world's ground truth is no stand-in
    assert "`pickscore` on `models/base/clip`" in tiny and "not human preference" in tiny
    # The real presets score with published weights: no mark, no note.
    sd15 = markdown_table(load_config("sd15", params_file=None), metrics, info)
    assert "†" not in sd15
    # A tiny-preset user who points pickscore at real weights loses the mark.
    real = load_config("tiny", ["eval.pickscore_model=yuvalkirstain/PickScore_v1"], params_file=None)
    assert "†" not in markdown_table(real, metrics, info)
