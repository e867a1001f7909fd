"""Model and data references: the one parser for every config value that names a model, weights or dataset.

A reference is one of four kinds::

    local      /abs/path   ~/x   ./models/base   ../x   models/base (when it exists)   a/b/c (see below)
    hub        org/name            org/name@<revision>
    hub_file   org/name:file.pt    org/name@<revision>:sub/dir/file.pth
    registry   models:/<name>@<alias>   models:/<name>/<version>

The ``pretrained:`` prefix of ``spm.source`` is not part of a reference: callers strip it.

Grammar and resolution order (:meth:`ModelRef.parse`), which keeps :meth:`spo.config.Config.resolve_ref`'s
semantics exactly:

1. ``models:/...`` is a registry URI (``name`` and ``alias``/``version`` are any text without ``/`` or ``@``).
2. ``~...`` or an absolute path is a local path (``~`` expanded).
3. ``./x`` / ``../x`` (and ``.`` / ``..``) are project paths: ``<root>/x`` whether or not it exists.
4. Any other relative text is a project path ``<root>/x`` when that exists, else a path relative to the working
   directory when that exists (so an existing folder always wins over a hub id of the same spelling).
5. Otherwise text of hub shape is a hub reference: ``ORG/NAME[@REVISION][:FILENAME]`` where ORG and NAME are
   ``[A-Za-z0-9][\\w.-]*`` (Hugging Face's repo-id alphabet; ``.`` inside names is valid: ``org/name.v2``),
   REVISION is a branch, tag or commit sha without ``:``/``@``/whitespace (``refs/pr/1`` is fine), and FILENAME
   a relative path inside the repo (no ``..`` part). The revision is written before the file.
6. Anything else that is not malformed is a local path relative to the working directory that does not
   exist (yet): ``a/b/c``, a bare ``name`` (legacy one-word hub ids such as ``gpt2`` are not hub ids here:
   write ``openai-community/gpt2``). Loaders report "no model at ..." for it, as today's code does.

Malformed (a :class:`RefError`; :class:`spo.config.Config` turns it into a ConfigError naming the key): empty
text, a ``pretrained:`` prefix, a ``models:/`` URI outside the two forms, and hub-shaped text with an empty or
invalid revision or file (``org/name@``, ``org/name:``, ``org/name:../x``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from spo.errors import SPOError

RefKind = Literal["local", "hub", "hub_file", "registry"]
LOCAL: RefKind = "local"
HUB: RefKind = "hub"
HUB_FILE: RefKind = "hub_file"
REGISTRY: RefKind = "registry"

_NAME = r"[A-Za-z0-9][\w.-]*"
HUB_ID_RE = re.compile(rf"{_NAME}/{_NAME}")
_HUB_PREFIX_RE = re.compile(rf"(?P<repo>{_NAME}/{_NAME})(?P<rest>[@:].*)?", re.DOTALL)
_REVISION_RE = re.compile(r"[^\s:@]+")
_REGISTRY_RE = re.compile(r"models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/@]+)|/(?P<version>[^/@]+))")
REGISTRY_PREFIX = "models:/"


class RefError(SPOError, ValueError):
    """A malformed model/data reference (the message shows the text and the accepted forms)."""


def is_hub_id(text: str) -> bool:
    """``org/name`` exactly (no revision, no file): the shape, not whether the repo exists."""
    return bool(HUB_ID_RE.fullmatch(text))


@dataclass(frozen=True)
class ModelRef:
    """One parsed reference (see the module docstring). Build with :meth:`parse` or the constructors below.

    ``path``: local kind only, the resolved location (root- or cwd-anchored, ``~`` expanded). ``repo_id``,
    ``revision``, ``filename``: hub kinds. ``uri``, ``registry_name``, ``alias``, ``version``: registry kind.
    ``text`` (as written) and ``anchor`` (``absolute`` | ``root`` | ``cwd``) are not part of equality.
    """

    kind: RefKind
    path: Path | None = None
    repo_id: str | None = None
    filename: str | None = None
    revision: str | None = None
    uri: str | None = None
    registry_name: str | None = None
    alias: str | None = None
    version: str | None = None
    text: str = field(default="", compare=False)
    anchor: Literal["absolute", "root", "cwd"] | None = field(default=None, compare=False)

    # -- parsing -----------------------------------------------------------------------------------------
    @classmethod
    def parse(cls, text: str | Path | ModelRef, root: str | Path = ".") -> ModelRef:
        """Parse ``text``; relative paths are project paths under ``root`` (``paths.root``). Raises RefError."""
        if isinstance(text, ModelRef):
            return text
        s = str(text)
        if not s.strip():
            raise RefError(
                "empty model reference; give a local path, a hub id (org/name) or models:/NAME@ALIAS"
            )
        if s != s.strip():
            raise RefError(f"model reference {s!r} has leading or trailing whitespace")
        if s.startswith(REGISTRY_PREFIX):
            return cls._parse_registry(s)
        if s.startswith("pretrained:"):
            raise RefError(
                f"{s!r}: the pretrained: prefix belongs to spm.source only; pass the reference after it"
            )
        root = Path(root)
        path = Path(s).expanduser()
        if path.is_absolute():
            return cls(LOCAL, path=path, text=s, anchor="absolute")
        rooted = root / path
        if s in (".", "..") or s.startswith(("./", "../")):
            return cls(LOCAL, path=rooted, text=s, anchor="root")
        if rooted.exists():
            return cls(LOCAL, path=rooted, text=s, anchor="root")
        if path.exists():
            return cls(LOCAL, path=path.absolute(), text=s, anchor="cwd")
        m = _HUB_PREFIX_RE.fullmatch(s)
        if m:
            return cls._parse_hub(s, m.group("repo"), m.group("rest") or "")
        return cls(LOCAL, path=path.absolute(), text=s, anchor="cwd")

    @classmethod
    def _parse_registry(cls, s: str) -> ModelRef:
        m = _REGISTRY_RE.fullmatch(s)
        if not m:
            raise RefError(f"cannot parse {s!r}: use models:/<name>@<alias> or models:/<name>/<version>")
        return cls(
            REGISTRY,
            uri=s,
            registry_name=m.group("name"),
            alias=m.group("alias"),
            version=m.group("version"),
            text=s,
        )

    @classmethod
    def _parse_hub(cls, s: str, repo: str, rest: str) -> ModelRef:
        revision = filename = None
        if rest.startswith("@"):
            rev, sep, file = rest[1:].partition(":")
            if not _REVISION_RE.fullmatch(rev):
                raise RefError(
                    f"{s!r}: the revision after '@' must be a branch, tag or commit sha (org/name@<revision>)"
                )
            revision = rev
            rest = sep + file
        if rest.startswith(":"):
            filename = rest[1:]
            parts = filename.split("/")
            if (
                not filename
                or filename.startswith("/")
                or ".." in parts
                or "" in parts
                or filename != filename.strip()
            ):
                raise RefError(
                    f"{s!r}: the file after ':' must be a relative path inside the hub repo "
                    "(org/name:file.pt or org/name:sub/dir/file.pth)"
                )
        elif rest:
            raise RefError(f"{s!r} is not a hub reference (org/name[@revision][:file])")
        kind = HUB_FILE if filename else HUB
        return cls(kind, repo_id=repo, filename=filename, revision=revision, text=s)

    # -- constructors ------------------------------------------------------------------------------------
    @classmethod
    def local(cls, path: str | Path) -> ModelRef:
        p = Path(path).expanduser()
        return cls(LOCAL, path=p, text=str(path), anchor="absolute" if p.is_absolute() else "cwd")

    @classmethod
    def hub(cls, repo_id: str, filename: str | None = None, revision: str | None = None) -> ModelRef:
        """A hub reference from its parts, validated by the hub grammar (no filesystem lookup)."""
        text = str(cls(HUB_FILE if filename else HUB, repo_id=repo_id, filename=filename, revision=revision))
        m = _HUB_PREFIX_RE.fullmatch(text)
        if not m or m.group("repo") != repo_id:
            raise RefError(f"{repo_id!r} is not a hub repo id (org/name)")
        return cls._parse_hub(text, m.group("repo"), m.group("rest") or "")

    # -- properties --------------------------------------------------------------------------------------
    @property
    def is_local(self) -> bool:
        return self.kind == LOCAL

    @property
    def is_hub(self) -> bool:
        """A hub repo or a file in one."""
        return self.kind in (HUB, HUB_FILE)

    @property
    def is_registry(self) -> bool:
        return self.kind == REGISTRY

    def exists(self) -> bool:
        """Local kind: the path exists. Other kinds: False (nothing is looked up remotely)."""
        return self.kind == LOCAL and self.path is not None and self.path.exists()

    def with_revision(self, revision: str | None) -> ModelRef:
        """A hub reference pinned to ``revision`` (unchanged when ``revision`` is None or the kind is not hub).

        Raises RefError when the reference already names a different revision.
        """
        if revision is None or not self.is_hub:
            return self
        if self.revision not in (None, revision):
            raise RefError(f"{self} pins revision {self.revision!r} but {revision!r} is configured as well")
        return replace(self, revision=revision, text=str(replace(self, revision=revision)))

    def with_filename(self, filename: str) -> ModelRef:
        """The file ``filename`` in this hub repo (a hub_file reference)."""
        if not self.is_hub:
            raise RefError(f"{self} is not a hub reference")
        return ModelRef.hub(self.repo_id or "", filename, self.revision)

    def pretrained_args(self) -> tuple[str, dict[str, Any]]:
        """``(name_or_path, kwargs)`` for a ``from_pretrained`` call: the revision travels as ``revision=``."""
        if self.kind == LOCAL:
            return str(self.path), {}
        if self.kind == HUB:
            warn_if_unpinned(self)
            return self.repo_id or "", ({"revision": self.revision} if self.revision else {})
        raise RefError(
            f"{self} names a {'hub file' if self.kind == HUB_FILE else 'registry model'}, not a model folder or hub repo"
        )

    def __str__(self) -> str:
        """Text that parses back to an equal reference (with the same root)."""
        if self.kind == REGISTRY:
            return self.uri or ""
        if self.kind == LOCAL:
            p = self.path or Path(".")
            if p.is_absolute():
                return str(p)
            s = p.as_posix()
            return s if s == ".." or s.startswith("../") else f"./{s}"
        out = self.repo_id or ""
        if self.revision:
            out += f"@{self.revision}"
        if self.filename:
            out += f":{self.filename}"
        return out


_WARNED_UNPINNED: set[str] = set()


def warn_if_unpinned(ref: ModelRef) -> None:
    """Once per repo: a hub reference without a revision follows the repo's main branch, so a re-run may
    silently load other weights. Pin it with ``org/name@<commit>`` (or model.revision / data.revision)."""
    if not ref.is_hub or ref.revision or not ref.repo_id or ref.repo_id in _WARNED_UNPINNED:
        return
    _WARNED_UNPINNED.add(ref.repo_id)
    from spo.utils import get_logger

    get_logger(__name__).warning(
        "unpinned hub reference %s: it follows the repo's main branch; pin it for reproducible runs with "
        "%s@<commit sha>", ref.repo_id, ref.repo_id,
    )


def parse_ref(text: str | Path | ModelRef, root: str | Path = ".") -> ModelRef:
    """Shorthand for :meth:`ModelRef.parse`."""
    return ModelRef.parse(text, root)
