"""The command line: help for every command, one-line errors, and `ptxlab ui` really serving."""

import contextlib
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psutil
import pytest
from typer.testing import CliRunner

from ptxlab.cli import app
from tests.servers import stop_process_group

runner = CliRunner()
REPO = Path(__file__).resolve().parents[1]
COMMANDS = ["run", "sweep", "report", "evaluate", "predict", "ui", "gc", "config", "data", "weights",
            "augment"]


def _registered(typer_app) -> dict[str, list[str]]:
    """Command name -> its subcommands ([] for a plain command), as the app dispatches them."""
    commands = {info.name: [] for info in typer_app.registered_commands}
    for group in typer_app.registered_groups:
        commands[group.name] = [info.name for info in group.typer_instance.registered_commands]
    return commands


def test_top_level_help_lists_every_command():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in COMMANDS:
        assert command in result.output
    # The app dispatches exactly these commands, each documented in the README's table, and
    # each defined in its own module under ptxlab/cli/ (one file per command group; other
    # modules there hold what several commands share).
    registered = _registered(app)
    assert sorted(registered) == sorted(COMMANDS)
    readme = (REPO / "README.md").read_text()
    for command, subcommands in registered.items():
        for sub in subcommands or [""]:
            assert re.search(rf"`ptxlab {command}{' ' + sub if sub else ''}\b", readme), (
                f"README documents no `ptxlab {command} {sub}`")
    modules = {path.stem for path in (REPO / "ptxlab" / "cli").glob("*.py")}
    assert set(COMMANDS) <= modules


@pytest.mark.parametrize("command", [["run"], ["sweep"], ["report"], ["evaluate"], ["predict"],
                                     ["ui"], ["gc"], ["config", "show"], ["data", "check"],
                                     ["weights", "import-lite0"], ["augment", "preview"]])
def test_every_command_has_help(command):
    result = runner.invoke(app, [*command, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output


def test_run_help_names_its_options():
    output = runner.invoke(app, ["run", "--help"]).output
    for option in ("--set", "--resume", "--nproc"):
        assert option in output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["run", "missing.yaml"], "missing.yaml: no such config file"),
        (["run", "--set", "train.nope=1"], "unknown key 'train.nope'"),
        (["run", "--nproc", "3", "--set", "train.batch_size=4"],
         "train.batch_size=4 must divide over --nproc 3 processes"),
        # Under torchrun: rank 0 says why, rank 1 stops quietly, torchrun adds nothing.
        (["run", "--nproc", "2", "--set", "data.source=/nonexistent/x"],
         "/nonexistent/x: no such folder"),
        (["config", "show", "--format", "xml"], "--format 'xml': allowed yaml, json"),
        (["config", "show", "--set", "model.arch=SegFormer"], "model.arch: got 'SegFormer'"),
    ],
)
@pytest.mark.slow
def test_errors_are_one_line_with_exit_2(args, message, isolated_store):
    result = subprocess.run([sys.executable, "-m", "ptxlab", *args], capture_output=True,
                            text=True, timeout=600)  # a loaded CI machine
    assert result.returncode == 2
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert "Traceback" not in result.stderr


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_for_health(port: int, server: subprocess.Popen) -> None:
    deadline = time.monotonic() + 120
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                assert r.read().decode().strip() == "OK"
                return
        except OSError:
            assert server.poll() is None, server.stdout.read()
            assert time.monotonic() < deadline, "ptxlab ui did not come up"
            time.sleep(0.5)


@pytest.mark.slow
def test_ui_serves_the_local_store_and_nothing_of_it_outlives_a_sigterm(isolated_store,
                                                                        monkeypatch):
    """What a supervisor, a container runtime or the test suite does: SIGTERM to `ptxlab ui`
    alone. The MLflow server and its uvicorn workers (another process group) go with it."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    port = _free_port()
    ui = subprocess.Popen([sys.executable, "-m", "ptxlab", "ui", "--port", str(port)],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          start_new_session=True)
    server: list[psutil.Process] = []
    try:
        _wait_for_health(port, ui)
        assert (isolated_store / "mlruns" / "mlflow.db").is_file()
        server = psutil.Process(ui.pid).children(recursive=True)
        assert server, "the MLflow server runs in processes of its own"
        ui.send_signal(signal.SIGTERM)
        ui.wait(timeout=60)  # the server stops cleanly (exit 0) or by the signal
        _, alive = psutil.wait_procs(server, timeout=5)
        assert not alive, [process.cmdline() for process in alive]
    finally:
        stop_process_group(ui)  # should this test fail, nothing of it is left running
        for process in server:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.kill()
