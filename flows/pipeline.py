"""The Prefect flow: ``synth`` + ``base`` (tiny only) -> ``prepare`` -> ``train_spm`` -> ``train_spo`` ->
``evaluate`` -> ``register`` -> ``promote``, one thin task per stage over ``spo.stages.<name>.run``.

What the orchestration adds, and nothing else (stage logic lives in spo/stages):

* **Caching** on the stage's inputs, as declared in :mod:`spo.pipeline_spec`: the key hashes the config
  ``sections`` that shape the stage's output, the content (``spo.utils.hash_tree``) of the artifacts it
  ``reads`` and of the local models its config names (``model_refs``; hub ids by name), its declared
  ``code`` files and the project root, so an unchanged SPM is not retrained. A cached result also records
  the hash of the stage's outputs (``writes`` + ``reports``); when those were deleted or changed since (a
  manual ``spo train``, ``make clean``), the stage runs again instead of trusting the cache. Register and promote talk to the registry and never cache.
* **Retries** (``StageSpec.retries``) with exponential backoff only for failures that can be transient
  (network, timeouts, a busy tracking store); a :class:`~spo.errors.SPOError` -- bad data
  (``DataValidationError``), a missing model, NaNs -- fails at once.
* **Lineage**: one MLflow parent run per flow run, a nested run per stage (spo.tracking).
* **Artifacts**: a markdown summary (data card, SPM accuracy by t, evaluation table with CIs, registry
  decision, MLflow link) and table artifacts, on the flow run's Artifacts tab.

Without ``PREFECT_API_URL`` the flow runs against Prefect's ephemeral local server; with it, against that
server (``prefect server start`` or Prefect Cloud). ``spo pipeline`` calls :func:`run_pipeline_cli`.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.tasks import exponential_backoff

from spo import tracking
from spo.config import DEFAULT_PARAMS_FILE, Config, load_config
from spo.errors import DataValidationError, SPOError
from spo.lock import project_lock
from spo.pipeline_spec import STAGE_BY_NAME, STAGES, StageSpec, artifact_path, repo_root, stages_for
from spo.results import StageResult, log_stage_end
from spo.utils import atomic_write_json, hash_tree, json_digest

FLOW_NAME = "spo-pipeline"


# -- the stages (declared in spo/pipeline_spec.py) ------------------------------------------------------
def _config_value(cfg: Config, dotted: str) -> Any:
    value: Any = cfg
    for part in dotted.split("."):
        value = getattr(value, part)
    return value


def stage_inputs(stage: StageSpec, cfg: Config) -> list[Path | str]:
    """What the stage's result depends on besides config and code: the artifacts it reads (by content) and
    the models/data its config names (``model_refs``; local folders by content, hub ids by name)."""
    out: list[Path | str] = [artifact_path(cfg, name) for name in stage.reads]
    for key in stage.model_refs:
        ref = _config_value(cfg, key)
        if ref:
            out.append(tracking.local_model_dir(cfg, ref) or str(ref))
    seen: set[str] = set()
    unique: list[Path | str] = []
    for item in out:  # the tiny preset's model.pretrained is models/base, also a read: hash it once
        ident = str(Path(item).resolve()) if isinstance(item, Path) else f"ref:{item}"
        if ident not in seen:
            seen.add(ident)
            unique.append(item)
    return unique


def _code_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    return sorted(
        f for f in path.rglob("*") if f.is_file() and "__pycache__" not in f.parts and f.suffix != ".pyc"
    )


def code_hash(stage: StageSpec, root: Path | None = None) -> str:
    """Content hash of the stage's declared ``code`` (paths relative to the repository root): editing
    spo/stats.py invalidates evaluate's cache and nothing else."""
    root = Path(root or REPO_ROOT)
    h = hashlib.sha256()
    for rel in stage.code:
        path = root / rel
        if not path.exists():
            h.update(f"absent:{rel}".encode())
            continue
        for f in _code_files(path):
            h.update(f.relative_to(root).as_posix().encode())
            h.update(f.read_bytes())
    return h.hexdigest()[:16]


