"""Reading images ahead on a background thread: order, errors in place, bounded look-ahead, clean stop."""

from __future__ import annotations

import contextlib
import threading
import time

import numpy as np
import pytest
from PIL import Image

from omnilabel.data.images import read_image_rgb
from omnilabel.data.prefetch import THREAD_PREFIX, prefetch_images
from omnilabel.errors import InputError


def _reader_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith(THREAD_PREFIX)]


class CountingReader:
    """Reads fake images (their index as a 1 x 1 array); ``bad`` paths raise InputError."""

    def __init__(self, bad: frozenset[int] = frozenset(), delay_s: float = 0.0) -> None:
        self.bad, self.delay_s = bad, delay_s
        self.reads = 0
        self.lock = threading.Lock()

    def __call__(self, path):
        time.sleep(self.delay_s)
        with self.lock:
            self.reads += 1
        if int(path) in self.bad:
            raise InputError(f"cannot read image {path}")
        return np.full((1, 1, 3), int(path), np.uint8)

    def wait_for(self, n: int, timeout_s: float = 5.0) -> int:
        end = time.monotonic() + timeout_s
        while self.reads < n and time.monotonic() < end:
            time.sleep(0.005)
        return self.reads


@pytest.mark.parametrize("depth", [0, 1, 3])
def test_order_kept_and_errors_delivered_in_place(depth):
    reader = CountingReader(bad=frozenset({2, 5}), delay_s=0.002)
    got = list(prefetch_images([str(i) for i in range(8)], depth=depth, read=reader))
    assert [i for i, _ in got] == list(range(8))
    for i, value in got:
        if i in (2, 5):
            assert isinstance(value, InputError) and f"image {i}" in str(value)
        else:
            assert int(value[0, 0, 0]) == i
    assert reader.reads == 8
    assert not _reader_threads()


def test_real_files_and_a_corrupt_one(tmp_path):
    good = tmp_path / "a.png"
    Image.fromarray(np.full((4, 5, 3), 7, np.uint8)).save(good)
    bad = tmp_path / "b.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (_, a), (_, b), (_, c) = prefetch_images([good, bad, tmp_path / "missing.png"], depth=2)
    np.testing.assert_array_equal(a, read_image_rgb(good))
    assert isinstance(b, InputError) and isinstance(c, InputError)


@pytest.mark.parametrize("depth", [1, 2])
def test_never_more_than_depth_ahead(depth):
    reader = CountingReader()
    n = 6
    with contextlib.closing(prefetch_images([str(i) for i in range(n)], depth=depth, read=reader)) as images:
        for i, _ in images:
            # holding image i, the reader may have read up to i + depth, and does get there
            expected = min(n, i + 1 + depth)
            assert reader.wait_for(expected) == expected
            time.sleep(0.05)
            assert reader.reads == expected


def test_depth_zero_reads_in_the_callers_thread_on_demand():
    threads = []

    def read(path):
        threads.append(threading.current_thread())
        return path

    images = prefetch_images(["a", "b"], depth=0, read=read)
    assert threads == []
    assert next(images) == (0, "a") and threads == [threading.current_thread()]
    images.close()
    assert len(threads) == 1


def test_early_close_stops_and_joins_the_thread():
    reader = CountingReader(delay_s=0.01)
    images = prefetch_images([str(i) for i in range(100)], depth=2, read=reader)
    assert next(images)[0] == 0
    assert len(_reader_threads()) == 1
    images.close()
    assert not _reader_threads()
    assert reader.reads <= 3


def test_an_exception_in_the_consumer_stops_the_thread():
    reader = CountingReader()
    with pytest.raises(RuntimeError, match="consumer failed"):
        with contextlib.closing(prefetch_images([str(i) for i in range(50)], depth=3, read=reader)) as images:
            for i, _ in images:
                if i == 1:
                    raise RuntimeError("consumer failed")
    assert not _reader_threads()
    assert reader.reads <= 5


def test_a_reader_bug_is_raised_at_its_position():
    def read(path):
        if path == "x":
            raise ZeroDivisionError("bug")
        return path

    images = prefetch_images(["a", "x", "b"], depth=2, read=read)
    assert next(images) == (0, "a")
    with pytest.raises(ZeroDivisionError):
        next(images)
    assert not _reader_threads()


def test_negative_depth_is_refused():
    with pytest.raises(InputError, match="prefetch depth must be >= 0"):
        next(prefetch_images(["a"], depth=-1))
