"""The views the README points to, rendered in headless Chromium: MLflow's run comparison, registered model
and evaluate-run artifacts (a real `mlflow server` on two tiny pipeline runs) and DVC's plots page, offline.

The oracles are the stages' report files, not the store: what the UI shows must match what was written.
With SPO_SCREENSHOT_DIR set, each view is also saved there (docs/img/ holds the README's copies).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from e2e_helpers import PIPELINE_SMALL, REPO, free_port, project_cfg, sh, wait_for_http

from spo import tracking
from spo.pipeline_spec import artifact_path

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

CHROMIUM = os.environ.get("SPO_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
if not CHROMIUM:
    pytest.skip(
        "no Chromium: apt-get install chromium, or SPO_CHROMIUM=/path/to/chrome", allow_module_level=True
    )
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright missing: pip install -e '.[dev]'")

CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
UI_TIMEOUT_MS = 90_000  # the MLflow UI is a React app that loads its data after the page; CI has 2 cores
SECOND_RUN = ["spo.lr=3e-3"]  # changes train_spo and evaluate only: the rest comes from the stage cache


# Resolved now: other e2e modules change the working directory while they run.
SCREENSHOT_DIR = (
    Path(os.environ["SPO_SCREENSHOT_DIR"]).resolve() if os.environ.get("SPO_SCREENSHOT_DIR") else None
)


def _shot(page, name: str) -> None:
    if SCREENSHOT_DIR:
        SCREENSHOT_DIR.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(SCREENSHOT_DIR / name))


def _read(cfg, name: str) -> dict:
    return json.loads(artifact_path(cfg, name).read_text())


@pytest.fixture(scope="module")
def runs(tmp_path_factory, dvc_clone, prefect_harness):
    """Two pipeline runs on the DVC test's tiny world (synth and base up to date, as in test_flow), each with
    the report files it wrote, read before the next run overwrites them."""
    from PIL import Image

    from flows.pipeline import spo_pipeline

    root = tmp_path_factory.mktemp("browser_project")
    for world in ("data/raw/pickapic_tiny", "models/base"):
        shutil.copytree(dvc_clone[0] / world, root / world)
    store = f"sqlite:///{root / 'mlflow' / 'mlflow.db'}"
    out = []
    for extra in ([], SECOND_RUN):
        overrides = [f"paths.root={root}", f"tracking.tracking_uri={store}", *PIPELINE_SMALL, *extra]
        summary = spo_pipeline(preset="tiny", overrides=overrides, params_file=None)
        cfg = project_cfg(root, store, *PIPELINE_SMALL, *extra)
        out.append(
            {
                "cfg": cfg,
                "run_id": summary["mlflow"]["run_id"],
                "experiment_id": summary["mlflow"]["experiment_id"],
                "eval": _read(cfg, "eval_metrics"),
                "spo": _read(cfg, "spo_summary"),
                "register": _read(cfg, "register_record"),
                "promote": _read(cfg, "promote_record"),
                "grid_size": Image.open(artifact_path(cfg, "eval_grid")).size,
            }
        )
    return out


@pytest.fixture(scope="module")
def mlflow_ui(runs, tmp_path_factory):
    """`mlflow server` on the runs' store, as the README starts `mlflow ui`; killed with its workers at the end."""
    cwd = tmp_path_factory.mktemp("mlflow_server")  # the server's default artifact folder lands here
    port = free_port()
    mlflow_cli = Path(sys.executable).with_name("mlflow")
    env = {**os.environ, "PATH": f"{mlflow_cli.parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("MLFLOW_TRACKING_URI", None)
    log_path = cwd / "server.log"
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            [
                str(mlflow_cli),
                "server",
                "--backend-store-uri",
                tracking.tracking_uri(runs[0]["cfg"]),
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--workers",
                "1",
            ],
            cwd=cwd,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_http(f"{url}/health", proc, log_path, 120, "mlflow server")
        yield url
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    """One headless Chromium with a fresh profile for the module (each test opens its own page)."""
    with sync_api.sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp("chromium_profile")),
            executable_path=CHROMIUM,
            args=CHROMIUM_ARGS,
            viewport={"width": 1280, "height": 800},
        )
        context.set_default_timeout(UI_TIMEOUT_MS)
        yield context
        context.close()