REPO_ROOT = repo_root()  # where StageSpec.code paths are read (tests point it at a copy)


def _hash_paths(items: list[Path | str]) -> list[str]:
    return [hash_tree(p) if isinstance(p, Path) and p.exists() else f"absent:{p}" for p in items]


def launch_fingerprint(accelerate_config: str | Path) -> dict[str, Any]:
    """What an accelerate config changes in a stage's result: its settings (comments aside) -- above all
    ``num_processes`` and ``num_machines``, which set the batch per step -- and the DeepSpeed JSON it names."""
    import yaml

    path = Path(accelerate_config)
    try:
        settings = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        return {"config": f"unreadable:{path}:{type(exc).__name__}"}
    if not isinstance(settings, dict):
        return {"config": f"not a mapping:{path}"}
    out: dict[str, Any] = {
        "num_processes": settings.get("num_processes"),
        "num_machines": settings.get("num_machines"),
        "settings": json_digest(settings, 16),
    }
    deepspeed = settings.get("deepspeed_config")
    ds_file = deepspeed.get("deepspeed_config_file") if isinstance(deepspeed, dict) else None
    if ds_file:  # accelerate resolves it from the working directory, as this does
        out["deepspeed_config"] = _hash_paths([Path(ds_file)])[0]
    return out


def cache_key(stage: StageSpec, cfg: Config, accelerate_config: str | Path | None = None) -> str:
    """``accelerate_config``: the stage runs under ``accelerate launch`` with it (its process count shapes
    the result: pairs per optimizer step, data per process)."""
    payload = {
        "stage": stage.name,
        "config": cfg.section_hash(*stage.sections),
        "inputs": _hash_paths(stage_inputs(stage, cfg)),
        "code": code_hash(stage),
        "root": str(Path(cfg.paths.root).resolve()),
    }
    if accelerate_config:  # absent in-process, so those keys stay what they were
        payload["launch"] = launch_fingerprint(accelerate_config)
    return f"spo-{stage.name}-" + json_digest(payload, 24)


def outputs_hash(stage: StageSpec, cfg: Config) -> str:
    return json_digest(_hash_paths(stage.output_paths(cfg)), None)


# -- retries -------------------------------------------------------------------------------------------
_TRANSIENT_NAMES = {
    "ConnectionError",
    "ConnectTimeout",
    "ReadTimeout",
    "Timeout",
    "TimeoutException",
    "RemoteDisconnected",
    "ProtocolError",
    "ChunkedEncodingError",
    "TransportError",
}
_TRANSIENT_MODULES = ("requests", "urllib3", "httpx", "http", "socket", "aiohttp")


def is_transient(exc: BaseException | None) -> bool:
    """Worth a retry: a network failure, a timeout, a busy tracking store, a 429/5xx from a server.

    Walks the exception's cause chain (a ModelLoadError wrapping a dropped connection is transient); a
    DataValidationError never is.
    """
    seen = 0
    while exc is not None and seen < 10:
        if isinstance(exc, DataValidationError):
            return False
        if isinstance(exc, ConnectionError | TimeoutError):
            return True
        cls = type(exc)
        if cls.__name__ in _TRANSIENT_NAMES and cls.__module__.split(".")[0] in _TRANSIENT_MODULES:
            return True
        status = getattr(getattr(exc, "response", None), "status_code", None)  # requests/httpx/hub errors
        if status is None and callable(getattr(exc, "get_http_status_code", None)):  # MlflowException
            status = exc.get_http_status_code()
        if isinstance(status, int) and (status == 429 or status >= 500):
            return True
        if "database is locked" in str(exc):
            return True
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return False


def _retry_if_transient(task_, task_run, state) -> bool:
    exc = state.result(raise_on_failure=False)
    transient = is_transient(exc if isinstance(exc, BaseException) else None)
    if not transient:
        get_run_logger().info("%s failed with a non-transient error; not retrying", task_run.name)
    return transient


