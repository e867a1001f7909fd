"""`spo evaluate` and `spo generate` on random tiny models: paired seeds, resume, reports, clear errors.

Oracles: the stock diffusers pipeline called image by image with ``torch.Generator().manual_seed(seed)``,
the tiny world's closed-form aesthetic recomputed from the saved PNGs, and numpy means over the per-image
table.
"""

from __future__ import annotations

import json
import shutil
import sys

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from spo_test_helpers import make_cfg

from spo import generation
from spo.errors import MissingExtraError, ModelLoadError, SPOError
from spo.models.lora import load_lora_into_pipeline, resolve_lora
from spo.rewards import resolve_local_refs
from spo.stages import evaluate, generate

PROMPTS = [
    "a small red circle on a blue background at the center",
    "a large yellow square on a black background at the top left",
    "a small green star on a white background at the bottom right",
]
FAST = [
    "eval.num_prompts=3",
    "eval.num_images_per_prompt=2",
    "eval.num_steps=4",
    "eval.batch_size=4",
    "eval.bootstrap_samples=200",
    "eval.scorers=[toy_aesthetic,clip,pickscore]",
    "eval.grid_prompts=2",
    "tracking.enabled=false",
]


METRIC_KEYS = {"base_mean", "spo_mean", "diff_mean", "diff_ci95", "win_rate", "win_rate_ci95", "n"}


