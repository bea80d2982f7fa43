"""How far away Redis is: the fastest recent round trip, which the auto-pipeline's pacing uses."""

from __future__ import annotations

import math
import time
from collections.abc import Callable

#: How long one window of round trips lasts. The floor is the fastest of the current and the
#: previous window, so it follows Redis moving farther away within two windows.
WINDOW_SECONDS = 10.0


class RoundTripFloor:
    """The fastest Redis round trip seen lately: Redis's distance, without the time replies
    wait in a busy event loop (a minimum filter over windows, as TCP BBR keeps its min RTT).

    Infinite until the first round trip is added.
    """

    def __init__(
        self,
        window_seconds: float = WINDOW_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._window = window_seconds
        self._clock = clock
        self._window_started = clock()
        self._current = math.inf
        self._previous = math.inf

    def add(self, seconds: float) -> None:
        now = self._clock()
        elapsed = now - self._window_started
        if elapsed >= self._window:
            # A window with no round trip at all leaves nothing to remember.
            self._previous = self._current if elapsed < 2 * self._window else math.inf
            self._current, self._window_started = math.inf, now
        if seconds < self._current:
            self._current = seconds

    @property
    def seconds(self) -> float:
        return min(self._current, self._previous)
