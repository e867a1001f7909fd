"""Wall-clock of the whole tiny pipeline as `make run` runs it (`spo pipeline --preset tiny`), in a fresh copy.

    .venv/bin/python bench/bench_pipeline.py                 # fresh copy of the working tree in a temp dir
    .venv/bin/python bench/bench_pipeline.py --keep /tmp/run # keep the copy (outputs, mlflow/, dvc-ready)
    .venv/bin/python bench/bench_pipeline.py --set spm.max_steps=100   # any config override

The copy gets its own git repo (for the lineage tags), MLflow store and Prefect home (a cold Prefect start,
as on a fresh machine). `make install` (venv + pip) is not included. Prints the total wall and CPU time,
the per-stage wall time from the flow's summary, and the headline results; `--json` writes them to a file.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def fresh_copy(dest: Path) -> None:
    """The working tree as a fresh clone would have it: tracked and untracked-but-not-ignored files."""
    files = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    for rel in filter(None, files.split("\0")):
        src = REPO / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    git = ["git", "-c", "user.name=bench", "-c", "user.email=bench@example.invalid"]
    for args in (["git", "init", "-q"], [*git, "add", "-A"], [*git, "commit", "-qm", "bench"]):
        subprocess.run(args, cwd=dest, check=True, capture_output=True)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--keep", type=Path, default=None, help="run in this (new) folder and keep it")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    args = parser.parse_args()

    root = args.keep or Path(tempfile.mkdtemp(prefix="spo-bench-pipeline-"))
    root.mkdir(parents=True, exist_ok=True)
    fresh_copy(root)
    venv_bin = Path(sys.executable).parent
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_TRACKING_URI"))}
    env.update(
        PATH=f"{venv_bin}{os.pathsep}{env['PATH']}",
        PREFECT_HOME=str(root / ".prefect"),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        HF_HUB_OFFLINE="1",
        DO_NOT_TRACK="true",
        MLFLOW_DISABLE_TELEMETRY="true",
        TOKENIZERS_PARALLELISM="false",
    )
    cmd = ["spo", "pipeline", "--preset", "tiny", *[f"--set={o}" for o in args.overrides]]
    print(f"running `{' '.join(cmd)}` in {root}", flush=True)
    load_before = os.getloadavg()
    started = time.perf_counter()
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    (root / "bench_pipeline.log").write_text(proc.stdout + "\n" + proc.stderr)
    if proc.returncode:
        sys.exit(
            f"spo pipeline failed ({proc.returncode}); log: {root / 'bench_pipeline.log'}\n{proc.stderr[-3000:]}"
        )

    summary = json.loads((root / "reports" / "pipeline_summary.json").read_text())
    result = {
        "command": " ".join(cmd),
        "wall_s": round(wall, 1),
        "cpu_s": round(usage.ru_utime + usage.ru_stime, 1),
        "peak_rss_mb": round(usage.ru_maxrss / 1024),
        "load_avg_before": [round(x, 2) for x in load_before],
        "load_avg_after": [round(x, 2) for x in os.getloadavg()],
        "cpus": os.cpu_count(),
        "stage_wall_s": {name: s.get("seconds") for name, s in summary["stages"].items()},
        "flow_s": summary["seconds"],
        "registry": {k: summary["registry"][k] for k in ("model", "version", "decision", "champion")},
        "primary": {summary["primary_metric"]: summary["eval"].get(summary["primary_metric"])},
        "spm_accuracy": summary["spm_accuracy"]["accuracy"],
    }
    print(proc.stdout)
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    if args.keep is None:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
