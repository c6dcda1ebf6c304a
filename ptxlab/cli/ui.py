"""`ptxlab ui`: the MLflow UI on this machine's tracking store."""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from ptxlab import environment
from ptxlab.cli.errors import fail_cleanly


def ui(
    port: Annotated[int, typer.Option(help="Port on 127.0.0.1.")] = 5000,
) -> None:
    """Open the MLflow UI on the tracking store (bound to 127.0.0.1 only)."""
    from ptxlab.tracking import configure, tracking_uri

    with fail_cleanly():
        if not _full_mlflow_installed():
            raise RuntimeError("ptxlab ui needs the MLflow server, which this install lacks "
                               "(mlflow-skinny only): pip install 'ptxlab[ui]'")
    uri = tracking_uri()
    with fail_cleanly():
        configure()  # a new SQLite store is created under ptxlab's lock, not by the server
    mlflow_cli = shutil.which("mlflow") or str(Path(sys.executable).parent / "mlflow")
    command = [mlflow_cli, "ui", "--host", "127.0.0.1", "--port", str(port),
               "--backend-store-uri", uri]
    Console(stderr=True).print(f"MLflow UI on http://127.0.0.1:{port} (store: {uri}); Ctrl+C stops it")
    # MLflow's background job runner (GenAI judges, schedules) is not needed to browse runs.
    env = environment.for_child(**{environment.TRACKING_URI: uri,
                                   "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
    raise typer.Exit(run_in_own_group(command, env))


def run_in_own_group(command: list[str], env: dict[str, str]) -> int:
    """Run a server in a process group of its own and wait for it. SIGTERM, SIGINT and SIGHUP
    sent to this process go to the whole group (the server's workers included); whatever is
    left of the group after a grace period is killed, so nothing outlives this process."""
    server = subprocess.Popen(command, env=env, start_new_session=True)

    def forward(signum: int, _frame) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signum)

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, forward)
    try:
        code = server.wait()
    finally:
        _end_group(server.pid)
    return 128 - code if code < 0 else code  # a signal's exit status, as shells report it


def _end_group(group: int, grace_s: float = 10.0) -> None:
    """Wait for the rest of the group to go after its leader, then kill what remains."""
    deadline = time.monotonic() + grace_s
    with contextlib.suppress(ProcessLookupError):
        while time.monotonic() < deadline:
            os.killpg(group, 0)  # raises once no process of the group is left
            time.sleep(0.1)
        os.killpg(group, signal.SIGKILL)


def _full_mlflow_installed() -> bool:
    """The `mlflow` distribution (server and web UI), not only `mlflow-skinny`'s client."""
    try:
        importlib.metadata.version("mlflow")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True
