"""The team stack of docker-compose.yml without Docker: a real `mlflow server` on a throwaway
PostgreSQL database that stores and serves the artifacts, a two-worker smoke sweep whose Optuna
study lives in PostgreSQL too, the Optuna dashboard on that study, and the MLflow UI of that
server in headless Chromium."""

import base64
import json
import os
import sys
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import optuna
import pytest
import yaml
from mlflow.tracking import MlflowClient
from optuna.trial import FrozenTrial, TrialState

from ptxlab.sweep import PARENT_ATTR
from tests.conftest import service_unavailable
from tests.servers import (
    MlflowServer,
    chromium_problem,
    headless_chromium,
    mlflow_server,
    optuna_dashboard,
    postgres_problem,
    run_bounded,
    throwaway_database,
    wait_until,
)

pytestmark = [pytest.mark.slow, pytest.mark.service]

ROOT = Path(__file__).parents[1]
SWEEP_TIMEOUT_S = 300
UI_TIMEOUT_S = 90
FIGURE = "plots/learning_curves.png"
EPOCHS = 4
ESCAPE_KEY = "\ue00c"  # selenium's Keys.ESCAPE (selenium stays optional: no import here)


@dataclass
class Sweep:
    """A finished smoke sweep on the team server: its study and where MLflow holds it."""

    server: MlflowServer
    study: str
    trials: list[FrozenTrial]
    parent_run_id: str
    experiment_id: str
    workdir: Path  # the working directory of `ptxlab sweep`

    @property
    def complete(self) -> list[FrozenTrial]:
        return [t for t in self.trials if t.state == TrialState.COMPLETE]

    def client(self) -> MlflowClient:
        return MlflowClient(tracking_uri=self.server.url)


