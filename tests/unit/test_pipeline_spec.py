"""The stage graph (spo/pipeline_spec.py) is the one declaration: dvc.yaml, the CLI, tracking and the flow
follow it, and everything it names exists."""

from __future__ import annotations

import argparse
import importlib
import inspect
from pathlib import Path

import pytest
import yaml

from spo import cli, tracking
from spo.config import load_config
from spo.dvc_yaml import check_dvc_yaml, render_dvc_yaml, stage_deps
from spo.pipeline_spec import (
    ARTIFACTS,
    PLOTS,
    PLUMBING,
    STAGE_BY_CLI,
    STAGE_BY_NAME,
    STAGES,
    artifact_in,
    artifact_path,
    producer_of,
    repo_root,
    stages_for,
    upstream_stages,
)

REPO = repo_root()
EXPLICIT_COMMANDS = {"config", "pipeline", "generate", "export", "dvc-yaml", "sweep", "plan", "launch-plan"}


def _cfg(tmp_path, *overrides):
    return load_config(
        "tiny", [f"paths.root={tmp_path}", "tracking.enabled=false", *overrides], params_file=None
    )


def test_committed_dvc_yaml_is_the_generated_one():
    assert (REPO / "dvc.yaml").read_text() == render_dvc_yaml(), (
        "run `spo dvc-yaml > dvc.yaml` (make dvc-yaml)"
    )
    assert check_dvc_yaml(REPO / "dvc.yaml") is None


def test_generated_dvc_yaml_follows_the_spec():
    spec = yaml.safe_load(render_dvc_yaml())
    assert list(spec["stages"]) == [s.name for s in STAGES]
    for stage in STAGES:
        entry = spec["stages"][stage.name]
        assert entry["cmd"] == f"spo {stage.cli}"
        assert entry.get("params", []) == list(stage.sections)
        assert entry.get("deps", []) == stage_deps(stage)
        declared = {}
        for kind in ("outs", "metrics", "plots"):
            for item in entry.get(kind, []):
                path, opts = next(iter(item.items())) if isinstance(item, dict) else (item, {})
                declared[path] = (kind, opts.get("cache", True))
        for artifact in stage.outputs():
            kind = {"out": "outs", "plots": "outs"}.get(artifact.kind, artifact.kind)  # plot data: plain outs
            assert declared[artifact.relpath().as_posix()] == (kind, artifact.cache), (
                stage.name,
                artifact.name,
            )
        assert len(declared) == len(stage.outputs())
    # An artifact inside a declared folder is a dependency on that folder; a declared file stays itself.
    assert "data/prepared" in spec["stages"]["train_spm"]["deps"]
    assert "reports/eval/metrics.json" in spec["stages"]["register"]["deps"]
    assert len(spec["plots"]) == len(PLOTS)


def test_dvc_yaml_check_command(tmp_path, capsys):
    good = tmp_path / "dvc.yaml"
    good.write_text(render_dvc_yaml())
    assert cli.main(["dvc-yaml", "--check", "--file", str(good)]) == 0
    good.write_text(render_dvc_yaml().replace("cmd: spo train-spm", "cmd: spo train-spm --resume latest"))
    capsys.readouterr()
    assert cli.main(["dvc-yaml", "--check", "--file", str(good)]) == 1
    err = capsys.readouterr().err
    assert "spo dvc-yaml > " in err and "-    cmd: spo train-spm --resume latest" in err
    assert cli.main(["dvc-yaml"]) == 0
    assert capsys.readouterr().out == render_dvc_yaml()


def test_every_stage_module_imports_and_has_run():
    for stage in STAGES:
        module = importlib.import_module(stage.module)
        assert callable(getattr(module, "run", None)), stage.module
        params = inspect.signature(module.run).parameters
        for opt in stage.options:  # the CLI passes run(cfg, **{opt.dest: value})
            assert opt.dest in params, (stage.name, opt.flag)


def test_every_artifact_name_referenced_exists():
    for artifact in ARTIFACTS.values():
        assert artifact.parent is None or artifact.parent in ARTIFACTS, artifact.name
    for stage in STAGES:
        for name in (*stage.reads, *stage.writes, *stage.reports):
            assert name in ARTIFACTS, (stage.name, name)
    for plot in PLOTS:
        for name in plot.y:
            assert name in ARTIFACTS and ARTIFACTS[name].kind == "plots", (plot.title, name)
    lineage = [a.lineage for a in ARTIFACTS.values() if a.lineage]
    assert len(lineage) == len(set(lineage))


