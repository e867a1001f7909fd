"""The sweep as a Prefect flow (``spo sweep <name> --prefect``): the same :func:`spo.sweeps.run_sweep`, its
stage logs in the flow run's Logs tab and its table as the flow run's markdown artifact ``sweep-<name>``."""

from __future__ import annotations

from typing import Any

from prefect import flow
from prefect.artifacts import create_markdown_artifact

from flows.pipeline import check_prefect_api, stage_logs_to_prefect
from spo.config import DEFAULT_PARAMS_FILE, load_config
from spo.lock import project_lock


@flow(name="spo-sweep", log_prints=True, validate_parameters=True, persist_result=False)
def spo_sweep(
    name: str,
    preset: str | None = None,
    overrides: list[str] | None = None,
    params_file: str | None = DEFAULT_PARAMS_FILE,
    only: list[str] | None = None,
    force: bool = False,
) -> dict[str, Any]:
    from spo.sweeps import run_sweep

    cfg = load_config(preset, list(overrides or []), params_file)
    with project_lock(cfg.paths.root, f"spo sweep {name}"), stage_logs_to_prefect():
        summary = run_sweep(cfg, name, only=only, force=force)
    create_markdown_artifact(
        markdown=summary["table_markdown"],
        key=f"sweep-{summary['name']}".lower().replace("_", "-").replace(".", "-"),
        description=f"spo sweep {summary['name']}: gains per variant with 95 % CIs",
    )
    return summary


def run_sweep_cli(name: str, preset, overrides, params_file, only=None, force=False) -> dict[str, Any]:
    """``spo sweep --prefect``: the flow against $PREFECT_API_URL or a temporary server that stops with us."""
    from flows.server import temporary_prefect_server

    check_prefect_api()
    with temporary_prefect_server():
        return spo_sweep(name, preset or None, list(overrides), params_file, only, force)
