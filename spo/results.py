"""What a stage returns: a small dataclass per stage, also written as strict JSON to the stage's report.

``run(cfg, ...) -> <Stage>Result``. The same object comes back whether the stage ran in this process or
as a child under ``accelerate launch`` (the parent reads the report the child wrote, see
:meth:`StageResult.read`). Results behave as read-only mappings too (``result["accuracy"]``), so code
that treated the old dict results keeps working.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, ClassVar, TypeVar

T = TypeVar("T", bound="StageResult")


def _finite_or_none(value: Any) -> Any:
    """Strict JSON: NaN and inf become null (json.dumps would write bare NaN, which is not JSON)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite_or_none(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_short(v)}" for k, v in value.items()) + "}"
    text = str(value)
    return text if len(text) <= 60 else text[:57] + "..."


@dataclasses.dataclass
class StageResult(Mapping):
    """Base of every stage result. Subclasses add typed fields; ``extra`` holds anything else reported."""

    stage: ClassVar[str] = ""
    # The fields of the one-line summary logged when the stage ends (empty: every scalar field).
    headline: ClassVar[tuple[str, ...]] = ()

    def summary(self) -> str:
        data = self.to_dict()
        names = self.headline or tuple(k for k, v in data.items() if isinstance(v, int | float | bool | str))
        return ", ".join(f"{k}={_short(data[k])}" for k in names if data.get(k) is not None) or "done"
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    # -- mapping view ---------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        out.update(self.extra)
        return _finite_or_none(out)

    def __getitem__(self, key: str) -> Any:
        data = self.to_dict()
        if key not in data:
            raise KeyError(key)
        return data[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.to_dict())

    def __len__(self) -> int:
        return len(self.to_dict())

    # -- construction ---------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls: type[T], data: Mapping[str, Any]) -> T:
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: v for k, v in data.items() if k in names}
        extra = {k: v for k, v in data.items() if k not in names}
        return cls(**known, extra=extra)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False, allow_nan=False) + "\n"

    def write(self, path: str | Path) -> Path:
        from spo.utils import atomic_write_text

        atomic_write_text(path, self.to_json())
        return Path(path)

    @classmethod
    def read(cls: type[T], path: str | Path) -> T:
        return cls.from_dict(json.loads(Path(path).read_text()))


def log_stage_end(stage: str, result: Any, seconds: float) -> None:
    """The last line a stage logs: how long it took and its headline numbers."""
    import logging

    summary = result.summary() if isinstance(result, StageResult) else "done"
    logging.getLogger("spo.stages").info("%s finished in %.1f s: %s", stage, seconds, summary)
