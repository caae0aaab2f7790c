"""The one path by which objects are reconciled: a queue of keys, each due at a time.

kopf's handlers and nothing else put keys in (`trigger`); a few worker threads take
the key due first, run the work function on it and put it back at the time the
work asked for (every object is looked at again periodically: level-based
reconciliation needs to run when nothing about the object changed, a node went
silent or a worker died). A key is never worked on by two threads at once; a
trigger while it is being worked on runs it again right after. The work function
returns None for an object that is gone: its key leaves the queue.
"""

from __future__ import annotations

import heapq
import logging
import threading
import time
from collections.abc import Callable

log = logging.getLogger(__name__)

Work = Callable[[str], float | None]
# A key whose work raised is looked at again after this long.
ERROR_DELAY_SECONDS = 30.0


class WorkQueue:
    def __init__(self, work: Work, *, workers: int = 4, name: str = "mesh-queue") -> None:
        self._work = work
        self._cond = threading.Condition()
        self._heap: list[tuple[float, int, str]] = []
        self._due: dict[str, float] = {}
        self._running: set[str] = set()
        self._again: set[str] = set()
        self._seq = 0
        self._stopped = False
        self._threads = [
            threading.Thread(target=self._loop, name=f"{name}-{i}", daemon=True)
            for i in range(max(1, workers))
        ]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify_all()
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            if thread.is_alive():
                thread.join(max(0.0, deadline - time.monotonic()))

    def trigger(self, key: str, delay: float = 0.0) -> None:
        """Have `key` worked on after `delay` seconds (or sooner if already due)."""
        with self._cond:
            if key in self._running:
                if delay <= 0:
                    self._again.add(key)
                return
            self._schedule(key, time.monotonic() + delay)

    def __contains__(self, key: str) -> bool:
        with self._cond:
            return key in self._due or key in self._running

    def _schedule(self, key: str, at: float) -> None:
        # Called with the lock held. An earlier time wins; stale heap entries are
        # skipped when popped.
        current = self._due.get(key)
        if current is not None and current <= at:
            return
        self._due[key] = at
        self._seq += 1
        heapq.heappush(self._heap, (at, self._seq, key))
        self._cond.notify()

    def _next(self) -> str | None:
        with self._cond:
            while not self._stopped:
                while self._heap and self._due.get(self._heap[0][2]) != self._heap[0][0]:
                    heapq.heappop(self._heap)  # superseded by an earlier time, or taken
                if not self._heap:
                    self._cond.wait()
                    continue
                at, _, key = self._heap[0]
                wait = at - time.monotonic()
                if wait > 0:
                    self._cond.wait(wait)
                    continue
                heapq.heappop(self._heap)
                del self._due[key]
                self._running.add(key)
                return key
            return None

    def _loop(self) -> None:
        while (key := self._next()) is not None:
            try:
                delay = self._work(key)
            except Exception:  # one bad object must not stop the others
                log.exception("reconcile of %s failed", key)
                delay = ERROR_DELAY_SECONDS
            with self._cond:
                self._running.discard(key)
                again = key in self._again
                self._again.discard(key)
                if again:
                    self._schedule(key, time.monotonic())
                elif delay is not None:
                    self._schedule(key, time.monotonic() + delay)
