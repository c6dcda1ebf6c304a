"""`ptxlab ui`: the MLflow UI on this machine's tracking store."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from ptxlab import environment


def ui(
    port: Annotated[int, typer.Option(help="Port on 127.0.0.1.")] = 5000,
) -> None:
    """Open the MLflow UI on the tracking store (bound to 127.0.0.1 only)."""
    from ptxlab.tracking import tracking_uri

    uri = tracking_uri()
    mlflow_cli = shutil.which("mlflow") or str(Path(sys.executable).parent / "mlflow")
    command = [mlflow_cli, "ui", "--host", "127.0.0.1", "--port", str(port),
               "--backend-store-uri", uri]
    Console(stderr=True).print(f"MLflow UI on http://127.0.0.1:{port} (store: {uri}); Ctrl+C stops it")
    # MLflow's background job runner (GenAI judges, schedules) is not needed to browse runs.
    env = environment.for_child(**{environment.TRACKING_URI: uri,
                                   "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
    raise typer.Exit(subprocess.call(command, env=env))