# -- tasks ---------------------------------------------------------------------------------------------
def _launch_with_accelerate(
    stage_name: str, cfg: Config, accelerate_config: str, resume: bool = False
) -> dict[str, Any]:
    """Run a stage on several GPUs/nodes: ``accelerate launch -m spo.cli <stage>`` with this exact config,
    its MLflow run nested under the pipeline's run. The stage's own error is in the log above the failure."""
    with tempfile.TemporaryDirectory(prefix="spo-launch-") as tmp:
        params = Path(tmp) / "params.yaml"
        params.write_text(cfg.to_yaml())  # carries `preset`, so the CLI applies every value
        cmd = [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--config_file",
            accelerate_config,
            "-m",
            "spo.cli",
            STAGE_BY_NAME[stage_name].cli,
            "--params",
            str(params),
            *(["--resume", "latest"] if resume else []),
        ]
        env = {**os.environ, "SPO_PARENT_RUN_ID": tracking.pipeline_run_id() or ""}
        get_run_logger().info("%s: %s", stage_name, " ".join(cmd))
        proc = subprocess.run(cmd, env=env, check=False)
    if proc.returncode:
        raise SPOError(
            f"{stage_name} failed under accelerate launch (exit code {proc.returncode}); its error is in the "
            "log above. Fix it and run the flow again (finished stages come from the cache)."
        )
    return {"launched": cmd[2:]}


def _execute(
    stage_name: str, cfg: Config, accelerate_config: str | None = None, resume: bool = False
) -> dict[str, Any]:
    """Run one stage under its MLflow run; return its summary (a plain dict) and the hash of what it wrote.

    ``resume``: stages that take ``--resume`` continue from their latest checkpoint of the same config (a
    fresh start when there is none): ``spo pipeline --resume`` after a kill."""
    stage = STAGE_BY_NAME[stage_name]
    resumable = resume and any(o.dest == "resume" for o in stage.options)
    if accelerate_config:
        result = _launch_with_accelerate(stage_name, cfg, accelerate_config, resumable)
    else:
        module = importlib.import_module(stage.module)
        started = time.perf_counter()
        with tracking.stage_tracker(cfg, stage_name):
            result = module.run(cfg, **({"resume": "latest"} if resumable else {}))
        log_stage_end(stage_name, result, time.perf_counter() - started)
    if isinstance(result, StageResult):
        result = result.to_dict()
    elif isinstance(result, Mapping):
        result = dict(result)
    return {"result": result, "outputs_hash": outputs_hash(stage, cfg)}


def _stage_task(stage: StageSpec):
    # No Prefect result persistence: Prefect stores results as pickles (code execution from a tampered
    # result store). The stage cache is spo's own JSON records (StageCache below).
    return task(
        _execute,
        name=stage.name,
        task_run_name=stage.name,
        tags=("spo", *stage.tags),
        cache_policy=NO_CACHE,
        persist_result=False,
        retries=stage.retries,
        retry_delay_seconds=exponential_backoff(backoff_factor=10),
        retry_jitter_factor=0.5,
        retry_condition_fn=_retry_if_transient,
    )


@task(name="cached", task_run_name="{stage_name} (cached)", tags=("spo", "cached"), persist_result=False)
def _cached_stage(stage_name: str, key: str, recorded: str) -> None:
    """Makes a cache hit visible in the Prefect UI (a stage that did no work)."""
    get_run_logger().info("%s: up to date (cache key %s, recorded %s); not run", stage_name, key, recorded)


class StageCache:
    """The stage cache: one strict-JSON record per cache key under ``<root>/.spo/cache/``, holding the
    stage's result and the hash of its outputs. Data only: a tampered or corrupt record is a cache miss,
    never code. A record counts only while the outputs it recorded are still on disk unchanged."""

    def __init__(self, root: str | Path):
        self.dir = Path(root) / ".spo" / "cache"

    def path(self, key: str) -> Path:
        return self.dir / f"{key}.json"

    def get(self, key: str) -> dict[str, Any] | None:
        path = self.path(key)
        if not path.exists():
            return None
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
            ok = (
                isinstance(record, dict)
                and record.get("key") == key
                and isinstance(record.get("result"), dict)
            )
        except (OSError, ValueError) as exc:
            ok, record = False, str(exc)
        if not ok:
            get_run_logger().warning(
                "ignoring an unreadable stage-cache record %s (%s)", path, str(record)[:200]
            )
            return None
        return record

    def put(self, key: str, stage: str, out: dict[str, Any]) -> None:
        atomic_write_json(
            self.path(key),
            {"key": key, "stage": stage, "recorded": time.strftime("%Y-%m-%d %H:%M:%S"), **out},
        )


