"""Redis glob matching: a table of edge cases, and properties checked against a port of util.c."""

from __future__ import annotations

import sqlite3

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from service.glob import (
    compile_pattern,
    escape,
    is_pattern,
    literal_prefix,
    prefix_upper_bound,
    unescape,
)

# Bytes util.c treats specially, plus multi-byte characters whose bytes are >= 0x80 (signed).
ALPHABET = "abc-^][\\*?é€ /"
KEYS = st.text(ALPHABET, max_size=6)
PATTERNS = st.text(ALPHABET, max_size=8)
ANY_TEXT = st.text(st.characters(blacklist_categories=["Cs"]), max_size=12)


def stringmatchlen(pattern: bytes, string: bytes) -> bool:
    """A line-by-line port of Redis's stringmatchlen_impl (src/util.c, nocase=0, x86 chars).

    The C code reads pattern[0] and pattern[1] one past the end, where the sds string has its NUL.
    """
    pat = pattern + b"\0"
    skip_longer_matches = False

    def signed(byte: int) -> int:
        return byte - 256 if byte >= 128 else byte

    def impl(p: int, plen: int, s: int, slen: int, nesting: int) -> bool:
        nonlocal skip_longer_matches
        if nesting > 1000:
            return False
        while plen and slen:
            c = pat[p]
            if c == ord("*"):
                while plen and pat[p + 1] == ord("*"):
                    p, plen = p + 1, plen - 1
                if plen == 1:
                    return True
                while slen:
                    if impl(p + 1, plen - 1, s, slen, nesting + 1):
                        return True
                    if skip_longer_matches:
                        return False
                    s, slen = s + 1, slen - 1
                skip_longer_matches = True
                return False
            if c == ord("?"):
                s, slen = s + 1, slen - 1
            elif c == ord("["):
                p, plen = p + 1, plen - 1
                negate = pat[p] == ord("^")
                if negate:
                    p, plen = p + 1, plen - 1
                match = False
                while True:
                    if pat[p] == ord("\\") and plen >= 2:
                        p, plen = p + 1, plen - 1
                        match = match or pat[p] == string[s]
                    elif pat[p] == ord("]"):
                        break
                    elif plen == 0:
                        p, plen = p - 1, plen + 1
                        break
                    elif plen >= 3 and pat[p + 1] == ord("-"):
                        start, end = sorted((signed(pat[p]), signed(pat[p + 2])))
                        p, plen = p + 2, plen - 2
                        match = match or start <= signed(string[s]) <= end
                    else:
                        match = match or pat[p] == string[s]
                    p, plen = p + 1, plen - 1
                if match == negate:
                    return False
                s, slen = s + 1, slen - 1
            else:
                if c == ord("\\") and plen >= 2:
                    p, plen = p + 1, plen - 1
                if pat[p] != string[s]:
                    return False
                s, slen = s + 1, slen - 1
            p, plen = p + 1, plen - 1
            if slen == 0:
                while pat[p] == ord("*"):
                    p, plen = p + 1, plen - 1
                break
        return plen == 0 and slen == 0

    return impl(0, len(pattern), 0, len(string), 0)


def redis_matches(pattern: str, key: str) -> bool:
    """What SCAN MATCH escape(prefix)+pattern selects among prefix+key, as the Redis tier asks."""
    return stringmatchlen(b"p:" + pattern.encode(), b"p:" + key.encode())


