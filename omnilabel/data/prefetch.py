"""Read images ahead of their use on one background thread, a bounded number at a time.

Decoding an image (PNG inflate, JPEG IDCT) is CPU work that Pillow does without holding the GIL, so a
reader thread overlaps it with the model's forward passes. ``prefetch_images`` keeps at most ``depth``
images read and not yet handed over, so memory stays bounded whatever the dataset's size, and yields them
in input order. A file that cannot be read is handed over in its place as the ``InputError`` its read
raised; the caller decides what to do with it (a job records it and goes on).

Closing the generator early (``close()``, or the consumer's ``for`` loop left by ``break`` or an exception
when the generator is used under ``contextlib.closing``) stops the thread and joins it before returning.
"""

from __future__ import annotations

import itertools
import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from omnilabel.data.images import read_image_rgb
from omnilabel.errors import InputError

#: Name prefix of the reader threads (a numbered suffix tells them apart).
THREAD_PREFIX = "omnilabel-prefetch"
#: Seconds between checks of the stop flag while the reader waits for room.
_POLL_S = 0.05

_counter = itertools.count()
_END = object()


def prefetch_images(
    paths: Sequence[str | Path],
    *,
    depth: int,
    read: Callable[[str | Path], Any] = read_image_rgb,
) -> Iterator[tuple[int, Any]]:
    """Yield ``(index, read(paths[index]))`` for every path, in order, reading up to ``depth`` ahead.

    Args:
        paths: image files.
        depth: images read ahead of the one the caller holds, >= 0; 0 reads each in the caller's thread when
            it is asked for.
        read: the reader (default ``read_image_rgb``: (H, W, 3) uint8 RGB); it signals an unreadable file
            with ``InputError``.

    Yields:
        ``(index, value)``: ``value`` is what ``read`` returned, or the ``InputError`` it raised for that
        file. Any other exception of ``read`` is raised to the caller at that file's position.

    Raises:
        InputError: ``depth`` is negative.
    """
    if depth < 0:
        raise InputError(f"prefetch depth must be >= 0, got {depth}")
    if depth == 0:
        yield from _read_in_caller(paths, read)
        return
    yield from _read_ahead(list(paths), depth, read)


def _read_in_caller(paths: Sequence[str | Path], read: Callable[[str | Path], Any]) -> Iterator[tuple[int, Any]]:
    for i, path in enumerate(paths):
        try:
            value = read(path)
        except InputError as exc:
            value = exc
        yield i, value


def _read_ahead(paths: list[str | Path], depth: int, read: Callable[[str | Path], Any]) -> Iterator[tuple[int, Any]]:
    # ``room`` counts free slots: the reader takes one before reading a file, the caller gives it back when
    # it takes that file, so at most ``depth`` files are read and not yet taken.
    room = threading.Semaphore(depth)
    done: queue.SimpleQueue[tuple[int, Any, bool]] = queue.SimpleQueue()
    stop = threading.Event()

    def reader() -> None:
        for i, path in enumerate(paths):
            while not room.acquire(timeout=_POLL_S):
                if stop.is_set():
                    return
            if stop.is_set():
                return
            try:
                done.put((i, read(path), False))
            except InputError as exc:
                done.put((i, exc, False))
            except BaseException as exc:  # handed to the caller, raised there
                done.put((i, exc, True))
                return
        done.put((len(paths), _END, False))

    thread = threading.Thread(target=reader, name=f"{THREAD_PREFIX}-{next(_counter)}", daemon=True)
    thread.start()
    try:
        while True:
            i, value, failed = done.get()
            if value is _END:
                return
            room.release()
            if failed:
                raise value
            yield i, value
    finally:
        stop.set()
        room.release()  # wakes a reader waiting for room at once
        thread.join()
