"""Faults users hit in their first week: several processes on a fresh store, an unreachable
tracking server, a full disk, unknown run ids, racing exit codes under --nproc."""

import errno
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from ptxlab import atomic
from ptxlab.cli import app
from ptxlab.cli.errors import one_line
from ptxlab.config import ConfigError, load_config
from ptxlab.data.cache import ResizedCache
from ptxlab.data.synthetic import SyntheticSpec, materialize
from ptxlab.distributed import exit_status
from ptxlab.experiment import run_experiment
from ptxlab.sweep import run_sweep
from ptxlab.train import NonFiniteLossError, TrainingCallbacks
from tests.conftest import TINY_RUN

ROOT = Path(__file__).parents[1]
PTXLAB = [sys.executable, "-m", "ptxlab"]


def fresh_directory_env(directory: Path) -> dict[str, str]:
    """The environment of a new user in `directory`: the default local store ./mlruns."""
    env = {key: value for key, value in os.environ.items() if key != "MLFLOW_TRACKING_URI"}
    env.update(PTXLAB_CACHE=str(directory / "cache"), PTXLAB_PROGRESS="0",
               NO_ALBUMENTATIONS_UPDATE="1")
    env.pop("PTXLAB_CHECKPOINTS", None)
    return env


def start_together(commands: list[list[str]], cwd: Path, env: dict[str, str],
                   timeout: float = 900) -> list[subprocess.CompletedProcess]:
    """Start every command at the same instant; wait for all of them."""
    processes = [subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for command in commands]
    results = []
    for command, process in zip(commands, processes, strict=True):
        out, err = process.communicate(timeout=timeout)
        results.append(subprocess.CompletedProcess(command, process.returncode, out, err))
    return results


def assert_store_consistent(database: Path) -> None:
    """Fully migrated (one alembic head, no leftover temporary tables), and MLflow reads it."""
    with sqlite3.connect(database) as connection:
        versions = connection.execute("select version_num from alembic_version").fetchall()
        tables = {row[0] for row in connection.execute(
            "select name from sqlite_master where type = 'table'")}
    assert len(versions) == 1
    assert not [table for table in tables if table.startswith("_alembic_tmp")]
    MlflowClient(f"sqlite:///{database}").search_experiments()


@pytest.mark.slow
def test_processes_opening_a_fresh_sqlite_store_at_once_all_succeed(tmp_path):
    """The store initialisation alone, six processes at once (without the lock MLflow's
    migrations collide: `Online migration expected to match one row`)."""
    script = ("from ptxlab import tracking; c = tracking.configure(); "
              "e = tracking.ensure_experiment(c, 'shared'); "
              "print(c.create_run(e).info.run_id)")
    env = fresh_directory_env(tmp_path)
    results = start_together([[sys.executable, "-c", script]] * 6, tmp_path, env)
    for result in results:
        assert result.returncode == 0, result.stderr[-2000:]
    database = tmp_path / "mlruns" / "mlflow.db"
    assert_store_consistent(database)
    client = MlflowClient(f"sqlite:///{database}")
    experiment = client.get_experiment_by_name("shared")
    assert len(client.search_runs([experiment.experiment_id])) == 6


@pytest.mark.slow
def test_two_runs_started_at_once_in_a_fresh_directory_both_finish(tmp_path):
    env = fresh_directory_env(tmp_path)
    command = [*PTXLAB, "run", *(arg for key in TINY_RUN for arg in ("--set", key)),
               "--set", "train.epochs=1"]
    results = start_together([command, command], tmp_path, env)
    for result in results:
        assert result.returncode == 0, result.stderr[-2000:]
    database = tmp_path / "mlruns" / "mlflow.db"
    assert_store_consistent(database)
    client = MlflowClient(f"sqlite:///{database}")
    runs = client.search_runs([client.get_experiment_by_name("ptxlab").experiment_id])
    assert sorted(run.info.status for run in runs) == ["FINISHED", "FINISHED"]
    assert all("best_val_pooled_iou" in run.data.metrics for run in runs)


