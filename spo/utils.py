"""Small shared helpers: atomic outputs, logging, seeding, device and dtype choice, hashing."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import random
import re
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

LOG_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"


def get_logger(name: str) -> logging.Logger:
    return logging.getLogger(name)


class _CurrentStderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time of the record: pytest's capture and Prefect swap it,
    and a handler bound to an old stream would write to a closed file ("I/O operation on closed file")."""

    @property
    def stream(self):  # type: ignore[override]
        import sys

        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def setup_logging(level: int | str = logging.INFO) -> None:
    root = logging.getLogger()
    if not any(getattr(h, "_spo", False) for h in root.handlers):
        handler = _CurrentStderrHandler()
        handler.setFormatter(logging.Formatter(LOG_FORMAT, datefmt="%H:%M:%S"))
        handler._spo = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    root.setLevel(level)
    from spo.progress import quiet_library_bars

    quiet_library_bars()
    logging.captureWarnings(True)  # one log format; and KNOWN_NOISE (spo/__init__.py) filters py.warnings
    # Libraries that are chatty at INFO.
    for noisy in ("httpx", "urllib3", "alembic", "great_expectations", "filelock", "asyncio", "mlflow.system_metrics"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


@contextlib.contextmanager
def atomic_dir(dest: str | Path) -> Iterator[Path]:
    """Yield a temporary directory next to ``dest``; on success it replaces ``dest``.

    On an exception (or a kill) the previous ``dest`` is untouched and the temporary folder is removed
    (or, after a kill, left as ``.<name>.tmp-*`` beside it, never mistaken for the output).
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    recover_dir(dest)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    # mkdtemp makes 0700; outputs should get the usual umask-based permissions.
    os.chmod(tmp, 0o777 & ~_umask())
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_dir(tmp, dest)


def replace_dir(src: Path, dest: Path) -> None:
    """Move ``src`` to ``dest``, swapping out an existing ``dest`` with two renames."""
    old = None
    if dest.exists() or dest.is_symlink():
        old = dest.parent / f".{dest.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(dest, old)
    os.replace(src, dest)
    if old is not None:
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)


def recover_dir(dest: str | Path) -> None:
    """Repair what a kill left around ``dest`` (see :func:`replace_dir`): when ``dest`` is missing but its
    previous version ``.<name>.old-*`` is there (killed between the two renames), restore it; then remove
    stale ``.<name>.old-*`` and ``.<name>.tmp-*`` leftovers. Says what it did."""
    dest = Path(dest)
    if not dest.parent.is_dir():
        return
    olds = sorted(dest.parent.glob(f".{glob_escape(dest.name)}.old-*"), key=lambda p: p.stat().st_mtime)
    if olds and not (dest.exists() or dest.is_symlink()):
        os.replace(olds[-1], dest)
        get_logger(__name__).warning("restored %s from %s (a previous write was killed)", dest, olds[-1].name)
        olds = olds[:-1]
    for stale in [*olds, *dest.parent.glob(f".{glob_escape(dest.name)}.tmp-*")]:
        get_logger(__name__).info("removing %s, left by a killed write", stale)
        if stale.is_dir() and not stale.is_symlink():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)


def glob_escape(name: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", name)


_SECRET_URL = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<userinfo>[^/@\s]+)@")
_SECRET_QUERY = re.compile(r"(?i)(?P<key>[?&](?:token|access_token|password|passwd|secret|key|sig|signature)=)[^&\s]+")


def redact(text: Any) -> Any:
    """``text`` with credentials in URLs masked: ``https://user:pw@host`` -> ``https://***@host`` and
    ``?token=...`` -> ``?token=***``. Non-strings are returned unchanged."""
    if not isinstance(text, str):
        return text
    text = _SECRET_URL.sub(lambda m: f"{m['scheme']}***@", text)
    return _SECRET_QUERY.sub(lambda m: f"{m['key']}***", text)


def redact_tree(node: Any) -> Any:
    """:func:`redact` applied to every string in nested dicts/lists (a config, before it is logged)."""
    if isinstance(node, dict):
        return {k: redact_tree(v) for k, v in node.items()}
    if isinstance(node, list | tuple):
        return [redact_tree(v) for v in node]
    return redact(node)


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    """Strict JSON (NaN/inf written as null: a bare ``NaN`` is not JSON and breaks other readers)."""
    text = json.dumps(strict_json(obj), indent=2, sort_keys=False, default=_json_default, allow_nan=False)
    atomic_write_text(path, text + "\n")


def strict_json(obj: Any) -> Any:
    """``obj`` with every non-finite float replaced by None (recursively), ready for strict JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: strict_json(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [strict_json(v) for v in obj]
    if hasattr(obj, "item") and getattr(obj, "ndim", 1) == 0:  # numpy / torch scalars
        return strict_json(obj.item())
    return obj


def _json_default(o: Any) -> Any:
    if isinstance(o, Path):
        return str(o)
    if hasattr(o, "item"):
        return o.item()
    if hasattr(o, "tolist"):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def json_digest(obj: Any, length: int | None = 16) -> str:
    """sha256 of ``obj``'s canonical JSON (sorted keys), hex, cut to ``length``: config and cache keys."""
    text = json.dumps(obj, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text())


def seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def hash_tree(path: str | Path) -> str:
    """Content hash of a file or directory (relative names + bytes), stable across machines."""
    path = Path(path)
    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for f in files:
        h.update(str(f.relative_to(path) if f != path else f.name).encode())
        h.update(sha256_file(f).encode())
    return h.hexdigest()


def torch_device() -> str:
    import torch

    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def torch_dtype(name: str, device: str | None = None, cpu_bf16: bool = False):
    """Config dtype name -> torch dtype. CPU computes in fp32 (half kernels are slow or missing) unless
    ``runtime.cpu_bf16`` asks for bf16 weights, the accelerator's mixed-precision path."""
    import torch

    device = device or torch_device()
    if device == "cpu":
        return torch.bfloat16 if cpu_bf16 else torch.float32
    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "no": torch.float32}[name]


def weight_dtype(cfg, device):
    """The frozen networks' dtype for ``cfg`` on ``device`` (``model.dtype``, ``runtime.cpu_bf16``)."""
    return torch_dtype(cfg.model.dtype, str(getattr(device, "type", device)).split(":")[0], cfg.runtime.cpu_bf16)


def effective_mixed_precision(name: str, cpu_bf16: bool = False) -> str:
    """accelerate's mixed_precision: as configured on CUDA; on CPU "no" (fp16 autocast is unsupported there),
    or "bf16" with ``runtime.cpu_bf16`` so that fp32 trained parameters meet bf16 frozen weights under autocast."""
    if torch_device() == "cuda":
        return name
    return "bf16" if cpu_bf16 else "no"


def require_path(path: str | Path, what: str, hint: str) -> Path:
    path = Path(path)
    if not path.exists():
        from spo.errors import SPOError

        raise SPOError(f"{what} not found at {path}. {hint}")
    return path
