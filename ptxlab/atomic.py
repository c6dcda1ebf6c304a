"""All-or-nothing writes: a temporary in the target's folder, renamed into place when complete.

A killed process, a full disk or any other failure never leaves a half-written file where a
reader looks, and never leaves the temporary behind (a SIGKILLed writer's temporary is the only
exception; its name starts with '.' and ends with '.tmp', so caches can sweep them). A failed
write raises `OSError` naming the *target* path, e.g. `/cache/x.npy: No space left on device`,
even where the library that wrote (torch, numpy) reported no file or a message of its own.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

TEMPORARY_SUFFIX = ".tmp"


class _RecordingWriter:
    """A file handle that remembers the OSError of a failed write: torch.save reports a failed
    write as a RuntimeError without the reason."""

    def __init__(self, handle: BinaryIO):
        self.handle = handle
        self.error: OSError | None = None

    def write(self, data) -> int:
        try:
            return self.handle.write(data)
        except OSError as error:
            self.error = self.error or error
            raise

    def __getattr__(self, name: str):  # seek, tell, read, flush ... as the file has them
        return getattr(self.handle, name)


def _naming(path: Path, error: OSError) -> OSError:
    """The OSError again, with the target path as its filename."""
    code = error.errno or errno.EIO
    reason = error.strerror or " ".join(str(error).split()) or os.strerror(code)
    return OSError(code, reason, str(path))


def write_file(path: str | Path, write: Callable[[BinaryIO], object]) -> Path:
    """Call `write(handle)` on a temporary next to `path`, then rename it to `path`."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        descriptor, temporary = tempfile.mkstemp(
            dir=path.parent, prefix=f".{path.name}.", suffix=TEMPORARY_SUFFIX)
    except OSError as error:
        raise _naming(path, error) from None
    handle = _RecordingWriter(os.fdopen(descriptor, "wb"))
    try:
        try:
            write(handle)  # type: ignore[arg-type]
        finally:
            handle.handle.close()
        os.replace(temporary, path)
    except BaseException as error:  # Ctrl-C included: no temporary is left behind
        Path(temporary).unlink(missing_ok=True)
        cause = handle.error or error
        if isinstance(cause, OSError):
            raise _naming(path, cause) from None
        raise
    return path


def write_bytes(path: str | Path, data: bytes) -> Path:
    return write_file(path, lambda handle: handle.write(data))


def write_text(path: str | Path, text: str) -> Path:
    return write_bytes(path, text.encode())


def save_torch(payload: object, path: str | Path) -> Path:
    """`torch.save(payload)` to `path`, all or nothing."""
    import torch  # only checkpoints need torch; the data tools do not

    return write_file(path, lambda handle: torch.save(payload, handle))


@contextmanager
def replacing_directory(target: str | Path) -> Iterator[Path]:
    """Fill the yielded temporary folder; on success it replaces `target` in one rename.

    On failure the temporary folder is removed and the error names `target`.
    """
    target = Path(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        temporary = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.",
                                          suffix=TEMPORARY_SUFFIX))
    except OSError as error:
        raise _naming(target, error) from None
    try:
        yield temporary
        shutil.rmtree(target, ignore_errors=True)  # a leftover of an older writer
        os.replace(temporary, target)
    except BaseException as error:
        shutil.rmtree(temporary, ignore_errors=True)
        if isinstance(error, OSError):
            raise _naming(target, error) from None
        raise


def stale_temporaries(folder: str | Path, pattern: str = "**/.*" + TEMPORARY_SUFFIX) -> list[Path]:
    """Temporaries under `folder` (files or folders) that writers of this module left."""
    return sorted(Path(folder).glob(pattern))
