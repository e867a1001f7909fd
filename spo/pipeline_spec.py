"""The pipeline, declared once: every artifact a stage reads or writes, and the stage graph over them.

Everything that needs to know the stages reads this module and nothing else:

* the ``spo`` CLI builds one subcommand per :class:`StageSpec` (``cli``, ``help``, ``options``);
* the Prefect flow (flows/pipeline.py) builds one task per stage, its cache key from ``sections``,
  ``reads``, ``code`` and ``model_refs``, and its output check from ``writes`` + ``reports``;
* tracking (spo/tracking.py) tags each stage run with the lineage of the artifacts it ``reads`` and the
  hash of the artifact it produces (the one with a ``lineage`` tag);
* ``dvc.yaml`` is *generated* from it (``spo dvc-yaml > dvc.yaml``; a test fails when they drift).

Stages refer to files by artifact name (``artifact_path(cfg, "spm_metrics")``), never by file-name literal.
Adding a stage = one module in spo/stages with ``run(cfg, ...)`` + one :class:`StageSpec` below.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

ArtifactKind = Literal["out", "metrics", "plots"]


@dataclass(frozen=True)
class Artifact:
    """A file or folder under ``paths.root``.

    ``parent``: the artifact this one lives in (``prompts_val`` is inside ``prepared``); only top-level
    artifacts are DVC outputs. ``lineage``: the tag under which the runs that read it record its hash and
    producing run (``lineage.<tag>_md5`` / ``lineage.<tag>_run_id``). ``kind``/``cache``: how DVC tracks it
    (metrics and plots are small and kept in git, ``cache: false``).
    """

    name: str
    rel: str  # relative to the parent artifact's path, or to paths.root when parent is None
    parent: str | None = None
    lineage: str | None = None
    kind: ArtifactKind = "out"
    cache: bool = True
    description: str = ""

    def relpath(self) -> Path:
        """Path relative to ``paths.root``."""
        if self.parent is None:
            return Path(self.rel)
        return ARTIFACTS[self.parent].relpath() / self.rel

    def path(self, root: str | Path | Any) -> Path:
        """Absolute-or-root-relative path; ``root`` is a path, a Config or a PathsConfig."""
        return _root_of(root) / self.relpath()

    def top_level(self) -> Artifact:
        """The top-level artifact this one lives in (itself when it has no parent): what DVC tracks."""
        return self if self.parent is None else ARTIFACTS[self.parent].top_level()


def _root_of(obj: Any) -> Path:
    if isinstance(obj, str | Path):
        return Path(obj)
    paths = getattr(obj, "paths", obj)  # a Config or a PathsConfig
    return Path(paths.root)


_ARTIFACT_LIST: tuple[Artifact, ...] = (
    # -- the tiny world (synth, base) ------------------------------------------------------------------
    Artifact(
        "raw_data", "data/raw/pickapic_tiny", lineage="raw_data", description="Pick-a-Pic-format parquet"
    ),
    Artifact("raw_data_info", "tiny_world.json", parent="raw_data"),
    Artifact("base_model", "models/base", lineage="base", description="diffusers folder of the base model"),
    Artifact("base_clip", "clip", parent="base_model", description="the tiny CLIP (SPM init, text encoder)"),
    Artifact("base_info", "spo_base.json", parent="base_model"),
    Artifact("base_tiny_decoder", "tiny_decoder", parent="base_model", description="spm.decoder=tiny's decoder"),
    Artifact("base_report", "reports/base_train.json", kind="metrics", cache=False),
    Artifact("base_samples", "reports/base_samples.png", cache=False),
    # -- prepare ---------------------------------------------------------------------------------------
    Artifact("prepared", "data/prepared", lineage="data_prepared", description="pair tables and prompts"),
    Artifact("spm_train_pairs", "spm_train", parent="prepared"),
    Artifact("spm_val_pairs", "spm_val", parent="prepared"),
    Artifact("prompts_train", "prompts_train.txt", parent="prepared"),
    Artifact("prompts_val", "prompts_val.txt", parent="prepared"),
    Artifact("data_card", "data_card.json", parent="prepared"),
    Artifact("data_validation", "reports/data_validation", description="Great Expectations results"),
    # -- train_spm -------------------------------------------------------------------------------------
    Artifact("spm_model", "models/spm", lineage="spm", description="the step-aware preference model"),
    Artifact("spm_config", "spm_config.json", parent="spm_model"),
    Artifact("spm_metrics", "reports/spm_metrics.json", kind="metrics", cache=False),
    Artifact("spm_accuracy", "reports/spm_accuracy.csv", kind="plots", cache=False),
    Artifact("spm_accuracy_plot", "reports/spm_accuracy.png", cache=False),
    Artifact("spm_curves", "reports/spm_train_curves.csv", kind="plots", cache=False),
    Artifact("spm_checkpoints", "checkpoints/spm"),
    # -- train_spo -------------------------------------------------------------------------------------
    Artifact("spo_dir", "models/spo"),
    Artifact("lora", "models/spo/lora", lineage="lora", description="the SPO LoRA (diffusers format)"),
    Artifact("lora_weights", "pytorch_lora_weights.safetensors", parent="lora"),
    Artifact("lora_info", "spo_lora.json", parent="lora"),
    Artifact("spo_summary", "reports/spo_train.json", kind="metrics", cache=False),
    Artifact("spo_curves", "reports/spo_train_curves.csv", kind="plots", cache=False),
    Artifact("spo_checkpoints", "checkpoints/spo"),
    # -- evaluate --------------------------------------------------------------------------------------
    Artifact("eval_reports", "reports/eval", lineage="eval", description="evaluation reports"),
    # The full report is a plain out; `dvc metrics show` reads the few headline numbers (eval_headline).
    Artifact("eval_metrics", "metrics.json", parent="eval_reports", cache=False),
    Artifact("eval_headline", "headline.json", parent="eval_reports", kind="metrics", cache=False),
    Artifact("eval_per_image", "per_image.parquet", parent="eval_reports"),
    Artifact("eval_table", "table.md", parent="eval_reports", cache=False),
    Artifact("eval_grid", "grid.png", parent="eval_reports"),
    Artifact("eval_diffs_plot", "diffs.png", parent="eval_reports"),
    Artifact("eval_diffs", "diffs.csv", parent="eval_reports", kind="plots", cache=False),
    Artifact("eval_images", "data/eval_images", description="image cache (PNG + manifests)"),
    # -- registry --------------------------------------------------------------------------------------
    Artifact("register_record", "reports/registry/register.json", cache=False),
    Artifact("promote_record", "reports/registry/promote.json", cache=False),
    Artifact("pipeline_summary", "reports/pipeline_summary.json", cache=False),
)
ARTIFACTS: dict[str, Artifact] = {a.name: a for a in _ARTIFACT_LIST}


def artifact_path(root: str | Path | Any, name: str) -> Path:
    """The path of artifact ``name`` under ``root`` (a path, a Config or a PathsConfig)."""
    try:
        return ARTIFACTS[name].path(root)
    except KeyError:
        raise KeyError(f"unknown artifact {name!r}; known: {', '.join(ARTIFACTS)}") from None


def artifact_in(folder: str | Path, name: str) -> Path:
    """Artifact ``name`` inside ``folder``, a stand-in for its parent artifact (a stage writing its output
    into a temporary folder that is swapped in whole: ``artifact_in(tmp, "data_card")``)."""
    artifact = ARTIFACTS[name]
    if artifact.parent is None:
        raise ValueError(f"artifact {name!r} has no parent artifact; use artifact_path")
    return Path(folder) / artifact.rel


def repo_root() -> Path:
    """The repository root (the parent of the ``spo`` package): what ``StageSpec.code`` paths are relative to."""
    return Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Option:
    """A stage-specific CLI option, passed to ``run(cfg, **{dest: value})``."""

    flag: str  # "--resume"
    help: str
    metavar: str | None = None
    is_flag: bool = False  # store_true
    default: Any = None
    # A config key the option sets (``--method dpo`` = ``--set spo.method=dpo``): applied before the config
    # resolves, so the tracked params and cache keys see it; such an option is not passed to ``run``.
    sets: str | None = None

    @property
    def dest(self) -> str:
        return self.flag.lstrip("-").replace("-", "_")


RESUME = Option(
    "--resume", "resume from a checkpoint: 'latest' or a checkpoint folder", metavar="latest|PATH"
)


@dataclass(frozen=True)
class StageSpec:
    """One pipeline stage.

    ``sections``: config sections that shape its output (DVC params, Prefect cache key). ``reads`` /
    ``writes`` / ``reports``: artifact names (``writes`` are DVC outs, ``reports`` the metrics/plots and
    other report files; a stage's lineage product is the first artifact of ``writes`` with a lineage tag).
    ``code``: the source files and folders its result depends on (DVC deps; Prefect cache key).
    ``model_refs``: config keys naming models or data it loads (``model.pretrained``); local folders enter
    the Prefect cache key by content, hub ids by name. ``registry``: talks to the model registry
    (never cached, retried on a busy store).
    """

    name: str  # module in spo.stages, MLflow run name, DVC stage name, Prefect task name
    cli: str
    help: str
    sections: tuple[str, ...] = ()
    reads: tuple[str, ...] = ()
    writes: tuple[str, ...] = ()
    reports: tuple[str, ...] = ()
    code: tuple[str, ...] = ()
    model_refs: tuple[str, ...] = ()
    options: tuple[Option, ...] = ()
    tiny_only: bool = False
    registry: bool = False
    retries: int = 0  # only ever used for transient failures
    tags: tuple[str, ...] = field(default_factory=tuple)
    mlflow_dir: str = ""  # where the stage's run carries its report files ("" = the run's artifact root)
    note: str = ""  # a comment above the stage in the generated dvc.yaml

    @property
    def module(self) -> str:
        return f"spo.stages.{self.name}"

    @property
    def gpu(self) -> bool:
        return "gpu" in self.tags

    def product(self) -> Artifact | None:
        """The artifact whose hash identifies this stage's output in lineage."""
        for name in self.writes:
            if ARTIFACTS[name].lineage:
                return ARTIFACTS[name]
        for name in self.writes:  # files declared one by one inside a folder (evaluate's reports/eval/*)
            parent = ARTIFACTS[name].parent
            if parent and ARTIFACTS[parent].lineage:
                return ARTIFACTS[parent]
        return None

    def outputs(self) -> tuple[Artifact, ...]:
        return tuple(ARTIFACTS[n] for n in (*self.writes, *self.reports))

    def output_paths(self, root: str | Path | Any) -> list[Path]:
        """Where the stage's outputs (``writes`` + ``reports``) live under ``root`` (a path or a Config)."""
        return [a.path(root) for a in self.outputs()]


STAGES: tuple[StageSpec, ...] = (
    StageSpec(
        "synth",
        cli="synth",
        help="generate the tiny world's Pick-a-Pic-format dataset (tiny preset)",
        sections=("synthetic",),
        writes=("raw_data",),
        code=("spo/stages/synth.py", "spo/data/synthetic.py", "spo/data/pickapic.py", "spo/utils.py"),
        options=(
            Option("--force", "regenerate even if the data is up to date", is_flag=True, default=False),
        ),
        tiny_only=True,
    ),
    StageSpec(
        "base",
        cli="base",
        help="pretrain the tiny base model and tiny CLIP (tiny preset)",
        sections=("base", "synthetic", "model"),
        reads=("raw_data",),
        writes=("base_model",),
        reports=("base_report", "base_samples"),
        code=(
            "spo/stages/base.py",
            "spo/base_training.py",
            "spo/models/tiny.py",
            "spo/models/diffusion.py",
            "spo/models/runtime.py",
            "spo/models/preference.py",
            "spo/data/synthetic.py",
            "spo/data/pickapic.py",
            "spo/training",
            "spo/utils.py",
        ),
        options=(
            Option("--force", "retrain even if models/base is up to date", is_flag=True, default=False),
            RESUME,
        ),
        tiny_only=True,
    ),
    StageSpec(
        "prepare",
        cli="prepare",
        help="validate Pick-a-Pic with Great Expectations and write data/prepared/",
        sections=("data",),
        reads=("raw_data",),
        writes=("prepared", "data_validation"),
        code=("spo/stages/prepare.py", "spo/data/pickapic.py", "spo/data/expectations.py", "spo/utils.py"),
        model_refs=("data.source",),
        retries=2,  # downloads from the hub
        mlflow_dir="data",
    ),
    StageSpec(
        "train_spm",
        cli="train-spm",
        help="train the step-aware preference model (models/spm/)",
        sections=("model", "data", "spm", "runtime"),
        reads=("prepared", "raw_data", "base_model"),  # the prepared tables point at the source images
        note="The prepared pair tables point at the source images in data/raw, hence that dependency.",
        writes=("spm_model",),
        reports=("spm_metrics", "spm_accuracy", "spm_accuracy_plot", "spm_curves"),
        code=(
            "spo/stages/train_spm.py",
            "spo/spm_training.py",
            "spo/models/preference.py",
            "spo/models/diffusion.py",
            "spo/models/runtime.py",
            "spo/losses.py",
            "spo/sampling.py",
            "spo/data/pickapic.py",
            "spo/training",
            "spo/utils.py",
        ),
        model_refs=("data.source", "model.pretrained", "spm.init"),
        options=(RESUME,),
        retries=1,
        tags=("gpu",),
        mlflow_dir="spm",
    ),
    StageSpec(
        "train_spo",
        cli="train",
        help="SPO LoRA fine-tuning (models/spo/lora/); --method dpo: the Diffusion-DPO baseline",
        sections=("model", "spo", "dpo", "runtime"),
        # raw_data: with spo.method=dpo it trains on the prepared pairs, whose images live in the source.
        reads=("prepared", "raw_data", "base_model", "spm_model"),
        writes=("lora",),
        reports=("spo_summary", "spo_curves"),
        code=(
            "spo/stages/train_spo.py",
            "spo/spo_trainer.py",
            "spo/dpo_trainer.py",
            "spo/sampling.py",
            "spo/losses.py",
            "spo/models/lora.py",
            "spo/models/diffusion.py",
            "spo/models/runtime.py",
            "spo/models/preference.py",
            "spo/data/pickapic.py",
            "spo/training",
            "spo/utils.py",
        ),
        model_refs=("model.pretrained",),
        options=(
            RESUME,
            Option(
                "--method",
                "spo (default: spo.method) or dpo, the Diffusion-DPO baseline",
                metavar="spo|dpo",
                sets="spo.method",
            ),
        ),
        retries=1,
        tags=("gpu",),
    ),
    StageSpec(
        "evaluate",
        cli="evaluate",
        help="paired-seed evaluation of base vs base+LoRA (reports/eval/)",
        sections=("model", "eval", "runtime"),
        reads=("prepared", "base_model", "spm_model", "lora"),
        writes=("eval_per_image", "eval_grid", "eval_diffs_plot"),
        reports=("eval_table", "eval_metrics", "eval_diffs", "eval_headline"),
        code=(
            "spo/stages/evaluate.py",
            "spo/generation.py",
            "spo/evaluation.py",
            "spo/eval_report.py",
            "spo/rewards",
            "spo/stats.py",
            "spo/models/diffusion.py",
            "spo/models/runtime.py",
            "spo/models/lora.py",
            "spo/models/preference.py",
            "spo/sampling.py",
            "spo/losses.py",
            "spo/data/pickapic.py",
            "spo/data/synthetic.py",  # the tiny world's toy_aesthetic scorer
            "spo/training",  # the LoRA explosion gate
            "spo/utils.py",
        ),
        model_refs=("model.pretrained", "eval.pickscore_model", "eval.clip_model"),
        options=(Option("--lora", "LoRA folder, file or hub id (default: models/spo/lora)"),),
        retries=2,  # scorer downloads
        tags=("gpu",),
        mlflow_dir="eval",
    ),
    StageSpec(
        "register",
        cli="register",
        help="log the LoRA as an MLflow model version with alias 'challenger'",
        sections=("registry",),
        reads=("lora", "eval_metrics"),
        reports=("register_record",),
        code=("spo/stages/register.py", "spo/tracking.py", "spo/serving.py", "spo/utils.py"),
        registry=True,
        retries=3,
        mlflow_dir="registry",
        note=(
            "The registry lives in MLflow, not in files: these stages record what they did in small JSON files "
            "so that DVC knows when to run them (a new LoRA or evaluation; a changed gate)."
        ),
    ),
    StageSpec(
        "promote",
        cli="promote",
        help="move 'champion' to the challenger if it passes the gate",
        sections=("registry",),
        reads=("register_record",),
        reports=("promote_record",),
        code=("spo/stages/promote.py", "spo/tracking.py", "spo/utils.py"),
        registry=True,
        retries=3,
        mlflow_dir="registry",
    ),
)
STAGE_BY_NAME: dict[str, StageSpec] = {s.name: s for s in STAGES}

# Modules every stage imports that hold no stage logic (names, errors, config plumbing, tracking, reference
# parsing): an edit there invalidates no cached stage. tests/unit/test_pipeline_spec.py checks that each
# stage's ``code`` plus these covers every spo module the stage imports, so the lists cannot drift.
PLUMBING: tuple[str, ...] = (
    "spo/__init__.py",
    "spo/errors.py",
    "spo/config.py",
    "spo/pipeline_spec.py",
    "spo/results.py",
    "spo/refs.py",
    "spo/hub.py",
    "spo/tracking.py",
    "spo/lock.py",
    "spo/progress.py",
    "spo/data/__init__.py",
    "spo/models/__init__.py",
)
STAGE_BY_CLI: dict[str, StageSpec] = {s.cli: s for s in STAGES}


def producer_of(artifact: str) -> StageSpec | None:
    """The stage that writes ``artifact`` (or the artifact it lives in)."""
    name: str | None = artifact
    while name is not None:
        for stage in STAGES:
            if name in stage.writes or name in stage.reports:
                return stage
        name = ARTIFACTS[name].parent
    return None


def upstream_stages(stage: str) -> tuple[StageSpec, ...]:
    """The stages whose lineage products a run of ``stage`` is tagged with: the producers of what it
    ``reads``, closed transitively through their own reads (register: prepare, train_spm, train_spo,
    evaluate, and synth/base upstream of those), in pipeline order. ``"pipeline"``: every stage with a product."""
    if stage == "pipeline":
        return tuple(s for s in STAGES if s.product() is not None)
    seen: set[str] = set()
    todo = list(STAGE_BY_NAME[stage].reads)
    while todo:
        producer = producer_of(todo.pop())
        if producer is None or producer.name in seen or producer.name == stage:
            continue
        seen.add(producer.name)
        todo.extend(producer.reads)
    return tuple(s for s in STAGES if s.name in seen and s.product() is not None)


def stages_for(cfg: Any) -> list[StageSpec]:
    """The stages a pipeline runs for this config (tiny-only stages only for the tiny preset)."""
    return [s for s in STAGES if cfg.is_tiny or not s.tiny_only]


# DVC's top-level plots (dvc plots show): name -> definition, artifacts by name.
@dataclass(frozen=True)
class PlotSpec:
    title: str
    x: str
    y: dict[str, tuple[str, ...]]  # artifact name -> columns
    template: str | None = None


PLOTS: tuple[PlotSpec, ...] = (
    PlotSpec("SPM accuracy vs t", "t", {"spm_accuracy": ("accuracy", "initial_accuracy")}, template="linear"),
    PlotSpec("SPM training loss", "step", {"spm_curves": ("loss",)}),
    PlotSpec("SPO training loss", "step", {"spo_curves": ("loss",)}),
    PlotSpec("SPO kept-pair fraction", "step", {"spo_curves": ("kept_fraction",)}),
    PlotSpec(
        "Evaluation gain (SPO - base)", "diff_mean", {"eval_diffs": ("scorer",)}, template="bar_horizontal"
    ),
)
