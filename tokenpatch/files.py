"""Writing a file so that no reader ever sees half of it: under a temporary name in the same
folder, then renamed, removed on any error, on Ctrl-C and on SIGTERM."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator, Union

from .errors import CheckpointError, first_line

PathLike = Union[str, os.PathLike]


def write_atomically(path: PathLike, write: Callable[[str], None]) -> None:
    """Run ``write(temporary_name)`` next to ``path``, then rename it over ``path``.

    The file gets the permissions of any new file, 0666 less the umask: a placeholder created
    with 0666 shows them, and they are set again after ``write`` (safetensors writes 0600 files).
    """
    target = Path(path)
    if target.name in ("", ".", ".."):
        raise CheckpointError(f"cannot write {str(path)!r}: it names no file")
    temporary = target.with_name(f".{target.name}.{uuid.uuid4().hex[:12]}.tmp")
    with _terminate_as_exit():
        _write_then_rename(path, target, temporary, write)


def write_text_atomically(path: PathLike, text: str) -> None:
    """:func:`write_atomically` of a text file."""
    write_atomically(path, lambda name: Path(name).write_text(text))


@contextlib.contextmanager
def _terminate_as_exit() -> Iterator[None]:
    """While the block runs, a SIGTERM that would kill the process outright (the default action)
    raises ``SystemExit(143)`` instead, so that the block's clean-up runs; in the main thread only
    (signal handlers live there), and a handler the program set stays as it was."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:
        yield
        return

    def exit_cleanly(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, exit_cleanly)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _write_then_rename(path: PathLike, target: Path, temporary: Path, write: Callable[[str], None]) -> None:
    """:func:`write_atomically`'s work: a placeholder, the write, its permissions, the rename."""
    try:
        os.close(os.open(temporary, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
        mode = temporary.stat().st_mode & 0o777
        write(str(temporary))
        os.chmod(temporary, mode)
        os.replace(temporary, target)
    except OSError as exc:
        temporary.unlink(missing_ok=True)
        raise CheckpointError(f"cannot write {path}: {exc.strerror or first_line(exc)}") from exc
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
