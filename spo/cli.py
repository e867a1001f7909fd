"""The ``spo`` command. Each stage command resolves the config and calls ``spo.stages.<stage>.run``.

The stage commands, their help and options come from :data:`spo.pipeline_spec.STAGES`; ``config``,
``pipeline``, ``generate``, ``export``, ``sweep``, ``plan``, ``launch-plan`` and ``dvc-yaml`` are written out here.

Heavy libraries are imported inside the commands so that ``spo --help`` answers at once.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Mapping
from contextlib import nullcontext
from typing import Any

from spo.config import DEFAULT_PARAMS_FILE, PRESETS, ConfigError, load_config
from spo.errors import SPOError
from spo.lock import project_lock
from spo.pipeline_spec import STAGE_BY_CLI, STAGES, StageSpec
from spo.results import log_stage_end

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
  spo sweep paper-ablations --only next-step-init  # variants x seeds of train + evaluate, one table
  spo plan --preset sd15 --gpus 4 --gpu a100      # FLOPs per stage (ours vs official) and GPU hours
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


def _add_stage_options(spec: StageSpec, p: argparse.ArgumentParser) -> None:
    for opt in spec.options:
        if opt.is_flag:
            p.add_argument(opt.flag, dest=opt.dest, action="store_true", help=opt.help)
        else:
            p.add_argument(opt.flag, dest=opt.dest, default=opt.default, metavar=opt.metavar, help=opt.help)


def _print_result(result: Any) -> None:
    if result is None:
        return
    if isinstance(result, Mapping):  # dicts and spo.results.StageResult
        print(json.dumps(dict(result), indent=2, default=str))
    else:
        print(result)


def _run_stage(spec: StageSpec, args: argparse.Namespace) -> Any:
    sets = [
        f"{o.sets}={getattr(args, o.dest)}"
        for o in spec.options
        if o.sets and getattr(args, o.dest) is not None
    ]
    cfg = load_config(args.preset, [*args.overrides, *sets], args.params)
    stage = importlib.import_module(spec.module)
    from spo import tracking

    extra = {opt.dest: getattr(args, opt.dest) for opt in spec.options if not opt.sets}
    # Under `accelerate launch` only rank 0 takes the project lock (the other ranks are part of its run).
    lock = (
        project_lock(cfg.paths.root, f"spo {spec.cli}")
        if os.environ.get("RANK", "0") == "0"
        else nullcontext()
    )
    started = time.perf_counter()
    with lock, tracking.stage_tracker(cfg, spec.name) as _:
        result = stage.run(cfg, **extra)
    if os.environ.get("RANK", "0") == "0":
        log_stage_end(spec.name, result, time.perf_counter() - started)
    return result


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

    for spec in STAGES:
        p = sub.add_parser(spec.cli, help=spec.help, description=spec.help)
        _add_config_args(p)
        _add_stage_options(spec, p)

    p = sub.add_parser("pipeline", help="run the whole pipeline as a Prefect flow (the `make run` job)")
    _add_config_args(p)
    p.add_argument(
        "--resume",
        action="store_true",
        help="training stages continue from their latest checkpoint of the same config (after a kill)",
    )
    p.add_argument(
        "--accelerate",
        action="append",
        default=[],
        metavar="STAGE=FILE",
        help="run a GPU stage (train_spm, train_spo, evaluate) under `accelerate launch --config_file FILE` "
        "(repeatable)",
    )
    p.add_argument(
        "--gpu-deployment",
        default=None,
        metavar="FLOW/DEPLOYMENT",
        help="dispatch the GPU stages to this spo-stage deployment (e.g. spo-stage/spo-stage-gpu, served by a "
        "GPU work pool's workers sharing this project root); needs PREFECT_API_URL",
    )

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

    p = sub.add_parser(
        "sweep",
        help="run a sweep (sweeps/<name>.yaml): variants x seeds of train + evaluate, one report",
        description="Run the variants x seeds of a sweep definition on this project's data, base model and SPM "
        "(run `make run` first); writes reports/sweeps/<name>/{table.md,gains.png,results.json} and one MLflow "
        "run per variant and seed under a sweep parent run. Unchanged runs are reused.",
    )
    _add_config_args(p)
    p.add_argument("name", help="sweep name (sweeps/<name>.yaml) or a path to a sweep file")
    p.add_argument(
        "--only", action="append", default=None, metavar="GROUP", help="run only this group (repeatable)"
    )
    p.add_argument("--force", action="store_true", help="rerun every run, even those already done")
    p.add_argument(
        "--prefect",
        action="store_true",
        help="run as the Prefect flow spo-sweep (logs and the table as a flow-run artifact)",
    )

    p = sub.add_parser(
        "plan",
        help="FLOPs per stage (ours vs the official algorithm) and projected GPU hours; runs nothing",
        description="Count the work of each stage for this config: UNet rows, VAE decodes and SPM forwards per "
        "prompt and per pair, FLOPs per call counted on the meta device from the real architectures, and the "
        "wall-clock on N GPUs at a stated MFU, next to the official algorithm's FLOPs (spo/plan.py).",
    )
    _add_config_args(p)
    from spo.plan import DEFAULT_KEPT_FRACTION, GPU_PEAK_TFLOPS

    p.add_argument("--gpus", type=int, default=1, help="number of GPUs (default: %(default)s)")
    p.add_argument("--gpu", choices=sorted(GPU_PEAK_TFLOPS), default="h100", help="GPU kind (default: %(default)s)")
    p.add_argument("--mfu", type=float, default=0.4, help="assumed model FLOPs utilisation (default: %(default)s)")
    p.add_argument(
        "--kept-fraction",
        type=float,
        default=DEFAULT_KEPT_FRACTION,
        help="share of comparisons whose pair passes spo.threshold (default: %(default)s, paper scale)",
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")

    p = sub.add_parser(
        "launch-plan",
        help="print the multi-node launch of a GPU stage (accelerate commands per node, or a Kubernetes Job)",
        description="Write out how to run one GPU stage on several nodes; runs nothing (spo/launch_plan.py).",
    )
    p.add_argument("stage", help="train-spm, train or evaluate")
    p.add_argument("--nodes", type=int, required=True, help="number of machines")
    p.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per machine (default: %(default)s)")
    p.add_argument("--main-ip", default=None, help="address of the rank-0 machine (accelerate commands)")
    p.add_argument("--port", type=int, default=29500, help="rendezvous port (default: %(default)s)")
    p.add_argument("--config-file", default=None, help="accelerate config (e.g. configs/accelerate/spm_zero2.yaml)")
    p.add_argument("--kubernetes", action="store_true", help="print a headless Service + Indexed Job instead")
    p.add_argument("--image", default="your-registry/spo:gpu", help="image for --kubernetes (default: %(default)s)")
    p.add_argument("--claim", default="spo-shared", help="shared PVC for --kubernetes (default: %(default)s)")
    p.add_argument("--namespace", default="default", help="namespace for --kubernetes (default: %(default)s)")
    p.add_argument(
        "--stage-args", default="", metavar="ARGS", help='arguments for the stage, e.g. "--preset sd15 --resume latest"'
    )

    p = sub.add_parser(
        "dvc-yaml",
        help="print dvc.yaml as generated from the stage graph (spo dvc-yaml > dvc.yaml)",
        description="Print dvc.yaml as generated from spo/pipeline_spec.py; --check compares it with a file.",
    )
    p.add_argument(
        "--check",
        action="store_true",
        help="exit 1 with a diff when the file differs from the generated one, instead of printing",
    )
    p.add_argument("--file", default="dvc.yaml", help="the file --check compares (default: %(default)s)")
    return parser


def _dispatch(args: argparse.Namespace) -> Any:
    if args.command == "config":
        cfg = load_config(args.preset, args.overrides, args.params)
        sys.stdout.write(cfg.to_yaml())
        return None
    if args.command in STAGE_BY_CLI:
        return _run_stage(STAGE_BY_CLI[args.command], args)
    handlers: dict[str, Callable[[argparse.Namespace], Any]] = {
        "pipeline": _cmd_pipeline,
        "generate": _cmd_generate,
        "export": _cmd_export,
        "sweep": _cmd_sweep,
        "plan": _cmd_plan,
        "launch-plan": _cmd_launch_plan,
    }
    return handlers[args.command](args)


def _cmd_pipeline(args: argparse.Namespace) -> Any:
    from flows.pipeline import run_pipeline_cli

    launch = {}
    for item in args.accelerate:
        stage, sep, path = item.partition("=")
        if not sep or not stage or not path:
            raise ConfigError(f"--accelerate takes STAGE=FILE (e.g. train_spo=configs/accelerate/multi_gpu.yaml), not {item!r}")
        launch[stage] = path
    return run_pipeline_cli(
        args.preset, args.overrides, args.params, resume=args.resume, accelerate_configs=launch,
        gpu_deployment=args.gpu_deployment,
    )


def _cmd_generate(args: argparse.Namespace) -> Any:
    from spo.stages.generate import run as generate

    cfg = load_config(args.preset, args.overrides, args.params)
    return generate(
        cfg, prompt=args.prompt, model=args.model, output=args.output, seed=args.seed, steps=args.steps
    )


def _cmd_export(args: argparse.Namespace) -> Any:
    from spo.stages.export import run as export

    cfg = load_config(args.preset, args.overrides, args.params)
    return export(cfg, fmt=args.format, lora=args.lora, output=args.output)


def _cmd_sweep(args: argparse.Namespace) -> Any:
    from spo.sweeps import run_sweep

    cfg = load_config(args.preset, args.overrides, args.params)
    if args.prefect:
        from flows.sweep import run_sweep_cli

        summary = run_sweep_cli(args.name, args.preset, args.overrides, args.params, args.only, args.force)
    else:
        with project_lock(cfg.paths.root, f"spo sweep {args.name}"):
            summary = run_sweep(cfg, args.name, only=args.only, force=args.force)
    return {
        "table": str(cfg.paths.root / "reports" / "sweeps" / summary["name"] / "table.md"),
        **_headline(summary),
    }


def _cmd_launch_plan(args: argparse.Namespace) -> None:
    import shlex

    from spo import launch_plan

    extra = tuple(shlex.split(args.stage_args))
    common = dict(port=args.port, config_file=args.config_file, spo_args=extra)
    if args.kubernetes:
        import yaml

        docs = launch_plan.kubernetes_manifests(
            args.stage, args.nodes, args.gpus_per_node, args.image, args.claim, namespace=args.namespace, **common
        )
        print(yaml.safe_dump_all(docs, sort_keys=False), end="")
        return
    if not args.main_ip:
        raise ConfigError("--main-ip HOST is needed for the accelerate commands (or use --kubernetes)")
    for rank, command in enumerate(launch_plan.node_commands(args.stage, args.nodes, args.gpus_per_node, args.main_ip, **common)):
        print(f"# node {rank}{' (rank 0: start it first, others connect to it)' if rank == 0 else ''}")
        print(command)


def _cmd_plan(args: argparse.Namespace) -> None:
    from spo.plan import format_plan, make_plan, per_call_flops

    cfg = load_config(args.preset, args.overrides, args.params)
    try:
        plan = make_plan(cfg, gpus=args.gpus, gpu=args.gpu, mfu=args.mfu, kept_fraction=args.kept_fraction)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    calls = per_call_flops(cfg)
    if args.json:
        print(json.dumps({**plan, "per_call_flops": calls}, indent=2))
    else:
        print(format_plan(plan, calls))


def _headline(summary: dict[str, Any]) -> dict[str, Any]:
    metric = summary["metric"]
    return {
        f"{g['name']}/{r['variant']}": f"{metric} gain {r['gains'][metric]['gain']:+.3f} "
        f"[{r['gains'][metric]['ci95'][0]:+.3f}, {r['gains'][metric]['ci95'][1]:+.3f}]"
        for g in summary["groups"]
        for r in g["rows"]
        if metric in r["gains"]
    }


def _cmd_dvc_yaml(args: argparse.Namespace) -> int:
    from spo.dvc_yaml import check_dvc_yaml, render_dvc_yaml

    if not args.check:
        sys.stdout.write(render_dvc_yaml())
        return 0
    problem = check_dvc_yaml(args.file)
    if problem:
        print(f"spo dvc-yaml: {problem}", file=sys.stderr, end="" if problem.endswith("\n") else "\n")
        return 1
    print(f"{args.file} is up to date")
    return 0


def main(argv: list[str] | None = None) -> int:
    from spo.utils import setup_logging

    args = build_parser().parse_args(argv)
    if args.command == "dvc-yaml":
        return _cmd_dvc_yaml(args)
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
