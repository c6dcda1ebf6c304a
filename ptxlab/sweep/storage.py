"""Optuna storages with heartbeats, and what happens to a trial whose heartbeat goes stale.

Which storage: `--storage URL` or $OPTUNA_STORAGE (an RDB URL such as
`postgresql+psycopg2://user@host/db`, for workers on several hosts: the same command on each host
joins the study), else a journal file `mlruns/optuna/<study>.journal` (Optuna's journal file
storage, safe for several worker processes on one host). Both keep heartbeats: a RUNNING trial
whose heartbeat is older than the grace period is failed by the next worker that looks, its child
run is marked KILLED with the reason, and it is re-queued with the same parameters (at most
`heartbeat.max_retry` times). Workers wait for trials still running elsewhere, so a killed
worker's trial is finished by the others, or by running the command again, which resumes the
study where it stands.
"""

from __future__ import annotations

import time
import warnings
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import optuna
import sqlalchemy
from optuna.exceptions import ExperimentalWarning, UpdateFinishedTrialError
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback

# Optuna's extension point for storages with heartbeats (RDBStorage implements it the same way).
from optuna.storages._heartbeat import BaseHeartbeat
from optuna.storages.journal import JournalFileBackend, JournalStorage
from optuna.trial import FrozenTrial, TrialState

from ptxlab import environment, tracking
from ptxlab.sweep.runs import PARENT_ATTR, finish_child_run
from ptxlab.sweep.study_file import HeartbeatSpec

HEARTBEAT_ATTR = "ptxlab.heartbeat"  # trial system attr of the journal storage
SCHEMA_LOCK_KEY = zlib.crc32(b"ptxlab: optuna schema")  # a PostgreSQL advisory lock id


class HeartbeatJournalStorage(JournalStorage, BaseHeartbeat):
    """Optuna's journal storage with heartbeats, kept as a trial system attr (one clock: one
    host, which is what a journal file is for)."""

    def __init__(self, backend: JournalFileBackend, heartbeat_interval: int, grace_period: int,
                 stale_trial_callback: Callable[[optuna.Study, FrozenTrial], None]):
        super().__init__(backend)
        self._heartbeat_interval = heartbeat_interval
        self._grace_period = grace_period
        self._stale_trial_callback = stale_trial_callback

    def record_heartbeat(self, trial_id: int) -> None:
        try:
            self.set_trial_system_attr(trial_id, HEARTBEAT_ATTR, time.time())
        except UpdateFinishedTrialError:
            pass  # another worker declared the trial stale meanwhile

    def _get_stale_trial_ids(self, study_id: int) -> list[int]:
        now = time.time()
        stale = []
        for trial in self.get_all_trials(study_id, deepcopy=False, states=(TrialState.RUNNING,)):
            started = trial.datetime_start.timestamp() if trial.datetime_start else 0.0
            if now - max(trial.system_attrs.get(HEARTBEAT_ATTR, 0.0), started) > self._grace_period:
                stale.append(self.get_trial_id_from_study_id_trial_number(study_id, trial.number))
        return stale

    def get_heartbeat_interval(self) -> int:
        return self._heartbeat_interval

    def get_heartbeat_stale_trial_callback(self) -> Callable[[optuna.Study, FrozenTrial], None]:
        return self._stale_trial_callback


class StaleTrialHandler:
    """Called by Optuna for a trial whose heartbeat went stale (its worker was killed or lost)
    and by a worker for its own interrupted trial: marks the child run KILLED with the reason
    and re-queues the trial with the same parameters, at most `max_retry` times."""

    def __init__(self, max_retry: int):
        self.max_retry = max_retry
        with warnings.catch_warnings():  # stable in practice; Optuna still labels it
            warnings.simplefilter("ignore", ExperimentalWarning)
            self.retry = RetryHeartbeatStaleTrialCallback(max_retry=max_retry)

    def __call__(self, study: optuna.Study, trial: FrozenTrial,
                 cause: str = "its worker stopped sending heartbeats (killed or lost)") -> None:
        attempts = len(trial.system_attrs.get("retry_history", [])) + 1
        retried = attempts <= self.max_retry
        self.retry(study, trial)
        outcome = "re-queued" if retried else f"not re-queued (max_retry={self.max_retry})"
        finish_child_run(study.user_attrs[PARENT_ATTR], trial.number, "FAIL",
                         f"{cause}; {outcome}", status="KILLED")


def resolve_storage(option: str | None, study_name: str) -> str:
    """--storage, else $OPTUNA_STORAGE, else the study's journal file under ./mlruns/optuna/."""
    return (option or environment.optuna_storage()
            or str(tracking.local_store() / "optuna" / f"{study_name}.journal"))


def _is_rdb(url: str) -> bool:
    return "://" in url


def masked(url: str) -> str:
    """The storage URL without its password, for logs and params."""
    if not _is_rdb(url) or "@" not in url:
        return url
    scheme, rest = url.split("://", 1)
    credentials, host = rest.rsplit("@", 1)
    return f"{scheme}://{credentials.split(':', 1)[0]}:***@{host}" if ":" in credentials else url


def make_storage(url: str, heartbeat: HeartbeatSpec) -> optuna.storages.BaseStorage:
    """RDB storage for a URL, journal-file storage for a path; both with heartbeats."""
    callback = StaleTrialHandler(heartbeat.max_retry)
    if not _is_rdb(url):
        path = Path(url)
        path.parent.mkdir(parents=True, exist_ok=True)
        return HeartbeatJournalStorage(JournalFileBackend(str(path)), heartbeat.interval,
                                       heartbeat.grace_period, callback)
    try:
        with _schema_lock(url), warnings.catch_warnings():
            warnings.simplefilter("ignore", ExperimentalWarning)  # stable; Optuna still labels it
            return RDBStorage(url, engine_kwargs={"pool_pre_ping": True},
                              heartbeat_interval=heartbeat.interval,
                              grace_period=heartbeat.grace_period,
                              heartbeat_stale_trial_callback=callback)
    except Exception as error:  # the driver's own error types: connection, auth, unknown DB
        message = str(error).strip().splitlines()[0] if str(error).strip() else repr(error)
        raise RuntimeError(f"cannot open the Optuna storage {masked(url)}: {message}") from None


@contextmanager
def _schema_lock(url: str) -> Iterator[None]:
    """On PostgreSQL, one process at a time past this point, on every host.

    RDBStorage creates Optuna's tables when a database has none; workers that start together
    on a new database (`docker compose up --scale worker=N`) race there, and most of them fail
    with a duplicate pg_type row. A session-level advisory lock serialises the creation.
    """
    if sqlalchemy.make_url(url).get_backend_name() != "postgresql":
        yield
        return
    engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool)
    try:
        with engine.connect() as connection:
            connection.execute(sqlalchemy.text("SELECT pg_advisory_lock(:key)"),
                               {"key": SCHEMA_LOCK_KEY})
            try:
                yield
            finally:
                connection.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:key)"),
                                   {"key": SCHEMA_LOCK_KEY})
    finally:
        engine.dispose()


def existing_storage(url: str, heartbeat: HeartbeatSpec) -> optuna.storages.BaseStorage:
    """The storage of a study that must already exist (a journal file is not created)."""
    if not _is_rdb(url) and not Path(url).is_file():
        raise FileNotFoundError(f"{url}: no study journal here (pass --storage or set "
                                "OPTUNA_STORAGE for a database)")
    return make_storage(url, heartbeat)
