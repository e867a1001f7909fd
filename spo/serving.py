"""The registered model's code (MLflow *models-from-code*): base model + SPO LoRA -> images.

``spo register`` logs this file itself as the model (``mlflow.pyfunc.log_model(python_model=<this file>)``):
no pickled Python is stored. What a model version holds besides this file is data only -- the LoRA
(safetensors), the base model folder for the tiny preset, the evaluation metrics and a JSON model config --
so tampering with any of those cannot run code. The code file's sha256 is recorded as the version tag
``spo.model_code_sha256`` and :func:`spo.tracking.load_model` refuses a version whose code differs.

``predict(prompts, params)``: ``params`` = seed, num_inference_steps, guidance_scale, eta, output
(``"array"``: a list of HxWx3 uint8 arrays, the default; ``"png_base64"``: base64-encoded PNG strings, which
is what a REST client wants -- a 512 px image is ~0.4 MB of PNG instead of ~3 MB of nested lists).

This module must import without the ``spo`` package (it runs wherever the model is served): torch,
diffusers, numpy, pillow and mlflow only.
"""

from __future__ import annotations

import base64
import io

import mlflow.pyfunc


def _png_base64(image) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


class SPOLoraModel(mlflow.pyfunc.PythonModel):
    """``predict(prompts) -> images`` from the base model with the SPO LoRA (see the module docstring)."""

    def load_context(self, context):
        import torch
        from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

        cfg = context.model_config
        device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(cfg["dtype"], torch.float32)
        dtype = dtype if device == "cuda" else torch.float32
        cls = StableDiffusionXLPipeline if cfg["arch"] == "sdxl" else StableDiffusionPipeline
        kwargs = {"dtype": dtype}
        if cfg["arch"] == "sd15":
            kwargs.update(safety_checker=None, requires_safety_checker=False)
        if cfg.get("revision"):
            kwargs["revision"] = cfg["revision"]
        if cfg.get("vae"):
            kwargs["vae"] = AutoencoderKL.from_pretrained(cfg["vae"], dtype=dtype)
        pipe = cls.from_pretrained(context.artifacts.get("base") or cfg["pretrained"], **kwargs)
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
        pipe.load_lora_weights(context.artifacts["lora"], adapter_name="spo")
        pipe.set_progress_bar_config(disable=True)
        self.pipe = pipe.to(device)
        self.cfg = cfg

    def predict(self, context, model_input, params=None):
        import torch

        # No type hints on purpose: with them MLflow would run a full generation at registration to infer
        # the output schema. The explicit signature hands prompts over as a one-column frame.
        prompts = model_input.iloc[:, 0].tolist() if hasattr(model_input, "iloc") else list(model_input)
        params = {**self.cfg["defaults"], **(params or {})}
        generator = torch.Generator(device="cpu").manual_seed(int(params["seed"]))
        out = self.pipe(
            [str(p) for p in prompts],
            num_inference_steps=int(params["num_inference_steps"]),
            guidance_scale=float(params["guidance_scale"]),
            eta=float(params["eta"]),
            height=self.cfg["resolution"],
            width=self.cfg["resolution"],
            generator=generator,
            output_type="np",
        )
        images = list((out.images * 255).round().clip(0, 255).astype("uint8"))
        if params.get("output") == "png_base64":
            return [_png_base64(image) for image in images]
        return images


mlflow.models.set_model(SPOLoraModel())
