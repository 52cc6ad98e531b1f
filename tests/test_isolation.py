"""Isolation between clients (issue 12): real slots, task hosts and processes on loopback.

* a slot's command line shows nothing of its config (routing id, worker id);
* a client that patches the process its task runs in (``builtins:exec``) cannot read or
  forge another client's tasks on the same slot: each client's tasks run in a task host of
  their own (:mod:`zfalkon.taskhost`);
* a task that kills its host fails with WorkerCrashed; the slot lives on and runs the next.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time

import psutil
import pytest
import zmq

import tasks
from conftest import (alive, child_env, descendants, kill_tree, outer_pid, start_worker,
                      stop_process, wait_until, worker_env)
from zfalkon import Executor, LocalCluster, WorkerCrashed
from zfalkon import payload
from zfalkon import protocol as P
from zfalkon._version import __version__
from zfalkon.constants import PROTOCOL_VERSION
from zfalkon.taskhost import _ASK_SECONDS, Zygote


@pytest.fixture(scope="module")
def one_slot():
    """A cluster of one worker with one slot: every task of every client runs there."""
    with LocalCluster(workers=1, slots_per_worker=1, env=worker_env()) as cluster:
        yield cluster


def slot_pid(cluster: LocalCluster) -> int:
    (worker,) = cluster.worker_procs
    (slot,) = [c.pid for c in psutil.Process(worker.pid).children()
               if "zfalkon.slot" in " ".join(c.cmdline())]
    return slot


# -- nothing on argv -----------------------------------------------------------------------


def test_slot_command_line_shows_no_routing_id_or_worker_id():
    """A slot started by a real agent against a scripted broker: its HELLO names its routing
    id and worker id, /proc/PID/cmdline shows neither, and it runs a task it is sent."""
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    router.bind("tcp://127.0.0.1:*")
    address = router.getsockopt_string(zmq.LAST_ENDPOINT)
    welcome = P.encode(P.Welcome(PROTOCOL_VERSION, __version__, 0, 2.0))
    worker = start_worker(address, "--slots", "1")
    kids: list[int] = []
    try:
        deadline = time.monotonic() + 30
        slot_ident = worker_id = None
        results: list = []
        sent = False
        while time.monotonic() < deadline and not results:
            if not router.poll(100):
                continue
            ident, frame = router.recv_multipart()
            msg = P.decode(frame)
            if isinstance(msg, P.Hello):
                router.send_multipart([ident, welcome])
                if msg.role == P.ROLE_SLOT:
                    slot_ident, worker_id = ident, msg.info["worker_id"]
            if slot_ident is not None and ident == slot_ident and not sent:
                blob = payload.python_task("tasks:add", (20, 22), {})
                router.send_multipart([ident, P.encode(P.Tasks(1, 0, [7], [blob]))])
                sent = True
            if isinstance(msg, P.Results) and msg.ids:
                results = list(zip(msg.ids, msg.blobs))
        assert results, "the slot returned no result"
        assert [(tid, payload.result_value(blob)) for tid, blob in results] == [(7, 42)]
        assert slot_ident is not None and isinstance(worker_id, str)
        kids = descendants(worker.pid)
        slots = [pid for pid in kids if "zfalkon.slot" in " ".join(psutil.Process(pid).cmdline())]
        assert slots  # the slot, its zygote, the task host
        for pid in slots:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read()
            assert cmdline.split(b"\0")[1:] == [b"-m", b"zfalkon.slot", b""], cmdline
            for secret in (slot_ident.hex(), worker_id, address):
                assert secret.encode() not in cmdline.lower()
            assert slot_ident not in cmdline
    finally:
        kids += descendants(worker.pid)
        stop_process(worker)
        kill_tree(kids)
        router.close(0)
        ctx.term()


# -- one client cannot tamper with another's tasks --------------------------------------------

# Runs in the process that runs the task (exec's globals: {}). It makes every later task in
# that process copy its task blob into SPY and return "forged" instead of its value.
ATTACK = """
import zfalkon.execute
import zfalkon.values

