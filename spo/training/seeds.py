"""Seed streams: every random draw of a trainer comes from a generator keyed by where it happens.

A stream keyed by (seed, epoch, iteration, process) is the same whatever the process count, batching or
resume point that reaches it, which is what lets a resumed run end bit-identical to an uninterrupted one.
"""

from __future__ import annotations

import numpy as np
import torch


def seed_stream(seed: int, *parts: int) -> int:
    """An independent 32-bit seed for the position ``parts`` (e.g. epoch, iteration, process) of run ``seed``."""
    return int(np.random.SeedSequence([int(seed), *(int(p) for p in parts)]).generate_state(1)[0])


def seed_generator(seed: int, *parts: int, device: str | torch.device = "cpu") -> torch.Generator:
    """A torch generator on ``device`` seeded with :func:`seed_stream`."""
    g = torch.Generator(device=device)
    g.manual_seed(seed_stream(seed, *parts))
    return g
