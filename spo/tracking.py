"""Experiment tracking and the model registry: the only module that imports mlflow.

Stages log through :func:`active` (a :class:`Tracker`), so the training core runs without any server. The
CLI wraps every stage in :func:`stage_tracker`; the Prefect flow wraps the whole pipeline in
:func:`pipeline_run`, under which each stage's run is nested.

Store: ``MLFLOW_TRACKING_URI`` (or ``tracking.tracking_uri``), default ``sqlite:///<root>/mlflow/mlflow.db``
with artifacts under ``<root>/mlflow/artifacts`` (MLflow's file store is deprecated, and with SQLite the
artifact root would otherwise land in ``./mlruns`` of whatever directory created the experiment).

Lineage: every run is tagged with the git commit and dirty flag, the base model id, and DVC md5 hashes
(the same ``<md5>.dir`` strings as ``dvc.lock``) of its inputs; each stage run records the hash of its
output (``spo.output_md5``), so a later stage finds the run that produced its inputs (``lineage.spm_run_id``
on the SPO run) by content, whether the stages ran under Prefect, DVC or by hand.

mlflow is imported inside functions so that ``spo --help`` stays fast.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import subprocess
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from spo.errors import SPOError
from spo.utils import get_logger, redact, redact_tree

log = get_logger(__name__)

DEFAULT_DB = Path("mlflow") / "mlflow.db"
DEFAULT_ARTIFACTS = Path("mlflow") / "artifacts"
MODEL_ARTIFACT = "spo_lora"  # name of the pyfunc model inside a registration run
# The experiment-type tag of MLflow 3's UI (mlflow/server/js: ExperimentKind.CUSTOM_MODEL_DEVELOPMENT).
EXPERIMENT_KIND_TAG, EXPERIMENT_KIND = "mlflow.experimentKind", "custom_model_development"
CHALLENGER, CHAMPION, PREVIOUS_CHAMPION = "challenger", "champion", "previous-champion"


class TrackingError(SPOError):
    """The tracking store or model registry could not be used."""


# -- the interface stages log through -------------------------------------------------------------------
class Tracker:
    """No-op base tracker: the interface stages log through."""

    run_id: str | None = None

    def log_params(self, params: dict[str, Any]) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        pass

    def set_tags(self, tags: dict[str, Any]) -> None:
        pass

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        pass

    def log_dict(self, obj: dict[str, Any], artifact_file: str) -> None:
        pass

    def log_text(self, text: str, artifact_file: str) -> None:
        pass

    def log_image(self, path: str | Path, key: str) -> None:
        pass


_ACTIVE: list[Tracker] = []


def active() -> Tracker:
    return _ACTIVE[-1] if _ACTIVE else Tracker()


@contextlib.contextmanager
def use(tracker: Tracker) -> Iterator[Tracker]:
    _ACTIVE.append(tracker)
    try:
        yield tracker
    finally:
        _ACTIVE.pop()


class MlflowTracker(Tracker):
    """Logs to one MLflow run by id (not the fluent "active run"), so it works from any thread.

    Logging calls during training are best-effort: a hiccup of the tracking server is logged as a
    warning instead of killing a multi-hour GPU job. Opening and closing runs is not best-effort.
    """

    def __init__(self, run_id: str):
        from mlflow import MlflowClient

        self.run_id = run_id
        self._client = MlflowClient()
        self._params: dict[str, str] = {}

    def _safely(self, what: str, fn, *args, **kwargs) -> None:
        try:
            fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 -- tracking must not end the run; see class docstring
            log.warning("MLflow %s failed for run %s: %s", what, self.run_id, redact(str(exc)))

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        # MLflow refuses to change a logged param (and then drops the whole batch): keep the first value.
        new = {str(k): _param_value(redact(v)) for k, v in params.items()}
        clashes = sorted(k for k, v in new.items() if self._params.get(k, v) != v)
        if clashes:
            log.info("params already logged with other values, kept the first: %s", ", ".join(clashes))
        items = [Param(k, v) for k, v in new.items() if k not in self._params]
        self._params.update({p.key: p.value for p in items})
        for i in range(0, len(items), 100):  # the store takes at most 100 params per batch
            self._safely("log_params", self._client.log_batch, self.run_id, params=items[i : i + 100])

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(str(k), float(v), now, int(step or 0)) for k, v in metrics.items() if v is not None]
        for i in range(0, len(items), 1000):
            self._safely("log_metrics", self._client.log_batch, self.run_id, metrics=items[i : i + 1000])

    def set_tags(self, tags: dict[str, Any]) -> None:
        from mlflow.entities import RunTag

        items = [RunTag(str(k), redact(str(v))) for k, v in tags.items() if v is not None]
        self._safely("set_tags", self._client.log_batch, self.run_id, tags=items)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        path = Path(path)
        if path.is_dir():
            self._safely("log_artifacts", self._client.log_artifacts, self.run_id, str(path), artifact_path)
        elif path.exists():
            self._safely("log_artifact", self._client.log_artifact, self.run_id, str(path), artifact_path)
        else:
            log.warning("not logging missing artifact %s", path)

    def log_dict(self, obj: dict[str, Any], artifact_file: str) -> None:
        self._safely("log_dict", self._client.log_dict, self.run_id, obj, artifact_file)

    def log_text(self, text: str, artifact_file: str) -> None:
        self._safely("log_text", self._client.log_text, self.run_id, text, artifact_file)

    def log_image(self, path: str | Path, key: str) -> None:
        """An image under ``key`` (the run page's image view), not only a file among the artifacts."""
        from PIL import Image

        if not Path(path).exists():
            log.warning("not logging missing image %s", path)
            return
        with Image.open(path) as img:
            self._safely(
                "log_image", self._client.log_image, self.run_id, img.convert("RGB"), key=key, step=0
            )


def _param_value(v: Any) -> str:
    s = "" if v is None else str(v)
    return s if len(s) <= 6000 else s[:5997] + "..."  # MLflow's limit on a param value


# -- the store ---------------------------------------------------------------------------------------
def tracking_uri(cfg: Any | None = None) -> str:
    """``tracking.tracking_uri`` > ``$MLFLOW_TRACKING_URI`` > ``sqlite:///<root>/mlflow/mlflow.db``."""
    if cfg is not None and cfg.tracking.tracking_uri:
        return cfg.tracking.tracking_uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    root = Path(cfg.paths.root) if cfg is not None else Path(".")
    return f"sqlite:///{(root / DEFAULT_DB).resolve()}"


def _artifact_location(uri: str) -> str | None:
    """Where a new experiment keeps artifacts: beside a local SQLite store; a server decides for itself."""
    if not uri.startswith("sqlite:///"):
        return None
    db = Path(uri[len("sqlite:///") :])
    return (db.parent / "artifacts").resolve().as_uri()


def init_store(cfg: Any | None = None) -> str:
    """Point mlflow at the store, create its schema and the experiment once; return the experiment id.

    Run this once before stages fan out: concurrent first-time schema creation on one SQLite file races.
    """
    import mlflow
    from mlflow import MlflowClient

    uri = tracking_uri(cfg)
    if uri.startswith("sqlite:///"):
        Path(uri[len("sqlite:///") :]).parent.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    name = cfg.tracking.experiment if cfg is not None else "spo"
    try:
        # Two processes creating a fresh SQLite store's schema (or the experiment) at once collide: the
        # tracking and registry stores migrate the schema when first opened, so open both under the lock.
        with sqlite_store_lock(uri, "init"):
            if uri.startswith("sqlite:///"):
                _create_sqlite_schema_atomically(Path(uri[len("sqlite:///") :]))
            client = MlflowClient()
            if uri.startswith("sqlite:///"):
                client.search_registered_models(max_results=1)
            exp = client.get_experiment_by_name(name)
            if exp is None:
                exp_id = client.create_experiment(name, artifact_location=_artifact_location(uri))
            else:
                exp_id = exp.experiment_id
            if (exp.tags if exp is not None else {}).get(EXPERIMENT_KIND_TAG) != EXPERIMENT_KIND:
                # Untagged, the MLflow 3 UI opens the experiment on its GenAI overview instead of the runs.
                client.set_experiment_tag(exp_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    except Exception as exc:
        raise TrackingError(
            f"cannot open the MLflow tracking store {redact(uri)!r}: {redact(str(exc))}. Check MLFLOW_TRACKING_URI (or "
            "tracking.tracking_uri), that the server is up, or disable tracking with --set tracking.enabled=false."
        ) from exc
    mlflow.set_experiment(experiment_id=exp_id)
    if (uri, exp_id) not in _REPAIRED:
        _REPAIRED.add((uri, exp_id))
        with contextlib.suppress(Exception):  # repair is best-effort; never blocks a run
            repair_stale_runs(exp_id)
    return exp_id


_REPAIRED: set[tuple[str, str]] = set()


def display_uri(cfg: Any | None = None) -> str:
    """The tracking URI as it may be printed, written or logged: credentials masked."""
    return redact(tracking_uri(cfg))


def ui_command(cfg: Any | None = None) -> str:
    uri = display_uri(cfg)
    if uri.startswith(("http://", "https://")):
        return f"open {uri}"
    return f"mlflow ui --backend-store-uri {uri}"


def serve_command(model: str, cfg: Any | None = None, port: int = 5001, cfg_uri: str | None = None) -> str:
    """How to serve a registered model with MLflow's own CLI against this project's store (``cfg_uri``: an
    already redacted URI)."""
    uri = redact(cfg_uri) if cfg_uri else display_uri(cfg)
    return (
        f"MLFLOW_TRACKING_URI={uri} mlflow models serve -m models:/{model}@{CHAMPION} "
        f"--env-manager local -p {port}"
    )


def config_digest(cfg: Any, n: int = 6) -> str:
    """A short hash of the resolved config less where things live (paths, tracking): two runs of one
    experiment share it wherever they ran."""
    from spo.utils import json_digest

    data = {k: v for k, v in cfg.to_dict().items() if k not in ("paths", "tracking")}
    return json_digest(data, n)


_NAME_SKIP = ("paths.", "tracking.")


def key_overrides(cfg: Any, limit: int = 3) -> list[str]:
    """``key=value`` for the config values that differ from the preset's defaults (paths/tracking aside)."""
    from spo.config import load_config

    try:
        default = load_config(cfg.preset, [], None).flat()
    except Exception:  # noqa: BLE001 -- a run name must never fail a run
        return []
    changed = [
        f"{k}={v}" for k, v in cfg.flat().items() if not k.startswith(_NAME_SKIP) and default.get(k) != v
    ]
    return changed[:limit] + ([f"+{len(changed) - limit} more"] if len(changed) > limit else [])


def run_label(cfg: Any) -> str:
    """``tiny-3f2a9c spo.lr=0.0001``: preset, config hash, the first few changed keys."""
    return " ".join([f"{cfg.preset}-{config_digest(cfg)}", *key_overrides(cfg)])


def run_url(run_id: str, experiment_id: str, cfg: Any | None = None) -> str:
    """Link to a run: the server's own address, or the one `mlflow ui` serves by default."""
    uri = display_uri(cfg)
    base = uri.rstrip("/") if uri.startswith(("http://", "https://")) else "http://127.0.0.1:5000"
    return f"{base}/#/experiments/{experiment_id}/runs/{run_id}"


# -- lineage -----------------------------------------------------------------------------------------
def dvc_md5(path: str | Path) -> str | None:
    """The hash DVC records for ``path`` in dvc.lock (``<md5>.dir`` for folders); None if it is missing."""
    path = Path(path)
    if not path.exists():
        return None
    from dvc_data.hashfile.build import build
    from dvc_data.hashfile.db import HashFileDB
    from dvc_objects.fs.local import LocalFileSystem
    from dvc_objects.fs.memory import MemoryFileSystem

    staging = HashFileDB(MemoryFileSystem(), "/staging")
    _, _, obj = build(staging, str(path.resolve()), LocalFileSystem(), "md5")
    return obj.hash_info.value


def git_state(root: str | Path) -> dict[str, str]:
    """``git.commit`` and ``git.dirty`` (tracked files modified) of the checkout holding ``root``."""

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=root, capture_output=True, text=True, check=True, timeout=30
        ).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return {"git.commit": "none", "git.dirty": "unknown"}
    return {"git.commit": commit, "git.dirty": str(dirty).lower(), "mlflow.source.git.commit": commit}


def local_model_dir(cfg: Any, ref: str) -> Path | None:
    """The existing local folder or file a model reference names (:meth:`spo.refs.ModelRef.parse`, rooted at
    ``paths.root``), resolved; None for hub ids, registry URIs, missing paths and malformed text."""
    from spo.refs import ModelRef, RefError

    if not ref:
        return None
    try:
        parsed = ModelRef.parse(ref, root=cfg.paths.root)
    except RefError:
        return None
    return parsed.path.resolve() if parsed.exists() and parsed.path is not None else None


def _product_path(cfg: Any, stage: str) -> Path | None:
    """Where the lineage product of ``stage`` lives (``StageSpec.product()``), None if it has none."""
    from spo.pipeline_spec import STAGE_BY_NAME

    spec = STAGE_BY_NAME.get(stage)
    product = spec.product() if spec is not None else None
    return product.path(cfg) if product is not None else None


def find_producer(stage: str, md5: str) -> str | None:
    """The latest finished run of ``stage`` whose output hashed to ``md5``."""
    from mlflow import MlflowClient

    exp_ids = [e.experiment_id for e in MlflowClient().search_experiments()]
    runs = MlflowClient().search_runs(
        exp_ids,
        filter_string=f"tags.`spo.stage` = '{stage}' and tags.`spo.output_md5` = '{md5}' "
        "and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return runs[0].info.run_id if runs else None


def lineage_tags(cfg: Any, stage: str, upstream: tuple[str, ...] | None = None) -> dict[str, str]:
    """Tags recording what a run of ``stage`` was built from (see module docstring); ``upstream`` (stage
    names) defaults to the producers of what the stage reads, transitively
    (:func:`spo.pipeline_spec.upstream_stages`; ``"pipeline"``: every stage with a product)."""
    from spo.pipeline_spec import STAGE_BY_NAME, upstream_stages

    tags = {"spo.preset": cfg.preset, "spo.stage": stage, **git_state(cfg.paths.root)}
    local = local_model_dir(cfg, cfg.model.pretrained)
    tags["lineage.base_model"] = str(local) if local else str(cfg.model.pretrained)
    if cfg.model.revision:
        tags["lineage.base_model_revision"] = cfg.model.revision
    if local:
        tags["lineage.base_model_md5"] = dvc_md5(local) or ""
    if upstream is None:
        known = stage == "pipeline" or stage in STAGE_BY_NAME
        upstream = tuple(s.name for s in upstream_stages(stage)) if known else ()
    for name in upstream:
        product = STAGE_BY_NAME[name].product()
        md5 = dvc_md5(product.path(cfg)) if product is not None else None
        if md5 is None:
            continue
        tag = product.lineage
        tags[f"lineage.{tag}_md5"] = md5
        producer = find_producer(name, md5) if cfg.tracking.enabled else None
        if producer:
            tags[f"lineage.{tag}_run_id"] = producer
    return tags


# -- runs --------------------------------------------------------------------------------------------
_PIPELINE_RUN: list[str] = []  # the parent run id while a pipeline runs in this process


def _is_main_process() -> bool:
    """Under `accelerate launch`, only rank 0 opens runs (the other ranks would duplicate them)."""
    return int(os.environ.get("RANK", "0")) == 0


@contextlib.contextmanager
def _run(
    cfg: Any, name: str, tags: dict[str, str], parent: str | None, system_metrics: bool
) -> Iterator[Tracker]:
    import mlflow

    exp_id = init_store(cfg)
    run = mlflow.start_run(
        experiment_id=exp_id,
        run_name=redact(name),  # names and notes quote overrides, which may carry credentials
        nested=parent is not None,
        parent_run_id=parent,
        tags={k: redact(str(v)) for k, v in {**tags, **process_tags()}.items()},
        log_system_metrics=system_metrics and cfg.tracking.log_system_metrics,
    )
    tracker = MlflowTracker(run.info.run_id)
    try:
        with use(tracker):
            yield tracker
    except BaseException as exc:
        mlflow.end_run(status="KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
        raise
    mlflow.end_run(status="FINISHED")


@contextlib.contextmanager
def stage_tracker(cfg: Any, stage: str) -> Iterator[Tracker]:
    """The tracker a stage logs to: an MLflow run named after the stage, nested under the pipeline's run
    when one is active, standalone otherwise (``spo train`` by hand, or under ``dvc repro``).

    Params are the resolved config; the resolved config is also an artifact. On success the run is tagged
    with the hash of the stage's output and the stage's reports are attached.
    """
    if not cfg.tracking.enabled or not _is_main_process():
        yield active()
        return
    parent = _PIPELINE_RUN[-1] if _PIPELINE_RUN else os.environ.get("SPO_PARENT_RUN_ID") or None
    init_store(cfg)  # before lineage_tags, which searches the store for the runs that made the inputs
    tags = {**lineage_tags(cfg, stage), "mlflow.note.content": _stage_description(cfg, stage)}
    # The launcher's process count (1 in-process): it shapes a training stage's result (pairs per step).
    tags["spo.num_processes"] = os.environ.get("WORLD_SIZE") or os.environ.get("LOCAL_WORLD_SIZE") or "1"
    with _run(cfg, f"{stage} {run_label(cfg)}", tags, parent, system_metrics=True) as tracker:
        tracker.log_params(cfg.flat())
        tracker.log_dict(redact_tree(cfg.to_dict()), "config/resolved_config.json")
        yield tracker
        output = _product_path(cfg, stage)
        if output is not None:
            tracker.set_tags({"spo.output_md5": dvc_md5(output)})
        for path, dest in stage_reports(cfg, stage):
            tracker.log_artifact(path, dest)


def _stage_description(cfg: Any, stage: str) -> str:
    from spo.pipeline_spec import STAGE_BY_NAME

    spec = STAGE_BY_NAME.get(stage)
    what = spec.help if spec is not None else stage
    changed = ", ".join(key_overrides(cfg, limit=20)) or "none"
    return f"`spo {spec.cli if spec else stage}`: {what}.\n\nPreset `{cfg.preset}`, config `{config_digest(cfg)}`; changed keys: {changed}."


def stage_reports(cfg: Any, stage: str) -> list[tuple[Path, str | None]]:
    """Report files a stage's run carries as artifacts (those that exist): the stage's ``writes`` and
    ``reports`` (spo.pipeline_spec) less its lineage product (models and data are recorded by hash, not
    copied), files under the stage's ``mlflow_dir`` ("spm", "eval", ...), folders under their own name
    (the Great Expectations Data Docs as ``data_validation/``)."""
    from spo.pipeline_spec import STAGE_BY_NAME

    spec = STAGE_BY_NAME.get(stage)
    if spec is None:
        return []
    product = spec.product()
    out: list[tuple[Path, str | None]] = []
    for artifact in spec.outputs():
        if artifact.lineage or (product is not None and artifact.name == product.name):
            continue
        path = artifact.path(cfg)
        if path.is_dir():
            out.append((path, path.name))
        elif path.exists():
            out.append((path, spec.mlflow_dir or None))
    return out


@contextlib.contextmanager
def pipeline_run(
    cfg: Any, run_name: str | None = None, tags: dict[str, str] | None = None
) -> Iterator[Tracker]:
    """The parent run of one pipeline execution; stage runs opened inside nest under it."""
    if not cfg.tracking.enabled:
        yield active()
        return
    init_store(cfg)
    # Products are hashed at the end, when this run has made them; at the start only code and base are known.
    changed = ", ".join(key_overrides(cfg, limit=50)) or "none (the preset's defaults)"
    note = (
        f"SPO pipeline, preset `{cfg.preset}`, config `{config_digest(cfg)}`.\n\nChanged keys: {changed}.\n\n"
        "Compare parent runs on `eval/<scorer>/diff_mean` with `diff_ci95_low`/`diff_ci95_high` (an interval "
        "that excludes 0 is a significant difference), `spo/pairs_trained`, `spo/kept_fraction`, `stage/*/seconds`."
    )
    all_tags = {**lineage_tags(cfg, "pipeline", upstream=()), "mlflow.note.content": note, **(tags or {})}
    with _run(cfg, run_name or f"pipeline {run_label(cfg)}", all_tags, None, system_metrics=False) as tracker:
        tracker.log_params(cfg.flat())
        tracker.log_dict(redact_tree(cfg.to_dict()), "config/resolved_config.json")
        _PIPELINE_RUN.append(tracker.run_id)
        try:
            yield tracker
        finally:
            _PIPELINE_RUN.pop()
        tracker.set_tags({k: v for k, v in lineage_tags(cfg, "pipeline").items() if k.startswith("lineage.")})


@contextlib.contextmanager
def group_run(cfg: Any, run_name: str, tags: dict[str, str] | None = None) -> Iterator[Tracker]:
    """A run that groups the runs opened inside it (a sweep, one variant of a sweep), nested under the
    enclosing group or pipeline run when there is one."""
    if not cfg.tracking.enabled or not _is_main_process():
        yield active()
        return
    init_store(cfg)
    parent = _PIPELINE_RUN[-1] if _PIPELINE_RUN else None
    with _run(cfg, run_name, tags or {}, parent, system_metrics=False) as tracker:
        _PIPELINE_RUN.append(tracker.run_id)
        try:
            yield tracker
        finally:
            _PIPELINE_RUN.pop()


@contextlib.contextmanager
def nested_under(run_id: str | None) -> Iterator[None]:
    """Stage runs opened inside (in this process or launched from it) nest under ``run_id``: the pipeline's
    run when a stage was dispatched to another process by the pipeline (flows/pipeline.py:spo_stage)."""
    if not run_id:
        yield
        return
    _PIPELINE_RUN.append(run_id)
    try:
        yield
    finally:
        _PIPELINE_RUN.pop()


def pipeline_run_id() -> str | None:
    """The parent run of the pipeline running in this process, if any."""
    return _PIPELINE_RUN[-1] if _PIPELINE_RUN else None


def experiment_id_of(run_id: str) -> str:
    from mlflow import MlflowClient

    return MlflowClient().get_run(run_id).info.experiment_id


def get_run(run_id: str):
    from mlflow import MlflowClient

    return MlflowClient().get_run(run_id)


def child_runs(parent_run_id: str) -> list:
    from mlflow import MlflowClient

    client = MlflowClient()
    exp = client.get_run(parent_run_id).info.experiment_id
    return client.search_runs([exp], filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}'")


# -- the model registry ------------------------------------------------------------------------------
@dataclass
class VersionInfo:
    name: str
    version: str
    tags: dict[str, str] = field(default_factory=dict)
    aliases: list[str] = field(default_factory=list)
    run_id: str | None = None


def _version_info(mv) -> VersionInfo:
    return VersionInfo(mv.name, str(mv.version), dict(mv.tags or {}), list(mv.aliases or []), mv.run_id)


def get_version(name: str, alias_or_version: str) -> VersionInfo | None:
    """A version by alias (``champion``) or number; None if the model, alias or version does not exist."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient()
    try:
        if str(alias_or_version).isdigit():
            return _version_info(client.get_model_version(name, str(alias_or_version)))
        return _version_info(client.get_model_version_by_alias(name, alias_or_version))
    except MlflowException as exc:
        if _is_not_found(exc):
            return None
        raise


def _is_not_found(exc) -> bool:
    return getattr(exc, "error_code", "") == "RESOURCE_DOES_NOT_EXIST" or "not found" in str(exc).lower()


def list_versions(name: str) -> list[VersionInfo]:
    """All versions of ``name``, oldest first, with their aliases ([] if the model does not exist)."""
    from mlflow import MlflowClient

    client = MlflowClient()
    if not _model_exists(name):
        return []
    aliases: dict[str, list[str]] = {}
    for alias, version in client.get_registered_model(name).aliases.items():
        aliases.setdefault(str(version), []).append(alias)
    versions = [_version_info(v) for v in client.search_model_versions(f"name = '{name}'")]
    for v in versions:
        v.aliases = sorted(aliases.get(v.version, []))  # search results do not carry aliases
    return sorted(versions, key=lambda v: int(v.version))


def find_version(name: str, tag: str, value: str) -> VersionInfo | None:
    """The oldest version of ``name`` whose ``tag`` equals ``value`` (e.g. the same LoRA content hash)."""
    matches = [v for v in list_versions(name) if v.tags.get(tag) == value]
    return matches[0] if matches else None


def set_alias(name: str, alias: str, version: str) -> None:
    from mlflow import MlflowClient

    MlflowClient().set_registered_model_alias(name, alias, str(version))


def set_version_tags(name: str, version: str, tags: dict[str, Any]) -> None:
    from mlflow import MlflowClient

    client = MlflowClient()
    for k, v in tags.items():
        client.set_model_version_tag(name, str(version), k, str(v))


def delete_version(name: str, version: str) -> None:
    from mlflow import MlflowClient

    MlflowClient().delete_model_version(name, str(version))


def pip_requirements() -> list[str]:
    """Pins for the serving environment, taken from this one (local build labels such as +cpu dropped)."""
    pkgs = [
        "mlflow",
        "torch",
        "diffusers",
        "transformers",
        "peft",
        "accelerate",
        "safetensors",
        "numpy",
        "pillow",
    ]
    reqs = []
    for pkg in pkgs:
        try:
            reqs.append(f"{pkg}=={importlib.metadata.version(pkg).split('+')[0]}")
        except importlib.metadata.PackageNotFoundError:
            reqs.append(pkg)
    return reqs


MODEL_CODE = Path(__file__).with_name("serving.py")  # the registered model's code (models-from-code)
CODE_TAG = "spo.model_code_sha256"


def model_code_sha256() -> str:
    from spo.utils import sha256_file

    return sha256_file(MODEL_CODE)


def _create_sqlite_schema_atomically(db: Path) -> None:
    """Build a new SQLite store's schema beside it, then rename it into place.

    MLflow's migrations are not transactional on SQLite: a process killed while creating a fresh store
    leaves a half-migrated file (``table _alembic_tmp_experiments already exists``) that every later run
    trips over. Built aside and renamed, a killed creation leaves only a temporary file behind."""
    if db.exists() and db.stat().st_size > 0:
        return
    import sqlalchemy
    from mlflow.store.db.utils import _initialize_tables

    tmp = db.with_name(f".{db.name}.creating-{os.getpid()}")
    for stale in db.parent.glob(f".{db.name}.creating-*"):
        stale.unlink(missing_ok=True)  # left by a killed creation; we hold the init lock
    engine = sqlalchemy.create_engine(f"sqlite:///{tmp}")
    try:
        _initialize_tables(engine)
    finally:
        engine.dispose()
    os.replace(tmp, db)


@contextlib.contextmanager
def sqlite_store_lock(uri: str, purpose: str) -> Iterator[None]:
    """An exclusive (blocking) file lock beside a local SQLite store; a no-op for servers."""
    import fcntl

    if not uri.startswith("sqlite:///"):
        yield
        return
    lock = Path(uri[len("sqlite:///") :]).with_suffix(f".{purpose}.lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def registry_lock(cfg: Any):
    """Serialise registrations against one local store (two processes, even from different project roots,
    registering at once would otherwise both create a version). Servers: the post-create check in
    :func:`register_lora` resolves a race instead."""
    return sqlite_store_lock(tracking_uri(cfg), "register")


def repair_registry(name: str, content_tag: str) -> list[str]:
    """Delete versions of ``name`` that a killed registration left incomplete (no ``content_tag``: written
    by a version of spo that set tags after creating the version) and duplicates of one content (keeping the
    oldest, which aliases are moved to). Returns what it did, one line each."""
    from mlflow import MlflowClient

    done: list[str] = []
    versions = list_versions(name)
    seen: dict[str, VersionInfo] = {}
    client = MlflowClient()
    for v in versions:
        content = v.tags.get(content_tag)
        keep = seen.get(content) if content else None
        if content and keep is None:
            seen[content] = v
            continue
        for alias in v.aliases:
            if keep is not None:
                client.set_registered_model_alias(name, alias, keep.version)
        delete_version(name, v.version)
        why = f"a duplicate of v{keep.version}" if keep else f"incomplete (no {content_tag} tag)"
        done.append(f"deleted {name} v{v.version}: {why}")
    for line in done:
        log.warning("registry repair: %s", line)
    return done


def _signature(cfg: Any):
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    return ModelSignature(
        inputs=Schema([ColSpec("string")]),
        params=ParamSchema(
            [
                ParamSpec("seed", "long", 0),
                ParamSpec("num_inference_steps", "long", cfg.eval.num_steps),
                ParamSpec("guidance_scale", "double", float(cfg.eval.cfg_scale)),
                ParamSpec("eta", "double", float(cfg.eval.eta)),
                ParamSpec("output", "string", "array"),
            ]
        ),
    )


def register_lora(
    cfg: Any,
    lora_dir: Path,
    extra_artifacts: dict[str, Path],
    version_tags: dict[str, str],
    description: str,
    content_tag: str = "lineage.lora_md5",
) -> tuple[VersionInfo, bool]:
    """Find-or-create the model version holding this LoRA; returns (version, created).

    Transactional: the version is created in one store call *with all its tags* (nothing half-tagged is
    ever visible), under :func:`registry_lock`, after :func:`repair_registry`; a kill before that call
    leaves no version (the logging run is marked KILLED on the next start), a kill after it leaves a
    complete version that the next register finds by ``content_tag`` and reuses.
    """
    from mlflow import MlflowClient

    name = cfg.registered_model_name
    content = version_tags[content_tag]
    init_store(cfg)
    with registry_lock(cfg):
        if _model_exists(name):
            repair_registry(name, content_tag)
            existing = find_version(name, content_tag, content)
            if existing is not None:
                return existing, False
        version = _log_and_create(cfg, name, lora_dir, extra_artifacts, version_tags, description)
        twins = [v for v in list_versions(name) if v.tags.get(content_tag) == content]
        if twins and twins[0].version != version.version:  # lost a race with another process: keep the oldest
            log.warning("%s v%s duplicates v%s (concurrent registration); deleting it", name, version.version, twins[0].version)
            delete_version(name, version.version)
            return twins[0], False
    with contextlib.suppress(Exception):  # cosmetic; the version is complete without it
        MlflowClient().update_model_version(name, version.version, description=description)
    return get_version(name, version.version) or version, True


def _log_and_create(cfg, name, lora_dir, extra_artifacts, version_tags, description) -> VersionInfo:
    import mlflow

    defaults = {
        "seed": 0,
        "num_inference_steps": cfg.eval.num_steps,
        "guidance_scale": float(cfg.eval.cfg_scale),
        "eta": float(cfg.eval.eta),
        "output": "array",
    }
    base_local = local_model_dir(cfg, cfg.model.pretrained)
    artifacts = {"lora": str(lora_dir), **{k: str(v) for k, v in extra_artifacts.items()}}
    if base_local and cfg.registry.bundle_base:
        artifacts["base"] = str(base_local)
    model_config = {
        "arch": cfg.model.arch,
        "pretrained": str(base_local or cfg.model.pretrained),
        "revision": cfg.model.revision,
        "vae": cfg.model.vae,
        "dtype": cfg.model.dtype,
        "resolution": cfg.eval_resolution,
        "defaults": defaults,
    }
    started = mlflow.active_run() is None
    if started:
        mlflow.start_run(run_name="register", tags={**lineage_tags(cfg, "register"), **process_tags()})
    try:
        with warnings.catch_warnings():
            # Deliberate: no input example (logging one would run a generation, as type hints would).
            warnings.filterwarnings("ignore", message=".*input example.*")
            warnings.filterwarnings("ignore", message=".*type hint.*")
            info = mlflow.pyfunc.log_model(
                name=MODEL_ARTIFACT,
                python_model=str(MODEL_CODE),
                artifacts=artifacts,
                model_config=model_config,
                signature=_signature(cfg),
                pip_requirements=pip_requirements(),
            )
        tags = {**version_tags, CODE_TAG: model_code_sha256()}
        mv = mlflow.register_model(info.model_uri, name, tags={k: str(v) for k, v in tags.items()})
    except BaseException:
        if started:
            mlflow.end_run(status="FAILED")
        raise
    if started:
        mlflow.end_run()
    return _version_info(mv)


def log_lora_model(
    cfg: Any,
    lora_dir: Path,
    extra_artifacts: dict[str, Path],
    version_tags: dict[str, str],
    description: str,
) -> VersionInfo:
    """Register the LoRA as a new (or the existing) version of ``cfg.registered_model_name``."""
    return register_lora(cfg, lora_dir, extra_artifacts, version_tags, description)[0]


def process_tags() -> dict[str, str]:
    """Who runs a run: lets the next start mark runs of dead processes KILLED (see repair_stale_runs)."""
    import socket

    return {"spo.pid": str(os.getpid()), "spo.host": socket.gethostname()}


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def repair_stale_runs(experiment_id: str) -> list[str]:
    """Mark RUNNING runs of this host whose process is gone (kill -9, OOM) as KILLED; returns their ids."""
    import socket

    from mlflow import MlflowClient

    client = MlflowClient()
    host = socket.gethostname()
    fixed = []
    for run in client.search_runs([experiment_id], filter_string="attributes.status = 'RUNNING'", max_results=500):
        tags = run.data.tags
        pid = tags.get("spo.pid")
        if tags.get("spo.host") != host or not (pid and pid.isdigit()) or _pid_alive(int(pid)):
            continue
        client.set_terminated(run.info.run_id, status="KILLED")
        fixed.append(run.info.run_id)
    if fixed:
        log.warning("marked %d run(s) of killed processes as KILLED: %s", len(fixed), ", ".join(fixed))
    return fixed


def resolve_lora_uri(uri: Any, cfg: Any | None = None) -> Path:
    """The local LoRA folder behind ``uri``: ``models:/name@alias`` or ``models:/name/<version>`` (downloaded
    from the registry; local stores are read in place) or a local folder/file path."""
    import mlflow

    from spo.refs import ModelRef

    ref = ModelRef.parse(uri)
    if not ref.is_registry:
        if not ref.is_local or not ref.path.exists():
            raise SPOError(f"LoRA not found at {uri}. Pass a LoRA folder or a models:/<name>@<alias> URI.")
        return ref.path
    init_store(cfg)
    name, alias_or_version = ref.registry_name, ref.alias or ref.version
    mv = get_version(name, alias_or_version)
    if mv is None:
        known = (
            ", ".join(f"v{v.version} {v.aliases}" for v in list_versions(name)) if _model_exists(name) else ""
        )
        raise SPOError(
            f"no model version {uri!r} in the registry at {display_uri(cfg)}"
            + (f" (versions: {known})" if known else f" (no registered model {name!r})")
            + ". Run `spo register` (and `spo promote` for @champion), or check MLFLOW_TRACKING_URI."
        )
    local = mlflow.artifacts.download_artifacts(f"models:/{name}/{mv.version}/artifacts/lora")
    return Path(local)


def _model_exists(name: str) -> bool:
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    try:
        MlflowClient().get_registered_model(name)
        return True
    except MlflowException:
        return False


def load_model(uri: str, cfg: Any | None = None):
    """``mlflow.pyfunc.load_model`` against this project's store, refusing a version whose model code is not
    exactly this package's ``spo/serving.py`` (models-from-code runs that file: a tampered artifact store
    must not be able to run code through it)."""
    import mlflow.pyfunc

    init_store(cfg)
    verify_model_code(uri)
    return mlflow.pyfunc.load_model(uri)


def mlflow_artifact_dir(uri: str) -> Path:
    """The local folder of an artifact URI (local stores: in place; remote ones: a downloaded copy)."""
    import mlflow

    return Path(mlflow.artifacts.download_artifacts(uri))


def verify_model_code(uri: str) -> None:
    import hashlib

    import mlflow
    import yaml

    local = Path(mlflow.artifacts.download_artifacts(f"{uri.rstrip('/')}/MLmodel")).parent
    mlmodel = yaml.safe_load((local / "MLmodel").read_text())
    flavor = mlmodel.get("flavors", {}).get("python_function", {}) or {}
    code = flavor.get("model_code_path")
    if flavor.get("loader_module") != "mlflow.pyfunc.loaders.code_model" or not code:
        raise TrackingError(
            f"refusing to load {uri}: it is not a models-from-code spo model (loader "
            f"{flavor.get('loader_module')!r}); a pickled model can run arbitrary code. Re-register the LoRA "
            "with `spo register`."
        )
    code = Path(code).name
    stored = local / code
    expected = model_code_sha256()
    actual = hashlib.sha256(stored.read_bytes()).hexdigest()
    if actual != expected:
        raise TrackingError(
            f"refusing to load {uri}: its model code {code} (sha256 {actual[:12]}) is not this spo's "
            f"spo/serving.py (sha256 {expected[:12]}). It was changed in the store, or registered by another "
            "spo version: re-register the LoRA with `spo register`, or load the LoRA itself with "
            "`spo generate --model <uri>` (reads only weights)."
        )