STAGE_TASKS = {s.name: _stage_task(s) for s in STAGES if not s.registry}

# Registry calls: retried on a flaky tracking server; safe to repeat (registration is idempotent).
registry_task = task(
    _execute,
    name="registry",
    task_run_name="{stage_name}",
    tags=("spo", "registry"),
    cache_policy=NO_CACHE,
    persist_result=False,
    retries=3,
    retry_delay_seconds=exponential_backoff(backoff_factor=5),
    retry_condition_fn=_retry_if_transient,
)


def run_stage(
    stage: StageSpec,
    cfg: Config,
    accelerate_config: str | None = None,
    resume: bool = False,
    deployment: str | None = None,
) -> dict[str, Any]:
    """The stage's task, skipped when the cache holds a record for its key whose outputs are still on disk.

    ``deployment``: run it as a flow run of that ``spo-stage`` deployment (another work pool, e.g. GPU
    workers) instead of in this process, and wait for it; its record in the shared stage cache is the result.
    """
    started = time.monotonic()
    cache = StageCache(cfg.paths.root)
    key = cache_key(stage, cfg, accelerate_config)
    record = cache.get(key)
    if record is not None and record.get("outputs_hash") == outputs_hash(stage, cfg):
        _cached_stage(stage.name, key, str(record.get("recorded")))
        out, cached = {"result": record["result"], "outputs_hash": record["outputs_hash"]}, True
    else:
        if record is not None:
            get_run_logger().info(
                "%s: cached result, but its outputs changed on disk; running it again", stage.name
            )
        if deployment:
            out, cached = dispatch_stage(stage, cfg, deployment, accelerate_config, resume, key), False
        else:
            out, cached = STAGE_TASKS[stage.name](stage.name, cfg, accelerate_config, resume), False
            cache.put(key, stage.name, out)
    return {**out, "cached": cached, "seconds": round(time.monotonic() - started, 1)}


def dispatch_stage(
    stage: StageSpec, cfg: Config, deployment: str, accelerate_config: str | None, resume: bool, key: str
) -> dict[str, Any]:
    """Run ``stage`` as a flow run of the ``spo-stage`` deployment ``deployment`` and wait for it.

    The child gets the resolved config itself (no params file on its worker needed) and nests its MLflow run
    under this pipeline's. Both sides must see the project root at the same path (a shared volume) and run
    the same spo code: the child's stage-cache record under ``key`` is how its result comes back."""
    from prefect.deployments import run_deployment

    parameters = {
        "stage": stage.name,
        "config": cfg.to_dict(),
        "accelerate_config": accelerate_config,
        "resume": resume,
        "parent_run_id": tracking.pipeline_run_id(),
    }
    get_run_logger().info("%s: dispatched to deployment %s", stage.name, deployment)
    child = run_deployment(deployment, parameters=parameters, timeout=None)
    if not child.state or not child.state.is_completed():
        state = child.state.name if child.state else "unknown"
        raise SPOError(
            f"{stage.name} ended {state} on deployment {deployment} (flow run {child.name}, {child.id}): "
            f"{child.state.message if child.state else ''}. Its log is on that flow run; fix it and run the "
            "pipeline again (finished stages come from the cache)."
        )
    record = StageCache(cfg.paths.root).get(key)
    if record is None:
        raise SPOError(
            f"{stage.name} completed on deployment {deployment} (flow run {child.name}) but left no result "
            f"under {StageCache(cfg.paths.root).dir.resolve()}: its worker must see this project root at "
            "the same path (a shared volume) and run the same spo version."
        )
    return {"result": record["result"], "outputs_hash": record["outputs_hash"], "flow_run": str(child.id)}


