"""spo's log handler follows sys.stderr: a handler bound to the stream of the moment broke later tests
(and any host that swaps stderr, such as pytest's capture or Prefect) with writes to a closed stream."""

from __future__ import annotations

import io
import subprocess
import sys
import textwrap


def test_log_records_reach_the_current_stderr_after_it_was_swapped(tmp_path):
    (tmp_path / "test_first.py").write_text(
        textwrap.dedent(
            """
            import logging
            from spo.utils import setup_logging
            def test_first():
                setup_logging()
                logging.getLogger("spo.x").info("first")
            """
        )
    )
    (tmp_path / "test_second.py").write_text(
        textwrap.dedent(
            """
            import logging
            def test_second(capsys):
                logging.getLogger("spo.x").warning("second")
                assert "second" in capsys.readouterr().err
            """
        )
    )
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_first.py", "test_second.py"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "I/O operation on closed file" not in proc.stdout + proc.stderr


def test_known_library_noise_is_dropped_and_other_warnings_are_not(caplog):
    import logging

    import spo

    caplog.set_level(logging.WARNING)
    fallback = logging.getLogger("transformers.utils.import_utils")
    fallback.warning("`SiglipImageProcessor` requires torchvision (not installed); falling back to `X`.")
    fallback.warning("something else from transformers")
    lora = logging.getLogger("diffusers.loaders.lora_base")
    lora.warning("No LoRA keys associated to CLIPTextModel found with the prefix='text_encoder'.")
    messages = [r.getMessage() for r in caplog.records]
    assert messages == ["something else from transformers"]
    assert set(spo.KNOWN_NOISE) == {"transformers.utils.import_utils", "diffusers.loaders.lora_base", "py.warnings"}


def test_progress_bars_become_a_few_log_lines_off_a_terminal(caplog, monkeypatch):
    import logging
    import time

    from spo.progress import tqdm

    monkeypatch.setattr(sys, "stderr", io.StringIO())  # a log file, not a terminal
    monkeypatch.setenv("SPO_PROGRESS_INTERVAL", "0.1")
    caplog.set_level(logging.INFO, logger="spo.progress")
    started = time.monotonic()
    for _ in tqdm(range(40), desc="outer"):  # ~0.4 s: a line every 0.1 s
        time.sleep(0.01)
        for _ in tqdm(range(3), desc="inner", leave=False):  # instant: below the interval, silent
            pass
    elapsed = time.monotonic() - started
    lines = [r.getMessage() for r in caplog.records if r.name == "spo.progress"]
    written = sys.stderr.getvalue()  # what reaches the log file: only the log lines, if a handler is set
    assert "\r" not in written and "\x1b" not in written and "inner" not in written
    # At most one line per interval (plus the last), not one per update.
    assert 1 <= len(lines) <= elapsed / 0.1 + 2 and all(line.startswith("outer:") for line in lines)
    assert lines[-1].startswith("outer: 100%") and "40/40" in lines[-1]
    assert all("\r" not in line and "\x1b" not in line for line in lines)


def test_library_progress_bars_are_switched_off_in_a_log(monkeypatch):
    import os

    import diffusers.utils.logging as diffusers_logging

    from spo.progress import quiet_library_bars

    monkeypatch.delenv("HF_HUB_DISABLE_PROGRESS_BARS", raising=False)
    monkeypatch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "true")  # an explicit choice is kept
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    diffusers_logging.enable_progress_bar()
    try:
        quiet_library_bars()
        assert os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] == "1"
        assert os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] == "true"
        assert not diffusers_logging.is_progress_bar_enabled()
    finally:
        diffusers_logging.enable_progress_bar()
