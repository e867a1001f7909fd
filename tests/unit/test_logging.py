"""spo's log handler follows sys.stderr: a handler bound to the stream of the moment broke later tests
(and any host that swaps stderr, such as pytest's capture or Prefect) with writes to a closed stream."""

from __future__ import annotations

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
