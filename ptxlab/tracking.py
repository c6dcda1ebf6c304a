"""MLflow: where runs are stored, how a run is opened or resumed, and what gets logged.

This and `sweep` are the only modules that import MLflow. The default store is
`sqlite:///mlruns/mlflow.db` with artifacts in `mlruns/artifacts/`, relative to the working
directory; `MLFLOW_TRACKING_URI` overrides it (e.g. a team server).
"""

from __future__ import annotations

import fcntl
import logging
import os
import subprocess
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import RunStatus
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

import ptxlab
from ptxlab import environment
from ptxlab.artifacts import (
    LOGGED_MODEL,
    LOGGED_MODEL_CHECKPOINT,
    LOGGED_MODEL_POSTPROCESS,
    MODEL,
    POSTPROCESS,
    file_name,
    folder,
)
from ptxlab.train import TrainingCallbacks

STORE_DIR = "mlruns"
FAILURE_TAG = "ptxlab.failure"
# MLflow draws a progress bar on stderr for every artifact download, even of one small file.
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
for _noisy in ("alembic", "mlflow"):
    logging.getLogger(_noisy).setLevel(logging.WARNING)
# MLflow's schema hint for integer columns of the case manifests (which have no missing values).
warnings.filterwarnings("ignore", ".*Hint: Inferred schema contains integer", UserWarning)


def local_store() -> Path:
    return Path.cwd() / STORE_DIR


def local_store_uri() -> str:
    return f"sqlite:///{local_store() / 'mlflow.db'}"


def tracking_uri() -> str:
    """MLFLOW_TRACKING_URI, or the local SQLite store under ./mlruns (created on demand)."""
    uri = environment.tracking_uri()
    if uri:
        return uri
    local_store().mkdir(exist_ok=True)
    return local_store_uri()


def sqlite_path(uri: str) -> Path | None:
    """The database file of a `sqlite:///` URI (None for other stores and in-memory SQLite)."""
    prefix = "sqlite:///"
    if not uri.startswith(prefix) or uri == prefix or ":memory:" in uri:
        return None
    return Path(uri[len(prefix):].split("?", 1)[0])


_READY_STORES: set[str] = set()


@contextmanager
def store_lock(uri: str) -> Iterator[None]:
    """Exclusive inter-process lock on a SQLite store (a `<db>.lock` file beside it); nothing
    for other stores. MLflow creates and migrates a SQLite store on first use, and two
    processes doing that at once break it for good."""
    database = sqlite_path(uri)
    if database is None:
        yield
        return
    database.parent.mkdir(parents=True, exist_ok=True)
    with open(database.with_name(database.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def configure() -> MlflowClient:
    """Point MLflow at the tracking store; the first use in this process creates or migrates a
    SQLite store under `store_lock`, so runs, sweep workers and evaluations may start together."""
    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    if uri in _READY_STORES:
        return MlflowClient(uri)
    with store_lock(uri):
        client = MlflowClient(uri)  # builds (and caches) MLflow's store: creates, migrates
        client.search_experiments(max_results=1)
    _READY_STORES.add(uri)
    return client


def run_status(run_id: str) -> str | None:
    """FINISHED, FAILED, KILLED, RUNNING or SCHEDULED; None where the store holds no such run
    (or only a deleted one)."""
    try:
        run = configure().get_run(run_id)
    except MlflowException:
        return None
    return None if run.info.lifecycle_stage == "deleted" else run.info.status


def require_run(run_id: str) -> None:
    """A one-line ValueError unless the tracking store holds run `run_id`."""
    try:
        configure().get_run(run_id)
    except MlflowException:
        raise ValueError(f"run {run_id}: no such run in the tracking store "
                         f"{tracking_uri()}") from None


# The MLflow UI opens an experiment of this kind (and any link with ?workflowType=...) in its
# machine-learning view (runs, charts, comparisons), not the GenAI view (traces, judges).
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}
ML_VIEW = "workflowType=machine_learning"


def ui_link(experiment_id: str, run_id: str | None = None, port: int = 5000) -> str:
    """The `ptxlab ui` address of an experiment (or one of its runs), in the ML view."""
    page = f"#/experiments/{experiment_id}" + (f"/runs/{run_id}" if run_id else "")
    return f"http://127.0.0.1:{port}/{page}?{ML_VIEW}"


def ensure_experiment(client: MlflowClient, name: str) -> str:
    """The experiment's id, creating it (artifacts under ./mlruns/artifacts for the local store)."""
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        if not EXPERIMENT_KIND.items() <= experiment.tags.items():  # made by an older ptxlab
            client.set_experiment_tag(experiment.experiment_id, *next(iter(EXPERIMENT_KIND.items())))
        return experiment.experiment_id
    location = None
    if mlflow.get_tracking_uri() == local_store_uri():
        location = (local_store() / "artifacts").as_uri()
    try:
        return client.create_experiment(name, artifact_location=location, tags=EXPERIMENT_KIND)
    except mlflow.exceptions.MlflowException:
        # Another worker created it between our lookup and create.
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            raise
        return experiment.experiment_id


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).parent, timeout=5)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


