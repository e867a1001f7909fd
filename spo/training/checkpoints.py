"""One checkpoint manager for every trainer.

Layout: ``<root>/checkpoint-<step>/`` holding whatever the trainer writes (accelerate ``save_state``, LoRA,
pending pairs) and, written last as the completeness marker, ``trainer_state.json``::

    {"meta": {"run_id", "config_hash", "config", "num_processes", "step", "saved_at"}, "state": {...}}

Rules (the same for base, SPM and SPO):

* **Run identity.** Every run has a run id; a checkpoint records it with the hash of the config sections
  that shape the result and the process count. A resumed run keeps the run id of its checkpoint.
* **Fresh run.** Without ``--resume``, checkpoints of an earlier run are *moved aside* to
  ``<root>/previous/<run id>/`` (the set moved before that is deleted) and the log says so: a new run never
  prunes its own checkpoints because an older run had higher step numbers, and ``--resume latest`` can
  never continue the older run by mistake.
* **``--resume latest``**: the newest complete checkpoint *of the same lineage* (same config hash); none at
  all starts a fresh run (so a preemptible job can always pass ``--resume latest``); only checkpoints of
  another config is an error that says how to choose. **``--resume PATH``**: that checkpoint, with a
  warning listing every config key that differs.
* **Process count.** A checkpoint resumes on the process count it was written with unless the trainer
  stores its data position in global units (``elastic=True``: SPO, whose position is the prompts sampled
  by all processes); otherwise (SPM, DPO: their stream position is per process) it is refused with
  both counts.
* **Atomic.** A checkpoint is written into ``.checkpoint-<step>.tmp`` and renamed once its state file is in;
  half-written folders are never listed and are swept on the next start. A non-finite state is never
  written. Rotation keeps the newest ``keep`` checkpoints of this run.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from spo.errors import SPOError
from spo.utils import atomic_write_json, get_logger, json_digest, replace_dir

log = get_logger(__name__)

STATE_FILE = "trainer_state.json"
PREFIX = "checkpoint-"
PREVIOUS_DIR = "previous"


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict):
        out: dict[str, Any] = {}
        for k, v in node.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: node}


def _article(noun: str) -> str:
    """'an' before a vowel sound: a vowel, or an initialism read letter by letter ("an SPM checkpoint")."""
    word = noun.split()[0] if noun.split() else noun
    if word[:1].lower() in "aeiou" or (word.isupper() and word[:1] in "AEFHILMNORSX"):
        return "an"
    return "a"


def config_differences(old: dict[str, Any] | None, new: dict[str, Any] | None) -> list[str]:
    """``key: old -> new`` for every config key that differs (sections as nested dicts)."""
    a, b = _flatten(old or {}), _flatten(new or {})
    return [f"{k}: {a.get(k, '(absent)')!r} -> {b.get(k, '(absent)')!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


@dataclass(frozen=True)
class RunIdentity:
    """Who wrote a checkpoint: the run, the config that shapes its result, and its process count."""

    run_id: str
    config_hash: str
    num_processes: int = 1
    config: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def new(cls, config: dict[str, Any], num_processes: int = 1, run_id: str | None = None) -> RunIdentity:
        """``config``: the config sections the result depends on, e.g. ``{s: cfg.to_dict()[s] for s in ...}``."""
        return cls(run_id or uuid.uuid4().hex[:12], json_digest(config), num_processes, config)

    @classmethod
    def for_config(cls, cfg: Any, sections: tuple[str, ...], num_processes: int = 1) -> RunIdentity:
        data = cfg.to_dict()
        return cls.new({s: data[s] for s in sections}, num_processes)

    def meta(self, step: int) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "config_hash": self.config_hash,
            "config": self.config,
            "num_processes": self.num_processes,
            "step": step,
            "saved_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }


@dataclass
class Resumed:
    """A checkpoint chosen for resuming: its folder, its meta and the trainer's state."""

    path: Path
    meta: dict[str, Any]
    state: dict[str, Any]


