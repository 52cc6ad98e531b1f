"""The slot's window: Little's law over measured task length and round trip."""

from __future__ import annotations

import time

import pytest

from zfalkon.constants import MAX_WINDOW, PREFETCH_SECONDS
from zfalkon.slotcore import window_for

LAN = 0.0003  # seconds: a loopback round trip


@pytest.mark.parametrize("task", [1e-6, 1e-4, 1e-3, 0.01, 0.1])
def test_window_grows_with_round_trip(task):
    windows = [window_for(task, rtt) for rtt in (LAN, 0.01, 0.05, 0.1, 0.2)]
    assert windows == sorted(windows)
    assert windows[-1] > windows[0] or windows[0] == MAX_WINDOW


@pytest.mark.parametrize("rtt", [LAN, 0.05, 0.2])
def test_window_shrinks_for_long_tasks(rtt):
    windows = [window_for(task, rtt) for task in (1e-5, 1e-3, 0.01, 0.1, 1.0, 10.0)]
    assert windows == sorted(windows, reverse=True)
    assert windows[-1] <= 2


def test_window_covers_the_round_trip_for_short_tasks():
    # 1 ms tasks behind a 100 ms round trip: ~105 tasks finish per round trip.
    assert window_for(0.001, 0.1) >= 2 * 105
    # no-op tasks behind 50 ms: tens of thousands in flight, capped
    assert window_for(3e-6, 0.05) > 30_000
    assert window_for(1e-9, 1.0) == MAX_WINDOW


def test_long_tasks_prefetch_one_only_when_the_round_trip_matters():
    assert window_for(1.0, LAN) == 1  # on a LAN, no private queue behind a long task
    assert window_for(1.0, 0.2) == 2  # at 200 ms, the next task waits ready
    assert window_for(100.0, 0.2) == 1


def test_short_tasks_keep_prefetch_seconds_of_work():
    assert window_for(0.001, LAN) >= PREFETCH_SECONDS / 0.001


def test_unmeasured_task_length_gives_the_largest_window():
    assert window_for(0.0, LAN) == MAX_WINDOW


def _window_after_sleep_tasks(rtt_ms: float) -> int:
    """Run 0.1 s tasks on one real worker behind ``rtt_ms``; return its window at the broker."""
    from zfalkon import Executor, LocalCluster

    with LocalCluster(workers=1, rtt_ms=rtt_ms) as cluster, Executor(cluster.address) as ex:
        assert list(ex.map(time.sleep, [0.1] * 12)) == [None] * 12
        return cluster.status()["worker_list"][0]["window"]


def test_real_slot_window_grows_behind_a_long_link():
    lan = _window_after_sleep_tasks(0)
    wan = _window_after_sleep_tasks(200)
    assert lan <= 2  # 0.1 s tasks on a LAN: no private queue
    assert wan >= 4  # behind 200 ms: enough to cover the round trip
