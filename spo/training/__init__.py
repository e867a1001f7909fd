"""The training kit shared by the three trainers (``spo base``, ``spo train-spm``, ``spo train``).

* :mod:`~spo.training.checkpoints` -- one checkpoint manager: run identity (run id, config hash, process
  count), fresh-run handling (an earlier run's checkpoints are moved aside, never adopted), rotation,
  ``resolve("latest" | PATH)``, atomic save with a completeness marker, load;
* :mod:`~spo.training.guard` -- one non-finite policy: skip and count, abort after N in a row, and a
  finiteness check before anything is written;
* :mod:`~spo.training.seeds` -- reproducible seed streams keyed by (seed, epoch, step, process, ...);
* :mod:`~spo.training.curves` -- one CSV curve writer;
* :mod:`~spo.training.schedules` -- the learning-rate schedules (warm-up then constant / linear / cosine).
* :mod:`~spo.training.launch` -- the Accelerator of every trainer, refused when the launcher started more
  processes than accelerate joined (``WORLD_SIZE`` vs ``num_processes``).

The LoRA policy SPO and Diffusion-DPO both train is :func:`spo.models.lora.prepare_lora_policy`.
"""

from spo.training.checkpoints import CheckpointManager, RunIdentity
from spo.training.curves import CurveWriter
from spo.training.guard import NonFiniteGuard, all_finite, require_finite, require_sane
from spo.training.schedules import warmup_schedule
from spo.training.seeds import seed_generator, seed_stream

__all__ = [
    "CheckpointManager",
    "CurveWriter",
    "NonFiniteGuard",
    "RunIdentity",
    "all_finite",
    "require_finite",
    "require_sane",
    "seed_generator",
    "seed_stream",
    "warmup_schedule",
]