@pytest.fixture
def page(browser):
    page = browser.new_page()
    page.errors = []
    page.on("pageerror", lambda exc: page.errors.append(str(exc)))
    yield page
    page.close()


def _close_assistant(page) -> None:
    """MLflow 3's assistant side panel covers a third of the page; it is not what the screenshots show."""
    close = page.get_by_role("button", name="Close", exact=True)
    if close.count():
        close.first.click()
        close.first.wait_for(state="hidden")


def _metric_rows(page) -> dict[str, list[str]]:
    """The compare page's Metrics table as ``name -> [value per run]``: its grids lay cells out by ``top``."""
    return page.evaluate(
        """() => {
          const link = [...document.querySelectorAll('a')].find(a => a.textContent === 'spo/pairs_trained');
          const rows = {};
          for (const cell of link.closest('.du-bois-light-collapse-item')
                                 .querySelectorAll('.ReactVirtualized__Grid__innerScrollContainer > div')) {
            (rows[cell.style.top] ??= []).push(cell.innerText.trim());
          }
          return Object.fromEntries(Object.values(rows).map(([name, ...values]) => [name, values]));
        }"""
    )


def test_compare_page_shows_each_runs_headline_metrics(runs, mlflow_ui, page):
    ids = json.dumps([r["run_id"] for r in runs], separators=(",", ":"))
    page.goto(f'{mlflow_ui}/#/compare-runs?runs={ids}&experiments=["{runs[0]["experiment_id"]}"]')
    page.get_by_text("Comparing 2 Runs").wait_for()
    page.get_by_text("spo/pairs_trained", exact=True).first.wait_for()
    body = page.inner_text("body")
    for run in runs:  # the run names tell the two configs apart
        assert f"pipeline tiny-{tracking.config_digest(run['cfg'])}" in body

    rows = _metric_rows(page)
    shown = 5e-4 + 1e-9  # the table rounds to 3 decimals
    for scorer in runs[0]["cfg"].eval.scorers:
        for key, pick in (
            ("diff_mean", lambda m: m["diff_mean"]),
            ("diff_ci95_low", lambda m: m["diff_ci95"][0]),
            ("diff_ci95_high", lambda m: m["diff_ci95"][1]),
        ):
            values = rows[f"eval/{scorer}/{key}"]
            expected = [pick(run["eval"][scorer]) for run in runs]
            assert [float(v) for v in values] == pytest.approx(expected, abs=shown), (scorer, key)
    assert [float(v) for v in rows["spo/pairs_trained"]] == [run["spo"]["pairs_trained"] for run in runs]

    _close_assistant(page)
    page.get_by_text("Show diff only").first.click()  # the parameters that differ: spo.lr
    page.get_by_text("Parameters", exact=True).first.evaluate("e => e.scrollIntoView({block: 'start'})")
    _shot(page, "mlflow-compare.png")
    assert not page.errors


def test_registered_model_page_shows_versions_and_aliases(runs, mlflow_ui, page):
    name = runs[-1]["register"]["model"]
    page.goto(f"{mlflow_ui}/#/models/{name}")
    page.get_by_role("heading", name=name).first.wait_for()
    versions = sorted({r["register"]["version"] for r in runs}, key=int)
    for version in versions:
        page.get_by_text(f"Version {version}", exact=True).first.wait_for()
    rows = {
        v: page.locator("tr, [role=row]").filter(has_text=f"Version {v}").first.inner_text() for v in versions
    }
    latest, champion = runs[-1]["register"]["version"], runs[-1]["promote"]["champion"]
    for version, text in rows.items():
        aliases = set(re.findall(r"@\s*(\w+)", text))  # alias chips read "@ challenger"
        assert ("challenger" in aliases) == (version == latest), (version, aliases)
        assert ("champion" in aliases) == (version == champion), (version, aliases)
    _close_assistant(page)
    _shot(page, "mlflow-registered-model.png")
    assert not page.errors


