"""RoundTripFloor on a fake clock: the fastest round trip of the current and previous window."""

from __future__ import annotations

import math

from service.tiers.roundtrip import RoundTripFloor


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_nothing_measured_is_infinitely_far() -> None:
    assert RoundTripFloor(10.0, Clock()).seconds == math.inf


def test_the_floor_is_the_fastest_round_trip_in_the_window() -> None:
    clock = Clock()
    floor = RoundTripFloor(10.0, clock)
    for seconds in (0.004, 0.00005, 0.002):
        floor.add(seconds)
        clock.now += 1
    assert floor.seconds == 0.00005


def test_a_redis_that_moved_away_is_followed_within_two_windows() -> None:
    clock = Clock()
    floor = RoundTripFloor(10.0, clock)
    floor.add(0.00005)  # near
    clock.now += 10
    floor.add(0.002)  # far from now on: the near one still counts for a window
    assert floor.seconds == 0.00005
    clock.now += 10
    floor.add(0.002)
    assert floor.seconds == 0.002


def test_a_window_without_round_trips_forgets_the_one_before() -> None:
    clock = Clock()
    floor = RoundTripFloor(10.0, clock)
    floor.add(0.00005)
    clock.now += 25  # two windows with no batch at all
    floor.add(0.003)
    assert floor.seconds == 0.003