# -- the flow ------------------------------------------------------------------------------------------
@flow(name=FLOW_NAME, log_prints=True, validate_parameters=True, persist_result=False)
def spo_pipeline(
    preset: str | None = "tiny",
    overrides: list[str] | None = None,
    params_file: str | None = DEFAULT_PARAMS_FILE,
    accelerate_configs: dict[str, str] | None = None,
    resume: bool = False,
    gpu_deployment: str | None = None,
) -> dict[str, Any]:
    """Run the whole SPO pipeline; returns the summary (also published as Prefect artifacts).

    ``preset``/``overrides``/``params_file`` resolve the config as ``spo <stage> --preset P --set k=v
    --params F`` does (``preset=None``: the params file's). ``accelerate_configs`` maps GPU stages
    (train_spm, train_spo, evaluate) to an accelerate config file; those stages then run under
    ``accelerate launch`` on all the worker's GPUs instead of in the flow's process. ``resume``: training
    stages continue from their latest checkpoint of the same config (after a kill). ``gpu_deployment``
    (e.g. ``spo-stage/spo-stage-gpu``): the GPU stages run as flow runs of that deployment of
    :func:`spo_stage` (a GPU work pool) while the rest run here (deploy this flow on a CPU pool); both
    pools' workers share the project root at the same path.

    The flow holds the project lock (spo/lock.py) throughout: a second pipeline or stage in the same
    project directory is refused with the holder's name instead of mixing checkpoints and outputs.
    """
    cfg = load_config(preset, overrides or [], params_file)
    with project_lock(cfg.paths.root, f"spo pipeline ({cfg.preset})"), stage_logs_to_prefect():
        return _pipeline(cfg, accelerate_configs or {}, resume, gpu_deployment)


STAGE_FLOW_NAME = "spo-stage"


@flow(name=STAGE_FLOW_NAME, flow_run_name="{stage}", log_prints=True, persist_result=False)
def spo_stage(
    stage: str,
    config: dict[str, Any],
    accelerate_config: str | None = None,
    resume: bool = False,
    parent_run_id: str | None = None,
) -> dict[str, Any]:
    """One pipeline stage as its own flow run, dispatched by :func:`spo_pipeline` (``gpu_deployment``).

    ``config`` is the pipeline's resolved config. No project lock here: the dispatching pipeline holds it
    for the whole run. The stage's MLflow run nests under ``parent_run_id``; its result goes to the shared
    stage cache, where the pipeline reads it."""
    from pydantic import ValidationError

    spec = STAGE_BY_NAME.get(stage)
    if spec is None or spec.registry:
        runnable = ", ".join(s.name for s in STAGES if not s.registry)
        raise SPOError(f"spo-stage runs one of {runnable}, not {stage!r}")
    try:
        cfg = Config.model_validate(config)
    except ValidationError as exc:
        raise SPOError(f"spo-stage {stage}: the config sent by the pipeline does not validate: {exc}") from None
    # Through the tracking stack, not the environment: an `accelerate launch`ed stage gets it from there too.
    with tracking.nested_under(parent_run_id), stage_logs_to_prefect():
        out = run_stage(spec, cfg, accelerate_config, resume)
    return {"stage": stage, "cached": out["cached"], "seconds": out["seconds"]}


@contextlib.contextmanager
def stage_logs_to_prefect():
    """Route the stages' ``spo.*`` loggers through Prefect's own handlers (console + API: the worker's
    console and the flow run's Logs tab), as ``PREFECT_LOGGING_EXTRA_LOGGERS=spo`` would -- that setting is
    read when Prefect configures logging, which a worker has done before it loads this flow. Not propagated
    meanwhile, so a line is printed once, in Prefect's format."""
    spo_logger = logging.getLogger("spo")
    added = [h for h in logging.getLogger("prefect.extra").handlers if h not in spo_logger.handlers]
    saved = (spo_logger.propagate, spo_logger.level)
    for handler in added:
        spo_logger.addHandler(handler)
    if added:
        spo_logger.propagate = False
        if spo_logger.getEffectiveLevel() > logging.INFO:
            spo_logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        for handler in added:
            spo_logger.removeHandler(handler)
        spo_logger.propagate = saved[0]
        spo_logger.setLevel(saved[1])


