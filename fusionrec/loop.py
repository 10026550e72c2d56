"""The event loop the stream worker and an inline ranker share (the embedded stack: Qdrant local
mode allows one client, so the ranker's store calls run on the worker's loop, one at a time).

Inline calls never overlap, so the queue of calls forms inside grpc, out of sight, and the
ranker's admission (serving/guards.py) caps instead the share of the loop its calls take:
BACKLOG_SHARE while the worker has a backlog, so both get on; IDLE_SHARE while it has none,
the rest of the loop going to shedding the excess fast when calls come faster than they end.
The share is kept by a `Budget` of loop time (a token bucket). A call that finds it spent
waits for it to refill when no other call is waiting (a lone client calling back to back is
paced to the share, not shed); under overload the loop is free while that call waits, grpc
hands over the calls queued behind it, and they, finding one waiting, are shed.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

# How recent a backlog counts.
WINDOW_S = 1.0
BACKLOG_SHARE = 0.5
IDLE_SHARE = 0.8
# Loop time inline calls may take back to back before they are paced (or shed).
BURST_S = 0.1


class Budget:
    """Loop time inline calls may still take: it refills at the share in force, up to BURST_S,
    and each call's time is taken from it when the call ends, so it may go below zero."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._level = BURST_S
        self._at = clock()

    def _refill(self, share: float) -> None:
        now = self._clock()
        self._level = min(BURST_S, self._level + (now - self._at) * share)
        self._at = now

    def spend(self, took: float, share: float) -> None:
        self._refill(share)
        self._level -= took

    def wait(self, share: float) -> float:
        """Seconds until there is budget again at `share` (0: there is now)."""
        self._refill(share)
        if self._level > 0:
            return 0.0
        return -self._level / share if share > 0 else math.inf


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
    """The share of the loop inline ranker calls may take."""
    return BACKLOG_SHARE if worker_backlog else IDLE_SHARE
