"""Real services for integration tests, each stopped or removed on exit: throwaway PostgreSQL
databases, an MLflow tracking server and an Optuna dashboard run as the team stack runs them,
headless Chromium, and commands whose whole process tree is bounded in time."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import sqlalchemy

POSTGRES = os.environ.get("PTXLAB_TEST_POSTGRES",
                          "postgresql+psycopg2://postgres@127.0.0.1:5432/test")
CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update",
                  "--disable-sync", "--window-size=1600,1000")
STOP_GRACE_S = 20

T = TypeVar("T")


def wait_until(probe: Callable[[], T], timeout: float, what: str, interval: float = 0.5) -> T:
    """Poll `probe` until it returns something truthy (returned) or `timeout` seconds pass."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout:.0f} s")
        time.sleep(interval)


def stop_process_group(process: subprocess.Popen) -> None:
    """SIGTERM the process's group (it was started in a session of its own), SIGKILL whatever
    is left after a grace period (children that outlived their parent included), reap it."""
    try:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            pass
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass  # nothing of the group is left
    process.wait()


@dataclass
class Finished:
    returncode: int
    output: str


def run_bounded(command: list[str], timeout: float, **popen: object) -> Finished:
    """Run a command in a session of its own; past `timeout` seconds its whole process tree is
    stopped and the run fails with the output so far."""
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, start_new_session=True, **popen)
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        stop_process_group(process)
        output, _ = process.communicate()
        raise AssertionError(f"{' '.join(command)}: still running after {timeout:.0f} s; "
                             f"output:\n{output[-4000:]}") from None
    finally:
        if process.poll() is None:
            stop_process_group(process)
    return Finished(process.returncode, output)


# --- PostgreSQL ----------------------------------------------------------------------------


def postgres_problem(url: str = POSTGRES) -> str | None:
    """Why the PostgreSQL server at `url` cannot be used, or None when it can."""
    engine = sqlalchemy.create_engine(url, connect_args={"connect_timeout": 3})
    try:
        with engine.connect():
            return None
    except sqlalchemy.exc.OperationalError as error:
        return f"PostgreSQL unreachable at {url}: {str(error).splitlines()[0]}"
    finally:
        engine.dispose()


@contextmanager
def throwaway_database(prefix: str, admin_url: str = POSTGRES) -> Iterator[str]:
    """A fresh database on the server of `admin_url`, dropped (connections and all) on exit;
    yields its URL."""
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    engine = sqlalchemy.create_engine(admin_url, isolation_level="AUTOCOMMIT",
                                      connect_args={"connect_timeout": 5})
    with engine.connect() as connection:
        connection.exec_driver_sql(f'CREATE DATABASE "{name}"')
    try:
        url = sqlalchemy.make_url(admin_url).set(database=name)
        yield url.render_as_string(hide_password=False)
    finally:
        with engine.connect() as connection:
            connection.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        engine.dispose()


# --- MLflow tracking server and Optuna dashboard ------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass
class MlflowServer:
    url: str
    artifacts: Path  # --artifacts-destination
    workdir: Path  # its working directory
    log: Path


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


@contextmanager
def _serving(name: str, command: list[str], probe_url: str, workdir: Path, log: Path,
             env: dict[str, str], startup_timeout: float) -> Iterator[None]:
    """Run a server command in a session of its own until `probe_url` answers 200; its whole
    process group is stopped on exit. A server that dies or stays silent fails with its log."""
    with log.open("wb") as out:
        process = subprocess.Popen(command, cwd=workdir, env=env, stdout=out,
                                   stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + startup_timeout
        while not _answers(probe_url):
            if process.poll() is not None or time.monotonic() > deadline:
                state = (f"exited with {process.returncode}" if process.poll() is not None
                         else f"not answering after {startup_timeout:.0f} s")
                raise RuntimeError(f"{name} {state}; its log:\n"
                                   f"{log.read_text(errors='replace')[-4000:]}")
            time.sleep(0.5)
        yield
    finally:
        stop_process_group(process)


def _venv_command(name: str) -> str:
    """The script `name` beside this interpreter, else (a venv on the system site-packages
    installs no scripts of its own) the one on PATH."""
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.exists() else shutil.which(name) or str(beside)


@contextmanager
def mlflow_server(backend_store_uri: str, workdir: Path,
                  startup_timeout: float = 120) -> Iterator[MlflowServer]:
    """The venv's `mlflow server` on 127.0.0.1 as docker-compose.yml runs it (serving the
    artifacts it stores under workdir/artifacts), once /health answers; stopped on exit."""
    artifacts = workdir / "artifacts"
    artifacts.mkdir()
    log = workdir / "server.log"
    url = f"http://127.0.0.1:{free_port()}"
    command = [_venv_command("mlflow"), "server", "--backend-store-uri", backend_store_uri,
               "--serve-artifacts", "--artifacts-destination", str(artifacts),
               "--host", "127.0.0.1", "--port", url.rsplit(":", 1)[1], "--workers", "1"]
    # The job runner (GenAI judges and scheduled jobs, 7 processes) is no part of the stack.
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    with _serving("mlflow server", command, f"{url}/health", workdir, log, env,
                  startup_timeout):
        yield MlflowServer(url, artifacts, workdir, log)


@contextmanager
def optuna_dashboard(storage_url: str, workdir: Path, startup_timeout: float = 60) -> Iterator[str]:
    """The venv's `optuna-dashboard` (the version docker-compose.yml runs) on 127.0.0.1 over
    `storage_url`; yields its URL once its API answers, stops it on exit."""
    url = f"http://127.0.0.1:{free_port()}"
    command = [_venv_command("optuna-dashboard"), storage_url, "--host", "127.0.0.1",
               "--port", url.rsplit(":", 1)[1]]
    with _serving("optuna-dashboard", command, f"{url}/api/studies", workdir,
                  workdir / "optuna-dashboard.log", dict(os.environ), startup_timeout):
        yield url


# --- Chromium ------------------------------------------------------------------------------


def chromium_problem() -> str | None:
    """Why headless Chromium cannot be driven here, or None when it can."""
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not os.access(p, os.X_OK)]
    if missing:
        return f"not installed: {', '.join(missing)} (apt-get install chromium chromium-driver)"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -e '.[dev]')"
    return None


@contextmanager
def headless_chromium(profile: Path, page_load_timeout: float = 60) -> Iterator[object]:
    """A selenium WebDriver for headless Chromium with a fresh profile; quit on exit."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={profile}")
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    try:
        driver.set_page_load_timeout(page_load_timeout)
        driver.set_script_timeout(30)
        yield driver
    finally:
        driver.quit()
