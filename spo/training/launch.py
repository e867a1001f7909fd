"""The one place the trainers build their accelerate ``Accelerator``, with the launch checked first.

On a host without CUDA, ``accelerate launch --multi_gpu --num_processes 2`` starts two processes whose
``WORLD_SIZE`` is 2 but whose Accelerators each see one process (accelerate falls back to no distribution):
two independent trainers racing on the same checkpoints and outputs. :func:`check_world_size` stops that
at trainer start. (``accelerate launch --cpu --num_processes 2`` leaves no trace in the environment: it
runs one process, which nothing can tell from a deliberate single-process run.)
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from spo.errors import SPOError

CPU_LAUNCH = "ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes {n} -m spo.cli ..."


def launched_world_size(environ: Mapping[str, str] | None = None) -> int:
    """The process count the launcher (torchrun / accelerate launch) started: ``WORLD_SIZE``, else
    ``LOCAL_WORLD_SIZE``, else 1."""
    env = os.environ if environ is None else environ
    for key in ("WORLD_SIZE", "LOCAL_WORLD_SIZE"):
        value = env.get(key, "").strip()
        if value:
            try:
                return int(value)
            except ValueError:
                raise SPOError(f"{key}={value!r} is not a process count; unset it or launch again") from None
    return 1


def check_world_size(num_processes: int, environ: Mapping[str, str] | None = None) -> None:
    """Raise when the launcher started more processes than accelerate joined into one run."""
    env = os.environ if environ is None else environ
    launched = launched_world_size(env)
    if launched > 1 and num_processes != launched:
        key = "WORLD_SIZE" if env.get("WORLD_SIZE", "").strip() else "LOCAL_WORLD_SIZE"
        raise SPOError(
            f"the launcher started {launched} processes ({key}={launched}) but accelerate sees "
            f"{num_processes}: each process would train on its own, racing on the same outputs. On a host "
            f"without GPUs set ACCELERATE_USE_CPU=true (`{CPU_LAUNCH.format(n=launched)}`, or "
            f"`torchrun --nproc_per_node {launched}` with it; `accelerate launch --cpu` runs one process "
            "only); on GPUs check that CUDA sees every device (CUDA_VISIBLE_DEVICES, nvidia-smi)."
        )


def checked_accelerator(**kwargs):
    """``accelerate.Accelerator(**kwargs)``, refused when it did not join every launched process."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    # accelerate keeps one process-wide AcceleratorState and refuses a second Accelerator with another
    # mixed precision. A flow runs its stages in one process (train-spm at fp32, then train at bf16),
    # and each stage's Accelerator replaces the last, so the stale state goes; the process group
    # (PartialState) stays.
    AcceleratorState._reset_state(reset_partial_state=False)
    accelerator = Accelerator(**kwargs)
    check_world_size(accelerator.num_processes)
    return accelerator
