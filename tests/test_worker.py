"""zfalkon.worker and zfalkon.slot: real worker processes against a real or fake broker."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time

import psutil
import pytest

import tasks
from conftest import (
    alive,
    broker_process,
    descendants,
    FakeBroker,
    kill_tree,
    outer_pid,
    start_worker,
    stop_process,
    wait_until,
    worker_process,
)
from zfalkon import ConfigError, Executor, WorkerCrashed, query_status
from zfalkon import protocol as P
from zfalkon._version import __version__
from zfalkon.constants import MAX_CRASHES, PROTOCOL_VERSION
from zfalkon.slot import StateFile
from zfalkon.worker import WorkerAgent, describe_exit


@pytest.fixture(scope="module")
def broker():
    """A broker process for this module: yields its address."""
    with broker_process() as (_, address):
        yield address


def workers_named(address: str) -> dict[str, dict]:
    return {w["name"]: w for w in query_status(address, timeout=5)["worker_list"]}


def registered(address: str, name: str, slots: int):
    w = workers_named(address).get(name)
    return w if w and w["connected_slots"] == slots else None


def broker_ends(address: str, pid: int) -> set:
    """The broker's ends (its local, the peer's remote address) of process ``pid``'s TCP
    connections to the broker at ``address``."""
    port = int(address.rsplit(":", 1)[1])
    return {(c.raddr, c.laddr) for c in psutil.Process(pid).net_connections("tcp")
            if c.raddr and c.raddr.port == port}


def open_at_broker(ends: set) -> bool:
    """Whether the broker still has any of these connections open (its socket not yet
    closed: a dead peer's end stays in CLOSE_WAIT until libzmq reads the EOF and closes it)."""
    return any((c.laddr, c.raddr) in ends and c.status in (psutil.CONN_ESTABLISHED,
                                                           psutil.CONN_CLOSE_WAIT)
               for c in psutil.net_connections("tcp"))


def slot_pids(worker: subprocess.Popen) -> list[int]:
    """PIDs of the live slot processes of a worker agent."""
    pids = []
    for child in psutil.Process(worker.pid).children():
        try:
            if "zfalkon.slot" in " ".join(child.cmdline()):
                pids.append(child.pid)
        except (psutil.NoSuchProcess, psutil.ZombieProcess):
            pass  # a slot that just died
    return pids


# -- registration and stopping -----------------------------------------------------------


def test_worker_registers_and_sigterm_stops_it(broker):
    proc = start_worker(broker, "--slots", "2", "--name", "wk-reg", "--tag", "gpu",
                        "--tag", "big")
    kids: list[int] = []
    try:
        w = wait_until(lambda: registered(broker, "wk-reg", 2), 30, message="worker registered")
        assert w["slots"] == 2 and w["tags"] == ["gpu", "big"]
        assert w["version"] == __version__
        assert w["hostname"] and w["cpus"] >= 1 and w["memory"] > 0
        kids = wait_until(lambda: len(slot_pids(proc)) == 2 and slot_pids(proc), 10)
        code, seconds = stop_process(proc, timeout=15)
        assert code == 0
        assert seconds < 5
        wait_until(lambda: "wk-reg" not in workers_named(broker), 5,
                   message="worker dropped from status")
        wait_until(lambda: not any(alive(pid) for pid in kids), 5, message="slots gone")
    finally:
        kids += descendants(proc.pid)
        stop_process(proc)
        kill_tree(kids)


def test_sigint_also_stops_a_worker(broker):
    proc = start_worker(broker, "--slots", "1", "--name", "wk-int")
    try:
        wait_until(lambda: registered(broker, "wk-int", 1), 30)
        os.kill(proc.pid, signal.SIGINT)
        assert proc.wait(10) == 0
        wait_until(lambda: "wk-int" not in workers_named(broker), 5)
    finally:
        stop_process(proc)


def test_sigterm_lets_the_running_task_finish(broker, tmp_path):
    started = tmp_path / "started"
    with worker_process(broker, "--slots", "1", "--name", "wk-drain") as proc:
        wait_until(lambda: registered(broker, "wk-drain", 1), 30)
        with Executor(broker) as ex:
            f = ex.shell(f"echo go > {started}; sleep 1; echo drained")
            wait_until(lambda: workers_named(broker)["wk-drain"]["running"] == 1, 10)
            wait_until(started.exists, 10, message="the slot has started the task")
            code, seconds = stop_process(proc, timeout=15)
            assert code == 0 and seconds < 5
            assert f.result(timeout=10).stdout == "drained\n"


def test_killed_slot_is_replaced(broker):
    with worker_process(broker, "--slots", "1", "--name", "wk-restart") as proc:
        wait_until(lambda: registered(broker, "wk-restart", 1), 30)
        (old,) = wait_until(lambda: slot_pids(proc), 10)
        os.kill(old, signal.SIGKILL)
        new = wait_until(lambda: [p for p in slot_pids(proc) if p != old], 10,
                         message="a new slot process")
        assert new and not alive(old)
        wait_until(lambda: registered(broker, "wk-restart", 1), 10)
        with Executor(broker) as ex:
            assert ex.submit(tasks.add, 20, 1).result(timeout=30) == 21
            # (the wait above may see the old slot's entry: this shows the new one serves;
            # tasks run in a task host, a descendant of the slot)
            host = outer_pid(ex.submit(tasks.whoami).result(timeout=30))
            assert host in descendants(new[0])


def test_worker_without_broker_stops_on_sigterm():
    # A plain TCP listener, not a broker: it accepts the worker's connection and never
    # answers, so the test can see the worker is up and trying to register.
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(30)
        proc = start_worker(f"tcp://127.0.0.1:{listener.getsockname()[1]}", "--slots", "1")
        try:
            conn, _ = listener.accept()  # the worker is connecting (raises on timeout)
            with conn:
                # a bounded window in which nothing may happen (an absence: no state to
                # wait for, only a time to let a wrong exit or slot show)
                time.sleep(0.5)
                assert proc.poll() is None  # still waiting for a broker
                assert not slot_pids(proc)  # no slot starts before registration
                code, seconds = stop_process(proc, timeout=10)
                assert code == 0 and seconds < 5
        finally:
            stop_process(proc)


@pytest.mark.parametrize("address", ["127.0.0.1:7450", "tcp://127.0.0.1:0", "tcp://h:70000"])
def test_worker_with_bad_address_exits_nonzero(address):
    proc = start_worker(address, stderr=subprocess.PIPE)
    try:
        _, err = proc.communicate(timeout=20)
    finally:
        stop_process(proc)
    assert proc.returncode != 0
    assert address in err


def test_agent_refuses_zero_or_negative_slots():
    for slots in (0, -1):
        with pytest.raises(ConfigError, match="at least one slot"):
            WorkerAgent("tcp://127.0.0.1:7450", slots=slots)


# -- a fake broker that refuses ----------------------------------------------------------


def run_worker_against(fake: FakeBroker) -> tuple[int, str, float]:
    start = time.monotonic()
    proc = start_worker(fake.address, "--slots", "1", stderr=subprocess.PIPE)
    try:
        _, err = proc.communicate(timeout=20)
    finally:
        kids = descendants(proc.pid)
        stop_process(proc)
        kill_tree(kids)
    return proc.returncode, err, time.monotonic() - start


def test_worker_refused_with_version_error_exits_nonzero():
    message = (f"protocol version mismatch: peer speaks zfalkon protocol {PROTOCOL_VERSION} "
               f"(package {__version__!r}), this side speaks protocol 99 (package 9.9.9)")
    with FakeBroker(P.Error("version", message)) as fake:
        code, err, seconds = run_worker_against(fake)
        assert len(fake.hellos) == 1
        hello = fake.hellos[0]
        assert hello.role == P.ROLE_WORKER and hello.protocol == PROTOCOL_VERSION
        assert hello.info["slots"] == 1 and isinstance(hello.info["worker_id"], str)
    assert code not in (0, None)
    assert seconds < 10
    assert "refused" in err
    assert "protocol 99" in err and f"protocol {PROTOCOL_VERSION}" in err
    assert "Traceback" not in err


def test_worker_welcomed_with_other_protocol_exits_nonzero():
    with FakeBroker(P.Welcome(PROTOCOL_VERSION + 98, "9.9.9", 0, 2.0)) as fake:
        code, err, seconds = run_worker_against(fake)
    assert code not in (0, None)
    assert seconds < 10
    assert "protocol version mismatch" in err
    assert f"protocol {PROTOCOL_VERSION + 98}" in err and f"protocol {PROTOCOL_VERSION}" in err
    assert "9.9.9" in err
    assert "Traceback" not in err


# -- crash handling ----------------------------------------------------------------------


def test_crashing_task_is_not_rerun_when_broker_sees_the_slot_go_first(broker, tmp_path):
    """A task that kills its slot must fail with WorkerCrashed once it has crashed a slot
    MAX_CRASHES times (docs/protocol.md R18), and never run more often than that.

    (A task that crashes kills only its task host, and the slot answers for it; here the
    task SIGKILLs the slot process itself, as a task running as the same Unix user can.)

    Here the broker notices the dead slot's connection (while dispatching new work to it)
    before the agent's SLOT_LOST arrives: the agent is paused with SIGSTOP for that
    moment, as a busy or slow agent would be.
    """
    log = tmp_path / "runs.txt"
    # (unsandboxed: a task in a sandbox cannot see, let alone kill, its slot)
    with worker_process(broker, "--slots", "1", "--name", "wk-race", "--sandbox",
                        "none") as proc:
        wait_until(lambda: registered(broker, "wk-race", 1), 30)
        with Executor(broker) as ex:
            assert ex.submit(tasks.add, 1, 1).result(timeout=30) == 2  # slot has credit now
            (slot,) = slot_pids(proc)
            ends = broker_ends(broker, slot)
            assert ends and open_at_broker(ends), "the slot's connection, open at the broker"
            leases_before = query_status(broker)["expired_leases"]
            os.kill(proc.pid, signal.SIGSTOP)
            try:
                crash = ex.submit(tasks.kill_slot_logged, str(log))
                wait_until(lambda: not alive(slot), 10, message="slot died")
                # the broker's socket sees the connection close: libzmq has closed its end
                wait_until(lambda: not open_at_broker(ends), 10,
                           message="the broker's end of the dead slot's connection closed")
                after = ex.submit(tasks.add, 2, 2)
                # the broker's send of `after` to the dead slot failed: it marks it stalled
                # (before the slot's lease or the agent's heartbeats could lapse)
                wait_until(lambda: workers_named(broker)["wk-race"]["stalled_slots"] == 1, 5,
                           message="the broker saw the dead slot")
                assert query_status(broker)["expired_leases"] == leases_before
            finally:
                os.kill(proc.pid, signal.SIGCONT)
            with pytest.raises(WorkerCrashed):
                crash.result(timeout=30)
            assert after.result(timeout=30) == 4
    runs = log.read_text().split()
    assert len(runs) == MAX_CRASHES, f"the crashing task ran {len(runs)} times"


# -- small units ---------------------------------------------------------------------------


@pytest.mark.parametrize("code, words", [
    (0, "exited with status 0"),
    (3, "exited with status 3"),
    (255, "exited with status 255"),
    (-signal.SIGSEGV, "killed by SIGSEGV"),
    (-signal.SIGKILL, "killed by SIGKILL"),
    (-signal.SIGTERM, "killed by SIGTERM"),
    (-200, "killed by signal 200"),
])
def test_describe_exit(code, words):
    assert describe_exit(code) == words


def test_state_file(tmp_path):
    path = str(tmp_path / "state")
    StateFile.create(path)
    a, b = StateFile(path), StateFile(path)
    try:
        assert a.get() == 0
        a.set((7 << 40) + 3)
        assert b.get() == (7 << 40) + 3  # shared through the file mapping
        a.set(0)
        assert b.get() == 0
    finally:
        a.close()
        b.close()


def test_a_dead_slot_is_blamed_for_the_task_its_host_ran_if_that_is_the_same_clients(tmp_path):
    """The slot's state file names the oldest task its host has not answered; the host's
    running cell the task it started last (it may have finished tasks whose results it had
    not yet sent). The agent takes the host's word only for a task of the same client."""
    from zfalkon.worker import _SlotProc

    cells = []
    for name in ("state", "running"):
        StateFile.create(str(tmp_path / name))
        cells.append(StateFile(str(tmp_path / name)))
    state, running = cells
    slot = _SlotProc(0, b"s", state, running, None, None)  # type: ignore[arg-type]
    a, b = 5 << P.ID_SHIFT, 6 << P.ID_SHIFT
    try:
        assert WorkerAgent._blame(slot) == 0
        state.set(a | 1)
        assert WorkerAgent._blame(slot) == a | 1  # (no host word)
        running.set(a | 3)
        assert WorkerAgent._blame(slot) == a | 3  # a | 1 and a | 2 had finished
        running.set(b | 3)
        assert WorkerAgent._blame(slot) == a | 1  # a host of A cannot blame B's task
        state.set(0)
        assert WorkerAgent._blame(slot) == 0  # idle: nobody
    finally:
        state.close()
        running.close()


def test_sigterm_drains_the_worker_visibly_and_finishes_its_running_task():
    """SIGTERM: status shows the worker draining; its running task completes (not lost,
    not crashed); then it deregisters and exits 0."""
    import signal as _signal

    from conftest import wait_until, worker_env
    from zfalkon import Executor, LocalCluster

    with LocalCluster(workers=0, env=worker_env()) as cluster:
        proc = cluster.add_worker(slots=1)
        cluster.wait_for_slots(1)
        with Executor(cluster.address) as ex:
            future = ex.submit(tasks.sleep_then, "finished", 2.0)
            wait_until(lambda: cluster.status()["worker_list"][0]["running"] == 1, 20)
            os.kill(proc.pid, _signal.SIGTERM)
            wait_until(lambda: any(w["draining"] for w in cluster.status()["worker_list"]), 5,
                       message="status shows the worker draining")
            assert future.result(timeout=30) == "finished"
            assert proc.wait(30) == 0
            wait_until(lambda: cluster.status()["workers"] == 0, 10, message="deregistered")