def test_evaluate_run_artifacts_page_shows_the_grid(runs, mlflow_ui, page):
    run = runs[-1]
    tracking.init_store(run["cfg"])
    [evaluate] = [r for r in tracking.child_runs(run["run_id"]) if r.data.tags["spo.stage"] == "evaluate"]
    page.goto(
        f"{mlflow_ui}/#/experiments/{run['experiment_id']}/runs/{evaluate.info.run_id}/artifacts/eval/grid.png"
    )
    for listed in ("grid.png", "diffs.png", "table.md"):
        page.get_by_text(listed, exact=True).first.wait_for()
    grid = page.locator("img[alt='eval/grid.png']").first  # the preview (its src is a blob: URL)
    grid.wait_for()
    page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=grid.element_handle())
    # The image the page shows is the evaluate stage's grid file, whole.
    assert tuple(grid.evaluate("img => [img.naturalWidth, img.naturalHeight]")) == run["grid_size"]
    _close_assistant(page)
    _shot(page, "mlflow-evaluate-artifacts.png")
    assert not page.errors


# Pixels in DVC's colour for the first revision (dvc_render's palette): drawn only from the plotted data.
DATA_PIXELS = """canvas => {
  const data = canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height).data;
  let n = 0;
  for (let i = 0; i < data.length; i += 4) {
    if (Math.abs(data[i] - 0x94) < 24 && Math.abs(data[i + 1] - 0x5d) < 24 && Math.abs(data[i + 2] - 0xd6) < 24) n++;
  }
  return n;
}"""


def test_dvc_plots_page_renders_offline(dvc_clone, page, tmp_path):
    """`make plots` as the README runs it: with the template of scripts/dvc_plots_offline.sh every plot draws
    with no network (DVC's default page loads vega from a CDN and stays blank offline)."""
    clone, env, _ = dvc_clone
    template = tmp_path / "plots-offline.html"
    built = subprocess.run(
        ["bash", str(REPO / "scripts" / "dvc_plots_offline.sh"), str(template)], capture_output=True, text=True
    )
    if built.returncode:
        pytest.skip(f"the offline template could not be built (npm registry unreachable?): {built.stderr[-300:]}")
    out = tmp_path / "plots"
    sh(["dvc", "plots", "show", "--html-template", str(template), "-o", str(out)], clone, env)
    titles = [next(iter(p)) for p in _dvc_plots(clone)]
    requested = []

    def offline(route):  # the page and its inlined scripts are local; anything else would be the network
        if route.request.url.startswith("file:"):
            route.continue_()
        else:
            requested.append(route.request.url)
            route.abort()

    page.route("**/*", offline)
    page.goto((out / "index.html").as_uri())
    plots = page.locator("body > div[id]")
    page.wait_for_function(
        f"() => document.querySelectorAll('body > div[id] canvas').length >= {len(titles)}"
    )
    assert plots.count() == len(titles)
    for i in range(len(titles)):
        canvas = plots.nth(i).locator("canvas").first
        box = canvas.bounding_box()
        assert box["width"] > 100 and box["height"] > 100, (titles[i], box)
        assert canvas.evaluate(DATA_PIXELS) > 0, titles[i]  # a single point at t=501 is a few pixels
    assert not requested and not page.errors, (requested, page.errors)
    _shot(page, "dvc-plots.png")


def _dvc_plots(clone: Path) -> list[dict]:
    import yaml

    return yaml.safe_load((clone / "dvc.yaml").read_text())["plots"]
