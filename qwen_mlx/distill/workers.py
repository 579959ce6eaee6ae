"""A stage's requests, a few at a time, on daemon threads, so Ctrl-C never waits on a hang.

``concurrent.futures`` joins its worker threads when the interpreter exits, so one request
stuck on a hanging teacher (a 120 s timeout, then retries) kept the process alive minutes
after Ctrl-C, and a second Ctrl-C printed "stopped" while it kept running. Here workers
are daemon threads: on Ctrl-C no item is started any more, ``stopping`` is set (the teacher
then sends no new attempt and cuts its retry waits short), the requests in flight get
:data:`GRACE` seconds to land in the ledger, and the caller gets the KeyboardInterrupt;
whatever still hangs is abandoned with the process.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

GRACE = 1.0  # seconds for replies in flight after Ctrl-C: the whole stop stays under 2 s
_POLL = 0.1  # the main thread waits in slices, so a signal is handled promptly


class _Stage:
    """Items handed out in order; results kept by index; the first error stops the rest."""

    def __init__(self, fn: Callable[[Any], Any], items: list[Any]):
        self.fn, self.items = fn, items
        self.results: list[Any] = [None] * len(items)
        self.error: BaseException | None = None
        self.halted = False
        self.next = self.running = 0
        self.cond = threading.Condition()

    def _take(self) -> int | None:
        with self.cond:
            if self.halted or self.error is not None or self.next >= len(self.items):
                return None
            self.next += 1
            self.running += 1
            return self.next - 1

    def work(self) -> None:
        while (i := self._take()) is not None:
            result, error = None, None
            try:
                result = self.fn(self.items[i])
            except BaseException as err:  # handed to the main thread, raised there
                error = err
            with self.cond:
                self.running -= 1
                self.results[i] = result
                if error is not None and self.error is None:
                    self.error = error
                self.cond.notify_all()

    def _settled(self) -> bool:
        stopped = self.halted or self.error is not None or self.next >= len(self.items)
        return stopped and self.running == 0

    def wait(self, seconds: float | None = None) -> None:
        """Until every started item is done (at most ``seconds``)."""
        deadline = None if seconds is None else time.monotonic() + seconds
        with self.cond:
            while not self._settled():
                left = _POLL if deadline is None else min(_POLL, deadline - time.monotonic())
                if left <= 0:
                    return
                self.cond.wait(left)

    def halt(self) -> None:
        with self.cond:
            self.halted = True


def run_ordered(
    fn: Callable[[Any], Any], items: Iterable[Any], workers: int, stopping: threading.Event
) -> list[Any]:
    """``[fn(item) for item in items]``, ``workers`` at a time, results in input order."""
    stage = _Stage(fn, list(items))
    for _ in range(min(workers, len(stage.items))):
        threading.Thread(target=stage.work, daemon=True, name="teacher-request").start()
    try:
        stage.wait()
    except KeyboardInterrupt:
        stage.halt()
        stopping.set()
        with contextlib.suppress(KeyboardInterrupt):  # a second Ctrl-C: stop waiting, now
            stage.wait(GRACE)
        raise
    if stage.error is not None:
        raise stage.error
    return stage.results
