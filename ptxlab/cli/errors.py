"""Turn expected failures into one line on stderr and a non-zero exit, never a traceback."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager

import typer
from rich.console import Console
from rich.text import Text

EXPECTED = (ValueError, OSError, RuntimeError, KeyError)


def one_line(error: BaseException) -> str:
    """The error as '<file>: <problem>' where the OS names a file, else its first line."""
    if isinstance(error, OSError) and error.filename and error.strerror:
        return f"{error.filename}: {error.strerror}"
    text = str(error)
    return text.splitlines()[0] if text else type(error).__name__


@contextmanager
def fail_cleanly(as_json: bool = False) -> Iterator[None]:
    """Expected errors: `error: <one line>` on stderr, exit 2; with `as_json` (a command's
    --json) also `{"error": <one line>}` on stdout, so its reader always gets JSON."""
    try:
        yield
    except EXPECTED as error:
        if as_json:
            print(json.dumps({"error": one_line(error)}))
        console = Console(stderr=True, highlight=False, soft_wrap=True)
        console.print(Text("error: ", style="bold red") + one_line(error))
        raise typer.Exit(2) from None
