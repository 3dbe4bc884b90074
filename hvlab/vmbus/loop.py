"""A small event loop for host-side timers and deferred work (heartbeats, delayed first packets).

Device models must not block vCPU threads and must not run two callbacks at once against the same
machine state, so timers fire on one loop thread and, when a ``lock`` is given (the machine lock, e.g.
``VmbusServer.lock``), run while holding it. ``ManualLoop`` has the same ``schedule`` interface but only
moves when a test calls ``advance()``, which keeps unit tests deterministic and fast.

Devices depend only on ``Scheduler``: ``schedule(delay, callback) -> handle with cancel()``.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import Any, Protocol

log = logging.getLogger("hvlab.vmbus")


class Cancellable(Protocol):
    def cancel(self) -> None: ...


class Scheduler(Protocol):
    """What a device needs to run something later."""

    def schedule(self, delay: float, callback: Callable[[], Any]) -> Cancellable: ...


class TimerHandle:
    """A scheduled callback; ``cancel()`` is idempotent and safe from any thread."""

    __slots__ = ("when", "callback", "cancelled")

    def __init__(self, when: float, callback: Callable[[], Any]) -> None:
        self.when = when
        self.callback = callback
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class _TimerQueue:
    """heapq of (when, seq, handle); seq keeps FIFO order for equal deadlines."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, TimerHandle]] = []
        self._seq = itertools.count()

    def push(self, handle: TimerHandle) -> None:
        heapq.heappush(self._heap, (handle.when, next(self._seq), handle))

    def next_deadline(self) -> float | None:
        while self._heap and self._heap[0][2].cancelled:
            heapq.heappop(self._heap)
        return self._heap[0][0] if self._heap else None

    def pop_due(self, now: float) -> TimerHandle | None:
        deadline = self.next_deadline()
        if deadline is None or deadline > now:
            return None
        return heapq.heappop(self._heap)[2]

    def __len__(self) -> int:
        return sum(1 for _, _, h in self._heap if not h.cancelled)


def _run(handle: TimerHandle, lock: AbstractContextManager[Any]) -> None:
    """Run one callback under the lock; a failing callback is logged and the loop carries on."""
    if handle.cancelled:
        return
    try:
        with lock:
            handle.callback()
    except Exception:
        log.exception("event loop callback %r failed", handle.callback)


class EventLoop:
    """A thread running timers in deadline order, each under ``lock`` when given.

    ``start()`` launches the daemon thread; ``stop()`` ends it (pending timers are dropped).
    ``schedule``/``call_soon`` may be called from any thread, including from callbacks.
    """

    def __init__(self, lock: AbstractContextManager[Any] | None = None, *, name: str = "hvlab-loop") -> None:
        self.lock: AbstractContextManager[Any] = lock if lock is not None else nullcontext()
        self.name = name
        self._timers = _TimerQueue()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False

    @staticmethod
    def time() -> float:
        return time.monotonic()

    def schedule(self, delay: float, callback: Callable[[], Any]) -> TimerHandle:
        handle = TimerHandle(self.time() + max(0.0, delay), callback)
        with self._cond:
            self._timers.push(handle)
            self._cond.notify()
        return handle

    def call_soon(self, callback: Callable[[], Any]) -> TimerHandle:
        return self.schedule(0.0, callback)

    def start(self) -> None:
        if self._thread is not None:
            return
        self._stopping = False
        self._thread = threading.Thread(target=self._main, name=self.name, daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = 5.0) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)
        self._thread = None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _main(self) -> None:
        while True:
            with self._cond:
                while not self._stopping:
                    now = self.time()
                    handle = self._timers.pop_due(now)
                    if handle is not None:
                        break
                    deadline = self._timers.next_deadline()
                    self._cond.wait(None if deadline is None else max(0.0, deadline - now))
                if self._stopping:
                    return
            _run(handle, self.lock)

    def __enter__(self) -> EventLoop:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class ManualLoop:
    """A Scheduler driven by the test: time stands still until ``advance()``/``run_pending()``."""

    def __init__(self, lock: AbstractContextManager[Any] | None = None) -> None:
        self.lock: AbstractContextManager[Any] = lock if lock is not None else nullcontext()
        self.now = 0.0
        self._timers = _TimerQueue()

    def time(self) -> float:
        return self.now

    def schedule(self, delay: float, callback: Callable[[], Any]) -> TimerHandle:
        handle = TimerHandle(self.now + max(0.0, delay), callback)
        self._timers.push(handle)
        return handle

    def call_soon(self, callback: Callable[[], Any]) -> TimerHandle:
        return self.schedule(0.0, callback)

    def run_pending(self) -> int:
        """Run everything due now (including callbacks scheduled with delay 0 by those); returns count."""
        ran = 0
        while (handle := self._timers.pop_due(self.now)) is not None:
            _run(handle, self.lock)
            ran += 1
        return ran

    def advance(self, seconds: float) -> int:
        """Move time forward, firing timers in deadline order at their own deadlines."""
        end = self.now + seconds
        ran = 0
        while True:
            deadline = self._timers.next_deadline()
            if deadline is None or deadline > end:
                break
            self.now = max(self.now, deadline)
            ran += self.run_pending()
        self.now = end
        return ran + self.run_pending()

    @property
    def pending(self) -> int:
        return len(self._timers)