def _pipeline(cfg: Config, launch: dict[str, str], resume: bool, gpu_deployment: str | None = None) -> dict[str, Any]:
    from prefect.runtime import flow_run

    started = time.monotonic()
    logger = get_run_logger()
    stages = stages_for(cfg)
    gpu_stages = [s.name for s in STAGES if s.gpu]
    unknown = sorted(set(launch) - set(gpu_stages))
    if unknown:
        raise SPOError(f"accelerate_configs: {unknown} are not GPU stages ({', '.join(gpu_stages)})")
    logger.info(
        "preset %s, root %s, stages: %s",
        cfg.preset,
        Path(cfg.paths.root).resolve(),
        ", ".join(s.name for s in stages),
    )
    tracking.init_store(cfg)  # create the store's schema once, before any stage opens a run
    results: dict[str, Any] = {}
    with tracking.pipeline_run(
        cfg, tags={"prefect.flow_run_id": str(flow_run.id), "prefect.flow_run_name": str(flow_run.name)}
    ) as parent:
        for stage in stages:
            if stage.registry:  # register, promote: below, never cached
                continue
            deployment = gpu_deployment if stage.gpu else None
            results[stage.name] = run_stage(stage, cfg, launch.get(stage.name), resume, deployment)
            logger.info("%s: %s", stage.name, "cached" if results[stage.name]["cached"] else "done")
        registered = registry_task("register", cfg)["result"]
        decision = registry_task("promote", cfg)["result"]
        summary = build_summary(cfg, results, registered, decision, parent.run_id, time.monotonic() - started)
        parent.log_metrics(headline_metrics(summary))
        parent.set_tags(
            {"registry.version": registered["version"], "registry.decision": decision["decision"]}
        )
        parent.log_dict(summary, artifact_path(cfg, "pipeline_summary").name)
        parent.log_text(summary_markdown(summary), "pipeline_summary.md")
    atomic_write_json(artifact_path(cfg, "pipeline_summary"), summary)
    publish_artifacts(summary)
    return summary


# -- summary -------------------------------------------------------------------------------------------
def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def build_summary(
    cfg: Config, results, registered, decision, parent_run_id: str | None, seconds: float
) -> dict[str, Any]:
    spm = _read_json(artifact_path(cfg, "spm_metrics"))
    metrics = _read_json(artifact_path(cfg, "eval_metrics"))
    card = _read_json(artifact_path(cfg, "data_card"))
    spo_train = _read_json(artifact_path(cfg, "spo_summary"))
    mlflow_info: dict[str, Any] = {"tracking_uri": tracking.display_uri(cfg), "ui": tracking.ui_command(cfg)}
    if parent_run_id:
        exp = tracking.experiment_id_of(parent_run_id)
        mlflow_info.update(
            run_id=parent_run_id, experiment_id=exp, url=tracking.run_url(parent_run_id, exp, cfg)
        )
    return {
        "preset": cfg.preset,
        "seconds": round(seconds, 1),
        "summary_file": str(artifact_path(cfg, "pipeline_summary")),
        "stages": {name: {"cached": r["cached"], "seconds": r["seconds"]} for name, r in results.items()},
        "outputs": {
            "prepared": str(artifact_path(cfg, "prepared")),
            "spm": str(artifact_path(cfg, "spm_model")),
            "lora": str(artifact_path(cfg, "lora")),
            "eval": str(artifact_path(cfg, "eval_reports")),
            "grid": str(artifact_path(cfg, "eval_grid")),
        },
        "data_card": data_card_view(card),
        "spm_accuracy": {
            "accuracy": spm.get("accuracy", {}),
            "initial_accuracy": spm.get("initial_accuracy", {}),
        },
        "eval": {k: v for k, v in metrics.items() if not k.startswith("_")},
        "spo_training": {k: spo_train[k] for k in ("pairs_trained", "kept_fraction") if k in spo_train},
        "primary_metric": cfg.registry.primary_metric,
        "registry": {
            **registered,
            **{k: decision[k] for k in ("decision", "promoted", "champion", "reason")},
        },
        "mlflow": mlflow_info,
    }