def write_lora(pipe, out_dir, seed: int, scale: float = 0.3):
    """A diffusers-format UNet LoRA with random (non-zero) weights, made with the stock peft/diffusers API."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    unet = pipe.unet
    unet.add_adapter(
        LoraConfig(
            r=4,
            lora_alpha=4,
            init_lora_weights="gaussian",
            target_modules=["to_q", "to_k", "to_v", "to_out.0"],
        )
    )
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * scale)
    StableDiffusionPipeline.save_lora_weights(
        str(out_dir),
        unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(unet)),
        safe_serialization=True,
        unet_lora_adapter_metadata=unet.peft_config["default"].to_dict(),
    )
    unet.delete_adapters("default")
    return out_dir / "pytorch_lora_weights.safetensors"


@pytest.fixture(scope="module")
def project_template(tmp_path_factory, tiny_models_root):
    """Random tiny SD-1.5 + CLIP, a validation prompt list and a random LoRA at models/spo/lora."""
    from spo.models.diffusion import load_pipeline

    root = tmp_path_factory.mktemp("eval_project")
    shutil.copytree(tiny_models_root / "models" / "base", root / "models" / "base")
    cfg = make_cfg(root, *FAST)
    cfg.paths.prepared.mkdir(parents=True)
    (cfg.paths.prepared / "prompts_val.txt").write_text("\n".join(PROMPTS) + "\n")
    write_lora(load_pipeline(resolve_local_refs(cfg).model), cfg.paths.lora.parent / "lora", seed=0)
    return root


@pytest.fixture
def project(tmp_path, project_template):
    root = tmp_path / "p"
    shutil.copytree(project_template, root)
    return root


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory, project_template):
    """One full evaluation, shared by the read-only checks below."""
    root = tmp_path_factory.mktemp("evaluated") / "p"
    shutil.copytree(project_template, root)
    cfg = make_cfg(root, *FAST)
    return cfg, evaluate.run(cfg)


def _pixels(path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB")).astype(np.int16)


# -- seeds and batching ---------------------------------------------------------------------------------
def test_seed_rule():
    assert generation.image_seed(0, 0, 0) == 0
    assert generation.image_seed(3, 12, 7) == 3_000_012_007
    jobs = generation.make_jobs(PROMPTS, 4, eval_seed=1)
    assert len({j.seed for j in jobs}) == 12
    with pytest.raises(ValueError):
        generation.image_seed(0, 0, 1000)


def test_batched_generation_matches_single_stock_calls(project):
    """One generator per image: a batch gives the images the stock pipeline draws one seed at a time, and
    the same seed gives the same image on every call."""
    from spo.models.diffusion import load_pipeline

    cfg = make_cfg(project, *FAST)
    pipe = load_pipeline(resolve_local_refs(cfg).model)
    proto = generation.protocol(cfg)
    seeds = [11, 12, 13]
    batch = generation.sample_images(pipe, PROMPTS, seeds, proto)
    for prompt, seed, image in zip(PROMPTS, seeds, batch, strict=True):
        stock = pipe(
            prompt,
            num_inference_steps=4,
            guidance_scale=5.0,
            eta=0.0,
            height=32,
            width=32,
            generator=torch.Generator().manual_seed(seed),
        ).images[0]
        assert np.abs(np.asarray(image).astype(int) - np.asarray(stock).astype(int)).max() <= 1
    # The same call twice gives identical images (across batch sizes only up to float rounding, checked above:
    # with several threads, matmul blocking depends on the batch size).
    again = generation.sample_images(pipe, PROMPTS, seeds, proto)
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(again, batch, strict=True))
    other = generation.sample_images(pipe, PROMPTS[:1], [99], proto)[0]
    assert not np.array_equal(np.asarray(other), np.asarray(batch[0]))


# -- the stage ----------------------------------------------------------------------------------------------
def test_evaluate_writes_paired_reports(evaluated):
    cfg, summary = evaluated
    out = cfg.paths.eval_reports
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) == {"toy_aesthetic", "clip", "pickscore", "_protocol"}
    table = pd.read_parquet(out / "per_image.parquet")
    assert len(table) == 6 and sorted(table["prompt_index"].unique()) == [0, 1, 2]
    for name in ("toy_aesthetic", "clip", "pickscore"):
        m = metrics[name]
        assert set(m) == METRIC_KEYS and m["n"] == 6
        diff = table[f"{name}_spo"] - table[f"{name}_base"]
        assert m["diff_mean"] == pytest.approx(diff.mean())
        assert m["base_mean"] == pytest.approx(table[f"{name}_base"].mean())
        wins = (diff > 0) + 0.5 * (diff == 0)
        assert m["win_rate"] == pytest.approx(wins.mean())
        assert m["diff_ci95"][0] <= m["diff_mean"] <= m["diff_ci95"][1]
    assert metrics["_protocol"]["num_prompts"] == 3 and metrics["_protocol"]["images_per_prompt"] == 2
    assert summary["images"]["generated"] == {"base": 6, "spo": 6}

    # The stored toy scores are the closed-form aesthetic of the saved PNGs.
    from spo.data.synthetic import toy_aesthetic

    for side in ("base", "spo"):
        images = [Image.open(cfg.paths.root / f) for f in table[f"{side}_file"]]
        np.testing.assert_allclose(toy_aesthetic(images), table[f"toy_aesthetic_{side}"], atol=1e-5)

    # Paired: base and SPO images of a row share prompt and seed; the LoRA changed the images.
    base_px = [_pixels(cfg.paths.root / f) for f in table["base_file"]]
    spo_px = [_pixels(cfg.paths.root / f) for f in table["spo_file"]]
    assert any(np.abs(b - s).max() > 8 for b, s in zip(base_px, spo_px, strict=True))
    manifests = [
        sorted(
            (e["prompt"], e["seed"]) for e in map(json.loads, (d / "manifest.jsonl").read_text().splitlines())
        )
        for d in sorted(cfg.paths.eval_images.iterdir())
    ]
    assert len(manifests) == 2 and manifests[0] == manifests[1]
    assert sorted(s for _, s in manifests[0]) == sorted(
        generation.image_seed(0, p, k) for p in range(3) for k in range(2)
    )

    grid = Image.open(out / "grid.png")
    assert grid.size == (220 + 2 * (2 * 96 + 4), 24 + 2 * 96)  # 2 prompts x 2 seeds of (base, SPO) tiles
    table_md = (out / "table.md").read_text()
    assert "| toy_aesthetic |" in table_md and "tiny world is synthetic" in table_md
    assert (out / "diffs.png").stat().st_size > 0 and (out / "diffs.csv").exists()


def test_base_images_are_the_stock_pipeline_images(evaluated):
    """Same seed -> identical base image across two independent calls (the stage's and a fresh stock one)."""
    from spo.models.diffusion import load_pipeline

    cfg, _ = evaluated
    table = pd.read_parquet(cfg.paths.eval_reports / "per_image.parquet")
    pipe = load_pipeline(resolve_local_refs(cfg).model)
    row = table.iloc[3]
    stock = pipe(
        row["prompt"],
        num_inference_steps=4,
        guidance_scale=5.0,
        height=32,
        width=32,
        generator=torch.Generator().manual_seed(int(row["seed"])),
    ).images[0]
    assert np.abs(_pixels(cfg.paths.root / row["base_file"]) - np.asarray(stock).astype(np.int16)).max() <= 1


def test_generate_reproduces_evaluation_images(evaluated, tmp_path):
    cfg, _ = evaluated
    row = pd.read_parquet(cfg.paths.eval_reports / "per_image.parquet").iloc[1]
    seed = int(row["seed"])
    lora_out = generate.run(
        cfg, row["prompt"], model=str(cfg.paths.lora), output=tmp_path / "spo.png", seed=seed
    )
    base_out = generate.run(cfg, row["prompt"], output=tmp_path / "base.png", seed=seed)
    assert lora_out["steps"] == 4 and base_out["lora_file"] is None
    assert np.abs(_pixels(tmp_path / "spo.png") - _pixels(cfg.paths.root / row["spo_file"])).max() <= 1
    assert np.abs(_pixels(tmp_path / "base.png") - _pixels(cfg.paths.root / row["base_file"])).max() <= 1
    with pytest.raises(SPOError, match=".png"):
        generate.run(cfg, "a red circle", output=tmp_path / "x.jpg")


@pytest.mark.slow
def test_resume_reuses_images_and_regenerates_only_missing_ones(project):
    cfg = make_cfg(project, *FAST)
    first = evaluate.run(cfg)
    assert first["images"]["generated"] == {"base": 6, "spo": 6}
    assert evaluate.run(cfg)["images"]["generated"] == {"base": 0, "spo": 0}

    table = pd.read_parquet(cfg.paths.eval_reports / "per_image.parquet")
    removed = {side: cfg.paths.root / table[f"{side}_file"].iloc[4] for side in ("base", "spo")}
    before = {side: _pixels(p) for side, p in removed.items()}
    for p in removed.values():
        p.unlink()
    assert evaluate.run(cfg)["images"]["generated"] == {"base": 1, "spo": 1}
    for side, p in removed.items():
        assert np.abs(_pixels(p) - before[side]).max() <= 1  # regenerated alone, same image as in the batch

    # The same LoRA file elsewhere has the same content hash: nothing new. Another LoRA: new SPO images only.
    copy = project / "elsewhere" / "my_lora.safetensors"
    copy.parent.mkdir()
    shutil.copy(cfg.paths.lora / "pytorch_lora_weights.safetensors", copy)
    assert evaluate.run(cfg, lora=str(copy))["images"]["generated"] == {"base": 0, "spo": 0}
    from spo.models.diffusion import load_pipeline

    other = write_lora(load_pipeline(resolve_local_refs(cfg).model), project / "other_lora", seed=1)
    assert evaluate.run(cfg, lora=str(other.parent))["images"]["generated"] == {"base": 0, "spo": 6}


def test_missing_extra_fails_before_generation_or_is_skipped_when_asked(project, monkeypatch):
    monkeypatch.setitem(sys.modules, "open_clip", None)
    cfg = make_cfg(project, *FAST, "eval.scorers=[toy_aesthetic,hpsv21]")
    with pytest.raises(MissingExtraError, match=r"EXTRAS=dev,metrics"):
        evaluate.run(cfg)
    assert not cfg.paths.eval_images.exists()  # failed before generating anything

    cfg = make_cfg(project, *FAST, "eval.scorers=[toy_aesthetic,hpsv21]", "eval.skip_unavailable=true")
    evaluate.run(cfg)
    metrics = json.loads((cfg.paths.eval_reports / "metrics.json").read_text())
    assert "hpsv21" not in metrics and metrics["_protocol"]["skipped_scorers"] == ["hpsv21"]


def test_failed_scoring_leaves_previous_reports_intact(project):
    cfg = make_cfg(project, *FAST)
    evaluate.run(cfg)
    before = (cfg.paths.eval_reports / "metrics.json").read_bytes()
    bad = make_cfg(
        project,
        *FAST,
        "eval.scorers=[toy_aesthetic,aesthetic]",
        f"eval.aesthetic_weights={project}/missing.pth",
    )
    with pytest.raises(ModelLoadError, match="eval.aesthetic_weights"):
        evaluate.run(bad)
    assert (cfg.paths.eval_reports / "metrics.json").read_bytes() == before


def test_missing_or_bad_lora_is_a_clear_error(project, capsys):
    cfg = make_cfg(project, *FAST)
    shutil.rmtree(cfg.paths.lora)
    with pytest.raises(SPOError, match="spo train"):
        evaluate.run(cfg)

    from spo.cli import main

    argv = [
        "evaluate",
        "--preset",
        "tiny",
        "--params",
        "/dev/null",
        "--set",
        f"paths.root={project}",
        *[a for item in FAST for a in ("--set", item)],
        "--lora",
        str(project / "no_such_lora"),
    ]
    assert main(argv) != 0
    err = capsys.readouterr().err
    assert "no_such_lora" in err and "Traceback" not in err


def test_sdxl_generation_is_paired_and_takes_a_lora(tiny_models_root, tmp_path):
    """The same code path serves SDXL: batched = single-seed images, and a LoRA loads and changes them."""
    from diffusers import StableDiffusionXLPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from spo.models.diffusion import load_pipeline

    cfg = make_cfg(
        tmp_path, *FAST, "model.arch=sdxl", f"model.pretrained={tiny_models_root}/models/base_sdxl"
    )
    pipe = load_pipeline(cfg.model)
    proto = generation.protocol(cfg)
    seeds = [5, 6]
    batch = generation.sample_images(pipe, PROMPTS[:2], seeds, proto)
    single = generation.sample_images(pipe, PROMPTS[1:2], seeds[1:], proto)[0]
    assert np.abs(np.asarray(batch[1]).astype(int) - np.asarray(single).astype(int)).max() <= 1

    unet = pipe.unet
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3, generator=torch.Generator().manual_seed(0))
    StableDiffusionXLPipeline.save_lora_weights(
        str(tmp_path / "xl_lora"),
        unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(unet)),
        unet_lora_adapter_metadata=unet.peft_config["default"].to_dict(),
    )
    fresh = load_pipeline(cfg.model)
    load_lora_into_pipeline(fresh, resolve_lora(str(tmp_path / "xl_lora"), cfg))
    with_lora = generation.sample_images(fresh, PROMPTS[:1], seeds[:1], proto)[0]
    assert np.abs(np.asarray(with_lora).astype(int) - np.asarray(batch[0]).astype(int)).max() > 8