CASES = [
    # plain text
    ("", "", True),
    ("", "a", False),
    ("abc", "abc", True),
    ("abc", "abd", False),
    ("abc", "ab", False),
    ("ab", "abc", False),
    ("a", "", False),
    # *
    ("*", "", True),
    ("**", "", True),
    ("*a*", "", False),
    ("*", "any thing/at all", True),
    ("a*", "a", True),
    ("a*", "abc", True),
    ("a*", "ba", False),
    ("*a", "a", True),
    ("*a", "bba", True),
    ("*a", "ab", False),
    ("a*b", "ab", True),
    ("a*b", "a/x/b", True),
    ("a*b", "axxbc", False),
    ("a**b", "ab", True),
    ("a*a", "a", False),
    ("a*a", "aa", True),
    ("*a*b*", "xaybz", True),
    ("*a*b*", "xbya", False),
    ("*a*a", "aaa", True),
    # ? takes one byte
    ("?", "a", True),
    ("?", "", False),
    ("?", "ab", False),
    ("??", "ab", True),
    ("a?c", "a c", True),
    ("a?c", "a/c", True),
    ("a?b", "a\0b", True),
    ("?", "é", False),
    ("??", "é", True),
    ("???", "€", True),
    ("caf?", "café", False),
    ("caf??", "café", True),
    # sets, negation, ranges
    ("[abc]", "b", True),
    ("[abc]", "d", False),
    ("[abc]", "", False),
    ("[abc]", "ab", False),
    ("x[abc]y", "xby", True),
    ("[^a]", "b", True),
    ("[^a]", "a", False),
    ("[^a]", "", False),
    ("[a-c]", "b", True),
    ("[a-c]", "d", False),
    ("[c-a]", "b", True),
    ("[c-a]", "d", False),
    ("[^a-c]", "b", False),
    ("[^a-c]", "d", True),
    ("[a-c-e]", "-", True),
    ("[a-c-e]", "d", False),
    ("[a-c-e]", "e", True),
    ("[--/]", ".", True),
    # "-" first is literal, "-" before "]" makes "]" a range end and leaves the set open
    ("[-a]", "-", True),
    ("[-a]", "b", False),
    ("[a-]", "-", False),
    ("[a-]", "_", True),
    ("[a-]", "]", True),
    ("[a-]b]", "b", True),
    ("[a-]b]", "b]", False),
    ("[a-", "-", True),
    ("[a-", "a", True),
    # "]" and "^" positions
    ("[]", "]", False),
    ("[]]", "]", False),
    ("[]a]", "a]", False),
    ("[^]", "x", True),
    ("[^]", "]", True),
    ("[^]", "", False),
    ("[^]a]", "xa]", True),
    ("[^^]", "^", False),
    ("[^^]", "a", True),
    ("[a^]", "^", True),
    ("]", "]", True),
    ("a]", "a]", True),
    ("[[]", "[", True),
    ("[*]", "*", True),
    ("[*]", "a", False),
    ("[?]", "?", True),
    ("[?]", "a", False),
    # unterminated "[": the set runs to the end of the pattern
    ("[", "[", False),
    ("[", "", False),
    ("a[", "a[", False),
    ("a[", "a", False),
    ("*[", "a[", False),
    ("[ab", "a", True),
    ("[ab", "ab", False),
    ("[ab", "[ab", False),
    ("[a-z", "m", True),
    ("[^", "x", True),
    ("[^", "^", True),
    ("x[^", "xy", True),
    # backslash, outside and inside sets
    ("\\*", "*", True),
    ("\\*", "a", False),
    ("\\?", "?", True),
    ("\\?", "a", False),
    ("\\[a]", "[a]", True),
    ("\\[a]", "a", False),
    ("\\a", "a", True),
    ("a\\\\b", "a\\b", True),
    ("a\\", "a\\", True),
    ("a\\", "a", False),
    ("\\", "\\", True),
    ("[\\]]", "]", True),
    ("[\\]", "]", True),
    ("[\\]", "\\", False),
    ("[\\", "\\", True),
    ("[a\\", "\\", True),
    ("[a\\", "a", True),
    ("[\\^a]", "^", True),
    ("[\\a-z]", "b", False),
    ("[\\a-z]", "-", True),
    ("[\\a-z]", "z", True),
    ("[a-\\z]", "\\", True),
    ("[a-\\z]", "_", True),
    ("[a-\\z]", "z", True),
    ("[a-\\z]", "b", False),
    # non-ASCII: one byte at a time, range ends compared as signed chars
    ("é*", "été", True),
    ("*é", "café", True),
    ("€", "€", True),
    ("\\é", "é", True),
    ("[é]", "é", False),
    ("[é][é]", "é", True),
    ("[a-é]", "_", True),
    ("[a-é]", "b", False),
    ("[a-é]?", "é", True),
    ("[é-z]??", "€", True),
    ("[^é]", "é", False),
    # keys with spaces and slashes
    ("users/*/profile", "users/42/profile", True),
    ("users/*/profile", "users/4/2/profile", True),
    ("users/?", "users/ab", False),
    ("my key*", "my key 1", True),
    ("my?key", "my key", True),
]


