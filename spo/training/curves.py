"""Training curves: one row per optimizer step, written as CSV (``dvc plots``) with fixed columns."""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any


class CurveWriter:
    """Collects rows and writes them atomically with the declared columns (missing values left empty,
    NaN/inf written empty so that plotting tools never meet a non-number)."""

    def __init__(self, columns: Sequence[str], rows: Iterable[dict[str, Any]] = ()):
        self.columns = list(columns)
        self.rows: list[dict[str, Any]] = list(rows)

    def append(self, row: dict[str, Any]) -> None:
        self.rows.append(row)

    def __len__(self) -> int:
        return len(self.rows)

    def text(self) -> str:
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=self.columns, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        for row in self.rows:
            writer.writerow({k: _cell(row.get(k)) for k in self.columns})
        return buf.getvalue()

    def write(self, path: str | Path) -> Path:
        from spo.utils import atomic_write_text

        atomic_write_text(path, self.text())
        return Path(path)


def _cell(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return ""
    return value
