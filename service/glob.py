"""Redis glob patterns (KEYS, SCAN MATCH), matched the same way by every tier.

A DELETE with a pattern must remove the same keys from Redis, memory and SQLite, so the other
tiers reproduce Redis's ``stringmatchlen`` (src/util.c) exactly rather than ``fnmatch``:

- matching is on UTF-8 bytes: ``?`` and each ``[...]`` take one byte, not one character;
- ``\\`` escapes the next byte, inside brackets too; a trailing ``\\`` is a literal backslash;
- ``[^...]`` negates; ``[z-a]`` is the same range as ``[a-z]``; range ends are single bytes
  compared as *signed* chars (x86): ``[a-é]`` is ``a`` to é's first byte 0xC3, that is bytes
  0x00-0x61 and 0xC3-0xFF, plus é's second byte on its own;
- ``-`` is a range only with a byte on each side, and that byte may be ``]`` or ``\\``:
  ``[a-]b]`` is the range ``]``-``a`` plus ``b``;
- ``[]`` matches nothing and ``[^]`` any byte; an unclosed ``[`` runs to the end of the pattern;
- a pattern with more than 1000 ``*`` groups that are not at its very end matches nothing
  (Redis's recursion limit).

The one deliberate difference: the empty key matches any pattern made only of ``*``, as it does
in Redis behind a key prefix (``prefix*`` matches ``prefix``), which is how keys live there.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable

__all__ = [
    "compile_pattern",
    "escape",
    "is_pattern",
    "literal_prefix",
    "prefix_upper_bound",
    "unescape",
]

_STAR, _QUESTION, _OPEN, _CLOSE, _CARET, _DASH, _BACKSLASH = b"*?[]^-\\"
# Redis recurses once per "*" group and gives up (no match) past this depth.
_MAX_NESTING = 1000
_ESCAPES = str.maketrans({c: "\\" + c for c in "*?[]\\"})
_MAX_CODE_POINT = 0x10FFFF
_SURROGATES = range(0xD800, 0xE000)


def _signed(byte: int) -> int:
    return byte - 256 if byte >= 128 else byte


def _byte_class(allowed: set[int]) -> bytes:
    if not allowed:
        return b"(?!)"
    runs: list[bytes] = []
    ordered = sorted(allowed)
    start = prev = ordered[0]
    for byte in [*ordered[1:], -1]:
        if byte != prev + 1:
            runs.append(b"\\x%02x" % start if start == prev else b"\\x%02x-\\x%02x" % (start, prev))
            start = byte
        prev = byte
    return b"[" + b"".join(runs) + b"]"


def _bracket(pattern: bytes, i: int) -> tuple[bytes, int]:
    """The class whose body starts at pattern[i], and the index just after it."""
    end = len(pattern)
    negate = i < end and pattern[i] == _CARET
    if negate:
        i += 1
    allowed: set[int] = set()
    # The branch order mirrors util.c: escape, then "]", then a range, which may swallow a "]".
    while i < end and pattern[i] != _CLOSE:
        if pattern[i] == _BACKSLASH and i + 1 < end:
            allowed.add(pattern[i + 1])
            i += 2
        elif i + 2 < end and pattern[i + 1] == _DASH:
            low, high = sorted((_signed(pattern[i]), _signed(pattern[i + 2])))
            allowed.update(b for b in range(256) if low <= _signed(b) <= high)
            i += 3
        else:
            allowed.add(pattern[i])
            i += 1
    if negate:
        allowed = set(range(256)) - allowed
    return _byte_class(allowed), min(i + 1, end)


def _segments(pattern: bytes) -> list[list[bytes]]:
    """The pattern split at its "*" groups; each part is a list of one-byte regexes."""
    segments: list[list[bytes]] = [[]]
    i = 0
    while i < len(pattern):
        byte = pattern[i]
        if byte == _STAR:
            if len(segments) == 1 or segments[-1]:
                segments.append([])
            i += 1
            continue
        if byte == _QUESTION:
            part, i = b".", i + 1
        elif byte == _OPEN:
            part, i = _bracket(pattern, i + 1)
        else:
            if byte == _BACKSLASH and i + 1 < len(pattern):
                i += 1
            part, i = re.escape(pattern[i : i + 1]), i + 1
        segments[-1].append(part)
    return segments


@functools.lru_cache(maxsize=512)
def compile_pattern(pattern: str) -> Callable[[str], bool]:
    """A predicate telling whether a key matches the Redis glob pattern."""
    first, *rest = [b"".join(parts) for parts in _segments(pattern.encode("utf-8"))]
    if sum(1 for part in rest if part) > _MAX_NESTING:
        return lambda _key: False
    if not rest:
        regex = first
    else:
        # Every part between stars has a fixed length, so its leftmost occurrence is always a
        # safe choice; atomic groups commit to it, which keeps the match linear where a plain
        # ".*a.*a.*b" backtracks exponentially on hostile patterns.
        *middle, last = rest
        regex = first + b"".join(b"(?>.*?" + part + b")" for part in middle) + b".*" + last
    fullmatch = re.compile(regex, re.DOTALL).fullmatch

    def matches(key: str) -> bool:
        return fullmatch(key.encode("utf-8")) is not None

    return matches


def _literal_head(s: str) -> tuple[str, bool]:
    """The unescaped text before the first unescaped metachar, and whether there is one."""
    out: list[str] = []
    i = 0
    while i < len(s):
        char = s[i]
        if char in "*?[":
            return "".join(out), True
        if char == "\\" and i + 1 < len(s):
            i += 1
            char = s[i]
        out.append(char)
        i += 1
    return "".join(out), False


def is_pattern(s: str) -> bool:
    """True when s has an unescaped "*", "?" or "[", i.e. can match more than one key."""
    return _literal_head(s)[1]


def unescape(s: str) -> str:
    """The one key a non-pattern string matches (ValueError when s is a pattern)."""
    literal, pattern = _literal_head(s)
    if pattern:
        raise ValueError(f"{s!r} is a pattern, not a key")
    return literal


def escape(s: str) -> str:
    """A pattern matching exactly the key s."""
    return s.translate(_ESCAPES)


def literal_prefix(pattern: str) -> str:
    """The longest string every key matching the pattern starts with, up to its first metachar."""
    return _literal_head(pattern)[0]


def prefix_upper_bound(prefix: str) -> str | None:
    """The least string above every string starting with prefix, None when there is none.

    Ordered by code point, which is SQLite's BINARY order on UTF-8 text. Surrogates are
    skipped: they cannot be encoded, so no stored key holds one.
    """
    stem = prefix.rstrip(chr(_MAX_CODE_POINT))
    if not stem:
        return None
    following = ord(stem[-1]) + 1
    if following in _SURROGATES:
        following = _SURROGATES.stop
    return stem[:-1] + chr(following)