@pytest.mark.parametrize(("pattern", "key", "expected"), CASES)
def test_table(pattern: str, key: str, expected: bool) -> None:
    assert compile_pattern(pattern)(key) is expected
    assert redis_matches(pattern, key) is expected


def test_bare_redis_differs_only_for_the_empty_key() -> None:
    # Bare stringmatchlen never matches "" with "*" (KEYS special-cases a lone "*" instead);
    # behind a prefix, as the Redis tier stores keys, every all-star pattern does.
    assert not stringmatchlen(b"*", b"")
    assert redis_matches("**", "")
    assert compile_pattern("**")("")


@pytest.mark.parametrize(
    ("pattern", "expected"),
    [
        ("*a" * 1000, True),
        ("*a" * 1000 + "*", True),
        ("*a" * 1001, False),
        ("*a" * 1001 + "*", False),
    ],
    ids=["1000-groups", "1000-groups-trailing-star", "1001-groups", "1001-groups-trailing-star"],
)
def test_redis_gives_up_past_1000_star_groups(pattern: str, expected: bool) -> None:
    assert compile_pattern(pattern)("a" * 1001) is expected


def test_many_stars_do_not_backtrack_exponentially() -> None:
    # A backtracking translation takes minutes here; the cap is the test timeout.
    assert not compile_pattern("*a" * 30 + "b")("a" * 5000)
    assert compile_pattern("*a" * 30 + "*b")("a" * 5000 + "b")


@settings(max_examples=2000, deadline=None)
@given(PATTERNS, KEYS)
def test_matches_like_redis(pattern: str, key: str) -> None:
    assert compile_pattern(pattern)(key) is redis_matches(pattern, key)
    if key:
        assert compile_pattern(pattern)(key) is stringmatchlen(pattern.encode(), key.encode())


@settings(max_examples=500, deadline=None)
@given(ANY_TEXT)
def test_escape_matches_exactly_itself(s: str) -> None:
    assert compile_pattern(escape(s))(s)
    assert not compile_pattern(escape(s))(s + "x")
    assert not is_pattern(escape(s))
    assert unescape(escape(s)) == s
    assert literal_prefix(escape(s)) == s


@settings(max_examples=500, deadline=None)
@given(st.text(ALPHABET, max_size=4), PATTERNS, KEYS)
def test_matching_keys_start_with_the_literal_prefix(head: str, tail: str, key: str) -> None:
    pattern = escape(head) + tail
    prefix = literal_prefix(pattern)
    assert prefix.startswith(head)
    for candidate in (key, head + key, prefix + key):
        if compile_pattern(pattern)(candidate):
            assert candidate.startswith(prefix)


@pytest.mark.parametrize(
    ("s", "expected"),
    [
        ("", False),
        ("plain/key with spaces", False),
        ("a]b", False),
        ("a^b-c", False),
        ("a\\*b", False),
        ("a\\?b\\[c", False),
        ("trailing\\", False),
        ("a\\\\*", True),
        ("a*", True),
        ("?", True),
        ("[", True),
        ("x[ab]", True),
        ("é*", True),
    ],
)
def test_is_pattern(s: str, expected: bool) -> None:
    assert is_pattern(s) is expected