spy = open(SPY, "ab", buffering=0)
real_unpackb = zfalkon.execute._unpackb
real_pack = zfalkon.values.pack

def unpackb(blob, *args, **kwargs):
    spy.write(bytes(blob) + b"\\n")
    return real_unpackb(blob, *args, **kwargs)

def forge(obj, *args, **kwargs):
    if isinstance(obj, list) and obj and obj[0] == 0:  # RESULT_VALUE
        obj = [obj[0], "forged"]
    return real_pack(obj, *args, **kwargs)

zfalkon.execute._unpackb = unpackb
zfalkon.values.pack = forge
"""


def test_a_client_that_patches_its_process_cannot_see_or_forge_another_clients_tasks(
        one_slot, tmp_path):
    spy = tmp_path / "spy"
    secret = "b-secret-5e1f0c"
    with Executor(one_slot.address) as a, Executor(one_slot.address) as b:
        # (exec's own result, None, is already forged on its way out)
        assert a.submit("builtins:exec", ATTACK.replace("SPY", repr(str(spy))),
                        {}).result(timeout=30) == "forged"
        # The attack works where it runs: A's own next task, in the same process, is
        # copied and forged (the process it patched is the one A's tasks keep using).
        assert a.submit(tasks.identity, "a-own").result(timeout=30) == "forged"
        assert b"a-own" in spy.read_bytes()
        # B's tasks on the same single slot: right values, and nothing of them reaches A.
        assert b.submit(tasks.identity, secret).result(timeout=30) == secret
        assert list(b.map(tasks.add, range(50), range(50))) == [2 * i for i in range(50)]
        assert b.shell(["echo", secret]).result(timeout=30).stdout == secret + "\n"
        # Interleaved task by task, A (in a fresh process: its patch is gone) and B.
        fa = [a.submit(tasks.identity, f"a{i}") for i in range(20)]
        fb = [b.submit(tasks.identity, f"{secret}-{i}") for i in range(20)]
        assert [f.result(timeout=30) for f in fa] == [f"a{i}" for i in range(20)]
        assert [f.result(timeout=30) for f in fb] == [f"{secret}-{i}" for i in range(20)]
    assert secret.encode() not in spy.read_bytes()


def test_each_client_gets_a_fresh_host_and_consecutive_tasks_share_it(one_slot):
    slot = slot_pid(one_slot)
    with Executor(one_slot.address) as a, Executor(one_slot.address) as b:
        # (PIDs here: a host in a sandbox is PID 2 of a PID namespace of its own)
        a1 = outer_pid(a.submit(tasks.whoami).result(timeout=30))
        assert outer_pid(a.submit(tasks.whoami).result(timeout=30)) == a1  # same host
        b1 = outer_pid(b.submit(tasks.whoami).result(timeout=30))
        assert b1 != a1 and b1 != slot and a1
        assert not alive(a1)  # A's host was killed before B's tasks ran
        a2 = outer_pid(a.submit(tasks.whoami).result(timeout=30))
        assert a2 not in (a1, b1, slot) and not alive(b1)
        for pid in (a2,):
            assert pid in descendants(slot)


# -- a task that kills its host ----------------------------------------------------------------


@pytest.mark.parametrize("fn, args, words", [
    (tasks.hard_exit, (9,), "exited with status 9"),
    ("os:_exit", (4,), "exited with status 4"),
    (tasks.segfault, (), "killed by SIGSEGV"),
    ("tasks:kill_self", (), "killed by SIGKILL"),
])
def test_a_task_that_kills_its_host_fails_alone_and_the_slot_lives_on(one_slot, fn, args,
                                                                       words):
    slot = slot_pid(one_slot)
    with Executor(one_slot.address) as ex:
        before = [ex.submit(tasks.add, i, 1) for i in range(100)]
        crash = ex.submit(fn, *args)
        after = [ex.submit(tasks.add, i, 2) for i in range(100)]
        with pytest.raises(WorkerCrashed) as info:
            crash.result(timeout=30)
        assert words in info.value.remote_message
        assert [f.result(timeout=30) for f in before] == [i + 1 for i in range(100)]
        assert [f.result(timeout=30) for f in after] == [i + 2 for i in range(100)]
        assert outer_pid(ex.submit(tasks.whoami).result(timeout=30)) in descendants(slot)
    assert slot_pid(one_slot) == slot  # the same slot process served throughout
    assert one_slot.status()["slots"] == 1


def test_shell_tasks_run_under_the_clients_host(one_slot):
    with Executor(one_slot.address) as ex:
        host = ex.submit(tasks.whoami).result(timeout=30)[0]  # (its own namespace's PID)
        out = ex.shell("echo $PPID; grep SigIgn /proc/self/status").result(timeout=30).stdout
        ppid, ignored = out.split("\n")[:2]
        assert int(ppid) == host  # /bin/sh's parent: the host that spawned it
        assert not int(ignored.split()[1], 16) & (1 << (2 - 1))  # SIGINT not ignored


def test_sigterm_lets_a_host_finish_its_task_and_stops_every_process(tmp_path):
    started = tmp_path / "started"
    with LocalCluster(workers=1, slots_per_worker=1, env=worker_env()) as cluster:
        (worker,) = cluster.worker_procs
        with Executor(cluster.address) as ex:
            f = ex.shell(f"echo go > {started}; sleep 1; echo done")
            wait_until(started.exists, 20, message="the task started")
            kids = descendants(worker.pid)
            assert len(kids) >= 4  # slot, zygote, host, sh (and sleep)
            code, seconds = stop_process(worker, timeout=15)
            assert code == 0 and seconds < 5
            assert f.result(timeout=10).stdout == "done\n"
        deadline = time.monotonic() + 5
        while any(alive(pid) for pid in kids) and time.monotonic() < deadline:
            time.sleep(0.02)  # (poll interval: the condition is every process gone)
        left = [pid for pid in kids if alive(pid)]
        kill_tree(left)
        assert not left



# -- the sandbox (worker --sandbox) ----------------------------------------------------------------

#: What a task sees of the processes around it, and what its signals to them do.
LOOK_AROUND = """
import ctypes, os, signal
refused = ctypes.CDLL(None).umount2(STATE_DIR.encode(), 2)  # (MNT_DETACH)
seen = sorted(int(p) for p in os.listdir('/proc') if p.isdigit())
for pid in (os.getppid(), 1):
    os.kill(pid, signal.SIGSTOP)  # (the namespace's init: ignored)
    os.kill(pid, signal.SIGKILL)
