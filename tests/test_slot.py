"""The slot's window: Little's law over measured task length and round trip."""

from __future__ import annotations

import time

import pytest

from zfalkon import protocol as P
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


# -- stopping: the last results are confirmed before BYE -------------------------------

class FakeBroker:
    """A ROUTER on 127.0.0.1 that one real slot process (``python -m zfalkon.slot``, its
    config on stdin as its agent writes it) registers with; the test speaks for the
    broker, message by message."""

    def __init__(self, tmp_path) -> None:
        import json
        import os
        import subprocess
        import sys

        import zmq

        from conftest import child_env
        from zfalkon.slot import StateFile

        self.ctx = zmq.Context()
        self.router = self.ctx.socket(zmq.ROUTER)
        self.router.setsockopt(zmq.LINGER, 0)
        port = self.router.bind_to_random_port("tcp://127.0.0.1")
        self.state_path = str(tmp_path / "slot-0")
        StateFile.create(self.state_path)
        config = {"broker": f"tcp://127.0.0.1:{port}", "ident": os.urandom(16).hex(),
                  "worker_id": "w", "index": 0, "state_path": self.state_path}
        self.proc = subprocess.Popen([sys.executable, "-m", "zfalkon.slot"],
                                     stdin=subprocess.PIPE, env=child_env())
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(config).encode())
        self.proc.stdin.close()
        self.ident = b""

    def recv(self, timeout: float):
        """The slot's next message, or None after ``timeout`` seconds."""
        from zfalkon import protocol as P

        if not self.router.poll(int(timeout * 1000)):
            return None
        self.ident, body = self.router.recv_multipart()
        return P.decode(body)

    def recv_until(self, want, timeout: float) -> list:
        """Messages until one for which ``want(msg)`` holds (the last in the list)."""
        got: list = []
        deadline = time.monotonic() + timeout
        while not got or not want(got[-1]):
            msg = self.recv(max(0.0, deadline - time.monotonic()))
            assert msg is not None, f"nothing wanted within {timeout} s; got {got}"
            got.append(msg)
        return got

    def send(self, msg) -> None:
        from zfalkon import protocol as P

        self.router.send_multipart([self.ident, P.encode(msg)])

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self.router.close()
        self.ctx.term()


def _a_task_running_then_sigterm(broker: FakeBroker) -> P.Results:
    """Register the slot, hand it a 0.3 s task, SIGTERM it while the task runs; return
    the RESULTS frame that carries the task's result."""
    import signal

    from conftest import wait_until
    from zfalkon import __version__, payload
    from zfalkon.constants import HEARTBEAT_SECONDS
    from zfalkon.slot import StateFile

    hello = broker.recv(30)
    assert type(hello) is P.Hello
    broker.send(P.Welcome(P.PROTOCOL_VERSION, __version__, 0, HEARTBEAT_SECONDS))
    announce = broker.recv_until(lambda m: type(m) is P.Results, 10)[-1]
    broker.send(P.Ack(announce.seq))
    tid = (7 << P.ID_SHIFT) + 1
    broker.send(P.Tasks(1, announce.seq, [tid],
                        [payload.python_task("time:sleep", (0.3,), {})]))
    state = StateFile(broker.state_path)
    try:
        wait_until(lambda: state.get() == tid, 20, message="the task running")
    finally:
        state.close()
    broker.proc.send_signal(signal.SIGTERM)
    got = broker.recv_until(lambda m: type(m) is P.Results and m.ids, 20)
    assert not [m for m in got if type(m) is P.Bye]
    results = got[-1]
    assert results.ids == [tid] and results.failed == 0
    return results


def test_a_stopping_slot_says_bye_only_once_its_last_results_are_acknowledged(tmp_path):
    """SIGTERM while a task runs: the slot returns the result, then waits for the broker's
    acknowledgement before BYE and exit. (Its agent's BYE, sent once the slot has exited,
    would otherwise race the result to the broker, which would take the task back.)"""
    broker = FakeBroker(tmp_path)
    try:
        results = _a_task_running_then_sigterm(broker)
        # No acknowledgement (PINGs go unanswered): the slot waits. Nothing to observe
        # but that nothing happens, so a window of time: 1 s, of STOP_CONFIRM_SECONDS.
        deadline = time.monotonic() + 1.0
        while (left := deadline - time.monotonic()) > 0:
            msg = broker.recv(left)
            assert type(msg) is not P.Bye, "BYE before the results were acknowledged"
        assert broker.proc.poll() is None, "exited before the results were acknowledged"
        broker.send(P.Ack(results.seq))
        broker.recv_until(lambda m: type(m) is P.Bye, 10)
        assert broker.proc.wait(10) == 0
    finally:
        broker.close()


def test_a_stopping_slot_waits_for_the_acknowledgement_at_most_stop_confirm_seconds(
        tmp_path):
    """A broker that never acknowledges does not keep a stopping slot: BYE and exit 0
    after STOP_CONFIRM_SECONDS (within its agent's STOP_GRACE_SECONDS)."""
    from zfalkon.constants import STOP_CONFIRM_SECONDS, STOP_GRACE_SECONDS

    assert STOP_CONFIRM_SECONDS < STOP_GRACE_SECONDS
    broker = FakeBroker(tmp_path)
    try:
        _a_task_running_then_sigterm(broker)
        started = time.monotonic()
        broker.recv_until(lambda m: type(m) is P.Bye, STOP_CONFIRM_SECONDS + 5)
        assert STOP_CONFIRM_SECONDS - 0.5 <= time.monotonic() - started
        assert broker.proc.wait(10) == 0
    finally:
        broker.close()
