"""The cost of a client switch on one slot (issue 12: each client's tasks run in a task host
of their own, so a slot that goes from one client's task to another's kills a host and forks
a fresh one from its zygote).

On LocalCluster(workers=1, slots_per_worker=1), no-op tasks (``os:getpid``, which also says
which host ran each task: every switch forks a new one, so distinct PIDs - 1 = switches):

* ``serial``: median round trip of one task at a time, one client, vs two clients taking
  turns task by task (every task a switch);
* ``burst``: N tasks submitted at once by one client, vs by two clients alternating
  submissions; tasks/s, switches counted from the PIDs, and
  (t_two - t_one) / switches as the cost of one switch;
* ``mechanism``: the zygote alone, in this process: reap a host and fork a fresh one.

    PYTHONPATH=. python bench/switch.py [--tasks 20000] [--serial 300]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time


def serial(ex_a, ex_b, n: int) -> tuple[float, float]:
    one, two = [], []
    for i in range(n):
        t0 = time.perf_counter()
        ex_a.submit("os:getpid").result()
        one.append(time.perf_counter() - t0)
    for i in range(n):
        t0 = time.perf_counter()
        (ex_a if i % 2 else ex_b).submit("os:getpid").result()
        two.append(time.perf_counter() - t0)
    return statistics.median(one) * 1e3, statistics.median(two) * 1e3


def burst(ex_a, ex_b, n: int) -> dict:
    t0 = time.perf_counter()
    fs = [ex_a.submit("os:getpid") for _ in range(n)]
    pids_one = {f.result() for f in fs}
    t_one = time.perf_counter() - t0
    t0 = time.perf_counter()
    fs = [(ex_a if i % 2 else ex_b).submit("os:getpid") for i in range(n)]
    pids_two = {f.result() for f in fs}
    t_two = time.perf_counter() - t0
    switches = len(pids_two) - 1
    return {"one_client_tasks_per_s": n / t_one, "two_clients_tasks_per_s": n / t_two,
            "hosts_one_client": len(pids_one), "switches": switches,
            "ms_per_switch": (t_two - t_one) / switches * 1e3 if switches else None}


def mechanism(rounds: int) -> float:
    from zfalkon.taskhost import Zygote

    zygote = Zygote.start()
    try:
        host = zygote.fork_host(1)
        t0 = time.perf_counter()
        for key in range(rounds):
            zygote.reap(host)
            host = zygote.fork_host(key)
        elapsed = time.perf_counter() - t0
        zygote.reap(host)
    finally:
        zygote.close()
    return elapsed / rounds * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tasks", type=int, default=20000)
    ap.add_argument("--serial", type=int, default=300)
    args = ap.parse_args()
    from zfalkon import Executor, LocalCluster

    out: dict = {"mechanism_ms_per_switch": mechanism(200)}
    with LocalCluster(workers=1, slots_per_worker=1) as cluster, \
            Executor(cluster.address) as ex_a, Executor(cluster.address) as ex_b:
        list(ex_a.map(abs, range(5000)))  # warm up
        one, two = serial(ex_a, ex_b, args.serial)
        out["serial_ms_one_client"] = one
        out["serial_ms_alternating_clients"] = two
        out.update(burst(ex_a, ex_b, args.tasks))
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
