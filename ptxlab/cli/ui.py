"""`ptxlab ui`: the MLflow UI on this machine's tracking store."""

from __future__ import annotations

import importlib.metadata
import shutil
import subprocess
import sys
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
    from ptxlab.tracking import tracking_uri

    with fail_cleanly():
        if not _full_mlflow_installed():
            raise RuntimeError("ptxlab ui needs the MLflow server, which this install lacks "
                               "(mlflow-skinny only): pip install 'ptxlab[ui]'")
    uri = tracking_uri()
    mlflow_cli = shutil.which("mlflow") or str(Path(sys.executable).parent / "mlflow")
    command = [mlflow_cli, "ui", "--host", "127.0.0.1", "--port", str(port),
               "--backend-store-uri", uri]
    Console(stderr=True).print(f"MLflow UI on http://127.0.0.1:{port} (store: {uri}); Ctrl+C stops it")
    # MLflow's background job runner (GenAI judges, schedules) is not needed to browse runs.
    env = environment.for_child(**{environment.TRACKING_URI: uri,
                                   "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
    raise typer.Exit(subprocess.call(command, env=env))


def _full_mlflow_installed() -> bool:
    """The `mlflow` distribution (server and web UI), not only `mlflow-skinny`'s client."""
    try:
        importlib.metadata.version("mlflow")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True
