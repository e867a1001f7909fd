"""Experiment tracking behind one small interface; the only module that imports mlflow.

Stages never import mlflow. They log through :func:`active`, which returns the tracker that the caller
(the CLI or the Prefect flow) activated with :func:`use`, or a no-op tracker when none is active (unit
tests, library use).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any


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


@contextlib.contextmanager
def stage_tracker(cfg: Any, stage: str) -> Iterator[Tracker]:
    """The tracker a CLI stage logs to (MLflow wiring lands with the orchestration work)."""
    yield active()