@contextmanager
def open_run(
    experiment: str,
    run_name: str | None = None,
    run_id: str | None = None,
    parent_run_id: str | None = None,
    tags: dict[str, str] | None = None,
    system_metrics: bool = True,
) -> Iterator[mlflow.ActiveRun]:
    """Start (or, with run_id, continue) a run. It ends FINISHED; on an exception FAILED with
    the reason in the `ptxlab.failure` tag, on Ctrl-C KILLED."""
    client = configure()
    experiment_id = ensure_experiment(client, experiment)
    base_tags = {"ptxlab.version": ptxlab.__version__, "mlflow.source.git.commit": git_commit()}
    mlflow.set_system_metrics_sampling_interval(5)
    run = mlflow.start_run(
        run_id=run_id,
        experiment_id=None if run_id else experiment_id,
        run_name=run_name,
        parent_run_id=parent_run_id,
        nested=parent_run_id is not None,
        tags={**base_tags, **(tags or {})},
        log_system_metrics=system_metrics,
    )
    try:
        yield run
    except BaseException as error:
        _end_unfinished(run.info.run_id, error)
        raise
    mlflow.end_run(RunStatus.to_string(RunStatus.FINISHED))


def failure_reason(error: BaseException) -> str:
    """One line: '<file>: <problem>' where the OS names a file, else the message's first line."""
    if isinstance(error, OSError) and error.filename and error.strerror:
        return f"{error.filename}: {error.strerror}"
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _end_unfinished(run_id: str, error: BaseException) -> None:
    """End the run FAILED (KILLED on Ctrl-C) with the reason as a tag. Best effort: when the
    store itself is what failed (a full disk under SQLite), the original error is what counts."""
    killed = isinstance(error, KeyboardInterrupt)
    status = RunStatus.KILLED if killed else RunStatus.FAILED
    try:
        tags = MlflowClient().get_run(run_id).data.tags
        if not killed and FAILURE_TAG not in tags:  # a more specific reason may be set already
            record_failure(run_id, failure_reason(error))
        mlflow.end_run(RunStatus.to_string(status))
    except Exception:  # noqa: BLE001 - reporting the first error matters more
        logging.getLogger(__name__).debug("could not end run %s as %s", run_id, status)


def record_failure(run_id: str, reason: str) -> None:
    """Tag the run with why it failed (`ptxlab.failure`); `open_run` then ends it FAILED."""
    MlflowClient().set_tag(run_id, FAILURE_TAG, reason[:4000])


def log_params(params: dict[str, Any]) -> None:
    """Params are write-once in MLflow; on resume the same values are accepted, others skipped."""
    run = mlflow.active_run()
    existing = MlflowClient().get_run(run.info.run_id).data.params
    fresh = {k: ("None" if v is None else v) for k, v in params.items() if k not in existing}
    items = list(fresh.items())
    for start in range(0, len(items), 100):
        mlflow.log_params(dict(items[start : start + 100]))


def log_text(text: str, artifact_file: str) -> None:
    mlflow.log_text(text, artifact_file)


def log_dict(data: dict, artifact_file: str) -> None:
    mlflow.log_dict(data, artifact_file)


def log_figure(figure, artifact_file: str) -> None:
    mlflow.log_figure(figure, artifact_file)


def log_artifact(path: Path, artifact_path: str | None = None) -> None:
    mlflow.log_artifact(str(path), artifact_path)


def log_metrics(metrics: dict[str, float], step: int | None = None, model_id: str | None = None,
                dataset=None) -> None:
    """Finite metrics into the active run; with `model_id` (and `dataset`) linked to that
    logged model (and the data set it was measured on)."""
    finite = {k: float(v) for k, v in metrics.items() if v == v}  # NaN is not logged
    mlflow.log_metrics(finite, step=step, model_id=model_id, dataset=dataset)


def set_tags(tags: dict[str, Any]) -> None:
    mlflow.set_tags({k: str(v) for k, v in tags.items()})


def dataset(manifest_rows: list[dict], source: str, name: str, digest: str):
    """A data set's case manifest as an MLflow dataset with a content digest."""
    import pandas as pd

    with warnings.catch_warnings():  # MLflow registers its local-file source class twice
        warnings.filterwarnings("ignore", "The specified dataset source can be interpreted in "
                                "multiple ways", UserWarning)
        return mlflow.data.from_pandas(pd.DataFrame(manifest_rows), source=source, name=name,
                                       digest=digest, targets="positive")


