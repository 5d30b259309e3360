"""Progress bars that the user can silence: ``TQDM_DISABLE=1`` (tqdm's own variable, honoured even
where a job asks for a bar) or ``tokenpatch ... --quiet``."""

from __future__ import annotations

import contextlib
import os
from typing import Any, Iterable, Iterator, Optional

from tqdm.auto import tqdm

_TRUE = ("1", "true", "yes", "on")


def silenced() -> bool:
    """True when ``TQDM_DISABLE`` is set to a true value (1, true, yes, on)."""
    return os.environ.get("TQDM_DISABLE", "").strip().lower() in _TRUE


def progress_bar(iterable: Optional[Iterable[Any]] = None, *, show: bool = True, **kwargs: Any) -> tqdm:
    """``tqdm(iterable, **kwargs)``, drawn when ``show`` and not :func:`silenced`."""
    return tqdm(iterable, disable=not show or silenced(), **kwargs)


@contextlib.contextmanager
def silenced_progress(silence: bool = True) -> Iterator[None]:
    """While the block runs, no progress bar is drawn (``TQDM_DISABLE=1``), if ``silence``; the
    variable is restored afterwards."""
    if not silence:
        yield
        return
    before = os.environ.get("TQDM_DISABLE")
    os.environ["TQDM_DISABLE"] = "1"
    try:
        yield
    finally:
        if before is None:
            del os.environ["TQDM_DISABLE"]
        else:
            os.environ["TQDM_DISABLE"] = before
