"""ModelRef: the one parser of model/data references (table-driven), the config's ref()/resolve_ref and hub.py."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from spo import hub
from spo.config import Config, ConfigError, PathsConfig, load_config
from spo.errors import ModelLoadError
from spo.refs import ModelRef, RefError, is_hub_id


@pytest.fixture
def project(tmp_path, monkeypatch):
    """root = tmp/proj holding models/base and org/name (a folder that shadows a hub id); cwd = tmp/cwd
    holding cwd_only/."""
    root = tmp_path / "proj"
    (root / "models" / "base").mkdir(parents=True)
    (root / "org" / "shadowed").mkdir(parents=True)
    cwd = tmp_path / "cwd"
    (cwd / "cwd_only").mkdir(parents=True)
    monkeypatch.chdir(cwd)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    return root


H, HF, L, R = "hub", "hub_file", "local", "registry"
# text, kind, expected fields ("path" relative to root unless it starts with /, "~" or "cwd:")
CASES = [
    ("org/name", H, {"repo_id": "org/name", "revision": None, "filename": None}),
    ("org/name.v2", H, {"repo_id": "org/name.v2"}),
    ("Org-1/Name_2.x", H, {"repo_id": "Org-1/Name_2.x"}),
    ("org/name@abc123", H, {"repo_id": "org/name", "revision": "abc123"}),
    ("org/name@refs/pr/1", H, {"repo_id": "org/name", "revision": "refs/pr/1"}),
    ("org/name:file.pth", HF, {"repo_id": "org/name", "filename": "file.pth", "revision": None}),
    ("org/name:sub/f.pt", HF, {"repo_id": "org/name", "filename": "sub/f.pt"}),
    ("org/name.v2@v1.0:sub/f.pt", HF, {"repo_id": "org/name.v2", "filename": "sub/f.pt", "revision": "v1.0"}),
    (
        "xswu/HPSv2:HPS_v2.1_compressed.pt",
        HF,
        {"repo_id": "xswu/HPSv2", "filename": "HPS_v2.1_compressed.pt"},
    ),
    ("models:/spo-tiny@champion", R, {"registry_name": "spo-tiny", "alias": "champion", "version": None}),
    ("models:/spo-tiny/3", R, {"registry_name": "spo-tiny", "version": "3", "alias": None}),
    ("./models/base", L, {"path": "models/base"}),
    ("./models/missing", L, {"path": "models/missing"}),  # ./ = a project path, existing or not
    ("../sibling", L, {"path": "../sibling"}),
    ("models/base", L, {"path": "models/base"}),  # exists under root
    ("models/missing", H, {"repo_id": "models/missing"}),  # missing: hub-id shape wins, as today
    ("org/shadowed", L, {"path": "org/shadowed"}),  # an existing folder beats the hub id
    ("cwd_only", L, {"path": "cwd:cwd_only"}),  # exists relative to the working directory
    ("/abs/path", L, {"path": "/abs/path"}),
    ("/abs/org/name:file.pt", L, {"path": "/abs/org/name:file.pt"}),
    ("~/x", L, {"path": "~/x"}),
    ("a/b/c", L, {"path": "cwd:a/b/c"}),  # neither: a (missing) local path, as today's code treats it
    ("gpt2", L, {"path": "cwd:gpt2"}),  # one-word legacy hub ids are not hub ids: write org/name
    ("_org/name", L, {"path": "cwd:_org/name"}),  # HF names start with a letter or digit
]


@pytest.mark.parametrize("text, kind, fields", CASES, ids=[c[0] for c in CASES])
def test_parse_table(project, text, kind, fields):
    ref = ModelRef.parse(text, root=project)
    assert ref.kind == kind
    for name, want in fields.items():
        if name == "path":
            if want.startswith("cwd:"):
                want = Path.cwd() / want.removeprefix("cwd:")
            elif want.startswith("~"):
                want = Path(want).expanduser()
            elif not want.startswith("/"):
                want = project / want
            assert ref.path == Path(want)
        else:
            assert getattr(ref, name) == want, name
    assert ref.is_local == (kind == L)
    assert (ref.uri == text) == (kind == R)
    # __str__ round-trips (same root), and for hub/registry kinds gives the text back
    assert ModelRef.parse(str(ref), root=project) == ref
    if kind != L:
        assert str(ref) == text


MALFORMED = [
    ("", "empty"),
    ("  org/name", "whitespace"),
    ("pretrained:org/name", "pretrained: prefix"),
    ("models:/", "models:/<name>@<alias>"),
    ("models:/a/b/c", "models:/<name>@<alias>"),
    ("models:/name@", "models:/<name>@<alias>"),
    ("org/name@", "revision"),
    ("org/name@a b", "revision"),
    ("org/name:", "file after ':'"),
    ("org/name:../secret", "file after ':'"),
    ("org/name@rev:", "file after ':'"),
    ("org/name#x", None),  # not hub-shaped: a missing local path, not an error
]


@pytest.mark.parametrize("text, match", MALFORMED, ids=[m[0] or "empty" for m in MALFORMED])
def test_malformed_references_are_clear_errors(project, text, match):
    if match is None:
        assert ModelRef.parse(text, root=project).is_local
        return
    with pytest.raises(RefError, match=match):
        ModelRef.parse(text, root=project)


def test_hub_id_shape_and_constructors():
    assert is_hub_id("org/name.v2") and not is_hub_id("org/name@x") and not is_hub_id("a/b/c")
    ref = ModelRef.hub("org/name", "w.pt", revision="abc")
    assert (ref.kind, str(ref)) == ("hub_file", "org/name@abc:w.pt")
    assert ModelRef.parse("org/name").with_revision("abc") == ModelRef.parse("org/name@abc")
    assert ModelRef.parse("org/name@abc").with_filename("f.pt") == ModelRef.parse("org/name@abc:f.pt")
    with pytest.raises(RefError, match="pins revision"):
        ModelRef.parse("org/name@abc").with_revision("def")
    assert ModelRef.parse("org/name@abc").pretrained_args() == ("org/name", {"revision": "abc"})
    assert ModelRef.parse("/x/y").pretrained_args() == ("/x/y", {})
    with pytest.raises(RefError, match="hub file"):
        ModelRef.parse("org/name:f.pt").pretrained_args()


# -- Config ----------------------------------------------------------------------------------------------
def _resolve_ref_before_modelref(root: Path, ref: str) -> str:
    """Config.resolve_ref as it was before spo/refs.py (the compatibility wrapper must match it)."""
    path = Path(ref).expanduser()
    if path.is_absolute():
        return str(path)
    rooted = root / path
    if ref.startswith(("./", "../")) or rooted.exists():
        return str(rooted)
    return ref


@pytest.mark.parametrize("root_kind", ["absolute", "relative"])
def test_resolve_ref_keeps_its_semantics(project, root_kind):
    root = project if root_kind == "absolute" else Path(os.path.relpath(project))
    cfg = Config(paths=PathsConfig(root=root))
    texts = [c[0] for c in CASES] + ["models/base/", "org/name:", "pretrained:x", "models:/x", ""]
    for text in texts:
        assert cfg.resolve_ref(text) == _resolve_ref_before_modelref(root, text), text
    assert cfg.resolve_ref(None) is None


def test_config_ref_by_key_and_text(project):
    cfg = load_config(
        "tiny",
        [f"paths.root={project}", "model.revision=abc", "spm.source=pretrained:org/spm"],
        params_file=None,
    )
    assert cfg.ref("model.pretrained") == ModelRef.parse(
        "models/base", root=project
    )  # local: revision unused
    assert cfg.ref("model.pretrained").path == project / "models" / "base"
    assert cfg.ref("spm.source") == ModelRef.parse("org/spm")
    assert cfg.ref("org/name@x").revision == "x"
    sd15 = load_config("sd15", ["model.revision=abc"], params_file=None)
    assert sd15.ref("model.pretrained").revision == "abc"
    assert sd15.ref(sd15.eval.hps_weights).filename == "HPS_v2.1_compressed.pt"
    with pytest.raises(ConfigError, match="model.vae is not set"):
        sd15.ref("model.vae")


@pytest.mark.parametrize(
    "override, key",
    [
        ("eval.pickscore_model=org/name@", "eval.pickscore_model"),
        ("eval.aesthetic_weights=org/name:", "eval.aesthetic_weights"),
        ("eval.lora=models:/bad/x/y", "eval.lora"),
        ("spm.source=pretrained:", "spm.source"),
        ("model.vae=pretrained:x", "model.vae"),
    ],
)
def test_malformed_reference_in_config_is_a_config_error_naming_the_key(override, key):
    with pytest.raises(ConfigError, match=rf"- {key}: "):
        load_config("sd15", [override], params_file=None)


def test_conflicting_revisions_are_a_config_error():
    with pytest.raises(ConfigError, match="model.pretrained: .*pins revision"):
        load_config("sd15", ["model.pretrained=org/name@a", "model.revision=b"], params_file=None)
    assert load_config("sd15", ["eval.pickscore_model=org/name@abc"], params_file=None)


def test_paths_come_from_the_artifact_catalog(tmp_path):
    p = PathsConfig(root=tmp_path)
    assert p.raw_data == tmp_path / "data" / "raw" / "pickapic_tiny"
    assert p.base_clip == tmp_path / "models" / "base" / "clip"
    assert p.lora == tmp_path / "models" / "spo" / "lora"
    assert (p.eval_reports, p.eval_images) == (
        tmp_path / "reports" / "eval",
        tmp_path / "data" / "eval_images",
    )
    assert (p.reports, p.checkpoints, p.spm_model) == (
        tmp_path / "reports",
        tmp_path / "checkpoints",
        tmp_path / "models" / "spm",
    )


# -- hub -------------------------------------------------------------------------------------------------
@pytest.fixture
def offline(monkeypatch):
    import huggingface_hub.constants as hc

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)


def test_hub_offline_errors_name_the_fix(offline):
    with pytest.raises(ModelLoadError, match=r"huggingface-cli download spo-test/none w.pt --revision abc"):
        hub.download_file("spo-test/none@abc:w.pt", "weights", "eval.hps_weights")
    with pytest.raises(ModelLoadError, match="HF_HUB_OFFLINE=0"):
        hub.download_repo("spo-test/none", "LoRA")
    with pytest.raises(ModelLoadError, match="not a hub repo"):
        hub.download_repo("/x/y")
    with pytest.raises(ModelLoadError, match="does not name a file"):
        hub.download_file("spo-test/none", "weights")


def test_hub_passes_the_revision(monkeypatch, tmp_path):
    import huggingface_hub

    calls = []

    def fake_file(repo, filename, revision=None):
        calls.append(("file", repo, filename, revision))
        return str(tmp_path / filename)

    def fake_snapshot(repo, revision=None, allow_patterns=None):
        calls.append(("repo", repo, revision, tuple(allow_patterns or ())))
        (tmp_path / "snap").mkdir(exist_ok=True)
        (tmp_path / "snap" / "pytorch_lora_weights.safetensors").write_bytes(b"x")
        (tmp_path / "snap" / "other.safetensors").write_bytes(b"x")
        return str(tmp_path / "snap")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_file)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot)
    assert hub.local_file_or_download("o/n@sha1", "w", default_filename="w.pt") == tmp_path / "w.pt"
    assert hub.lora_file("o/l@sha2").name == "pytorch_lora_weights.safetensors"
    assert hub.lora_file("o/l:x.safetensors") == tmp_path / "x.safetensors"
    assert calls == [
        ("file", "o/n", "w.pt", "sha1"),
        ("repo", "o/l", "sha2", ("*.safetensors",)),
        ("file", "o/l", "x.safetensors", None),
    ]


def test_local_file_or_download_reads_local_files_and_folders(tmp_path):
    (tmp_path / "w.pt").write_bytes(b"x")
    assert hub.local_file_or_download(str(tmp_path / "w.pt"), "w") == tmp_path / "w.pt"
    assert hub.local_file_or_download(str(tmp_path), "w", default_filename="w.pt") == tmp_path / "w.pt"
    with pytest.raises(ModelLoadError, match="set spm.pretrained_file"):
        hub.local_file_or_download(str(tmp_path), "w", "other.pt", filename_key="spm.pretrained_file")
    with pytest.raises(ModelLoadError, match=r"--set eval.hps_weights=\.\.\."):
        hub.local_file_or_download(str(tmp_path / "nope.pt"), "w", config_key="eval.hps_weights")
    with pytest.raises(ModelLoadError, match="not a hub id"):
        hub.lora_file(str(tmp_path / "nope"))


def test_hub_constructor_ignores_the_filesystem(project, monkeypatch):
    monkeypatch.chdir(project)  # org/shadowed exists here as a folder
    assert ModelRef.hub("org/shadowed", "f.pt").kind == "hub_file"
    assert ModelRef.parse("org/shadowed").is_local
    with pytest.raises(RefError, match="not a hub repo id"):
        ModelRef.hub("a/b/c")


def test_unpinned_hub_references_warn_once_and_pinned_ones_never(caplog):
    import logging

    from spo import refs

    refs._WARNED_UNPINNED.discard("some-org/unpinned-model")
    with caplog.at_level(logging.WARNING):
        ModelRef.parse("some-org/unpinned-model").pretrained_args()
        ModelRef.parse("some-org/unpinned-model").pretrained_args()
        ModelRef.parse("some-org/pinned-model@0123abcd").pretrained_args()
    lines = [r.getMessage() for r in caplog.records if "unpinned hub reference" in r.getMessage()]
    assert lines == [
        "unpinned hub reference some-org/unpinned-model: it follows the repo's main branch; pin it for "
        "reproducible runs with some-org/unpinned-model@<commit sha>"
    ]
