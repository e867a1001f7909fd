"""The ``spo`` command. Each stage command resolves the config and calls ``spo.stages.<stage>.run``.

Heavy libraries are imported inside the commands so that ``spo --help`` answers at once.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
from collections.abc import Callable
from typing import Any

from spo.config import DEFAULT_PARAMS_FILE, PRESETS, ConfigError, load_config
from spo.errors import SPOError

EPILOG = """\
config: every command takes --preset {tiny,sd15,sdxl} and any number of --set section.key=value
(values are YAML: --set spo.lr=1e-4 --set eval.scorers=[pickscore,clip]). Without --preset the preset
named in params.yaml is used. `spo config` prints the resolved config.

examples:
  spo pipeline                                   # the whole tiny pipeline (what `make run` does)
  spo prepare --preset sd15 --set data.source=/mnt/pickapic_v1
  accelerate launch -m spo.cli train --preset sd15
  spo evaluate --preset sd15 --lora SPO-Diffusion-Models/SPO-SD-v1-5_4k-p_10ep_LoRA
  spo generate --model models:/spo-tiny@champion "a red circle on a blue background" -o out.png
"""


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", choices=PRESETS, default=None, help="config preset (default: params.yaml's)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set spo.lr=1e-4 (repeatable)",
    )
    p.add_argument("--params", default=DEFAULT_PARAMS_FILE, help="params file (default: %(default)s)")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")


# command name -> (stage module, help)
STAGES: dict[str, tuple[str, str]] = {
    "synth": ("synth", "generate the tiny world's Pick-a-Pic-format dataset (tiny preset)"),
    "base": ("base", "pretrain the tiny base model and tiny CLIP (tiny preset)"),
    "prepare": ("prepare", "validate Pick-a-Pic with Great Expectations and write data/prepared/"),
    "train-spm": ("train_spm", "train the step-aware preference model (models/spm/)"),
    "train": ("train_spo", "SPO LoRA fine-tuning (models/spo/lora/)"),
    "evaluate": ("evaluate", "paired-seed evaluation of base vs base+LoRA (reports/eval/)"),
    "register": ("register", "log the LoRA as an MLflow model version with alias 'challenger'"),
    "promote": ("promote", "move 'champion' to the challenger if it passes the gate"),
}


def _stage_extra_args(name: str, p: argparse.ArgumentParser) -> None:
    if name == "train":
        p.add_argument("--resume", default=None, metavar="latest|PATH", help="resume from a checkpoint")
    if name == "train-spm":
        p.add_argument("--resume", default=None, metavar="latest|PATH", help="resume from a checkpoint")
    if name == "evaluate":
        p.add_argument("--lora", default=None, help="LoRA folder, file or hub id (default: models/spo/lora)")
    if name == "base":
        p.add_argument("--force", action="store_true", help="retrain even if models/base is up to date")
    if name == "synth":
        p.add_argument("--force", action="store_true", help="regenerate even if the data is up to date")


def _print_result(result: Any) -> None:
    if result is None:
        return
    if isinstance(result, dict):
        print(json.dumps(result, indent=2, default=str))
    else:
        print(result)


def _run_stage(module: str, args: argparse.Namespace, extra: dict[str, Any]) -> Any:
    cfg = load_config(args.preset, args.overrides, args.params)
    stage = importlib.import_module(f"spo.stages.{module}")
    from spo import tracking

    with tracking.stage_tracker(cfg, module) as _:
        return stage.run(cfg, **extra)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="spo",
        description="Step-by-step preference optimization (SPO) for Stable Diffusion 1.5 / SDXL.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("config", help="print the resolved config as YAML")
    _add_config_args(p)

    for name, (_module, help_text) in STAGES.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        _add_config_args(p)
        _stage_extra_args(name, p)

    p = sub.add_parser("pipeline", help="run the whole pipeline as a Prefect flow (the `make run` job)")
    _add_config_args(p)

    p = sub.add_parser("generate", help="generate an image from a registered model or a LoRA")
    _add_config_args(p)
    p.add_argument("prompt", help="text prompt")
    p.add_argument("--model", default=None, help="models:/spo-<preset>@champion, a LoRA folder, or none")
    p.add_argument("-o", "--output", default="out.png", help="output PNG (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=None, help="DDIM steps (default: eval.num_steps)")

    p = sub.add_parser("export", help="export the trained LoRA for other tools (kohya for webui/ComfyUI)")
    _add_config_args(p)
    p.add_argument("--format", choices=["kohya", "diffusers"], default="kohya")
    p.add_argument("--lora", default=None, help="LoRA folder (default: models/spo/lora)")
    p.add_argument("-o", "--output", default=None, help="output .safetensors file")
    return parser


def _dispatch(args: argparse.Namespace) -> Any:
    if args.command == "config":
        cfg = load_config(args.preset, args.overrides, args.params)
        sys.stdout.write(cfg.to_yaml())
        return None
    if args.command in STAGES:
        module = STAGES[args.command][0]
        extra = {k: getattr(args, k) for k in ("resume", "lora", "force") if hasattr(args, k)}
        return _run_stage(module, args, extra)
    handlers: dict[str, Callable[[argparse.Namespace], Any]] = {
        "pipeline": _cmd_pipeline,
        "generate": _cmd_generate,
        "export": _cmd_export,
    }
    return handlers[args.command](args)


def _cmd_pipeline(args: argparse.Namespace) -> Any:
    from flows.pipeline import run_pipeline_cli

    return run_pipeline_cli(args.preset, args.overrides, args.params)


def _cmd_generate(args: argparse.Namespace) -> Any:
    from spo.stages.generate import run as generate

    cfg = load_config(args.preset, args.overrides, args.params)
    return generate(cfg, prompt=args.prompt, model=args.model, output=args.output, seed=args.seed, steps=args.steps)


def _cmd_export(args: argparse.Namespace) -> Any:
    from spo.stages.export import run as export

    cfg = load_config(args.preset, args.overrides, args.params)
    return export(cfg, fmt=args.format, lora=args.lora, output=args.output)


def main(argv: list[str] | None = None) -> int:
    from spo.utils import setup_logging

    args = build_parser().parse_args(argv)
    setup_logging(logging.DEBUG if getattr(args, "verbose", False) else logging.INFO)
    try:
        _print_result(_dispatch(args))
    except ConfigError as exc:
        print(f"spo: {exc}", file=sys.stderr)
        return 2
    except SPOError as exc:
        print(f"spo {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("spo: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
