"""The cost of the task host sandbox (worker ``--sandbox``: user, PID and mount namespaces
per host), each figure beside its no-sandbox baseline from the same run.

* ``switch``: the zygote alone, in this process: give up a host (``kill``, as the slot
  does on a client switch: the zygote answers at once and reaps it later), get a fresh one
  (``fork_host``) and run one no-op task on it, until its result is read: what a client
  switch costs the slot; ``fork``: the kill and fork_host alone. Two cases: ``ready``,
  the zygote had its spare host forked ahead of time (a pause of ``--pause`` s between
  switches, not timed: the usual case, a spare is forked once the slot is quiet for 5 ms); ``back_to_back``, switches with no pause,
  so each host is forked (and, in a sandbox, enters its namespaces) while the slot waits.
  Medians of ``--switches`` rounds per case, the two modes taking turns round by round.
* ``serial``: bench/core.py's serial round trip (submit one no-op, wait; one client, so no
  switch: the steady state) on LocalCluster(workers=1, slots_per_worker=1) with
  ``--sandbox none`` and with ``--sandbox namespaces``, in alternating blocks.

    PYTHONPATH=. python bench/sandbox.py [--switches 300] [--serial 2000] [--blocks 4]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import pathlib
import select
import statistics
import sys
import tempfile
import time

from zfalkon import Executor, LocalCluster, payload

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from core import bench_serial  # noqa: E402  (bench/core.py, imported as bench/report does)

NOOP = payload.python_task("os:getpid", (), {})


def _run_one(host, tid: int) -> None:
    host.send([(tid, NOOP)])
    while not host.receive():
        select.select([host.result_r], [], [], 1.0)


def switch(rounds: int, pause: float) -> dict:
    from zfalkon.taskhost import Zygote

    hidden = tempfile.mkdtemp(prefix="zfalkon-bench-")
    zygotes = {"none": Zygote.start(), "namespaces": Zygote.start()}
    zygotes["namespaces"].use_sandbox({"hide": [hidden]})
    samples: dict[str, list[float]] = {f"{what}_{m}_{case}": [] for m in zygotes
                                       for case in ("ready", "back_to_back")
                                       for what in ("switch", "fork")}
    try:
        hosts = {m: z.fork_host(0) for m, z in zygotes.items()}
        for m in zygotes:
            _run_one(hosts[m], 1)
        tid = 1
        for r in range(rounds):
            for case in ("ready", "back_to_back"):
                for m, z in (zygotes.items() if r % 2 else reversed(zygotes.items())):
                    if case == "ready":
                        time.sleep(pause)  # (the zygote forks its spare once we are quiet)
                    tid += 1
                    t0 = time.perf_counter()
                    z.kill(hosts[m])  # (as the slot does: the zygote reaps it later)
                    hosts[m] = z.fork_host(tid)
                    t1 = time.perf_counter()
                    _run_one(hosts[m], tid)
                    samples[f"switch_{m}_{case}"].append(time.perf_counter() - t0)
                    samples[f"fork_{m}_{case}"].append(t1 - t0)
        for m, z in zygotes.items():
            z.reap(hosts[m])
    finally:
        for z in zygotes.values():
            z.close()
        pathlib.Path(hidden).rmdir()
    return {f"{k.split('_', 1)[0]}_ms_median_{k.split('_', 1)[1]}": statistics.median(v) * 1e3
            for k, v in samples.items()}


def serial(n: int, blocks: int) -> dict:
    out: dict[str, list[float]] = {"none": [], "namespaces": []}
    with contextlib.ExitStack() as stack:
        executors = {}
        for m in out:
            cluster = stack.enter_context(LocalCluster(workers=1, slots_per_worker=1,
                                                       worker_args=["--sandbox", m]))
            executors[m] = stack.enter_context(Executor(cluster.address))
        for b in range(blocks):
            for m in (("none", "namespaces") if b % 2 == 0 else ("namespaces", "none")):
                out[m].append(bench_serial(executors[m], n)["serial_rtt_ms_median"])
    return {f"serial_rtt_ms_median_{m}": statistics.median(v) for m, v in out.items()} | {
        f"serial_rtt_ms_block_medians_{m}": [round(x, 4) for x in v] for m, v in out.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--switches", type=int, default=300)
    ap.add_argument("--serial", type=int, default=2000)
    ap.add_argument("--blocks", type=int, default=4)
    ap.add_argument("--pause", type=float, default=0.1,
                    help="seconds between switches in the ready case (not timed)")
    args = ap.parse_args()
    from zfalkon.taskhost import probe_sandbox

    reason = probe_sandbox()
    if reason is not None:
        sys.exit(f"no sandbox on this machine: {reason}")
    figures = switch(args.switches, args.pause)
    figures.update(serial(args.serial, args.blocks))
    print(json.dumps(figures, indent=2))
    f = figures
    print("\nsandbox cost (median, no sandbox -> namespaces, same run):")
    for case in ("ready", "back_to_back"):
        for what in ("switch", "fork"):
            print(f"  {what}{' (kill + fork_host only)' if what == 'fork' else ''}, "
                  f"spare {case.replace('_', ' ')}: "
                  f"{f[f'{what}_ms_median_none_{case}']:.3f} ms -> "
                  f"{f[f'{what}_ms_median_namespaces_{case}']:.3f} ms")
    print(f"  serial round trip, one client: {f['serial_rtt_ms_median_none']:.3f} ms -> "
          f"{f['serial_rtt_ms_median_namespaces']:.3f} ms")


if __name__ == "__main__":
    main()