def data_card_view(card: dict[str, Any]) -> dict[str, Any]:
    """The few lines of data/prepared/data_card.json worth a glance."""
    counts = card.get("counts", {})
    view: dict[str, Any] = {"source": card.get("source", {}).get("ref")}
    for table in ("spm_train", "spm_val"):
        c = counts.get(table, {})
        if c:
            view[table] = f"{c.get('pairs')} pairs ({c.get('ties')} ties, {c.get('captions')} captions)"
    for prompts in ("prompts_train", "prompts_val"):
        if prompts in counts:
            view[prompts] = f"{counts[prompts].get('written')} prompts"
    validation = card.get("validation", {})
    if validation:
        view["validation"] = (
            f"{'passed' if validation.get('success') else 'FAILED'} ({validation.get('evaluated_expectations')} expectations)"
        )
    return {k: v for k, v in view.items() if v is not None}


def headline_metrics(summary: dict[str, Any]) -> dict[str, float]:
    out: dict[str, float] = {"pipeline/seconds": summary["seconds"]}
    for name, s in summary.get("stages", {}).items():
        out[f"stage/{name}/seconds"] = s["seconds"]
    for name, m in summary["eval"].items():
        out[f"eval/{name}/diff_mean"] = m["diff_mean"]
        # The interval says whether a difference between two runs' gains is more than noise.
        out[f"eval/{name}/diff_ci95_low"], out[f"eval/{name}/diff_ci95_high"] = m["diff_ci95"]
        out[f"eval/{name}/win_rate"] = m["win_rate"]
    for key, value in summary.get("spo_training", {}).items():
        out[f"spo/{key}"] = value
    for t, acc in summary["spm_accuracy"]["accuracy"].items():
        out[f"spm/accuracy_t{t}"] = acc
    return out


