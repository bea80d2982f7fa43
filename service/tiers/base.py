"""What every tier stores and the errors a tier may raise."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Entry:
    """A cached value: its JSON encoding, when it expires (epoch seconds, None = never) and
    the version of the write that made it (see service/versions.py)."""

    raw: bytes
    expires_at: float | None
    version: int = 0

    def remaining(self, now: float) -> float | None:
        """Seconds left to live, None when it never expires."""
        return None if self.expires_at is None else self.expires_at - now

    def ttl_seconds(self, now: float) -> int | None:
        """Remaining time as the API shows it: whole seconds, rounded up, at least 1."""
        left = self.remaining(now)
        return None if left is None else max(1, math.ceil(left))


class TierError(Exception):
    """A tier could not do what was asked (timeout, lost connection, disk full)."""
