"""Versions that order writes across instances: newest write wins.

A version is microseconds since the epoch, strictly increasing within a process, and never
below a version this process has seen from another instance (a hybrid logical clock). So an
instance whose clock runs behind still orders its writes after the changes it has observed;
two instances writing the same key within their clock skew of each other, without seeing
each other's write, are ordered by their clocks. Run NTP.
"""

from __future__ import annotations

import time
from collections.abc import Callable

MICROSECONDS = 1_000_000


class VersionClock:
    """Hands out versions for writes and deletes."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._last = 0

    def next(self) -> int:
        version = max(int(self._clock() * MICROSECONDS), self._last + 1)
        self._last = version
        return version

    def observe(self, version: int) -> None:
        """Never hand out a version at or below one another instance used."""
        self._last = max(self._last, version)