def test_every_artifact_has_at_most_one_producer_and_every_read_has_one():
    owners: dict[str, str] = {}
    for stage in STAGES:
        for name in (*stage.writes, *stage.reports):
            assert name not in owners, f"{name} written by {owners.get(name)} and {stage.name}"
            owners[name] = stage.name
        for name in stage.reads:
            assert producer_of(name) is not None, (stage.name, name)


def test_every_stage_code_path_exists():
    for stage in STAGES:
        assert stage.code, stage.name
        assert f"spo/stages/{stage.name}.py" in stage.code, stage.name
        for rel in stage.code:
            assert (REPO / rel).exists(), (stage.name, rel)


def test_model_refs_are_config_keys(tmp_path):
    cfg = _cfg(tmp_path)
    for stage in STAGES:
        for key in stage.model_refs:
            section, field = key.split(".")
            assert hasattr(getattr(cfg, section), field), (stage.name, key)
        for section in stage.sections:
            assert hasattr(cfg, section), (stage.name, section)


def _subcommands() -> set[str]:
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return set(sub.choices)


def test_cli_subcommands_are_the_stages():
    assert _subcommands() - EXPLICIT_COMMANDS == {s.cli for s in STAGES}
    assert set(STAGE_BY_CLI) == {s.cli for s in STAGES} and len(STAGE_BY_NAME) == len(STAGES)


def test_cli_stage_options_come_from_the_spec():
    parser = cli.build_parser()
    assert parser.parse_args(["train-spm", "--resume", "latest"]).resume == "latest"
    assert parser.parse_args(["train"]).resume is None
    assert parser.parse_args(["synth", "--force"]).force is True
    assert parser.parse_args(["base"]).force is False
    assert parser.parse_args(["evaluate", "--lora", "x"]).lora == "x"
    with pytest.raises(SystemExit):
        parser.parse_args(["prepare", "--force"])


def test_lineage_products():
    products = {s.name: (s.product().name if s.product() else None) for s in STAGES}
    assert products == {
        "synth": "raw_data",
        "base": "base_model",
        "prepare": "prepared",
        "train_spm": "spm_model",
        "train_spo": "lora",
        "evaluate": "eval_reports",  # files declared one by one inside the folder
        "register": None,
        "promote": None,
    }

    def names(stage):
        return [s.name for s in upstream_stages(stage)]

    assert names("synth") == []
    assert names("prepare") == ["synth"]
    assert {"prepare"} <= set(names("train_spm"))
    assert {"prepare", "train_spm"} <= set(names("train_spo"))
    for stage in ("register", "promote", "pipeline"):
        assert {"prepare", "train_spm", "train_spo", "evaluate"} <= set(names(stage)), stage
    assert names("pipeline") == [s.name for s in STAGES if s.product()]


def test_producer_of():
    assert producer_of("prepared").name == "prepare"
    assert producer_of("prompts_val").name == "prepare"  # inside data/prepared
    assert producer_of("lora_weights").name == "train_spo"
    assert producer_of("eval_metrics").name == "evaluate"
    assert producer_of("register_record").name == "register"
    assert producer_of("spm_checkpoints") is None
    assert producer_of("pipeline_summary") is None  # the flow writes it, no stage


def test_artifact_paths_match_the_config_paths(tmp_path):
    cfg = _cfg(tmp_path)
    p = cfg.paths
    assert artifact_path(cfg, "raw_data") == p.raw_data
    assert artifact_path(cfg, "prepared") == p.prepared
    assert artifact_path(cfg, "base_model") == p.base_model
    assert artifact_path(cfg, "base_clip") == p.base_clip
    assert artifact_path(cfg, "spm_model") == p.spm_model
    assert artifact_path(cfg, "lora") == p.lora
    assert artifact_path(cfg, "eval_reports") == p.eval_reports
    assert artifact_path(cfg, "eval_images") == p.eval_images
    assert artifact_path(cfg, "prompts_val") == p.prepared / "prompts_val.txt"
    assert artifact_path(p, "eval_metrics") == artifact_path(tmp_path, "eval_metrics")
    assert artifact_in(tmp_path / "x", "data_card") == tmp_path / "x" / "data_card.json"
    with pytest.raises(KeyError):
        artifact_path(cfg, "nope")
    assert [s.name for s in stages_for(cfg)] == [s.name for s in STAGES]
    assert "synth" not in [s.name for s in stages_for(load_config("sd15", params_file=None))]


