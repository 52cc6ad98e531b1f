"""Poison tasks (issue 14): a task that crashes its slot or its worker agent is run again
at most ``--max-crashes`` times in all (default MAX_CRASHES = 2), then fails with
``WorkerCrashed`` naming it, while the other tasks finish; each task host and shell task
runs in a session of its own, so a task that signals its process group, or its agent's,
cannot take down the provisioner (docs/protocol.md R18).

Real processes: a broker, and ``zfalkon provision local`` (started in a session of its
own, so nothing here can reach the test's process group) launching 1-slot workers. The
poison tasks find their agent by PID ancestry and check that it is a child of that
provisioner before signalling it.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import tasks
from conftest import (
    alive,
    child_env,
    start_broker,
    stop_process,
    wait_until,
    worker_env,
)

from zfalkon import Executor, query_status
from zfalkon.constants import MAX_CRASHES
from zfalkon.errors import WorkerCrashed


def _runs(path) -> int:
    return len(path.read_text().split()) if path.exists() else 0


@pytest.fixture
def provisioned():
    """A broker and ``zfalkon provision local`` keeping 2 to 4 one-slot workers, with no
    sandbox (``$ZFALKON_SANDBOX``): in one, a task can reach neither its slot nor its
    agent (tests/test_isolation.py), so these poisons are for machines without one."""
    broker, address = start_broker()
    prov = subprocess.Popen(
        [sys.executable, "-m", "zfalkon", "--log-level", "WARNING", "provision", "local",
         "--broker", address, "--min", "2", "--max", "4", "--slots-per-instance", "1",
         "--interval", "0.5"],
        env=child_env() | {"ZFALKON_SANDBOX": "none"}, start_new_session=True)
    try:
        wait_until(lambda: query_status(address)["slots"] >= 2, 60, interval=0.2,
                   message="two workers registered")
        yield address, prov
    finally:
        stop_process(prov, timeout=60)
        stop_process(broker)


@pytest.mark.parametrize("poison", ["kill_slot_logged", "kill_agent_logged",
                                    "kill_agent_group_logged"])
def test_a_poison_task_is_quarantined_after_max_crashes_and_the_rest_finish(
        provisioned, tmp_path, poison):
    address, prov = provisioned
    log = tmp_path / "runs.txt"
    args = (str(log),) if poison == "kill_slot_logged" else (str(log), prov.pid)
    with Executor(address) as ex:
        bad = ex.submit(getattr(tasks, poison), *args)
        good = [ex.submit(tasks.sleep_then, i, 0.1) for i in range(20)]
        with pytest.raises(WorkerCrashed) as info:
            bad.result(timeout=120)
        assert [f.result(timeout=120) for f in good] == list(range(20))
        text = str(info.value)
        assert f"task {bad.task_id}" in text and f"{MAX_CRASHES} times" in text, text
        assert "quarantined" in text
        assert _runs(log) == MAX_CRASHES  # (not once more, on any worker)
        assert prov.poll() is None, "the provisioner died"
        # it keeps serving: replacement workers take new work
        wait_until(lambda: query_status(address)["slots"] >= 2, 60, interval=0.2,
                   message="workers replaced")
        assert list(ex.map(tasks.square, range(10), timeout=120)) == [x * x for x in range(10)]
    assert _runs(log) == MAX_CRASHES and alive(prov.pid)


def test_each_task_host_and_shell_task_is_a_session_of_its_own():
    """A task's killpg(0) or kill(0, ...) reaches its own process alone: a host is the
    leader of its session and group, and so is each shell command it spawns (with no
    sandbox: in one, the host is PID 2 of its own PID namespace, whose processes are all
    it can signal)."""
    from zfalkon import LocalCluster

    with LocalCluster(workers=1, env=worker_env() | {"ZFALKON_SANDBOX": "none"}) as cluster, \
            Executor(cluster.address) as ex:
        agent = cluster.worker_procs[0].pid
        pid, group, session = ex.submit(tasks.session_ids).result(timeout=60)
        assert pid == group == session
        out = ex.shell("cut -d' ' -f1,5,6 /proc/$$/stat").result(timeout=60)
        pid, group, session = map(int, out.stdout.split())
        assert pid == group == session
        # the task's own group: it dies alone, its slot answers WorkerCrashed at once
        with pytest.raises(WorkerCrashed):
            ex.submit(tasks.killpg_own_group).result(timeout=60)
        assert alive(agent) and cluster.worker_procs[0].poll() is None
        assert ex.submit(tasks.add, 1, 2).result(timeout=60) == 3
