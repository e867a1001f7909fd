"""Helpers shared by tests (import as `from spo_test_helpers import make_cfg`; `conftest` is ambiguous
because tests/e2e has its own conftest.py)."""

from __future__ import annotations

from pathlib import Path

# Small tiny-world sizes for tests (the tiny preset itself is sized for `make run`).
SMALL = [
    "synthetic.train_rows=240",
    "synthetic.validation_rows=60",
    "synthetic.test_rows=20",
    "synthetic.unique_rows=12",
    "synthetic.train_shards=2",
    "data.num_train_prompts=16",
    "data.gx_jpeg_sample=16",
]


def make_cfg(root: Path, *overrides: str):
    from spo.config import load_config

    return load_config("tiny", [f"paths.root={root}", *SMALL, *overrides], params_file=None)


def load_bench(name: str):
    """bench/<name>.py as a module (bench/ is scripts, not a package)."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "bench" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
