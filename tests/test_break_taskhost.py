"""Break attempt: task hosts attacked from inside a task.

One worker with one slot; two clients interleave their tasks on it. Client B's "bad"
tasks (``builtins:exec`` of a snippet) kill their own process group, kill the zygote (their
parent), kill the slot (their grandparent) or SIGSTOP the zygote. Every good task of both
clients (a shell task appending a unique line to a file) must complete with returncode 0,
and run once (the bad task may fail however it likes). Timings in /tmp/brk/taskhost.txt.
"""

from __future__ import annotations

import concurrent.futures as cf
import os
import time

import pytest

from conftest import worker_env
from zfalkon import Executor, LocalCluster

BAD = {
    "killpg": "import os,signal; os.killpg(0, signal.SIGKILL)",
    "kill_zygote": "import os,signal; os.kill(os.getppid(), signal.SIGKILL)",
    "kill_slot": ("import os,signal,psutil; "
                  "os.kill(psutil.Process(os.getppid()).ppid(), signal.SIGKILL)"),
    "stop_zygote": "import os,signal; os.kill(os.getppid(), signal.SIGSTOP)",
}
K = 20
BOUND = 45.0


def run(kind: str, tmp_path) -> None:
    marker = str(tmp_path / "marker")
    with LocalCluster(workers=1, slots_per_worker=1, env=worker_env()) as cluster:
        a = Executor(cluster.address, connect_timeout=30)
        b = Executor(cluster.address, connect_timeout=30)
        try:
            good, bad = [], []
            start = time.monotonic()
            for i in range(K):
                good.append(a.shell(f"echo a{i} >> {marker}"))
                if i % 4 == 1:
                    bad.append(b.submit("builtins:exec", BAD[kind]))
                good.append(b.shell(f"echo b{i} >> {marker}"))
            _, not_done = cf.wait(good + bad, BOUND)
            # Then host switches one task at a time, after every bad task ran: the tasks
            # above may have been dispatched client by client, with no switch (no request to
            # the zygote) after the last bad one; each of these switches needs the zygote.
            for i in range(2):
                for ex, name in ((a, "ta"), (b, "tb")):
                    good.append(ex.shell(f"echo {name}{i} >> {marker}"))
                    not_done |= cf.wait(good[-1:], BOUND / 4).not_done
            took = time.monotonic() - start
            lines = open(marker).read().split() if os.path.exists(marker) else []
            dup = len(lines) - len(set(lines))
            outcomes = [type(f.exception()).__name__ if f.done() and f.exception()
                        else ("ok" if f.done() else "pending") for f in bad]
            try:
                status = {k: cluster.status()[k] for k in
                          ("submitted", "done", "failed", "queued", "running", "slots")}
            except Exception as exc:  # noqa: BLE001
                status = repr(exc)
            with open("/tmp/brk/taskhost.txt", "a") as f:
                f.write(f"{kind}: not_done={len(not_done)} took={took:.1f}s "
                        f"lines={len(lines)} distinct={len(set(lines))} dup={dup} "
                        f"bad={outcomes} broker={status}\n")
            assert not not_done, f"{kind}: {len(not_done)} futures pending after {BOUND} s; " \
                                 f"bad outcomes {outcomes}; broker {status}"
            failed = [f.exception() or f.result().returncode for f in good
                      if f.exception() or f.result().returncode]
            assert not failed, f"{kind}: good tasks failed: {failed[:3]}"
            assert sorted(set(lines)) == sorted([f"a{i}" for i in range(K)]
                                                + [f"b{i}" for i in range(K)]
                                                + ["ta0", "tb0", "ta1", "tb1"])
            return dup
        finally:
            a.shutdown(wait=False, cancel_futures=True)
            b.shutdown(wait=False, cancel_futures=True)


@pytest.mark.timeout(150)
@pytest.mark.parametrize("kind", ["killpg", "kill_zygote", "stop_zygote"])
def test_bad_task_does_not_hurt_interleaved_good_tasks(kind, tmp_path):
    dup = run(kind, tmp_path)
    # Only the bad task's own host died (killpg), or none did: a host outlives its zygote,
    # which the slot replaces when it next needs one (at once if it is gone, after a timeout
    # if it is stopped). The slot's session and its other tasks live on: nothing runs twice.
    # (killpg: unless tasks of B before the bad one, in the same host, had results still
    # buffered there, which are run again: rare, when B's tasks were dispatched together.)
    assert dup == 0


@pytest.mark.timeout(150)
@pytest.mark.xfail(strict=False, reason=(  # (not strict: about 1 run in 15 breaks, 1 test in 3)
    "a task of client B that SIGKILLs its slot and returns can get the NEXT task of client B "
    "blamed (WorkerCrashed 'killed by SIGKILL'): when that task was already queued in the "
    "same host, the host starts it (and says so in its running cell) within microseconds, "
    "while the slot's death reaches the zygote, which then kills the hosts, only after the "
    "slot's teardown (a millisecond or so); nothing the host can see without a syscall per "
    "task tells it that the slot is gone. Never another client's task: the agent takes the "
    "host's word only for a task of the client of the slot's oldest unanswered task. (Fixed: "
    "an innocent task that had finished but whose result was still buffered in the host was "
    "blamed, about 1 run in 2.) Repeated up to 6 runs"))
def test_killing_the_slot_blames_only_the_killer(tmp_path):
    for r in range(6):
        d = tmp_path / str(r)
        d.mkdir()
        run("kill_slot", d)
