"""LoRA helpers: adapter-off reference, fp32 LoRA params, diffusers-format save/load, kohya export.

Oracles: the UNet's output before any adapter was added, and stock diffusers pipelines loading the files
with ``load_lora_weights``.
"""

from __future__ import annotations

import pytest
import torch

from spo.config import ModelConfig, load_config
from spo.errors import ModelLoadError
from spo.models.diffusion import DiffusionAdapter, load_pipeline, pipeline_class
from spo.models.lora import (
    LORA_TARGETS,
    add_lora,
    load_lora_into,
    lora_parameters,
    lora_state_dict,
    reference_unet,
    save_lora,
)
from spo.sampling import generate_latents

ARCH_DIRS = {"sd15": "base", "sdxl": "base_sdxl"}


def _load(root, arch: str):
    model_cfg = ModelConfig(
        arch=arch, pretrained=str(root / "models" / ARCH_DIRS[arch]), resolution=32, dtype="fp32"
    )
    return load_pipeline(model_cfg)


def _randomise_lora(unet, seed: int = 0) -> None:
    # Gaussian init leaves lora_B = 0 (the LoRA starts as a no-op); give it weight so outputs change.
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def _unet_inputs(adapter, batch: int = 2):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(adapter.latent_shape(batch), generator=g)
    cond, _ = adapter.encode_prompts(["a red circle"] * batch)
    return x, torch.tensor([500, 300]), cond


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_reference_is_the_base_unet_with_adapters_off(tiny_models_root, arch):
    pipe = _load(tiny_models_root, arch)
    adapter = DiffusionAdapter(pipe, 32)
    x, t, cond = _unet_inputs(adapter)
    with torch.no_grad():
        base_out = adapter.unet_call(pipe.unet, x, t, cond)
    params = add_lora(pipe.unet, rank=4, alpha=8)
    _randomise_lora(pipe.unet)
    with torch.no_grad():
        policy_out = adapter.unet_call(pipe.unet, x, t, cond)
    assert not torch.allclose(policy_out, base_out, atol=1e-4)
    with reference_unet(pipe.unet) as ref:
        assert not torch.is_grad_enabled()
        ref_out = adapter.unet_call(ref, x, t, cond)
    torch.testing.assert_close(ref_out, base_out, rtol=0, atol=1e-6)
    # adapters are back on, also after an exception inside the block
    with pytest.raises(RuntimeError), reference_unet(pipe.unet):
        raise RuntimeError("boom")
    with torch.no_grad():
        torch.testing.assert_close(adapter.unet_call(pipe.unet, x, t, cond), policy_out)
    assert all(p.requires_grad for p in params)


def test_add_lora_targets_attention_projections_in_fp32(tiny_models_root):
    pipe = _load(tiny_models_root, "sd15")
    pipe.unet.to(torch.bfloat16)  # frozen weights in half precision, as on a GPU
    params = add_lora(pipe.unet, rank=4)
    names = [n for n, p in pipe.unet.named_parameters() if p.requires_grad]
    assert names and all(".lora_A." in n or ".lora_B." in n for n in names)
    modules = {n.split(".lora_")[0] for n in names}
    suffixes = {next(t for t in LORA_TARGETS if m.endswith(f".{t}")) for m in modules}
    assert suffixes == {"to_q", "to_k", "to_v", "to_out.0"}
    n_linear = sum(
        1 for n, _ in pipe.unet.named_modules() if n.endswith(tuple(f".{t}" for t in LORA_TARGETS))
    )
    assert len(params) == 2 * n_linear
    assert all(p.dtype == torch.float32 for p in params)
    assert isinstance(params, list) and params == lora_parameters(pipe.unet)
    frozen = [p for n, p in pipe.unet.named_parameters() if "lora_" not in n]
    assert all(not p.requires_grad and p.dtype == torch.bfloat16 for p in frozen)


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_saved_lora_reproduces_trainer_images_in_stock_pipeline(tiny_models_root, tmp_path, arch):
    pipe = _load(tiny_models_root, arch)
    adapter = DiffusionAdapter(pipe, 32)
    add_lora(pipe.unet, rank=4, alpha=8)  # alpha != rank: needs the adapter metadata to load right
    _randomise_lora(pipe.unet)
    lora_file = save_lora(pipe.unet, tmp_path / "lora", arch)
    assert lora_file.name == "pytorch_lora_weights.safetensors"

    prompt, steps = "a blue square on a red background", 4
    ours = generate_latents(
        adapter, [prompt], torch.Generator().manual_seed(3), steps, cfg_scale=5.0, eta=1.0
    )

    stock = pipeline_class(arch).from_pretrained(str(tiny_models_root / "models" / ARCH_DIRS[arch]))
    stock.set_progress_bar_config(disable=True)

    def stock_latents():
        return stock(
            prompt,
            num_inference_steps=steps,
            guidance_scale=5.0,
            eta=1.0,
            height=32,
            width=32,
            generator=torch.Generator().manual_seed(3),
            output_type="latent",
        ).images

    without = stock_latents()
    stock.load_lora_weights(str(tmp_path / "lora"))
    with_lora = stock_latents()
    torch.testing.assert_close(with_lora, ours, rtol=1e-4, atol=1e-4)
    assert (without - ours).abs().max() > 1e-2  # the LoRA matters


def test_load_lora_into_restores_weights(tiny_models_root, tmp_path):
    a, b = _load(tiny_models_root, "sd15"), _load(tiny_models_root, "sd15")
    add_lora(a.unet, rank=4, alpha=2)
    add_lora(b.unet, rank=4, alpha=2)
    _randomise_lora(a.unet, seed=5)
    save_lora(a.unet, tmp_path / "lora", "sd15")
    load_lora_into(b.unet, tmp_path / "lora" / "pytorch_lora_weights.safetensors")
    sa, sb = lora_state_dict(a.unet), lora_state_dict(b.unet)
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_kohya_export_round_trips_through_stock_loader(tiny_models_root, tmp_path, arch):
    from safetensors import safe_open

    from spo.stages import export

    cfg = load_config("tiny", [f"paths.root={tmp_path}", f"model.arch={arch}"], params_file=None)
    pipe = _load(tiny_models_root, arch)
    add_lora(pipe.unet, rank=4, alpha=8)
    _randomise_lora(pipe.unet, seed=2)
    save_lora(pipe.unet, cfg.paths.lora, arch)

    summary = export.run(cfg, fmt="kohya")
    out = summary["output"]
    with safe_open(out, framework="pt") as f:
        keys = list(f.keys())
        meta = f.metadata()
        alphas = {f.get_tensor(k).item() for k in keys if k.endswith(".alpha")}
    assert keys and all(k.startswith("lora_unet_") for k in keys)
    assert alphas == {8.0} and meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "8"

    def latents(lora_path):
        stock = pipeline_class(arch).from_pretrained(str(tiny_models_root / "models" / ARCH_DIRS[arch]))
        stock.set_progress_bar_config(disable=True)
        stock.load_lora_weights(str(lora_path))
        return stock(
            "a red circle",
            num_inference_steps=3,
            height=32,
            width=32,
            generator=torch.Generator().manual_seed(0),
            output_type="latent",
        ).images

    torch.testing.assert_close(latents(out), latents(cfg.paths.lora), rtol=0, atol=1e-6)


def test_missing_lora_is_a_clear_error(tmp_path):
    from spo.stages import export

    cfg = load_config("tiny", [f"paths.root={tmp_path}"], params_file=None)
    with pytest.raises(ModelLoadError, match="spo train"):
        export.run(cfg, fmt="kohya")
