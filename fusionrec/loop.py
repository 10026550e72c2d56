"""The event loop the stream worker and an inline ranker share (the embedded stack: Qdrant local
mode allows one client, so the ranker's store calls run on the worker's loop, one at a time).

Inline calls never overlap, so the queue of calls forms inside grpc, out of sight, and the
ranker's admission (serving/guards.py) caps instead the time its calls took of the last
second: BACKLOG_SHARE of it while the worker has a backlog, so both get on; IDLE_SHARE while
the worker has none, so a lone client calling back to back is seldom shed, while the rest of
the loop still goes to shedding the excess fast when calls come faster than they end.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable

# The window over which time is counted, and for which a backlog counts.
WINDOW_S = 1.0
BACKLOG_SHARE = 0.5
IDLE_SHARE = 0.8


class TimeWindow:
    """Seconds spent at something over the last WINDOW_S."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._spans: deque[tuple[float, float]] = deque()  # (ended at, took)

    def record(self, took: float) -> None:
        self._spans.append((self._clock(), took))

    def total(self) -> float:
        cutoff = self._clock() - WINDOW_S
        while self._spans and self._spans[0][0] < cutoff:
            self._spans.popleft()
        return sum(took for _, took in self._spans)


class Backlog:
    """When the stream worker last had more waiting than it could take in one batch."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._at = -math.inf

    def mark(self) -> None:
        self._at = self._clock()

    def recent(self) -> bool:
        return self._clock() - self._at < WINDOW_S


def ranker_share(worker_backlog: bool) -> float:
    """The share of the window inline ranker calls may take."""
    return BACKLOG_SHARE if worker_backlog else IDLE_SHARE
