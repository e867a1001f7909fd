"""Small shared helpers: atomic outputs, logging, seeding, device and dtype choice, hashing."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import random
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

LOG_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"


def get_logger(name: str) -> logging.Logger:
    return logging.getLogger(name)


def setup_logging(level: int | str = logging.INFO) -> None:
    root = logging.getLogger()
    if not any(getattr(h, "_spo", False) for h in root.handlers):
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter(LOG_FORMAT, datefmt="%H:%M:%S"))
        handler._spo = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    root.setLevel(level)
    # Libraries that are chatty at INFO.
    for noisy in ("httpx", "urllib3", "alembic", "great_expectations", "filelock", "asyncio"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


@contextlib.contextmanager
def atomic_dir(dest: str | Path) -> Iterator[Path]:
    """Yield a temporary directory next to ``dest``; on success it replaces ``dest``.

    On an exception (or a kill) the previous ``dest`` is untouched and the temporary folder is removed
    (or, after a kill, left as ``.<name>.tmp-*`` beside it, never mistaken for the output).
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
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
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


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


def torch_dtype(name: str, device: str | None = None):
    """Config dtype name -> torch dtype; CPU always computes in fp32 (half kernels are slow or missing)."""
    import torch

    device = device or torch_device()
    if device == "cpu":
        return torch.float32
    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "no": torch.float32}[name]


def effective_mixed_precision(name: str) -> str:
    """accelerate's mixed_precision, downgraded to "no" on CPU where fp16 autocast is unsupported."""
    return name if torch_device() == "cuda" else "no"


def require_path(path: str | Path, what: str, hint: str) -> Path:
    path = Path(path)
    if not path.exists():
        from spo.errors import SPOError

        raise SPOError(f"{what} not found at {path}. {hint}")
    return path
