"""Shared fixtures: offline environment, a tiny config rooted in a temp dir, tiny random-init models.

Fixtures that need trained models build them small and once per session; tests that check *learning*
live in the benchmarks and the pipeline run, not here.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from spo_test_helpers import SMALL, make_cfg  # noqa: F401  (re-exported for older imports)

OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "DO_NOT_TRACK": "true",
    "DVC_NO_ANALYTICS": "1",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "TOKENIZERS_PARALLELISM": "false",
}
for _k, _v in OFFLINE_ENV.items():
    os.environ.setdefault(_k, _v)


@pytest.fixture
def tiny_cfg(tmp_path):
    """A tiny-preset Config whose outputs all go under a fresh temp dir."""
    return make_cfg(tmp_path)


@pytest.fixture(scope="session")
def tiny_models_root(tmp_path_factory) -> Path:
    """Random-init tiny models saved as real folders: models/base (SD-1.5 arch), models/base/clip,
    models/base_sdxl. Copy it (``tiny_project``) before writing into it."""
    from spo.models.tiny import save_random_tiny_models

    root = tmp_path_factory.mktemp("tiny_models")
    save_random_tiny_models(root)
    return root


@pytest.fixture(scope="session")
def _tiny_project_template(tmp_path_factory, tiny_models_root) -> Path:
    """Synthetic data + prepared data + random tiny models, built once per session."""
    from spo.stages import prepare, synth

    root = tmp_path_factory.mktemp("tiny_project")
    shutil.copytree(tiny_models_root / "models", root / "models")
    cfg = make_cfg(root)
    synth.run(cfg)
    prepare.run(cfg)
    return root


@pytest.fixture
def tiny_project(tmp_path, _tiny_project_template):
    """A writable copy of the session's tiny project; returns a Config rooted there."""
    root = tmp_path / "project"
    shutil.copytree(_tiny_project_template, root, symlinks=True)
    return make_cfg(root)