@pytest.mark.parametrize(
    ("s", "key"),
    [
        ("", ""),
        ("plain", "plain"),
        ("a\\*b", "a*b"),
        ("a\\\\b", "a\\b"),
        ("\\a\\]", "a]"),
        ("a]b", "a]b"),
        ("trailing\\", "trailing\\"),
        ("caf\\é", "café"),
    ],
)
def test_unescape(s: str, key: str) -> None:
    assert unescape(s) == key
    assert compile_pattern(s)(key)


def test_unescape_refuses_patterns() -> None:
    with pytest.raises(ValueError, match="pattern"):
        unescape("a*")


@pytest.mark.parametrize(
    ("s", "escaped"),
    [
        ("", ""),
        ("cache:", "cache:"),
        ("a*b?c[d]e\\f", "a\\*b\\?c\\[d\\]e\\\\f"),
        ("^-é /", "^-é /"),
    ],
)
def test_escape(s: str, escaped: str) -> None:
    assert escape(s) == escaped


@pytest.mark.parametrize(
    ("pattern", "prefix"),
    [
        ("", ""),
        ("*", ""),
        ("users/*", "users/"),
        ("users/4?", "users/4"),
        ("a[bc]", "a"),
        ("a\\*b*", "a*b"),
        ("a\\\\*", "a\\"),
        ("a]b^c-*", "a]b^c-"),
        ("café*", "café"),
        ("exact\\?", "exact?"),
        ("trailing\\", "trailing\\"),
    ],
)
def test_literal_prefix(pattern: str, prefix: str) -> None:
    assert literal_prefix(pattern) == prefix


@pytest.mark.parametrize(
    ("prefix", "bound"),
    [
        ("", None),
        ("a", "b"),
        ("users/", "users0"),
        ("a\x7f", "a\x80"),
        ("caf\xe9", "caf\xea"),
        ("a\U0010ffff", "b"),
        ("\U0010ffff\U0010ffff", None),
        ("\ud7ff", "\ue000"),
        ("\uffff", "\U00010000"),
    ],
)
def test_prefix_upper_bound(prefix: str, bound: str | None) -> None:
    assert prefix_upper_bound(prefix) == bound


@settings(max_examples=500, deadline=None)
@given(ANY_TEXT, ANY_TEXT, st.data())
def test_prefix_upper_bound_splits_the_key_space(
    prefix: str, other: str, data: st.DataObject
) -> None:
    bound = prefix_upper_bound(prefix)
    cut = data.draw(st.integers(0, len(prefix)))
    for key in (prefix + other, prefix[:cut] + other, other):
        # UTF-8 bytes (SQLite BINARY) and code points order keys the same way.
        below = bound is None or key.encode() < bound.encode()
        assert below is (key < prefix or key.startswith(prefix))
    assert bound is None or bound.encode("utf-8")


def test_prefix_range_scan_in_sqlite() -> None:
    keys = ["", "a", "ab", "ab\U0010ffff", "abc", "abd", "ac", "ab/é", "ab€", "b", "a\U0010ffff"]
    with sqlite3.connect(":memory:") as conn:
        conn.execute("CREATE TABLE t (key TEXT PRIMARY KEY)")
        conn.executemany("INSERT INTO t VALUES (?)", [(k,) for k in keys])
        for prefix in ["a", "ab", "ab\U0010ffff", "a\U0010ffff", ""]:
            upper = prefix_upper_bound(prefix)
            sql, args = "SELECT key FROM t WHERE key >= ?", [prefix]
            if upper is not None:
                sql += " AND key < ?"
                args.append(upper)
            found = {row[0] for row in conn.execute(sql, args)}
            assert found == {k for k in keys if k.startswith(prefix)}, prefix
    conn.close()
