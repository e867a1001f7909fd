"""bench/gpu/check.sh --dry-run: the GPU check runs end to end on the CPU at toy sizes, so it cannot rot before
a GPU is lent (issue #10 item 3)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SECTIONS = ("env", "sd15_spo", "sd15_eval", "spm_train", "sd15_agreement", "sdxl_spo", "sdxl_eval",
            "sdxl_agreement")


def run_check(out: Path, *extra: str) -> dict:
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(["bash", str(REPO / "bench/gpu/check.sh"), "--dry-run", "--out", str(out), *extra],
                          env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "no wheel install" in proc.stdout  # the packages are installed here: the carried wheels are not needed
    return json.loads((out / "gpu_check.json").read_text())


def numbers(section: dict) -> dict[str, float]:
    return {k: v for k, v in section.items() if isinstance(v, int | float)}


def test_dry_run_measures_every_section(tmp_path):
    data = run_check(tmp_path)
    secs = data["sections"]
    assert list(secs) == list(SECTIONS)
    for name, sec in secs.items():
        assert sec["status"] == "ok", (name, sec.get("traceback", sec["status"]))
        bad = {k: v for k, v in numbers(sec).items() if not math.isfinite(v)}
        assert not bad, (name, bad)
    # Nothing the GPU machine lacks (and that no wheel carries) was imported.
    assert data["meta"]["not_on_device_imported"] == []

    for arch in ("sd15", "sdxl"):
        spo = secs[f"{arch}_spo"]
        assert spo["all_steps_finite"] == 1
        assert spo["training_tflop_per_pair"] > 0 and 0 < spo["training_mfu_vs_matmul"]
        assert 0 < spo["sampling_share_of_iteration"] < 1
        assert spo["iteration_s_projected"] > spo["sampling_s_per_iteration"]
        # On the CPU the "bf16" variants compute in fp32 (no CPU autocast): the same pairs through the same
        # arithmetic must agree exactly, so any difference would mean the variants saw different inputs.
        agree = secs[f"{arch}_agreement"]
        for variant in ("bf16_autocast", "bf16_weights"):
            assert agree[f"{variant}_logp_max_abs_diff"] == 0.0
            assert agree[f"{variant}_loss_max_abs_diff"] == 0.0
            assert agree[f"{variant}_margin_sign_agreement"] == 1.0
        assert agree["fp32_log_ratio_abs_mean"] > 0  # the perturbed LoRA makes policy != reference
        assert secs[f"{arch}_eval"]["generation_images_per_s"] > 0
    # 1 prompt, 4 DDIM steps branching from step 1 (t = 501, 251, 1 are all <= kappa), threshold 0: the
    # SD-1.5 sampler compares at 3 steps and keeps all 3 pairs.
    assert secs["sd15_spo"]["pairs_per_iteration"] == 3
    assert secs["spm_train"]["batch_size"] == 2 and secs["spm_train"]["losses_finite"] == 1

    table = (tmp_path / "gpu_check.md").read_text()
    assert all(f"| {name} | ok |" in table for name in SECTIONS)


def test_sections_that_do_not_fit_the_budget_are_skipped(tmp_path):
    data = run_check(tmp_path, "--budget-s", "0.5")  # spent by the imports before the first section
    assert {s["status"] for s in data["sections"].values()} == {"skipped: time budget"}
    assert list(data["sections"]) == list(SECTIONS)
