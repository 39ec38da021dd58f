"""Background work of many shard engines on a few threads (a shard host's engines share them).

A standalone ``ShardEngine`` runs its maintenance and its recall calibration on two threads of
its own. A shard host (``shard.host``) holds hundreds of engines in one process, where two
threads per engine, each waking every half second, would cost more than the idle shards
themselves. There each engine hands its two loops to a ``BackgroundPool`` as *steps*: one round
of the loop, which says when it wants to run again (``Step``). A pool keeps the steps in a
timer heap and runs the due ones on its own few threads, one step of a given engine at a time.

A step returns ``None`` when it found nothing to do: the pool then waits longer each time
(``idle_min_s`` doubling up to ``idle_max_s``), so a thousand idle shards cost a few checks a
second. ``wake(key)`` (a write that made a seal due) runs the step at once. A float is the
delay the step asks for itself (0: more work is waiting; an error's back-off).
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger(__name__)

Step = Callable[[], float | None]


@dataclass
class _Task:
    step: Step
    due: float
    idle_s: float
    running: bool = False
    woken: bool = False
    removed: bool = False


class BackgroundPool:
    """Runs registered steps on ``workers`` daemon threads (see the module docstring)."""

    def __init__(
        self,
        name: str,
        workers: int,
        idle_min_s: float = 0.5,
        idle_max_s: float = 5.0,
        on_start: Callable[[], None] | None = None,
    ) -> None:
        """``on_start`` runs first in each worker thread (e.g. to lower its priority)."""
        if workers < 1:
            raise ValueError("a background pool needs at least one worker")
        self.name = name
        self._idle_min_s = idle_min_s
        self._idle_max_s = max(idle_min_s, idle_max_s)
        self._cv = threading.Condition()
        self._tasks: dict[str, _Task] = {}
        self._heap: list[tuple[float, int, str]] = []
        self._seq = itertools.count()
        self._closed = False
        self._on_start = on_start
        self._threads = [
            threading.Thread(target=self._work, name=f"{name}-{i}", daemon=True)
            for i in range(workers)
        ]
        for thread in self._threads:
            thread.start()

    def __len__(self) -> int:
        with self._cv:
            return len(self._tasks)

    def _push(self, key: str, task: _Task, due: float) -> None:
        task.due = due
        heapq.heappush(self._heap, (due, next(self._seq), key))
        self._cv.notify()

    def add(self, key: str, step: Step) -> None:
        """Run ``step`` from now on (first at once); a key is registered at most once."""
        with self._cv:
            if self._closed:
                raise RuntimeError(f"background pool {self.name} is closed")
            if key in self._tasks:
                raise ValueError(f"{key!r} already runs in background pool {self.name}")
            task = _Task(step, 0.0, self._idle_min_s)
            self._tasks[key] = task
            self._push(key, task, time.monotonic())

    def wake(self, key: str) -> None:
        """Run ``key``'s step as soon as a worker is free (after the one running, if any)."""
        with self._cv:
            task = self._tasks.get(key)
            if task is None:
                return
            task.idle_s = self._idle_min_s
            if task.running:
                task.woken = True
            elif task.due > time.monotonic():
                self._push(key, task, time.monotonic())

    def remove(self, key: str) -> None:
        """Stop running ``key``'s step; returns once a step of it in progress has ended (never
        call it from that step)."""
        with self._cv:
            task = self._tasks.pop(key, None)
            if task is None:
                return
            task.removed = True
            while task.running:
                self._cv.wait()

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        for thread in self._threads:
            if thread is not threading.current_thread():
                thread.join(timeout=30)

    def _next(self) -> tuple[str, _Task] | None:
        """The next due task, marked running (None: the pool closed). Holds the lock."""
        while not self._closed:
            now = time.monotonic()
            while self._heap:
                due, _, key = self._heap[0]
                task = self._tasks.get(key)
                if task is None or task.running or due != task.due:
                    heapq.heappop(self._heap)  # removed, running, or rescheduled since
                    continue
                if due > now:
                    break
                heapq.heappop(self._heap)
                task.running = True
                return key, task
            self._cv.wait(self._heap[0][0] - now if self._heap else None)
        return None

    def _work(self) -> None:
        if self._on_start is not None:
            self._on_start()
        while True:
            with self._cv:
                picked = self._next()
            if picked is None:
                return
            key, task = picked
            try:
                delay = task.step()
            except Exception:  # a step handles its own errors; this only keeps the worker
                log.exception("%s: background step of %s failed", self.name, key)
                delay = self._idle_max_s
            with self._cv:
                task.running = False
                if task.removed:
                    self._cv.notify_all()
                    continue
                if task.woken:
                    task.woken, delay = False, 0.0
                if delay is None:  # idle: wait longer each round
                    delay = task.idle_s
                    task.idle_s = min(task.idle_s * 2, self._idle_max_s)
                else:
                    task.idle_s = self._idle_min_s
                self._push(key, task, time.monotonic() + delay)
