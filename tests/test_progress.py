"""Progress display: bars on a terminal, one plain line per epoch in a redirected log."""

import io
import os
import re
import subprocess
import sys

import pytest

from ptxlab.progress import EpochReporter, display, epoch_line
from tests.conftest import TINY_RUN


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize(("env", "stream", "expected"), [
    (None, io.StringIO(), "lines"), (None, _Terminal(), "bar"), ("auto", _Terminal(), "bar"),
    ("0", _Terminal(), "none"), ("1", io.StringIO(), "lines"), ("lines", _Terminal(), "lines"),
    ("none", io.StringIO(), "none"), ("bar", io.StringIO(), "bar"),
])
def test_the_switch_reads_the_environment_and_the_terminal(env, stream, expected, monkeypatch):
    if env is None:
        monkeypatch.delenv("PTXLAB_PROGRESS", raising=False)
    else:
        monkeypatch.setenv("PTXLAB_PROGRESS", env)
    assert display(stream=stream) == expected


def test_an_explicit_choice_wins_and_a_bad_one_is_named(monkeypatch):
    monkeypatch.setenv("PTXLAB_PROGRESS", "none")
    assert display("lines") == "lines"
    monkeypatch.setenv("PTXLAB_PROGRESS", "loud")
    with pytest.raises(ValueError, match=r"PTXLAB_PROGRESS='loud': allowed auto, bar, lines"):
        display()


def test_epoch_line_reads_like_the_issue_asks():
    metrics = {"train_loss": 0.4123, "val_dice": 0.7311, "val_iou": 0.5894, "lr": 2.1e-4,
               "images_per_s": 38.2, "val_loss": 0.5}
    assert epoch_line(6, 40, metrics, 240) == (
        "epoch 7/40  train_loss 0.412  val_dice 0.731  val_iou 0.589  lr 2.1e-4  38 img/s  eta 4m")


def test_lines_mode_prints_one_line_per_epoch_and_no_bar():
    out = io.StringIO()
    reporter = EpochReporter("lines", out)
    reporter.on_train_start({"epochs_planned": 3, "start_epoch": 1})
    for epoch in (1, 2):
        for batch in range(5):
            reporter.on_batch_end(epoch, batch, 5, 0.5, 10.0)
        reporter.on_epoch_end(epoch, {"train_loss": 0.5, "val_iou": 0.2})
    lines = out.getvalue().splitlines()
    assert [line.split("  ")[0] for line in lines] == ["epoch 2/3", "epoch 3/3"]
    assert lines[-1].endswith("eta 0s") and "\r" not in out.getvalue()


def test_bar_mode_draws_a_bar_and_keeps_the_epoch_line():
    out = _Terminal()
    reporter = EpochReporter("bar", out)
    reporter.on_train_start({"epochs_planned": 1})
    for batch in range(3):
        reporter.on_batch_end(0, batch, 3, 0.5, 10.0)
    reporter.on_epoch_end(0, {"train_loss": 0.5})
    text = out.getvalue()
    assert "\r" in text and "0/3 [" in text and text.rstrip().endswith("eta 0s")


@pytest.mark.slow
def test_a_redirected_run_logs_one_plain_line_per_epoch(isolated_store, tmp_path):
    """`ptxlab run > log 2>&1` with the switch unset: exactly one line per epoch, no carriage
    return anywhere."""
    env = {k: v for k, v in os.environ.items() if k != "PTXLAB_PROGRESS"}
    args = [arg for override in TINY_RUN + ["train.epochs=3"] for arg in ("--set", override)]
    log = tmp_path / "log"
    with log.open("wb") as handle:
        code = subprocess.call([sys.executable, "-m", "ptxlab", "run", *args],
                               stdout=handle, stderr=subprocess.STDOUT, env=env, timeout=600)
    text = log.read_text()
    assert code == 0, text
    assert "\r" not in text
    epochs = [line for line in text.splitlines() if line.startswith("epoch ")]
    assert len(epochs) == 3, text
    assert all(re.fullmatch(r"epoch \d/3  train_loss \S+  val_dice \S+  val_iou \S+  lr \S+  "
                            r"\d+ img/s  eta \S+", line) for line in epochs), epochs