def test_stage_reports_follow_the_spec(tmp_path):
    cfg = _cfg(tmp_path)
    for name in ("spm_metrics", "spm_accuracy", "eval_per_image", "eval_metrics", "data_card"):
        artifact_path(cfg, name).parent.mkdir(parents=True, exist_ok=True)
        artifact_path(cfg, name).write_text("{}")
    artifact_path(cfg, "data_validation").mkdir(parents=True)
    artifact_path(cfg, "spm_model").mkdir(parents=True)

    def rel(stage):
        return {(p.relative_to(tmp_path).as_posix(), d) for p, d in tracking.stage_reports(cfg, stage)}

    assert rel("train_spm") == {("reports/spm_metrics.json", "spm"), ("reports/spm_accuracy.csv", "spm")}
    assert rel("evaluate") == {
        ("reports/eval/per_image.parquet", "eval"),
        ("reports/eval/metrics.json", "eval"),
    }
    assert rel("prepare") == {("reports/data_validation", "data_validation")}  # data/prepared: by hash only
    assert rel("pipeline") == set()


def test_lineage_tags_follow_the_reads(tmp_path, monkeypatch):
    # A relative model reference missing under paths.root falls back to the working directory (spo.refs): run
    # from tmp_path, so a checkout where `make run` left models/base does not lend its base model to the test.
    monkeypatch.chdir(tmp_path)
    cfg = _cfg(tmp_path)
    for name in ("prepared", "spm_model", "lora", "eval_reports"):
        artifact_path(cfg, name).mkdir(parents=True)
        (artifact_path(cfg, name) / "f.txt").write_text(name)
    register = tracking.lineage_tags(cfg, "register")
    for tag in ("data_prepared", "spm", "lora", "eval"):
        assert register[f"lineage.{tag}_md5"] == tracking.dvc_md5(
            artifact_path(
                cfg,
                STAGE_BY_NAME[
                    {"data_prepared": "prepare", "spm": "train_spm", "lora": "train_spo", "eval": "evaluate"}[
                        tag
                    ]
                ]
                .product()
                .name,
            )
        ), tag
    spm = tracking.lineage_tags(cfg, "train_spm")
    assert "lineage.data_prepared_md5" in spm and "lineage.lora_md5" not in spm
    assert not any(
        k.endswith("_md5") and k != "lineage.base_model_md5" for k in tracking.lineage_tags(cfg, "synth")
    )
    assert not any(k.endswith("_md5") for k in tracking.lineage_tags(cfg, "pipeline", upstream=()))


def _spo_imports(path: Path, module: str) -> set[str]:
    """Every ``spo.*`` module a file imports (top-level and inside functions), statically."""
    import ast

    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = module.rsplit(".", node.level)[0]
                base = f"{package}.{base}" if base else package
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)
    return {m for m in found if m.split(".")[0] == "spo"}


def _module_file(module: str) -> Path | None:
    root = repo_root()
    for candidate in (root / (module.replace(".", "/") + ".py"), root / module.replace(".", "/") / "__init__.py"):
        if candidate.exists():
            return candidate
    return None


def _expand(paths) -> set[str]:
    root = repo_root()
    out: set[str] = set()
    for p in paths:
        full = root / p
        out.update(str(f.relative_to(root)) for f in full.rglob("*.py")) if full.is_dir() else out.add(p)
    return out


@pytest.mark.parametrize("stage", [s.name for s in STAGES])
def test_declared_code_covers_everything_the_stage_imports(stage):
    """A stage's `code` (DVC deps, Prefect cache key) + PLUMBING covers the transitive closure of the spo
    modules its module imports: an edit to a module a stage uses always invalidates that stage."""
    spec = STAGE_BY_NAME[stage]
    declared = _expand(spec.code) | set(PLUMBING)
    root = repo_root()
    todo = [spec.module] + [
        str(Path(f).with_suffix("")).replace("/", ".") for f in _expand(spec.code) if f.endswith(".py")
    ]
    seen: set[str] = set()
    while todo:
        module = todo.pop()
        path = _module_file(module)
        if path is None or module in seen:
            continue
        seen.add(module)
        for imported in _spo_imports(path, module):
            parts = imported.split(".")
            todo.extend(".".join(parts[:k]) for k in range(1, len(parts) + 1))
    used = {str(_module_file(m).relative_to(root)) for m in seen}
    assert used - declared == set(), f"{stage}: add to its StageSpec.code (or PLUMBING): {sorted(used - declared)}"