def write_tiny_smoke_study(directory: Path) -> Path:
    """The shipped smoke study cut to four trials (two learning rates, two seeds), with a unique
    name, an absolute base and heartbeats that a busy two-core machine cannot miss."""
    tree = yaml.safe_load((ROOT / "experiments" / "studies" / "smoke.yaml").read_text())
    tree.update(name=f"team-{uuid.uuid4().hex[:10]}", base=str(ROOT / "experiments" / "default.yaml"),
                space={"optim.lr": {"type": "categorical", "choices": [0.003, 1.0e-7]}},
                repeats=2, hypotheses=[], heartbeat={"interval": 5, "grace_period": 120})
    tree["set"].update({"augment.preset": "light", "train.epochs": EPOCHS})
    path = directory / f"{tree['name']}.yaml"
    path.write_text(yaml.safe_dump(tree, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def team_server(tmp_path_factory) -> Iterator[MlflowServer]:
    """`mlflow server` on a throwaway PostgreSQL database, serving artifacts from a tmp dir."""
    problem = postgres_problem()
    if problem:
        service_unavailable(problem)
    workdir = tmp_path_factory.mktemp("mlflow-server")
    with (throwaway_database("ptxlab_test_mlflow") as backend,
          mlflow_server(backend, workdir) as server):
        yield server


@pytest.fixture(scope="module")
def optuna_database(team_server) -> Iterator[str]:
    """A second throwaway PostgreSQL database for the Optuna study (dropped after the module)."""
    with throwaway_database("ptxlab_test_optuna") as storage_url:
        yield storage_url


@pytest.fixture(scope="module")
def smoke_sweep(team_server, optuna_database, tmp_path_factory) -> Sweep:
    """`python -m ptxlab sweep --workers 2` against the team server and the Optuna database."""
    files = tmp_path_factory.mktemp("sweep-files")
    workdir = tmp_path_factory.mktemp("sweep-workdir")
    study_file = write_tiny_smoke_study(files)
    env = {**os.environ, "MLFLOW_TRACKING_URI": team_server.url,
           "PTXLAB_CACHE": str(files / "cache"), "PTXLAB_CHECKPOINTS": str(files / "checkpoints"),
           "PTXLAB_PROGRESS": "0"}
    finished = run_bounded(
        [sys.executable, "-m", "ptxlab", "sweep", str(study_file), "--storage", optuna_database,
         "--workers", "2"], timeout=SWEEP_TIMEOUT_S, cwd=workdir, env=env)
    assert finished.returncode == 0, finished.output[-4000:]
    storage = optuna.storages.RDBStorage(optuna_database)
    try:
        study = optuna.load_study(study_name=study_file.stem, storage=storage)
        trials, parent_run_id = study.get_trials(), study.user_attrs[PARENT_ATTR]
    finally:
        storage.engine.dispose()
    client = MlflowClient(tracking_uri=team_server.url)
    experiment_id = client.get_run(parent_run_id).info.experiment_id
    return Sweep(team_server, study_file.stem, trials, parent_run_id, experiment_id, workdir)


def test_a_two_worker_sweep_logs_to_the_team_server(smoke_sweep, tmp_path):
    sweep = smoke_sweep
    client = sweep.client()
    assert len(sweep.complete) == len(sweep.trials) == 4, [t.state for t in sweep.trials]

    (parent,) = client.search_runs(
        [sweep.experiment_id],
        f"tags.`ptxlab.role` = 'study' and tags.`ptxlab.study` = '{sweep.study}'")
    assert parent.info.run_id == sweep.parent_run_id
    assert parent.info.run_name == sweep.study and parent.info.status == "FINISHED"

    children = client.search_runs([sweep.experiment_id],
                                  f"tags.`mlflow.parentRunId` = '{sweep.parent_run_id}'")
    by_id = {run.info.run_id: run for run in children}
    assert sorted(by_id) == sorted(t.user_attrs["mlflow_run_id"] for t in sweep.complete)
    for trial in sweep.complete:
        run = by_id[trial.user_attrs["mlflow_run_id"]]
        assert run.info.status == "FINISHED"
        assert run.info.run_name == f"{sweep.study}-{trial.number:04d}"
        assert run.data.tags["optuna.state"] == "COMPLETE"
        assert run.data.tags["optuna.param.optim.lr"] == str(trial.params["optim.lr"])
        assert run.data.metrics["best_val_pooled_iou"] == pytest.approx(trial.value)
        history = client.get_metric_history(run.info.run_id, "train_loss")
        assert sorted(m.step for m in history) == list(range(EPOCHS))

    # Artifacts go through the server into its --artifacts-destination, not into ./mlruns.
    run = by_id[sweep.complete[0].user_attrs["mlflow_run_id"]]
    artifact_uri = urlparse(run.info.artifact_uri)
    assert artifact_uri.scheme == "mlflow-artifacts", run.info.artifact_uri
    stored = sweep.server.artifacts / artifact_uri.path.lstrip("/")
    postprocess = json.loads(Path(client.download_artifacts(
        run.info.run_id, "model/postprocess.json", str(tmp_path))).read_text())
    chosen = {key.removeprefix("chosen.postprocess."): value
              for key, value in run.data.params.items() if key.startswith("chosen.postprocess.")}
    assert {key: str(value) for key, value in postprocess.items()} == chosen
    assert json.loads((stored / "model" / "postprocess.json").read_text()) == postprocess
    figure = Path(client.download_artifacts(run.info.run_id, FIGURE, str(tmp_path))).read_bytes()
    assert figure.startswith(b"\x89PNG\r\n\x1a\n")
    assert (stored / FIGURE).read_bytes() == figure
    assert list(sweep.workdir.iterdir()) == []
    assert sorted(p.name for p in sweep.server.workdir.iterdir()) == ["artifacts", "server.log"]


def test_the_mlflow_ui_lists_the_sweep_and_shows_a_logged_figure(smoke_sweep, tmp_path):
    problem = chromium_problem()
    if problem:
        service_unavailable(problem)
    sweep = smoke_sweep
    url = sweep.server.url
    child_names = sorted(f"{sweep.study}-{t.number:04d}" for t in sweep.complete)
    child_run_id = sweep.complete[0].user_attrs["mlflow_run_id"]
    figure = sweep.client().download_artifacts(child_run_id, FIGURE, str(tmp_path))
    with headless_chromium(tmp_path / "chromium-profile") as browser:

        def page_text() -> str:
            return browser.find_element("tag name", "body").text

        # MLflow 3.17 opens an experiment on its GenAI overview unless told the workflow.
        browser.get(f"{url}/#/experiments/{sweep.experiment_id}?workflowType=machine_learning")
        wait_until(lambda: sweep.study in page_text(), UI_TIMEOUT_S, "the parent run listed")
        assert f"#/experiments/{sweep.experiment_id}/runs?" in browser.current_url
        # Child runs sit folded under their parent: unfold it with the button of its name cell.
        browser.find_element(
            "xpath", f"//div[@role='row'][.//a[normalize-space()='{sweep.study}']]"
                     "//button[contains(@data-component-id, 'runnamecellrenderer')]").click()
        wait_until(lambda: all(name in page_text() for name in child_names), UI_TIMEOUT_S,
                   f"child runs {child_names} listed")
        shots = screenshot_folder(tmp_path)
        keep_screenshot(browser, shots / "runs.png")
        compare_the_trials(browser, sweep, shots)

        browser.get(f"{url}/#/experiments/{sweep.experiment_id}/runs/{child_run_id}/artifacts/"
                    f"{FIGURE}")
        shown = wait_until(lambda: browser.execute_script(
            "return Array.from(document.images).find(img => img.alt === arguments[0]"
            " && img.complete && img.naturalWidth > 0) || null", FIGURE),
            UI_TIMEOUT_S, f"{FIGURE} shown")
        keep_screenshot(browser, shots / "figure.png")
        requested = browser.execute_script(
            "return performance.getEntriesByType('resource').map(entry => entry.name)")
        # The UI fetches the artifact from the server, then shows it from a blob: URL.
        shown_bytes = browser.execute_async_script(
            "const done = arguments[arguments.length - 1];"
            "fetch(arguments[0].src).then(r => r.blob()).then(blob => {"
            "  const reader = new FileReader();"
            "  reader.onload = () => done(reader.result.split(',')[1]);"
            "  reader.readAsDataURL(blob); });", shown)
    assert (f"{url}/get-artifact?path={FIGURE.replace('/', '%2F')}&run_uuid={child_run_id}"
            in requested)
    assert base64.b64decode(shown_bytes) == Path(figure).read_bytes()


def screenshot_folder(tmp_path: Path) -> Path:
    """Where screenshots are kept: $PTXLAB_TEST_ARTIFACTS (CI uploads it) or the test's tmp dir."""
    folder = Path(os.environ.get("PTXLAB_TEST_ARTIFACTS") or tmp_path) / "mlflow-ui"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def keep_screenshot(browser, path: Path) -> None:
    browser.save_screenshot(str(path))
    print(f"screenshot: {path}")


def table_row(text: str, name: str, cells: int) -> list[str] | None:
    """The `cells` cells after `name` on the one line of the page text that holds a table row
    of that name, or None when there is no such row."""
    rows = [line.split()[1:] for line in text.splitlines()
            if line.split()[:1] == [name] and len(line.split()) == cells + 1]
    assert len(rows) <= 1, rows
    return rows[0] if rows else None


def compare_the_trials(browser, sweep: Sweep, shots: Path) -> None:
    """With the parent unfolded, tick its children and press Compare, as a person would: the
    parallel coordinates plot and the parameters table (differences only) show each trial's
    learning rate."""
    for trial in sweep.complete:
        browser.find_element(
            "xpath", f"//div[@role='row'][.//a[normalize-space()='{sweep.study}-{trial.number:04d}']]"
                     "//input[contains(@class, 'ag-checkbox-input')]").click()
    browser.find_element("xpath", "//button[normalize-space()='Compare']").click()
    heading = f"Comparing {len(sweep.complete)} Runs from 1 Experiment"
    wait_until(lambda: heading in browser.find_element("tag name", "body").text, UI_TIMEOUT_S,
               "the compare view")
    assert "#/compare-runs?" in browser.current_url
    wait_until(lambda: browser.find_elements(
        "xpath", "//*[local-name()='text'][normalize-space()='optim.lr']"), UI_TIMEOUT_S,
        "optim.lr as an axis of the parallel coordinates plot")
    diff_only = browser.find_element("xpath", "//button[@aria-label='Parameters - Show diff only']")
    diff_only.click()
    wait_until(lambda: diff_only.get_attribute("aria-checked") == "true", UI_TIMEOUT_S,
               "show diff only switched on")
    trials = len(sweep.complete)
    wait_until(lambda: table_row(browser.find_element("tag name", "body").text, "train.epochs",
                                 trials) is None, UI_TIMEOUT_S,
               "parameters that differ between trials only")
    keep_screenshot(browser, shots / "compare.png")
    text = browser.find_element("tag name", "body").text
    assert sorted(table_row(text, "optim.lr", trials)) == sorted(
        str(t.params["optim.lr"]) for t in sweep.complete)
    # The plot starts on whichever metric MLflow lists first: pick the study's objective, as a
    # person would, by typing it into the plot's Metrics box.
    objective = "best_val_pooled_iou"
    metrics_box = browser.find_element("xpath", "//*[normalize-space()='Metrics:']/following::input[1]")
    browser.execute_script("arguments[0].scrollIntoView({block: 'center'}); arguments[0].focus()",
                           metrics_box)
    metrics_box.send_keys(objective)
    wait_until(lambda: browser.find_elements(
        "xpath", f"//*[contains(@class, 'select-item-option')][normalize-space()='{objective}']"),
        UI_TIMEOUT_S, f"{objective} offered")[0].click()
    wait_until(lambda: browser.find_elements(
        "xpath", f"//*[local-name()='text'][normalize-space()='{objective}']"), UI_TIMEOUT_S,
        f"{objective} as an axis of the parallel coordinates plot")
    metrics_box.send_keys(ESCAPE_KEY)
    # Its axis spans the trials' objective values (labelled with 5 decimals).
    values = [t.value for t in sweep.complete]
    for end in (f"{min(values):.5f}", f"{max(values):.5f}"):
        wait_until(lambda end=end: browser.find_elements(
            "xpath", f"//*[local-name()='text'][normalize-space()='{end}']"), UI_TIMEOUT_S,
            f"{end} at an end of the {objective} axis")
    keep_screenshot(browser, shots / "compare-objective.png")


def test_the_optuna_dashboard_shows_the_study(smoke_sweep, optuna_database, tmp_path):
    def get(url: str) -> dict:
        with urllib.request.urlopen(url, timeout=30) as response:
            return json.load(response)

    sweep = smoke_sweep
    with optuna_dashboard(optuna_database, tmp_path) as url:
        summaries = get(f"{url}/api/studies")["study_summaries"]
        (summary,) = [s for s in summaries if s["study_name"] == sweep.study]
        study = get(f"{url}/api/studies/{summary['study_id']}")
    shown = {trial["number"]: trial for trial in study["trials"]}
    assert sorted(shown) == sorted(trial.number for trial in sweep.trials)
    for trial in sweep.complete:
        assert shown[trial.number]["state"] == "Complete"
        assert shown[trial.number]["values"] == [pytest.approx(trial.value)]
        epochs = {v["step"]: v["value"] for v in shown[trial.number]["intermediate_values"]}
        assert epochs == pytest.approx(trial.intermediate_values)
