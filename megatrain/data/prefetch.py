"""Background prefetch: run an iterator in a thread, keeping a bounded number of items ready."""

from __future__ import annotations

import queue
import threading
from typing import Any, Iterator

_END = object()


class _Failure:
    def __init__(self, error: BaseException):
        self.error = error


class Prefetcher:
    """Items of `items`, produced in a daemon thread at most `depth` ahead of the consumer.

    An exception in the thread is re-raised by `get`. `close` stops and joins the thread;
    it is safe to call more than once.
    """

    def __init__(self, items: Iterator[Any], depth: int, name: str = "megatrain-prefetch"):
        if depth < 1:
            raise ValueError("prefetch depth must be >= 1")
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(items,), name=name, daemon=True)
        self._thread.start()

    def _run(self, items: Iterator[Any]) -> None:
        try:
            for item in items:
                if not self._put(item):
                    return
            self._put(_END)
        except BaseException as e:  # handed to the consumer, which re-raises it
            self._put(_Failure(e))
        finally:
            close = getattr(items, "close", None)
            if close is not None:
                close()  # a generator's cleanup (its own threads, files) runs here, in this thread

    def _put(self, item: Any) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.05)
                return True
            except queue.Full:
                pass
        return False

    def get(self) -> Any:
        """The next item; raises StopIteration at the end and the producer's exception on failure."""
        item = self._queue.get()
        if item is _END:
            self._queue.put(_END)  # stay exhausted for later calls
            raise StopIteration
        if isinstance(item, _Failure):
            self._queue.put(item)
            raise item.error
        return item

    def close(self) -> None:
        self._stop.set()
        while self._thread.is_alive():
            try:  # unblock a producer waiting on a full queue
                self._queue.get(timeout=0.05)
            except queue.Empty:
                pass
        self._thread.join()
