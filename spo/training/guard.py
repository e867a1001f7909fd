"""One non-finite policy for every trainer: skip the step and count it, abort after N in a row, and never
write (save a model, write a checkpoint) a state that holds NaN/inf."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from spo.errors import NonFiniteError
from spo.utils import get_logger

log = get_logger(__name__)


def all_finite(tensors: Iterable[torch.Tensor]) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors)


def require_finite(tensors: Iterable[torch.Tensor], what: str, hint: str) -> None:
    """Raise :class:`NonFiniteError` (nothing written) when any tensor holds NaN/inf."""
    if not all_finite(tensors):
        raise NonFiniteError(f"{what} holds NaN/inf values; nothing was written. {hint}")


def require_sane(tensors: Iterable[torch.Tensor], what: str, max_abs: float, hint: str) -> None:
    """Raise :class:`NonFiniteError` when any value is NaN/inf or larger than ``max_abs`` in magnitude: an
    exploded run (e.g. a learning rate 10^4 too high) gives finite but absurd weights, and must fail like a
    NaN does instead of being published."""
    tensors = list(tensors)
    require_finite(tensors, what, hint)
    largest = max((float(t.detach().abs().max()) for t in tensors if t.numel()), default=0.0)
    if largest > max_abs:
        raise NonFiniteError(
            f"{what} exploded: a weight of magnitude {largest:.3g} (limit {max_abs:g}); nothing was written. {hint}"
        )


class NonFiniteGuard:
    """Counts non-finite steps. ``ok(finite, what)`` returns ``finite``; a ``False`` is logged and counted,
    and the ``limit``-th in a row raises :class:`NonFiniteError` with ``hint`` (what to change)."""

    def __init__(self, limit: int, name: str, hint: str):
        if limit < 1:
            raise ValueError("limit must be at least 1")
        self.limit, self.name, self.hint = limit, name, hint
        self.in_a_row = 0
        self.skipped = 0

    def ok(self, finite: bool, what: str = "loss", step: int | None = None) -> bool:
        if finite:
            self.in_a_row = 0
            return True
        self.in_a_row += 1
        self.skipped += 1
        where = f" at step {step}" if step is not None else ""
        log.warning(
            "%s: non-finite %s%s, step skipped (%d in a row, limit %d)",
            self.name, what, where, self.in_a_row, self.limit,
        )
        if self.in_a_row >= self.limit:
            raise NonFiniteError(
                f"{self.in_a_row} optimizer steps in a row produced a non-finite {what}{where}; training "
                f"stopped and no checkpoint was written from that state. {self.hint}"
            )
        return False

    def state_dict(self) -> dict[str, int]:
        return {"in_a_row": self.in_a_row, "skipped": self.skipped}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.in_a_row, self.skipped = int(state.get("in_a_row", 0)), int(state.get("skipped", 0))
