"""Turn expected failures into one line on stderr and a non-zero exit, never a traceback."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import typer
from rich.console import Console
from rich.text import Text

EXPECTED = (ValueError, FileNotFoundError, RuntimeError, KeyError)


@contextmanager
def fail_cleanly() -> Iterator[None]:
    try:
        yield
    except EXPECTED as error:
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        Console(stderr=True, highlight=False, soft_wrap=True).print(Text("error: ", style="bold red") + message)
        raise typer.Exit(2) from None
