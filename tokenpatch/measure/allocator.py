"""Handing the C heap's free pages back to the system between batches.

glibc raises its mmap threshold to the size of the largest block freed, so later batches of images
and attention maps come from the heap, and the heap keeps the pages they freed: without a trim, a
process's resident memory grows with the images it has read (1.8 GB more after 3,000 images,
``benchmarks/held_out_rss.py``) instead of staying at one batch's worth. ``malloc_trim`` returns
those pages; where the C library has none (macOS, musl, Windows) nothing is done.
"""

from __future__ import annotations

import ctypes
import functools
from typing import Callable, Iterable, Iterator, Optional, TypeVar

Item = TypeVar("Item")


@functools.lru_cache(maxsize=1)
def _malloc_trim() -> Optional[Callable[[int], int]]:
    try:
        return ctypes.CDLL(None).malloc_trim  # the C library this process already runs on
    except (OSError, AttributeError, TypeError):  # no such function, or no CDLL(None) (Windows)
        return None


def trim_heap() -> None:
    """Return the heap's free pages to the system (glibc's ``malloc_trim(0)``), where there is one."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


#: batches between two trims in the library's loops (0: never); ``benchmarks/heap_trim.py`` measures the choice
TRIM_EVERY = 1


def trimming(batches: Iterable[Item]) -> Iterator[Item]:
    """``batches``, trimming the heap (:func:`trim_heap`) after every ``TRIM_EVERY``-th one has been used."""
    for number, batch in enumerate(batches, 1):
        yield batch
        if TRIM_EVERY and number % TRIM_EVERY == 0:
            trim_heap()
