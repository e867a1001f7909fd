"""An exclusive lock on a project root: two pipelines (or a pipeline and a hand-run stage) in one project
directory would otherwise mix each other's checkpoints, outputs and registry versions.

The lock is ``fcntl.flock`` on ``<root>/.spo.lock``: the kernel drops it when its holder dies, so a lock
left by a killed process is recovered by the next start with nothing to clean. The file records the holder
(pid, host, command, since) for the message a second process gets. Re-entrant within a process, and
inherited by the children it launches (``accelerate launch`` of a stage under ``spo pipeline``) through
``SPO_LOCK_TOKEN``.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

from spo.errors import SPOError

LOCK_FILE = ".spo.lock"
TOKEN_ENV = "SPO_LOCK_TOKEN"


class ProjectLocked(SPOError):
    """Another process holds the project lock."""

    exit_code = 75  # EX_TEMPFAIL: try again later


_HELD: dict[str, tuple[int, int, str]] = {}  # resolved lock path -> (fd, depth, token)


def _holder(path: Path) -> str:
    try:
        info = json.loads(path.read_text() or "{}")
    except (OSError, json.JSONDecodeError):
        return "another process"
    return (
        f"pid {info.get('pid', '?')} on {info.get('host', '?')} since {info.get('since', '?')} "
        f"({info.get('command', '?')})"
    )


@contextlib.contextmanager
def project_lock(root: str | Path, what: str = "") -> Iterator[Path]:
    """Hold the exclusive lock on project ``root`` for the block; raise :class:`ProjectLocked` at once
    (naming the holder) when another process holds it."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    path = (root / LOCK_FILE).resolve()
    key = str(path)
    inherited = os.environ.get(TOKEN_ENV)
    if key in _HELD:  # re-entrant
        fd, depth, token = _HELD[key]
        _HELD[key] = (fd, depth + 1, token)
        try:
            yield path
        finally:
            fd, depth, token = _HELD[key]
            _HELD[key] = (fd, depth - 1, token)
        return
    if inherited and _token_of(path) == inherited:  # our parent holds it for us
        yield path
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise ProjectLocked(
            f"the project at {root.resolve()} is in use by {_holder(path)}; wait for it to finish "
            f"(or stop it) before running {what or 'this command'} here. Two runs in one project directory "
            "would mix their checkpoints and outputs; use a separate checkout (--set paths.root=...) to run "
            "in parallel."
        ) from None
    token = uuid.uuid4().hex
    info = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "since": time.strftime("%Y-%m-%d %H:%M:%S"),
        "command": what or " ".join(os.path.basename(a) if i == 0 else a for i, a in enumerate(sys.argv))[:200],
        "token": token,
    }
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(info).encode(), 0)
    _HELD[key] = (fd, 1, token)
    previous = os.environ.get(TOKEN_ENV)
    os.environ[TOKEN_ENV] = token
    try:
        yield path
    finally:
        _HELD.pop(key, None)
        if previous is None:
            os.environ.pop(TOKEN_ENV, None)
        else:
            os.environ[TOKEN_ENV] = previous
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
        os.close(fd)  # releases the flock


def _token_of(path: Path) -> str | None:
    try:
        return json.loads(path.read_text() or "{}").get("token")
    except (OSError, json.JSONDecodeError):
        return None
