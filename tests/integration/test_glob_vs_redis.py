"""compile_pattern against a real redis-server's own SCAN MATCH, on generated keys and patterns."""

from __future__ import annotations

import random

import redis

from service.glob import compile_pattern, escape
from tests.procs import RedisProcess
from tests.unit.test_glob import CASES

# Kept away from whatever else the shared server holds; escaped like CACHE_KEY_PREFIX is.
PREFIX = "tiercache-glob-vs-redis:"
SEED = 1_2025
# Every byte util.c treats specially, plus characters of two and three UTF-8 bytes.
ALPHABET = "abc-^][\\*?é€ /"
SET_BODY = "abc-^]\\é€"


def generate_keys(rng: random.Random) -> set[str]:
    keys = {key for _, key, _ in CASES} | {"a" * 1001, "a" * 1000 + "b"}
    while len(keys) < 500:
        keys.add("".join(rng.choice(ALPHABET) for _ in range(rng.randint(1, 5))))
    return keys


def random_set(rng: random.Random, must_hold: str = "") -> str:
    body = must_hold + "".join(rng.choice(SET_BODY) for _ in range(rng.randint(0, 3)))
    body = "".join(rng.sample(body, len(body)))
    closing = "]" if rng.random() < 0.75 else ""
    return "[" + ("^" if rng.random() < 0.3 else "") + body + closing


def random_token(rng: random.Random) -> str:
    roll = rng.random()
    if roll < 0.35:
        return rng.choice(ALPHABET)
    if roll < 0.5:
        return "*"
    if roll < 0.6:
        return "?"
    if roll < 0.7:
        return "\\" + rng.choice(ALPHABET)
    return random_set(rng)


def pattern_from_key(rng: random.Random, key: str) -> str:
    """Likely to match its key and its neighbours, so the sets compared are rarely empty."""
    tokens: list[str] = []
    for char in key:
        roll = rng.random()
        if roll < 0.45:
            tokens.append(char)
        elif roll < 0.6:
            tokens.append("?")
        elif roll < 0.7:
            tokens.append("*")
        elif roll < 0.8:
            tokens.append("\\" + char)
        else:
            tokens.append(random_set(rng, char))
        if rng.random() < 0.15:
            tokens.append("*")
    return "".join(tokens)


def generate_patterns(rng: random.Random, keys: list[str]) -> list[str]:
    patterns = {pattern for pattern, _, _ in CASES}
    patterns |= {"*a" * 1000, "*a" * 1001, "*a" * 1001 + "*", "*a" * 1000 + "*b"}
    patterns |= {pattern_from_key(rng, rng.choice(keys)) for _ in range(350)}
    patterns |= {"".join(random_token(rng) for _ in range(rng.randint(1, 5))) for _ in range(250)}
    raw = sorted(
        {"".join(rng.choice(ALPHABET) for _ in range(rng.randint(1, 6))) for _ in range(150)}
    )
    # Malformed on purpose: an open "[" and a lone trailing backslash.
    patterns |= {*raw, *(p + "[" for p in raw[:20]), *(p + "\\" for p in raw[20:40])}
    return sorted(patterns)


def test_compile_pattern_selects_what_redis_scan_match_selects(
    shared_redis: RedisProcess,
) -> None:
    rng = random.Random(SEED)
    keys = generate_keys(rng)
    patterns = generate_patterns(rng, sorted(keys))
    mismatches: list[str] = []
    selected_counts: list[int] = []
    with redis.Redis.from_url(shared_redis.url) as client:
        client.mset({PREFIX + key: b"1" for key in keys})
        try:
            for pattern in patterns:
                found = {
                    raw.decode()[len(PREFIX) :]
                    for raw in client.scan_iter(match=escape(PREFIX) + pattern, count=10_000)
                }
                matches = compile_pattern(pattern)
                selected = {key for key in keys if matches(key)}
                selected_counts.append(len(selected))
                if found != selected:
                    mismatches.append(
                        f"{pattern[:60]!r}: only redis {sorted(found - selected)[:5]}, "
                        f"only ours {sorted(selected - found)[:5]}"
                    )
        finally:
            client.delete(*(PREFIX + key for key in keys))

    assert not mismatches, f"{len(mismatches)} of {len(patterns)} patterns differ:\n" + "\n".join(
        mismatches[:20]
    )
    assert len(patterns) >= 700
    # The comparison means something only if patterns select some keys but not all of them.
    partial = sum(1 for count in selected_counts if 0 < count < len(keys))
    assert partial >= len(patterns) // 2, partial