class _SingleProcess:
    is_main_process = True
    num_processes = 1

    def wait_for_everyone(self) -> None:
        pass


class CheckpointManager:
    """Checkpoints of one trainer under ``root`` (e.g. ``checkpoints/spo``); see the module docstring.

    ``accelerator``: anything with ``is_main_process`` and ``wait_for_everyone()`` (an accelerate
    Accelerator); None for single-process trainers.
    """

    def __init__(
        self,
        root: str | Path,
        identity: RunIdentity,
        keep: int | None = None,
        accelerator: Any | None = None,
        elastic: bool = False,
        name: str = "checkpoint",
    ):
        self.root = Path(root)
        self.identity = identity
        self.keep = keep
        self.acc = accelerator or _SingleProcess()
        self.elastic = elastic
        self.name = name

    # -- listing -------------------------------------------------------------------------------------
    @staticmethod
    def step_of(path: Path) -> int:
        return int(path.name.removeprefix(PREFIX))

    def list(self) -> list[Path]:
        """Complete checkpoints (the state file is written last), oldest first."""
        if not self.root.is_dir():
            return []
        found = [
            p
            for p in self.root.glob(f"{PREFIX}*")
            if p.is_dir() and p.name.removeprefix(PREFIX).isdigit() and (p / STATE_FILE).exists()
        ]
        return sorted(found, key=self.step_of)

    @staticmethod
    def read_meta(path: Path) -> dict[str, Any]:
        try:
            data = json.loads((Path(path) / STATE_FILE).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise SPOError(f"{path} is not a readable checkpoint ({exc}); pick another or start fresh") from exc
        return data.get("meta", {}) if isinstance(data, dict) else {}

    # -- starting a run ------------------------------------------------------------------------------
    def start(self, resume: str | Path | None) -> Resumed | None:
        """Resolve ``resume`` (None, "latest" or a path) and prepare the folder; returns the checkpoint to
        resume from (None: a fresh run). Call on every process; only the main process moves files."""
        if self.acc.is_main_process:
            self._sweep_partial()
        chosen = self.resolve(resume)
        if chosen is None:
            if self.acc.is_main_process:
                self._move_aside_earlier_run()
            self.acc.wait_for_everyone()
            return None
        resumed = self.load(chosen)
        self.acc.wait_for_everyone()
        return resumed

    def resolve(self, resume: str | Path | None) -> Path | None:
        if resume is None or resume == "":
            return None
        if str(resume) == "latest":
            found = self.list()
            if not found:
                log.info("--resume latest: no %s under %s, starting a fresh run", self.name, self.root)
                return None
            same = [p for p in found if self.read_meta(p).get("config_hash") == self.identity.config_hash]
            if same:
                return same[-1]
            newest = found[-1]
            diffs = config_differences(self.read_meta(newest).get("config"), self.identity.config)
            raise SPOError(
                f"--resume latest: the checkpoints under {self.root} were written with a different config "
                f"({'; '.join(diffs[:8]) or 'config hash differs'}). Resume one of them explicitly with "
                f"--resume {newest}, or start a fresh run without --resume (they are then moved aside)."
            )
        path = Path(resume)
        if not (path / STATE_FILE).exists():
            known = ", ".join(str(p) for p in self.list()) or f"(none under {self.root})"
            raise SPOError(
                f"--resume {resume}: not {_article(self.name)} {self.name} (no {STATE_FILE} in it). Use --resume "
                f"latest, or one of: {known}. Start without --resume for a fresh run."
            )
        return path

    def load(self, path: Path) -> Resumed:
        data = json.loads((path / STATE_FILE).read_text())
        meta, state = data.get("meta", {}), data.get("state", {})
        if meta.get("config_hash") != self.identity.config_hash:
            diffs = config_differences(meta.get("config"), self.identity.config)
            log.warning(
                "resuming %s with a different config than it was written with; the run continues with the "
                "new one. Differences: %s",
                path,
                "; ".join(diffs) or "(config hash differs)",
            )
        saved_world = int(meta.get("num_processes", self.identity.num_processes))
        if saved_world != self.identity.num_processes and not self.elastic:
            relaunch = (
                f"accelerate launch --num_processes {saved_world} ...; on a host without GPUs with "
                "ACCELERATE_USE_CPU=true and --multi_gpu"
                if saved_world > 1
                else "without accelerate launch, or with --num_processes 1"
            )
            raise SPOError(
                f"{path} was written by {saved_world} process(es) but this run has "
                f"{self.identity.num_processes}; the data position of {_article(self.name)} {self.name} is per "
                f"process, so resuming on another count would skip or repeat data. Relaunch on {saved_world} "
                f"process(es) ({relaunch}), or start a fresh run without --resume (its checkpoints are "
                "moved aside)."
            )
        if meta.get("run_id"):  # a resumed run continues the lineage of its checkpoint
            self.identity = RunIdentity(
                meta["run_id"], self.identity.config_hash, self.identity.num_processes, self.identity.config
            )
        log.info("resuming %s (run %s, step %s)", path, meta.get("run_id", "?"), meta.get("step", "?"))
        return Resumed(path, meta, state)

    def _sweep_partial(self) -> None:
        if not self.root.is_dir():
            return
        for tmp in self.root.glob(f".{PREFIX}*.tmp"):
            log.info("removing a half-written %s left by a killed run: %s", self.name, tmp)
            shutil.rmtree(tmp, ignore_errors=True)

    def _move_aside_earlier_run(self) -> None:
        found = [p for p in self.root.glob(f"{PREFIX}*") if p.is_dir()] if self.root.is_dir() else []
        if not found:
            return
        metas = [self.read_meta(p) if (p / STATE_FILE).exists() else {} for p in found]
        old_id = next((m["run_id"] for m in metas if m.get("run_id")), "unknown")
        previous = self.root / PREVIOUS_DIR
        shutil.rmtree(previous, ignore_errors=True)  # keep one earlier run, not all of them
        dest = previous / old_id
        dest.mkdir(parents=True)
        for p in found:
            os.replace(p, dest / p.name)
        log.warning(
            "fresh run: moved %d %s(s) of an earlier run (run %s, steps %s) from %s to %s. Use --resume latest "
            "to continue a run instead of starting a new one.",
            len(found),
            self.name,
            old_id,
            ", ".join(p.name.removeprefix(PREFIX) for p in sorted(found, key=lambda q: q.name)),
            self.root,
            dest,
        )

    # -- saving --------------------------------------------------------------------------------------
    def save(
        self,
        step: int,
        state: dict[str, Any],
        write: Callable[[Path], None] | None = None,
        finite: bool = True,
    ) -> Path | None:
        """Write checkpoint ``step``: ``write(tmp)`` runs on every process (accelerate's save_state is
        collective), then the main process writes the state file and renames the folder into place.
        Returns the folder, or None when ``finite`` is False (a non-finite state is never written)."""
        if not finite:
            log.error("%s at step %d NOT written: the state holds NaN/inf values", self.name, step)
            return None
        final = self.root / f"{PREFIX}{step}"
        tmp = self.root / f".{final.name}.tmp"
        if self.acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        self.acc.wait_for_everyone()
        if write is not None:
            write(tmp)
        self.acc.wait_for_everyone()  # every process's files are in tmp before it is renamed
        if self.acc.is_main_process:
            atomic_write_json(tmp / STATE_FILE, {"meta": self.identity.meta(step), "state": state})
            replace_dir(tmp, final)
            if self.keep:
                for old in self.list()[: -self.keep]:
                    shutil.rmtree(old, ignore_errors=True)
        self.acc.wait_for_everyone()
        return final
