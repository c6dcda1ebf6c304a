"""How a run shows its progress: bars in a terminal, one plain line per epoch in a log file.

One switch chooses the display: `ptxlab run --progress` or `PTXLAB_PROGRESS`, each `auto`
(the default: bars when stderr is a terminal, else lines), `bar`, `lines` or `none` (`0`
also means none, `1` auto). Lines never contain a carriage return, so a redirected log
(`ptxlab run > log 2>&1`, a cluster job, `docker compose logs`) reads one line per epoch:

    epoch 7/40  train_loss 0.412  val_dice 0.731  val_iou 0.589  lr 2.1e-4  38 img/s  eta 4m

The training loop knows nothing of this: `EpochReporter` implements its callbacks (duck-typed,
so that the command line can read the switch without importing torch).
"""

from __future__ import annotations

import os
import sys
import time
from typing import Literal, TextIO, get_args

from tqdm import tqdm

from ptxlab import environment

Choice = Literal["auto", "bar", "lines", "none"]
CHOICES: tuple[str, ...] = get_args(Choice)
Display = Literal["bar", "lines", "none"]
ENV = environment.PROGRESS
_ALIASES = {"0": "none", "1": "auto", "": "auto"}


def display(choice: str | None = None, stream: TextIO | None = None) -> Display:
    """The display to use: `choice`, else $PTXLAB_PROGRESS, else auto (bars on a terminal)."""
    raw = choice if choice is not None else environment.progress_choice()
    value = _ALIASES.get(raw.strip().lower(), raw.strip().lower())
    if value not in CHOICES:
        source = "--progress" if choice is not None else ENV
        raise ValueError(f"{source}={raw!r}: allowed {', '.join(CHOICES)} (0 = none)")
    if value == "auto":
        stream = stream or sys.stderr
        return "bar" if stream.isatty() else "lines"
    return value  # type: ignore[return-value]


def choose(choice: str) -> Display:
    """Set the switch for this process and the processes it starts (e.g. torchrun's ranks)."""
    resolved = display(choice)
    os.environ[ENV] = choice
    return resolved


def duration(seconds: float) -> str:
    """A short human duration: 45s, 4m, 1h12m."""
    if seconds < 60:
        return f"{seconds:.0f}s"
    minutes = round(seconds / 60)
    return f"{minutes}m" if minutes < 60 else f"{minutes // 60}h{minutes % 60:02d}m"


def epoch_line(epoch: int, epochs: int, metrics: dict[str, float], eta_s: float | None) -> str:
    """One epoch as a plain line (see the module docstring)."""
    parts = [f"epoch {epoch + 1}/{epochs}"]
    for key in ("train_loss", "val_dice", "val_iou"):
        if key in metrics:
            parts.append(f"{key} {metrics[key]:.3f}")
    if "lr" in metrics:
        parts.append(f"lr {metrics['lr']:.1e}".replace("e-0", "e-"))
    if "images_per_s" in metrics:
        parts.append(f"{metrics['images_per_s']:.0f} img/s")
    if eta_s is not None:
        parts.append(f"eta {duration(eta_s)}")
    return "  ".join(parts)


class EpochReporter:
    """Training progress on stderr: a batch bar (display `bar`) and a line per epoch."""

    def __init__(self, display: Display, stream: TextIO | None = None):
        self.display = display
        self.stream = stream or sys.stderr
        self.bar: tqdm | None = None
        self.epochs, self.first_epoch, self.started = 0, 0, time.monotonic()

    def on_train_start(self, info: dict) -> None:
        self.epochs = int(info["epochs_planned"])
        self.first_epoch = int(info.get("start_epoch", 0))
        self.started = time.monotonic()

    def on_batch_end(self, epoch: int, batch: int, batches: int, loss: float,
                     images_per_s: float) -> None:
        if self.display != "bar":
            return
        if self.bar is None:
            self.bar = tqdm(total=batches, desc=f"epoch {epoch + 1}/{self.epochs}",
                            unit="batch", leave=False, file=self.stream)
        self.bar.set_postfix(loss=f"{loss:.4f}", img_s=f"{images_per_s:.1f}", refresh=False)
        self.bar.update()

    def on_epoch_end(self, epoch: int, metrics: dict[str, float]) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self.display == "none":
            return
        done = epoch + 1 - self.first_epoch
        per_epoch = (time.monotonic() - self.started) / max(done, 1)
        eta = per_epoch * (self.epochs - epoch - 1)
        print(epoch_line(epoch, self.epochs, metrics, eta), file=self.stream, flush=True)

    def on_checkpoint(self, epoch: int, path, is_best: bool) -> None:
        """Checkpoints are not shown."""
