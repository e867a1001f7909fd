"""Fault injection, part 3: the pipeline process -- its Prefect server dies with it, a second run in the
same project is refused, and the stage cache is data only (a tampered record runs nothing)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from e2e_helpers import REPO

pytestmark = pytest.mark.e2e


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (exited, not yet reaped) counts as gone
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def test_the_temporary_prefect_server_dies_with_a_killed_pipeline(tmp_path):
    script = textwrap.dedent(
        """
        import time
        from flows.server import temporary_prefect_server
        from prefect.server.api.server import SubprocessASGIServer
        with temporary_prefect_server() as url:
            server = next(iter(SubprocessASGIServer._instances.values()))
            print(server.server_process.pid, url, flush=True)
            time.sleep(120)
        """
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(tmp_path / "prefect"), PREFECT_SERVER_ANALYTICS_ENABLED="false", PYTHONPATH=str(REPO))
    proc = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO
    )
    line = proc.stdout.readline().split()
    if len(line) != 2:  # the server did not come up: show why instead of an empty list
        proc.kill()
        pytest.fail(f"temporary Prefect server did not start: {proc.communicate()[1][-3000:]}")
    assert line[1].startswith("http://127.0.0.1:"), line
    server_pid = int(line[0])
    assert _alive(server_pid)
    os.kill(proc.pid, signal.SIGKILL)  # no finally, no atexit: only the kernel can stop the server now
    proc.wait()
    deadline = time.monotonic() + 30
    while _alive(server_pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _alive(server_pid), "the Prefect server outlived the killed pipeline"


def test_a_stage_is_refused_while_another_run_holds_the_project(tmp_path):
    hold = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom spo.lock import project_lock\n"
         "with project_lock(sys.argv[1], 'spo pipeline (tiny)'):\n print('held', flush=True); time.sleep(60)",
         str(tmp_path)],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    try:
        assert hold.stdout.readline().strip() == "held"
        proc = subprocess.run(
            [sys.executable, "-m", "spo.cli", "prepare", "--preset", "tiny", "--params", "/dev/null",
             "--set", f"paths.root={tmp_path}", "--set", "tracking.enabled=false"],
            capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)},
        )
    finally:
        hold.kill()
        hold.wait()
    assert proc.returncode == 75, proc.stderr
    assert f"in use by pid {hold.pid}" in proc.stderr and "spo pipeline (tiny)" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_tampered_stage_cache_record_is_a_miss_and_runs_nothing(tmp_path, monkeypatch):
    import flows.pipeline as pipeline

    warnings: list[str] = []

    class _Logger:
        def warning(self, msg, *args):
            warnings.append(msg % args)

    monkeypatch.setattr(pipeline, "get_run_logger", lambda: _Logger())
    cache = pipeline.StageCache(tmp_path)
    cache.put("k1", "train_spm", {"result": {"steps": 3}, "outputs_hash": "h"})
    assert cache.get("k1")["result"] == {"steps": 3}
    marker = tmp_path / "PAYLOAD_RAN"
    import pickle

    class Payload:
        def __reduce__(self):
            return (Path.write_text, (marker, "x"))

    cache.path("k1").write_bytes(pickle.dumps(Payload()))  # a pickle where JSON belongs
    assert cache.get("k1") is None and not marker.exists()
    cache.path("k1").write_text(json.dumps({"key": "other", "result": {}}))  # a record for another key
    assert cache.get("k1") is None
    assert len(warnings) == 2
    # Prefect never persists results (its result files are pickles).
    assert all(t.persist_result is False for t in pipeline.STAGE_TASKS.values())
    assert pipeline.registry_task.persist_result is False and pipeline.spo_pipeline.persist_result is False
