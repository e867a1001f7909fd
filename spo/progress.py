"""Progress bars: tqdm on a terminal; in a log (stderr not a TTY: CI, a Prefect worker, ``make run > log``) no
redraws -- a bar that runs longer than ``SPO_PROGRESS_INTERVAL`` seconds (default 30) becomes one plain log
line every interval, and shorter ones (per-iteration sampling steps, eval batches) print nothing."""

from __future__ import annotations

import logging
import os
import re
import sys

from tqdm.auto import tqdm as _tqdm

_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
log = logging.getLogger("spo.progress")


def log_interval() -> float:
    return float(os.environ.get("SPO_PROGRESS_INTERVAL", "30"))


class _LogLines:
    """A file for tqdm that turns each refresh into one log line (carriage returns and cursor codes dropped)."""

    def write(self, text: str) -> None:
        line = _ANSI.sub("", text).replace("\r", "").strip()
        if line:
            log.info(line)

    def flush(self) -> None:
        pass


def _on_terminal() -> bool:
    return bool(getattr(sys.stderr, "isatty", lambda: False)())


class tqdm(_tqdm):  # noqa: N801 -- a drop-in for tqdm.auto.tqdm
    # No monitor thread: a refresh from it would log outside the stage's thread (and its Prefect run context).
    monitor_interval = 0

    def __init__(self, *args, **kwargs):
        if kwargs.get("file") is None and not _on_terminal() and not kwargs.get("disable"):
            interval = log_interval()
            kwargs.update(file=_LogLines(), ascii=True, mininterval=interval, delay=interval, disable=False)
        super().__init__(*args, **kwargs)


def quiet_library_bars() -> None:
    """Off a terminal, the libraries' own bars (hub and transformers weight loading, diffusers' pipeline
    loading, MLflow artifact transfers) are redraws in a log too: switch them off. Explicit settings win."""
    if _on_terminal():
        return
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    diffusers_logging = sys.modules.get("diffusers.utils.logging")
    if diffusers_logging is not None:
        diffusers_logging.disable_progress_bar()
