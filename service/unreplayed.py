"""Journaled changes that Redis may not hold yet, while a recovery replays the journal.

When Redis is back, the journal is replayed up to its newest row before the mode flips to full,
but writes keep arriving and being journaled meanwhile; those rows are replayed just after
the flip. Until they are, Redis can still hold an older value of such a key (or one this
instance deleted), and a full-mode read would serve it. While a recovery runs, the SQLite
tier notes here every journal row it commits, and the cascade passes over a Redis hit older
than a noted change for the local tiers, which already hold that change.
"""

from __future__ import annotations

from collections.abc import Callable

from service.glob import compile_pattern


class Unreplayed:
    """Newest journaled version per key and per pattern, noted only while tracking."""

    def __init__(self) -> None:
        self._keys: dict[str, int] | None = None
        self._patterns: list[tuple[Callable[[str], bool], int]] = []

    @property
    def tracking(self) -> bool:
        return self._keys is not None

    def start(self) -> None:
        """Begin noting, afresh: what was journaled before now is replayed before the flip."""
        self._keys, self._patterns = {}, []

    def stop(self) -> None:
        """The journal is replayed: Redis holds every change noted."""
        self._keys, self._patterns = None, []

    def note(self, op: str, target: str, version: int) -> None:
        if self._keys is None:
            return
        if op == "pattern":
            self._patterns.append((compile_pattern(target), version))
        elif self._keys.get(target, 0) < version:
            self._keys[target] = version

    def hides(self, key: str, version: int) -> bool:
        """Whether a Redis entry of `key` at `version` predates a change not yet replayed."""
        if not self._keys and not self._patterns:
            return False
        assert self._keys is not None
        if self._keys.get(key, 0) > version:
            return True
        return any(noted > version and matches(key) for matches, noted in self._patterns)
