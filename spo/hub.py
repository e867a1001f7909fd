"""The one module that downloads from the Hugging Face hub (``hf_hub_download`` / ``snapshot_download``).

Every function takes a :class:`spo.refs.ModelRef` (or text parsed as one) and downloads at the reference's
revision (``org/name@<sha>`` pins it; without one the hub's default branch is used). Files land in the HF
cache; with ``HF_HUB_OFFLINE=1`` only what is already cached resolves, and every failure is a
:class:`spo.errors.ModelLoadError` that names the fix (download it, or point the config key at a local copy).
"""

from __future__ import annotations

from pathlib import Path

from spo.errors import ModelLoadError
from spo.refs import HUB_FILE, LOCAL, ModelRef, warn_if_unpinned

LORA_SUFFIX = ".safetensors"


def _key_hint(config_key: str | None) -> str:
    return f" (--set {config_key}=...)" if config_key else ""


def _at(ref: ModelRef) -> str:
    return f" at revision {ref.revision}" if ref.revision else ""


def download_file(ref: ModelRef | str, what: str, config_key: str | None = None) -> Path:
    """The file a ``hub_file`` reference names (``org/name[@rev]:file``), downloaded into the HF cache."""
    ref = ModelRef.parse(ref)
    if ref.kind != HUB_FILE or not ref.repo_id or not ref.filename:
        raise ModelLoadError(
            f"{what}: {str(ref)!r} does not name a file in a hub repo. Point the config{_key_hint(config_key)} "
            "at a local file or at 'hub_owner/repo:filename'."
        )
    from huggingface_hub import hf_hub_download

    try:
        warn_if_unpinned(ref)
        return Path(hf_hub_download(ref.repo_id, ref.filename, revision=ref.revision))
    except Exception as exc:  # offline, missing repo/file, auth: all mean "cannot get the weights"
        rev = f" --revision {ref.revision}" if ref.revision else ""
        raise ModelLoadError(
            f"{what}: could not get {ref.filename!r} from the hub repo {ref.repo_id!r}{_at(ref)} "
            f"({type(exc).__name__}). With HF_HUB_OFFLINE=1 the file must already be cached (huggingface-cli "
            f"download {ref.repo_id} {ref.filename}{rev}), or point the config{_key_hint(config_key)} at a local "
            "copy (or set HF_HUB_OFFLINE=0 to download it)."
        ) from exc


def download_repo(
    ref: ModelRef | str,
    what: str = "model",
    allow_patterns: list[str] | None = None,
    config_key: str | None = None,
) -> Path:
    """A snapshot of the hub repo ``ref`` (``org/name[@rev]``) in the HF cache, optionally only matching files."""
    ref = ModelRef.parse(ref)
    if not ref.is_hub or not ref.repo_id:
        raise ModelLoadError(f"{what}: {str(ref)!r} is not a hub repo id (owner/name[@revision]).")
    from huggingface_hub import snapshot_download

    try:
        warn_if_unpinned(ref)
        return Path(snapshot_download(ref.repo_id, revision=ref.revision, allow_patterns=allow_patterns))
    except Exception as exc:
        rev = f" --revision {ref.revision}" if ref.revision else ""
        raise ModelLoadError(
            f"{what}: could not get {ref.repo_id!r}{_at(ref)} from the hub ({type(exc).__name__}: {exc}). With "
            f"HF_HUB_OFFLINE=1 it must already be cached (huggingface-cli download {ref.repo_id}{rev}), or "
            f"pass a local folder{_key_hint(config_key)} (or set HF_HUB_OFFLINE=0 to download it)."
        ) from exc


def local_file_or_download(
    ref: ModelRef | str,
    what: str,
    default_filename: str | None = None,
    config_key: str | None = None,
    filename_key: str | None = None,
) -> Path:
    """A weights file: a local file, a file in a local folder (``default_filename``), ``org/name[@rev]:file``,
    or ``org/name[@rev]`` with ``default_filename`` -> a local path (hub files through the HF cache).

    ``config_key`` names the config key of ``ref`` and ``filename_key`` the one that sets the file name inside a
    folder, for the error messages. It replaces the weights-file resolution that lived in spo/rewards and
    spo/models/preference.py.
    """
    text = str(ref)
    ref = ModelRef.parse(ref)
    key = _key_hint(config_key)
    if ref.kind == LOCAL:
        path = ref.path or Path(text)
        if path.is_file():
            return path
        if path.is_dir() and default_filename:
            if (path / default_filename).is_file():
                return path / default_filename
            fix = (
                f"set {filename_key} to the checkpoint's file name"
                if filename_key
                else f"point the config{key} at the file"
            )
            raise ModelLoadError(f"{what}: no {default_filename} in {path}; {fix}.")
        raise ModelLoadError(
            f"{what}: no weights file at {text!r}. Point the config{key} at a local file or at "
            f"'hub_owner/repo:filename'."
        )
    if ref.kind == "hub" and default_filename:
        ref = ref.with_filename(default_filename)
    if ref.kind != HUB_FILE:
        raise ModelLoadError(
            f"{what}: no weights file at {text!r}. Point the config{key} at a local file or at "
            f"'hub_owner/repo:filename'."
        )
    return download_file(ref, what, config_key)


def lora_file(ref: ModelRef | str, weight_name: str = "pytorch_lora_weights.safetensors") -> Path:
    """The LoRA weights file behind a hub reference (what ``evaluate._hub_lora`` did, now with revisions).

    ``org/name[@rev]:file.safetensors`` downloads that file; ``org/name[@rev]`` downloads the repo's
    ``*.safetensors`` and picks ``weight_name`` or the only one. Local references are refused (the caller
    handles files and folders).
    """
    text = str(ref)
    try:
        ref = ModelRef.parse(ref)
    except ValueError as exc:
        raise ModelLoadError(
            f"no LoRA file or folder at {text!r}, and it is not a hub id (owner/name): {exc}"
        ) from exc
    if not ref.is_hub:
        raise ModelLoadError(f"no LoRA file or folder at {text!r}, and it is not a hub id (owner/name).")
    if ref.kind == HUB_FILE:
        return download_file(ref, "LoRA")
    folder = download_repo(ref, "LoRA", allow_patterns=[f"*{LORA_SUFFIX}"])
    files = sorted(folder.rglob(f"*{LORA_SUFFIX}"))
    preferred = [f for f in files if f.name == weight_name]
    if preferred or len(files) == 1:
        return (preferred or files)[0]
    raise ModelLoadError(
        f"hub repo {ref.repo_id!r} holds {len(files)} {LORA_SUFFIX} files ({', '.join(f.name for f in files[:5])}); "
        f"pick one with --lora {ref.repo_id}:FILENAME"
    )