def eval_rows(summary: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for name, m in summary["eval"].items():
        low, high = m["diff_ci95"]
        rows.append(
            {
                "scorer": name + (" (primary)" if name == summary["primary_metric"] else ""),
                "base": round(m["base_mean"], 4),
                "spo": round(m["spo_mean"], 4),
                "spo - base": round(m["diff_mean"], 4),
                "95% CI": f"[{low:+.4f}, {high:+.4f}]",
                "win rate": round(m["win_rate"], 3),
                "n": m.get("n"),
            }
        )
    return rows


def spm_rows(summary: dict[str, Any]) -> list[dict[str, Any]]:
    acc, init = summary["spm_accuracy"]["accuracy"], summary["spm_accuracy"]["initial_accuracy"]
    return [
        {"t": t, "accuracy": round(a, 3), "initial accuracy": round(init.get(t, float("nan")), 3)}
        for t, a in acc.items()
    ]


def _md_table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "_(none)_"
    cols = list(rows[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r[c]) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def _stage_note(stage: dict[str, Any]) -> str:
    return "cached" if stage["cached"] else f"{stage['seconds']:.0f} s"


def summary_markdown(summary: dict[str, Any]) -> str:
    reg, ml = summary["registry"], summary["mlflow"]
    stages = ", ".join(f"{name} ({_stage_note(s)})" for name, s in summary["stages"].items())
    card = "\n".join(f"- {k}: {v}" for k, v in summary["data_card"].items()) or "_(no data card)_"
    link = f"[MLflow run]({ml['url']})" if ml.get("url") else "MLflow tracking disabled"
    return f"""# SPO pipeline ({summary["preset"]})

Finished in {summary["seconds"]:.0f} s. Stages: {stages}.

## Data card
{card}

## SPM accuracy by timestep
{_md_table(spm_rows(summary))}

## Evaluation (SPO vs base, paired seeds, bootstrap 95% CI)
{_md_table(eval_rows(summary))}

## Registry
`{reg["model"]}` v{reg["version"]} is `@challenger` ({"new version" if reg["created"] else "same LoRA as before"}).
Gate on `{summary["primary_metric"]}`: **{reg["decision"]}** ({reg["reason"]}). `@champion`: v{reg["champion"] or " none"}.

## Tracking
{link}; open the UI with `{ml["ui"]}`.
"""


def publish_artifacts(summary: dict[str, Any]) -> None:
    key = f"spo-{summary['preset']}"
    create_markdown_artifact(
        summary_markdown(summary), key=f"{key}-summary", description="SPO pipeline summary"
    )
    create_table_artifact(eval_rows(summary), key=f"{key}-eval", description="SPO vs base, paired, 95% CI")
    create_table_artifact(
        spm_rows(summary) or [{"t": None}], key=f"{key}-spm-accuracy", description="SPM accuracy by t"
    )


def summary_text(summary: dict[str, Any]) -> str:
    """What `spo pipeline` prints at the end."""
    reg, ml, out = summary["registry"], summary["mlflow"], summary["outputs"]
    lines = [
        f"SPO pipeline ({summary['preset']}) finished in {summary['seconds']:.0f} s",
        "  " + ", ".join(f"{name} ({_stage_note(s)})" for name, s in summary["stages"].items()),
        "",
        "outputs:",
        *[f"  {k:<9}{v}" for k, v in out.items()],
        "",
        "evaluation, SPO vs base (paired seeds, 95% bootstrap CI):",
        *["  " + line for line in _md_table(eval_rows(summary)).splitlines()],
        "",
        f"registry: {reg['model']} v{reg['version']} -> @challenger ({'new' if reg['created'] else 'unchanged LoRA'});"
        f" gate on {summary['primary_metric']}: {reg['decision']}; @champion = v{reg['champion'] or ' none'}",
        f"  {reg['reason']}",
        f'  use it: spo generate --model models:/{reg["model"]}@champion "a red circle on a blue background" -o out.png',
        "",
        f"MLflow: {ml['ui']}" + (f"  then open {ml['url']}" if ml.get("url") else ""),
        f"  serve it: {tracking.serve_command(reg['model'], cfg_uri=ml['tracking_uri'])}",
    ]
    return "\n".join(lines)


def check_prefect_api(timeout: float = 5.0) -> None:
    """With ``PREFECT_API_URL`` set, fail in one line when that server does not answer (instead of an
    httpx traceback from deep inside the flow engine)."""
    import httpx
    from prefect.settings import PREFECT_API_URL

    from spo.utils import redact

    url = os.environ.get("PREFECT_API_URL") or PREFECT_API_URL.value()
    if not url:
        return
    try:
        httpx.get(f"{str(url).rstrip('/')}/health", timeout=timeout).raise_for_status()
    except httpx.HTTPError as exc:
        raise SPOError(
            f"the Prefect API at {redact(str(url))} does not answer ({type(exc).__name__}: {redact(str(exc))}). "
            "Start it (`prefect server start`), fix PREFECT_API_URL, or unset it to run against a temporary "
            "local server."
        ) from None


def run_pipeline_cli(
    preset: str | None,
    overrides: list[str],
    params_file: str | None,
    resume: bool = False,
    accelerate_configs: dict[str, str] | None = None,
    gpu_deployment: str | None = None,
) -> str:
    """``spo pipeline``: run the flow, return the printed summary. A stage's SPOError propagates as is.

    Without PREFECT_API_URL the flow runs against a temporary server that stops with this process, however
    it ends (flows/server.py); dispatching to a deployment needs a real server, where its workers poll."""
    from flows.server import temporary_prefect_server

    if gpu_deployment and not os.environ.get("PREFECT_API_URL"):
        raise SPOError(
            "--gpu-deployment needs the Prefect server the GPU workers poll: export PREFECT_API_URL=http://HOST:4200/api"
        )
    check_prefect_api()
    with temporary_prefect_server():
        summary = spo_pipeline(
            preset=preset or None, overrides=list(overrides), params_file=params_file, resume=resume,
            accelerate_configs=accelerate_configs or {}, gpu_deployment=gpu_deployment,
        )
    return summary_text(summary)


if __name__ == "__main__":  # python flows/pipeline.py == spo pipeline --preset tiny
    print(run_pipeline_cli("tiny", [], DEFAULT_PARAMS_FILE))
