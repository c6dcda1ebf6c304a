"""`run_sweep`: open the study, then work on it in this process or in N spawned ones."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from optuna.trial import FrozenTrial, TrialState

from ptxlab import environment
from ptxlab.sweep.oof import OutOfFold, out_of_fold
from ptxlab.sweep.storage import masked, resolve_storage
from ptxlab.sweep.study import StudyHandle, Tally, open_study, tally
from ptxlab.sweep.study_file import StudyFile, load_study_file
from ptxlab.sweep.worker import Worker


def _budget(handle: StudyHandle, n_trials: int | None) -> int:
    """--n-trials, else the study file's n_trials, else the grid's size: finished trials wanted."""
    chosen = n_trials or handle.spec.n_trials or handle.grid_size
    if chosen is None:
        raise ValueError(f"study {handle.spec.name!r}: a {handle.spec.sampler.type} sampler needs "
                         "n_trials (in the study file or --n-trials)")
    return chosen


@contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """`docker stop` and friends end the current trial like Ctrl+C: marked and re-queued."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@dataclass
class SweepResult:
    """Where the study stands when this command stops working on it."""

    name: str
    storage: str
    parent_run_id: str
    experiment: str
    counts: Tally
    budget: int
    best: FrozenTrial | None
    stopped: str  # done | timeout | workers done
    worker_failures: list[str]
    out_of_fold: OutOfFold | None = None  # a cv study whose trials are all done
    handle: StudyHandle | None = None  # the study, for what comes after (the fold ensemble)

    @property
    def unfinished(self) -> bool:
        """Trials are still queued or running (e.g. after a timeout or a lost worker)."""
        return bool(self.counts.waiting or self.counts.running)


def run_sweep(study_file: Path | str, storage: str | None = None, workers: int = 1,
              n_trials: int | None = None, timeout: float | None = None, name: str | None = None,
              log: Callable[[str], None] | None = None,
              overrides: list[str] | None = None) -> SweepResult:
    """`ptxlab sweep`: create or join the study, then run it with one or `workers` processes;
    `overrides` (`KEY=VALUE`) join the study file's `set`."""
    loaded = load_study_file(study_file, name, overrides)
    url = resolve_storage(storage, loaded.spec.name)
    log = log or (lambda text: print(text, file=sys.stderr, flush=True))
    index = environment.sweep_worker_index()
    handle = open_study(loaded, url, seed_offset=index)
    wanted = _budget(handle, n_trials)
    failures: list[str] = []
    if workers <= 1:
        prefix = f"[worker {index}] " if index else ""
        with _sigterm_as_interrupt():
            stopped = Worker(handle, wanted, timeout, lambda t: log(prefix + t)).run()
    else:
        log(f"study {loaded.spec.name}: {workers} workers on {masked(url)}; MLflow parent run "
            f"{handle.parent_run_id}")
        failures = _spawn_workers(loaded, url, workers, n_trials, timeout, overrides or [])
        stopped = "workers done"
    trials = handle.study.get_trials(deepcopy=False)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    best = None
    if complete:
        pick = max if loaded.spec.objective.direction == "maximize" else min
        best = pick(complete, key=lambda t: t.value)
    result = SweepResult(loaded.spec.name, masked(url), handle.parent_run_id, handle.experiment,
                         tally(trials), wanted, best, stopped, failures)
    if loaded.spec.cv and not index and not result.unfinished:  # not in a spawned worker
        log(f"study {loaded.spec.name}: out-of-fold post-processing on the pooled folds")
        result.out_of_fold = out_of_fold(handle)
    result.handle = handle
    return result


def _spawn_workers(loaded: StudyFile, url: str, workers: int, n_trials: int | None,
                   timeout: float | None, overrides: list[str]) -> list[str]:
    """N processes running this command with one worker each (their logs on stderr, their
    summaries dropped: the launcher prints one); their CPU threads split."""
    command = [sys.executable, "-m", "ptxlab", "sweep", str(loaded.path), "--workers", "1",
               "--name", loaded.spec.name, *[a for o in overrides for a in ("--set", o)]]
    if n_trials:
        command += ["--n-trials", str(n_trials)]
    if timeout:
        command += ["--timeout", str(timeout)]
    threads = str(max(1, (os.cpu_count() or 1) // workers))
    processes = []
    for index in range(1, workers + 1):
        env = environment.for_child(**{environment.SWEEP_WORKER: str(index),
                                       environment.OPTUNA_STORAGE: url, environment.PROGRESS: "0"})
        env.setdefault("OMP_NUM_THREADS", threads)
        processes.append(subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL))
    failures = []
    try:
        for index, process in enumerate(processes, start=1):
            code = process.wait()
            if code != 0:
                failures.append(f"worker {index} (pid {process.pid}) exited with {code}")
    except KeyboardInterrupt:
        for process in processes:
            process.wait()  # each marks and re-queues its own trial
        raise
    return failures