result = (os.getpid(), os.getppid(), seen, refused, os.listdir(STATE_DIR))
"""


def test_a_task_in_a_sandbox_sees_only_its_own_processes_and_no_state_file():
    """In a sandbox a task's host is PID 2 of a PID namespace of its own (PID 1: an init it
    cannot signal); /proc lists those alone (and its children); the agent's directory of
    state files is empty; the slot serves on, in the same host for the same client."""
    from zfalkon.taskhost import probe_sandbox

    reason = probe_sandbox()
    if reason is not None:  # (e.g. Ubuntu's AppArmor refusing unprivileged user namespaces)
        pytest.skip(f"this kernel refuses the task host sandbox's namespaces: {reason}")
    with LocalCluster(workers=1, slots_per_worker=1, env=worker_env(),
                      worker_args=["--sandbox", "namespaces"]) as cluster:
        slot = slot_pid(cluster)
        with open(f"/proc/{slot}/maps") as f:
            (state,) = {line.split()[5] for line in f
                        if "zfalkon-worker-" in line and line.split()[5].endswith("slot-0")}
        state_dir = os.path.dirname(state)
        assert "slot-0" in os.listdir(state_dir)
        with Executor(cluster.address) as ex:
            host = ex.submit(tasks.whoami).result(timeout=30)
            look = LOOK_AROUND.replace("STATE_DIR", repr(state_dir))
            code = f"(lambda ns: (exec({look!r}, ns), ns['result'])[1])({{}})"
            pid, ppid, seen, refused, state_files = ex.submit("builtins:eval", code).result(
                timeout=30)
            assert (pid, ppid) == (2, 1) and seen == [1, 2]
            assert refused == -1 and state_files == []  # (a tmpfs it cannot unmount)
            assert ex.submit(tasks.whoami).result(timeout=30) == host  # the same host
            assert outer_pid(host) in descendants(slot)
        assert slot_pid(cluster) == slot


# -- a task that kills or stops its zygote -------------------------------------------------------


def _run(host, tid: int, a: int) -> int:
    host.send([(tid, payload.python_task("operator:add", (a, 1), {}))])
    for _ in range(500):  # (the result pipe is non-blocking: wait until it is readable)
        select.select([host.result_r], [], [], 0.02)
        answered = host.receive()
        if answered.ids:
            break
    assert (answered.ids, answered.failed) == ([tid], [False]) and host.running() == tid
    return payload.result_value(answered.results[0])


def test_a_lost_zygote_is_replaced_and_the_host_it_forked_lives_on():
    """A zygote killed (SIGKILL) or stopped (SIGSTOP) under the slot: the host it forked goes
    on running its tasks; the next request finds the zygote gone (or times out on it),
    kills it by PID, starts a fresh one (by exec) and kills the old host itself."""
    zygote = Zygote.start()
    try:
        host = zygote.fork_host(1)
        assert _run(host, 11, 1) == 2
        first = zygote.pid
        os.kill(first, signal.SIGKILL)
        assert _run(host, 12, 2) == 3  # (hosts do not die with their zygote)
        zygote.kill(host)
        assert zygote.pid != first and zygote.replaced == 1
        wait_until(lambda: not alive(host.pid), 5, message="the old host killed")
        host = zygote.fork_host(2)
        assert _run(host, 13, 3) == 4
        second = zygote.pid
        os.kill(second, signal.SIGSTOP)
        assert _run(host, 14, 4) == 5
        started = time.monotonic()
        zygote.kill(host)
        assert _ASK_SECONDS <= time.monotonic() - started < _ASK_SECONDS + 5
        assert zygote.pid not in (first, second) and zygote.replaced == 2
        assert not alive(second)
        wait_until(lambda: not alive(host.pid), 5, message="the old host killed")
        host = zygote.fork_host(3)
        assert _run(host, 15, 5) == 6
        # (the zygote killed it, or it saw its task pipe end first)
        assert zygote.reap(host) in (0, -signal.SIGKILL)
        assert zygote.replaced == 2
    finally:
        zygote.close()



SLOT = """
import os, sys, time
from zfalkon import payload
from zfalkon.taskhost import Zygote
zygote = Zygote.start()
host = zygote.fork_host(1)
host.send([(1, payload.python_task("time:sleep", (float(sys.argv[2]),), {}))])
deadline = time.monotonic() + 20
while host.running() != 1 and time.monotonic() < deadline:  # (the host's own word)
    time.sleep(0.01)  # (poll interval)
print(zygote.pid, host.pid, host.running(), flush=True)
if sys.argv[1] == "zygote-first":
    os.kill(zygote.pid, 9)
time.sleep(60)  # (the slot idles until the test kills it)
"""


@pytest.mark.parametrize("how, task_seconds", [("slot", 60), ("zygote-first", 1)])
def test_hosts_die_with_their_slot(how, task_seconds):
    """Hosts have no parent-death signal of their own (they outlive a zygote a task
    killed): when the slot dies, its zygote kills them; if the zygote was gone already,
    the slot's death ends the host's task pipe, and the host ends after its task."""
    slot = subprocess.Popen([sys.executable, "-c", SLOT, how, str(task_seconds)],
                            stdout=subprocess.PIPE, text=True, env=child_env())
    host = 0
    try:
        assert slot.stdout is not None
        zygote, host, running = map(int, slot.stdout.readline().split())
        assert running == 1, "the host did not start its task"
        assert alive(host)
        slot.kill()
        slot.wait()
        wait_until(lambda: not alive(host) and not alive(zygote), 5,
                   message="the host and the zygote gone after the slot")
    finally:
        slot.kill()
        slot.wait()
        if host:
            kill_tree([host])