def log_dataset(dataset, context: str) -> None:
    """Register the data set as a run input (MLflow's dataset lineage)."""
    try:
        mlflow.log_input(dataset, context=context)
    except mlflow.exceptions.MlflowException as error:
        # Two runs registering the same new data set at once (sweep workers): the store's
        # check-then-insert lets one win; the other links to the row it created.
        if "UNIQUE constraint" not in str(error) and "duplicate key" not in str(error):
            raise
        mlflow.log_input(dataset, context=context)


def has_artifact(run_id: str, artifact_path: str) -> bool:
    """Whether run `run_id` logged the artifact `artifact_path`."""
    parent = artifact_path.rpartition("/")[0] or None
    return any(item.path == artifact_path
               for item in configure().list_artifacts(run_id, parent))


def experiment_name(run_id: str) -> str:
    """The name of the experiment run `run_id` belongs to."""
    client = configure()
    return client.get_experiment(client.get_run(run_id).info.experiment_id).name


def download_artifact(run_id: str, artifact_path: str, dest: Path | None = None) -> Path:
    """Fetch one artifact of a run to a local path."""
    configure()
    dest = dest or Path(tempfile.mkdtemp(prefix="ptxlab-"))
    return Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=artifact_path,
                                                    dst_path=str(dest)))


def model_files(reference: str, dest: Path) -> tuple[str, Path, Path]:
    """(run id, checkpoint, post-processing rule) of a trained model, downloaded into `dest`.

    `reference` is a run id, `runs:/<run id>/<name>`, `models:/<model id>`,
    `models:/<registered name>/<version>` or `models:/<registered name>@<alias>`.
    """
    client = configure()
    try:
        if not reference.startswith(("runs:/", "models:/")):
            client.get_run(reference)
            logged = {i.path for i in client.list_artifacts(reference, folder(MODEL))}
            for artifact in (MODEL, POSTPROCESS):
                if artifact not in logged:
                    raise FileNotFoundError(
                        f"run {reference}: no {artifact} logged (did training finish?)")
            return (reference, download_artifact(reference, MODEL, dest),
                    download_artifact(reference, POSTPROCESS, dest))
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=reference,
                                                         dst_path=str(dest)))
    except mlflow.exceptions.MlflowException as error:
        detail = " ".join(str(error).split())[:200]
        named = reference if reference.startswith(("runs:/", "models:/")) else f"run {reference}"
        raise ValueError(f"{named}: not found in the tracking store ({detail})") from None
    if (local / file_name(MODEL)).is_file():  # runs:/<id>/model, the run's plain files
        return reference.split("/")[1], local / file_name(MODEL), local / file_name(POSTPROCESS)
    if not (local / LOGGED_MODEL_CHECKPOINT).is_file():
        raise FileNotFoundError(f"{reference}: not a ptxlab model (no {LOGGED_MODEL_CHECKPOINT})")
    run_id = mlflow.models.Model.load(str(local)).run_id
    return run_id, local / LOGGED_MODEL_CHECKPOINT, local / LOGGED_MODEL_POSTPROCESS


def register_model(run_id: str, name: str, tags: dict[str, str], alias: str) -> int:
    """Register run `run_id`'s logged model as a new version of `name`, tagged, with `alias`
    moved to it; returns the version."""
    client = configure()
    experiment_id = client.get_run(run_id).info.experiment_id
    found = mlflow.search_logged_models(
        experiment_ids=[experiment_id], output_format="list",
        filter_string=f"source_run_id = '{run_id}' AND name = '{LOGGED_MODEL}'")
    if not found:
        raise FileNotFoundError(f"run {run_id}: no logged model {LOGGED_MODEL!r} (trained "
                                "before ptxlab logged MLflow models?)")
    version = mlflow.register_model(f"models:/{found[0].model_id}", name, tags=tags)
    client.set_registered_model_alias(name, alias, version.version)
    return int(version.version)


def logged_steps(run_id: str, key: str) -> set[int]:
    return {m.step for m in MlflowClient().get_metric_history(run_id, key)}


class MlflowCallbacks(TrainingCallbacks):
    """Adapts the training loop's callbacks to MLflow; logs each epoch's metrics exactly once."""

    def __init__(self, run_id: str, resumed: bool):
        self.run_id = run_id
        self.already_logged = logged_steps(run_id, "val_iou") if resumed else set()

    def on_train_start(self, info: dict) -> None:
        set_tags({f"ptxlab.{key}": value for key, value in info.items()})

    def on_epoch_end(self, epoch: int, metrics: dict[str, float]) -> None:
        if epoch in self.already_logged:
            return
        log_metrics({k: v for k, v in metrics.items() if k != "epoch"}, step=epoch)
        self.already_logged.add(epoch)

    def replay(self, history: list[dict[str, float]]) -> None:
        """Log epochs a killed run finished but had not logged yet."""
        for metrics in history:
            self.on_epoch_end(int(metrics["epoch"]), metrics)