@pytest.mark.slow
def test_two_sweep_workers_on_a_fresh_journal_and_store_share_one_study(tmp_path):
    study = tiny_study(tmp_path)
    env = fresh_directory_env(tmp_path)
    command = [*PTXLAB, "sweep", str(study), "--workers", "1"]
    results = start_together([command, command], tmp_path, env)
    for result in results:
        assert result.returncode == 0, result.stderr[-2000:]
    database = tmp_path / "mlruns" / "mlflow.db"
    assert_store_consistent(database)
    client = MlflowClient(f"sqlite:///{database}")
    runs = client.search_runs([client.get_experiment_by_name("ptxlab-smoke").experiment_id])
    parents = [run for run in runs if "mlflow.parentRunId" not in run.data.tags]
    children = [run for run in runs if "mlflow.parentRunId" in run.data.tags]
    assert len(parents) == 1
    assert sorted(run.data.params["optim.lr"] for run in children) == ["0.003", "1e-07"]
    assert {run.info.status for run in children} == {"FINISHED"}


@pytest.mark.slow
def test_an_unreachable_tracking_server_is_one_line_in_seconds_before_any_data(tmp_path):
    env = {**fresh_directory_env(tmp_path), "MLFLOW_TRACKING_URI": "http://127.0.0.1:9"}
    started = time.monotonic()
    result = subprocess.run([*PTXLAB, "run"], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=120)
    elapsed = time.monotonic() - started
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert "tracking server http://127.0.0.1:9 did not answer" in result.stderr
    assert elapsed < 30
    assert not (tmp_path / "cache").exists()  # no synthetic data written, nothing cached


