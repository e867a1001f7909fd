"""Learning-rate schedules as LambdaLR multipliers: linear warm-up, then constant, linear decay or cosine."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

Decay = Literal["constant", "linear", "cosine"]


def warmup_schedule(decay: Decay, warmup: int, total: int | None = None) -> Callable[[int], float]:
    """Multiplier of the base LR at optimizer step ``step`` (0-based).

    ``constant``: warm-up ``(step + 1) / (warmup + 1)`` then 1 (diffusers' constant_with_warmup when
    warmup = 0); ``linear``: then linear decay to 0 at ``total`` (DeepSpeed's WarmupDecayLR, as the
    official SPM run); ``cosine``: warm-up ``(step + 1) / warmup`` then half a cosine to 0 at ``total``.
    """
    if decay != "constant" and not total:
        raise ValueError(f"a {decay} schedule needs the total number of steps")

    def constant(step: int) -> float:
        return (step + 1) / (warmup + 1) if step < warmup else 1.0

    def linear(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return max(0.0, (total - step) / max(1, total - warmup))

    def cosine(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))

    return {"constant": constant, "linear": linear, "cosine": cosine}[decay]
