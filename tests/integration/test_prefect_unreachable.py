"""`spo pipeline` with PREFECT_API_URL pointing at a server that is down: one clear line, exit code 1."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_pipeline_with_unreachable_prefect_api_fails_in_one_line(tmp_path):
    with socket.socket() as s:  # a port nothing listens on once closed
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {
        "PATH": "/usr/bin:/bin",
        "PYTHONPATH": str(REPO),
        "HOME": str(tmp_path),
        "PREFECT_HOME": str(tmp_path / "prefect"),
        "PREFECT_API_URL": f"http://user:secret@127.0.0.1:{port}/api",
    }
    proc = subprocess.run(
        [sys.executable, "-m", "spo.cli", "pipeline", "--preset", "tiny"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert "Prefect API" in lines[0] and str(port) in lines[0] and "does not answer" in lines[0]
    assert "secret" not in proc.stderr  # credentials in the URL are redacted
    assert "Traceback" not in proc.stderr