@pytest.mark.slow
def test_resume_of_an_unknown_run_is_one_line_exit_2(isolated_store):
    result = subprocess.run([*PTXLAB, "run", "--resume", "0123456789abcdef"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert result.stderr.strip() == (
        f"error: run 0123456789abcdef: no such run in the tracking store "
        f"{os.environ['MLFLOW_TRACKING_URI']}")


def test_nproc_exit_status_does_not_depend_on_which_rank_stopped_first():
    # rank 0 exits 2 with its message; torchrun stops rank 1 with SIGTERM (-15), which it may
    # record with an earlier timestamp.
    assert exit_status({1: -15, 0: 2}) == 2
    assert exit_status({0: 2, 1: 2}) == 2
    assert exit_status({1: 3}) == 3
    assert exit_status({0: -9, 1: -15}) == 1


@pytest.mark.slow
def test_nproc_error_exit_status_is_2_every_time(isolated_store):
    """The race of issue 14 showed once in eight tries; twelve tries in pairs."""
    command = [*PTXLAB, "run", "--nproc", "2", "--set", "data.source=/nonexistent/x"]
    for _ in range(6):
        results = start_together([command, command], isolated_store, dict(os.environ), 300)
        for result in results:
            assert result.returncode == 2, result.stderr
            assert result.stderr.strip() == "error: /nonexistent/x: no such folder"


class SmallFileSystem:
    """A small tmpfs mounted at `root` (as root, where mount works), else a folder whose writes
    through ptxlab.atomic fail with ENOSPC once `fill` was called (a simulated full disk)."""

    def __init__(self, root: Path, size_mb: int, monkeypatch):
        self.root = root
        root.mkdir()
        self.mounted = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs", str(root)],
            capture_output=True).returncode == 0
        self.monkeypatch = monkeypatch

    def fill(self, leave_bytes: int = 0) -> None:
        """Use all but `leave_bytes` of the space."""
        if not self.mounted:
            return self._simulate()
        free = shutil.disk_usage(self.root).free - leave_bytes
        with open(self.root / "filler", "wb") as handle:
            handle.write(b"\0" * max(0, free))

    def _simulate(self) -> None:
        root, write = self.root.resolve(), atomic._RecordingWriter.write

        def full(writer, data):
            target = Path(os.readlink(f"/proc/self/fd/{writer.handle.fileno()}"))
            if target.is_relative_to(root):
                writer.error = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                raise writer.error
            return write(writer, data)

        self.monkeypatch.setattr(atomic._RecordingWriter, "write", full)

    def temporaries(self) -> list[Path]:
        return [path for path in self.root.rglob("*") if path.name.endswith(".tmp")]

    def unmount(self) -> None:
        if self.mounted:
            subprocess.run(["umount", "-l", str(self.root)], check=True)


@pytest.fixture
def small_fs(tmp_path, monkeypatch):
    filesystem = SmallFileSystem(tmp_path / "small", 96, monkeypatch)
    yield filesystem
    filesystem.unmount()


class FillDiskWhenTrainingStarts(TrainingCallbacks):
    def __init__(self, filesystem: SmallFileSystem):
        self.filesystem = filesystem

    def on_train_start(self, info: dict) -> None:
        self.filesystem.fill(leave_bytes=4096)


@pytest.mark.slow
def test_a_full_disk_at_a_checkpoint_fails_the_run_in_one_line(isolated_store, small_fs,
                                                                monkeypatch):
    checkpoints = small_fs.root / "checkpoints"
    monkeypatch.setenv("PTXLAB_CHECKPOINTS", str(checkpoints))
    config = load_config(None, TINY_RUN)
    with pytest.raises(OSError) as raised:
        run_experiment(config, progress=False, extra_callbacks=FillDiskWhenTrainingStarts(small_fs))
    client = MlflowClient()
    [run] = client.search_runs([client.get_experiment_by_name("ptxlab").experiment_id])
    message = f"{checkpoints / run.info.run_id / 'best.pt'}: No space left on device"
    assert one_line(raised.value) == message
    assert run.info.status == "FAILED"
    assert run.data.tags["ptxlab.failure"] == message
    assert small_fs.temporaries() == []


def test_a_full_disk_while_caching_names_the_entry_and_leaves_no_temporaries(small_fs, capfd):
    cases = materialize(SyntheticSpec(24, 0.5, 64, 0), small_fs.root / "synthetic",
                        progress=False)
    small_fs.fill(leave_bytes=64 * 1024)  # room for a few 8 kB entries, not for 24
    with pytest.raises(OSError) as raised:
        ResizedCache(small_fs.root / "resized", 64).ensure(cases, progress=False)
    assert raised.value.errno == errno.ENOSPC
    assert Path(raised.value.filename).is_relative_to(small_fs.root / "resized")  # entry or stamp
    assert one_line(raised.value) == f"{raised.value.filename}: No space left on device"
    assert small_fs.temporaries() == []
    assert capfd.readouterr().err == ""


def test_a_full_disk_while_writing_synthetic_data_leaves_nothing_behind(small_fs, capfd):
    small_fs.fill(leave_bytes=64 * 1024)
    with pytest.raises(OSError) as raised:
        materialize(SyntheticSpec(200, 0.5, 128, 0), small_fs.root / "synthetic",
                    progress=False)
    target = small_fs.root / "synthetic" / f"synthetic-{SyntheticSpec(200, 0.5, 128, 0).digest()}"
    assert one_line(raised.value) == f"{target}: No space left on device"
    assert sorted(path.name for path in (small_fs.root / "synthetic").iterdir()) == [
        f"{target.name}.lock"]
    assert capfd.readouterr().err == ""  # no libpng error lines


@pytest.mark.slow
def test_a_run_on_a_full_disk_stops_in_preflight_naming_the_folder(isolated_store, small_fs):
    small_fs.fill()
    if not small_fs.mounted:
        pytest.skip("needs a real small file system (mount as root) to measure free space")
    env = {**os.environ, "PTXLAB_CACHE": str(small_fs.root / "cache")}
    result = subprocess.run([*PTXLAB, "run"], env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 2
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("error: cache directory (data.cache_dir or PTXLAB_CACHE)") or (
        line.startswith(f"error: {small_fs.root / 'cache'}") and "free" in line), line


def tiny_study(directory: Path, **changes) -> Path:
    """The shipped smoke study cut to two one-epoch trials."""
    tree = yaml.safe_load((ROOT / "experiments/studies/smoke.yaml").read_text())
    tree.update(base=str(ROOT / "experiments" / "default.yaml"), name=f"t-{uuid.uuid4().hex[:8]}",
                space={"optim.lr": {"type": "categorical", "choices": [0.003, 1.0e-7]}},
                repeats=1, hypotheses=[], **changes)
    tree["set"].update({"train.epochs": 1})
    study = directory / "study.yaml"
    study.write_text(yaml.safe_dump(tree, sort_keys=False))
    return study


@pytest.mark.slow
def test_finished_runs_leave_no_checkpoints_and_gc_frees_what_is_left(isolated_store):
    checkpoints = isolated_store / "checkpoints"
    run_sweep(tiny_study(isolated_store))
    client = MlflowClient()
    trials = client.search_runs([client.get_experiment_by_name("ptxlab-smoke").experiment_id],
                                "tags.`mlflow.parentRunId` != ''")
    assert len(trials) == 2 and {run.info.status for run in trials} == {"FINISHED"}
    assert not [path for path in checkpoints.iterdir() if path.name in
                {run.info.run_id for run in trials}]

    kept = run_experiment(load_config(None, [*TINY_RUN, "train.epochs=1",
                                             "train.keep_checkpoints=true"]), progress=False)
    with pytest.raises(NonFiniteLossError):
        run_experiment(load_config(None, [*TINY_RUN, "optim.lr=1e30"]), progress=False)
    [failed] = [path.name for path in checkpoints.iterdir() if path.name != kept.run_id]
    assert client.get_run(failed).info.status == "FAILED"
    assert (checkpoints / failed).is_dir()  # a FAILED run keeps its folder, to resume from

    dry = CliRunner().invoke(app, ["gc", "--dry-run"])
    assert dry.exit_code == 0, dry.output
    assert f"would remove {checkpoints / kept.run_id} (" in dry.output
    assert "run finished" in dry.output and failed not in dry.output
    assert dry.output.strip().splitlines()[-1].startswith("would free ")
    assert (checkpoints / kept.run_id).is_dir()  # a dry run removes nothing

    done = CliRunner().invoke(app, ["gc", "--older-than", "0"])
    assert done.exit_code == 0, done.output
    assert sorted(path.name for path in checkpoints.iterdir()) == []
    assert done.output.strip().splitlines()[-1].startswith("freed ")


def test_a_bad_set_value_names_the_override_not_the_defaults():
    with pytest.raises(ConfigError) as raised:
        load_config(None, ["train.epochs=abc"])
    assert str(raised.value).startswith("--set: train.epochs: ")


def test_data_check_keeps_whole_file_names_when_piped(tmp_path):
    long_name = "1.2.276.0.7230010.3.1.4.8323329.5597.1517875188.959090" * 2 + ".png"
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    (tmp_path / "images" / long_name).write_bytes(b"not a png")
    result = CliRunner().invoke(app, ["data", "check", str(tmp_path)])
    assert result.exit_code == 1
    assert str(tmp_path / "masks" / long_name) in result.stdout


def test_json_commands_print_json_on_errors_too(tmp_path):
    result = CliRunner().invoke(app, ["data", "check", str(tmp_path / "nowhere"), "--json"])
    assert result.exit_code == 2
    assert json.loads(result.stdout) == {"error": f"{tmp_path / 'nowhere'}: no such folder"}
    assert result.stderr.strip() == f"error: {tmp_path / 'nowhere'}: no such folder"


def test_an_unusable_cache_directory_is_called_the_cache_directory(tmp_path):
    (tmp_path / "a-file").write_text("")
    (tmp_path / "images").mkdir()
    result = CliRunner().invoke(app, ["data", "cache", str(tmp_path), "--size", "32",
                                      "--cache-dir", str(tmp_path / "a-file")])
    assert result.exit_code == 2
    assert result.stderr.strip() == (f"error: cache directory (--cache-dir or PTXLAB_CACHE) "
                                     f"{tmp_path / 'a-file'}: is a file, not a folder; point it "
                                     "at a folder")
