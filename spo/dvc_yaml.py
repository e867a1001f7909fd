"""``dvc.yaml``, generated from the stage graph in :mod:`spo.pipeline_spec` (``spo dvc-yaml > dvc.yaml``).

Per stage: ``cmd: spo <cli>``; ``params``: its config sections; ``deps``: the top-level artifacts it reads
(an artifact inside a folder counts as that folder) and its code; ``outs``/``metrics``/``plots``: what it
writes and reports, by artifact kind, ``cache: false`` where the artifact is kept in git. The top-level
``plots`` come from :data:`spo.pipeline_spec.PLOTS`. A test fails when the committed file drifts.
"""

from __future__ import annotations

import difflib
import json
import re
import textwrap
from pathlib import Path

from spo.pipeline_spec import ARTIFACTS, PLOTS, STAGES, Artifact, StageSpec

HEADER = """\
# GENERATED from spo/pipeline_spec.py by `spo dvc-yaml > dvc.yaml` (`make dvc-yaml`); do not edit by hand,
# edit the StageSpec there (tests/unit/test_pipeline_spec.py fails when this file drifts).
#
# The SPO pipeline for `dvc repro` (docs/ORCHESTRATION.md#dvc). Every stage calls the `spo` CLI, i.e. the
# same spo.stages.<name>.run the Prefect flow calls; params come from params.yaml (`spo config --preset P
# --params /dev/null > params.yaml` writes one), so `dvc exp run -S spo.lr=3e-4` works on any key.
#
# synth and base build the tiny world (a synthetic Pick-a-Pic and a small pretrained SD-1.5). For the real
# presets they do no work and leave placeholder folders (the base model and data come from the hub),
# so one dvc.yaml serves every preset.
#
# Outputs are cached by DVC (share them with `dvc push`/`dvc pull`, see the remote in .dvc/config);
# metrics and plot data are small and kept in git (cache: false).
"""

_PLAIN = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_./() -]*")


def _scalar(value: str) -> str:
    """A YAML scalar: plain when unambiguous, else double-quoted (JSON strings are valid YAML)."""
    reserved = {"true", "false", "null", "yes", "no", "on", "off", "y", "n", "~"}
    if _PLAIN.fullmatch(value) and not value.endswith(" ") and value.lower() not in reserved:
        return value
    return json.dumps(value)


def _comment(text: str, indent: str) -> list[str]:
    return [f"{indent}# {line}" for line in textwrap.wrap(text, 104 - len(indent))]


def _path_entry(artifact: Artifact) -> list[str]:
    path = _scalar(artifact.relpath().as_posix())
    if artifact.cache:
        return [f"      - {path}"]
    return [f"      - {path}:", "          cache: false"]


def _tracked(name: str) -> Artifact:
    """The artifact DVC tracks for ``name``: itself when a stage declares it, else the nearest declared
    folder it lives in (``prompts_val`` -> ``prepared``), else its top-level artifact."""
    declared = {n for s in STAGES for n in (*s.writes, *s.reports)}
    artifact: Artifact | None = ARTIFACTS[name]
    while artifact is not None:
        if artifact.name in declared:
            return artifact
        artifact = ARTIFACTS[artifact.parent] if artifact.parent else None
    return ARTIFACTS[name].top_level()


def stage_deps(stage: StageSpec) -> list[str]:
    """The DVC-tracked paths of what the stage reads (deduplicated, in order), then its code."""
    paths = [_tracked(name).relpath().as_posix() for name in stage.reads]
    return list(dict.fromkeys([*paths, *stage.code]))


def _render_stage(stage: StageSpec) -> list[str]:
    lines = _comment(stage.note, "  ") if stage.note else []
    lines += [f"  {stage.name}:", f"    cmd: spo {stage.cli}"]
    if stage.sections:
        lines += ["    params:", *[f"      - {_scalar(s)}" for s in stage.sections]]
    deps = stage_deps(stage)
    if deps:
        lines += ["    deps:", *[f"      - {_scalar(d)}" for d in deps]]
    by_kind: dict[str, list[Artifact]] = {"out": [], "metrics": [], "plots": []}
    for artifact in stage.outputs():
        # Plot data files are plain outs: as stage plots, `dvc plots show` would draw each one once more with
        # default axes (x = row index) beside the top-level plots (PLOTS) that give them meaningful axes.
        by_kind["out" if artifact.kind == "plots" else artifact.kind].append(artifact)
    for kind, key in (("out", "outs"), ("metrics", "metrics"), ("plots", "plots")):
        if by_kind[kind]:
            lines.append(f"    {key}:")
            for artifact in by_kind[kind]:
                lines += _path_entry(artifact)
    return lines


def _render_plots() -> list[str]:
    lines = ["plots:"]
    for plot in PLOTS:
        lines.append(f"  - {_scalar(plot.title)}:")
        if plot.template:
            lines.append(f"      template: {_scalar(plot.template)}")
        lines += [f"      x: {_scalar(plot.x)}", "      y:"]
        for name, columns in plot.y.items():
            cols = (
                _scalar(columns[0])
                if len(columns) == 1
                else "[" + ", ".join(_scalar(c) for c in columns) + "]"
            )
            lines.append(f"        {_scalar(ARTIFACTS[name].relpath().as_posix())}: {cols}")
    return lines


def render_dvc_yaml() -> str:
    """The text of dvc.yaml for the stage graph in spo.pipeline_spec."""
    lines = HEADER.splitlines() + ["stages:"]
    for i, stage in enumerate(STAGES):
        if i:
            lines.append("")
        lines += _render_stage(stage)
    lines.append("")
    lines += _render_plots()
    return "\n".join(lines) + "\n"


def check_dvc_yaml(path: str | Path) -> str | None:
    """None when ``path`` holds the generated dvc.yaml, else a message with the unified diff."""
    path = Path(path)
    try:
        current = path.read_text()
    except OSError as exc:
        return f"cannot read {path}: {exc}. Write it with `spo dvc-yaml > {path}`."
    expected = render_dvc_yaml()
    if current == expected:
        return None
    diff = "".join(
        difflib.unified_diff(
            current.splitlines(keepends=True),
            expected.splitlines(keepends=True),
            fromfile=f"{path} (committed)",
            tofile=f"{path} (generated)",
        )
    )
    return (
        f"{path} differs from the stage graph in spo/pipeline_spec.py; run `spo dvc-yaml > {path}`.\n{diff}"
    )
