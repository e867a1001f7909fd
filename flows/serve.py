"""Serve the pipeline on a schedule from this machine, without a work pool (a local alternative to
``prefect deploy``; see docs/ORCHESTRATION.md).

    prefect server start                                   # in another terminal (schedules need a server)
    export PREFECT_API_URL=http://127.0.0.1:4200/api
    python flows/serve.py                                  # weekly tiny retrain, Mondays 03:00 UTC
    python flows/serve.py --preset sd15 --cron "0 3 * * 1" --set spo.lr=3e-5

The process stays up and runs each scheduled flow run itself; stop it with Ctrl-C. Trigger a run now with
``prefect deployment run spo-pipeline/spo-retrain-local``.
"""

from __future__ import annotations

import argparse
import os
import sys

DEFAULT_CRON = "0 3 * * 1"  # weekly, Monday 03:00, as the spo-retrain deployment in prefect.yaml


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--name", default="spo-retrain-local", help="deployment name (default: %(default)s)")
    parser.add_argument("--preset", default="tiny", help="config preset (default: %(default)s)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--params", default="params.yaml", help="params file (default: %(default)s)")
    parser.add_argument("--cron", default=DEFAULT_CRON, help="schedule (default: %(default)r, UTC)")
    args = parser.parse_args(argv)
    if not os.environ.get("PREFECT_API_URL"):
        sys.exit(
            "serve needs a Prefect server (an ephemeral one does not fire schedules): run `prefect server start` "
            "and export PREFECT_API_URL=http://127.0.0.1:4200/api"
        )
    from flows.pipeline import spo_pipeline

    spo_pipeline.serve(
        name=args.name,
        cron=args.cron,
        parameters={"preset": args.preset, "overrides": args.overrides, "params_file": args.params},
        tags=["spo", "retrain"],
        description="Scheduled SPO retraining served from this machine",
        limit=1,  # one pipeline at a time on this machine
    )


if __name__ == "__main__":
    main()
