"""The flow's cache keys and retry policy, checked without running stages (fast)."""

from __future__ import annotations

import sqlite3

import httpx
import pytest
import requests
from e2e_helpers import project_cfg
from mlflow.exceptions import MlflowException
from mlflow.protos import databricks_pb2 as pb

from flows.pipeline import STAGE_BY_NAME, cache_key, is_transient
from spo.errors import DataValidationError, ModelLoadError, NonFiniteError

pytestmark = pytest.mark.e2e


def _cause(outer: BaseException, inner: BaseException) -> BaseException:
    try:
        try:
            raise inner
        except BaseException as exc:
            raise outer from exc
    except BaseException as exc:
        return exc


class _Response:
    def __init__(self, status_code: int):
        self.status_code = status_code


class HubError(Exception):
    def __init__(self, status: int):
        super().__init__(f"HTTP {status}")
        self.response = _Response(status)


@pytest.mark.parametrize(
    ("exc", "transient"),
    [
        (ConnectionResetError("peer reset"), True),
        (TimeoutError("read timed out"), True),
        (requests.exceptions.ConnectionError("dns"), True),
        (httpx.ConnectTimeout("connect"), True),
        (HubError(503), True),
        (HubError(429), True),
        (HubError(404), False),
        (MlflowException("too many requests", error_code=pb.REQUEST_LIMIT_EXCEEDED), True),
        (MlflowException("server error", error_code=pb.INTERNAL_ERROR), True),
        (MlflowException("no such model", error_code=pb.RESOURCE_DOES_NOT_EXIST), False),
        (MlflowException("bad tag", error_code=pb.INVALID_PARAMETER_VALUE), False),
        (sqlite3.OperationalError("database is locked"), True),
        (_cause(ModelLoadError("could not load base"), ConnectionError("reset")), True),
        (_cause(DataValidationError("bad shard"), ConnectionError("reset")), False),  # never retried
        (DataValidationError("no parquet shards"), False),
        (NonFiniteError("NaN loss"), False),
        (ValueError("bad value"), False),
        (None, False),
    ],
)
def test_only_transient_failures_are_retried(exc, transient):
    assert is_transient(exc) is transient


def test_cache_key_follows_the_stage_inputs(tmp_path):
    """An unchanged SPM keeps its key (is not retrained) when only later stages' settings change."""
    base = ["paths.root=" + str(tmp_path)]
    (tmp_path / "data" / "prepared").mkdir(parents=True)
    (tmp_path / "data" / "prepared" / "prompts_train.txt").write_text("a red circle\n")
    spm = STAGE_BY_NAME["train_spm"]

    def key(*overrides):
        return cache_key(spm, project_cfg(tmp_path, "sqlite:///unused.db", *base, *overrides))

    reference = key()
    assert key("spo.lr=0.1", "eval.num_prompts=3", "registry.margin=0.2") == reference  # not SPM inputs
    assert key("spm.lr=0.1") != reference  # its own section
    assert key("model.resolution=64") != reference  # the base model it trains against
    (tmp_path / "data" / "prepared" / "prompts_train.txt").write_text("a blue square\n")
    assert key() != reference  # its input data
    assert key() == key()


def test_code_hash_covers_only_the_stage_declared_code(tmp_path, monkeypatch):
    """A docstring edit in spo/stats.py invalidates evaluate's cache and no other stage's."""
    import shutil

    from flows import pipeline
    from spo.pipeline_spec import STAGES

    repo = tmp_path / "repo"
    shutil.copytree(pipeline.REPO_ROOT / "spo", repo / "spo", ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(pipeline, "REPO_ROOT", repo)
    cfg = project_cfg(tmp_path / "project", "sqlite:///unused.db")
    before = {s.name: cache_key(s, cfg) for s in STAGES}
    stats = repo / "spo" / "stats.py"
    stats.write_text(stats.read_text().replace('"""', '"""Edited. ', 1))
    after = {s.name: cache_key(s, cfg) for s in STAGES}
    assert [name for name in before if before[name] != after[name]] == ["evaluate"]
    (repo / "spo" / "rewards" / "new_scorer.py").write_text("X = 1\n")  # a folder in `code`: any file in it
    assert cache_key(STAGE_BY_NAME["evaluate"], cfg) != after["evaluate"]
    assert cache_key(STAGE_BY_NAME["train_spm"], cfg) == after["train_spm"]
