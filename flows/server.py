"""A temporary Prefect API server that cannot outlive ``spo pipeline``.

Without ``PREFECT_API_URL`` Prefect starts an "ephemeral" server in a subprocess and stops it at exit --
but not when the pipeline is killed (kill -9, OOM killer, a preempted node): every such kill used to leak a
server. This one is Prefect's own subprocess server started with the Linux parent-death signal set, so the
kernel stops it whenever its parent dies, and SIGTERM/SIGINT of the pipeline stop it through a normal exit.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:  # runs in the child between fork and exec
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _server_class():
    from prefect.server.api.server import SubprocessASGIServer

    class ParentBoundServer(SubprocessASGIServer):
        def _run_uvicorn_command(self):
            popen = subprocess.Popen
            subprocess.Popen = lambda *a, **k: popen(*a, preexec_fn=_die_with_parent, **k)  # type: ignore[misc]
            try:
                return super()._run_uvicorn_command()
            finally:
                subprocess.Popen = popen  # type: ignore[misc]

    return ParentBoundServer


@contextlib.contextmanager
def _exit_on_sigterm() -> Iterator[None]:
    """SIGTERM (what schedulers and `kill` send) exits through the finally blocks, like Ctrl-C."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def temporary_prefect_server() -> Iterator[str | None]:
    """Yield the API URL of a temporary server (None, and nothing started, when PREFECT_API_URL is set)."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    if os.environ.get("PREFECT_API_URL") or PREFECT_API_URL.value():
        yield None
        return
    server = _server_class()()
    with _exit_on_sigterm():
        # Prefect's default start-up timeout (20 s) is too short for a first start, which runs the database
        # migrations, on a busy 2-core machine: 120 s unless PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS is set.
        server.start(timeout=None if os.environ.get("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS") else 120)
        try:
            with temporary_settings({PREFECT_API_URL: server.api_url}):
                yield server.api_url
        finally:
            server.stop()
