"""Network chaos: random link stalls and resets during a long run, optionally with a journal
and broker ``kill -9``s; count tasks lost and results delivered twice.

A broker on 127.0.0.1, ``--workers`` worker processes of ``--slots`` slots, each behind its
own in-process :class:`~zfalkon.linkproxy.LinkProxy` (``--rtt-ms`` round trip), and the
client behind one more. While ``--tasks`` no-op tasks go through ``Executor.map`` (and,
spread over the same run, ``--futures`` more through ``Executor.submit``), a fault hits
one random link (a worker's or the client's) every ``--fault-every`` seconds on average
(exponential gaps), one fault at a time:

- ``reset``: every connection of that link closed with RST (zmq reconnects at once);
- ``short freeze``: no byte moves for ``--short-freeze`` seconds (under the heartbeat
  timeout: a pause);
- ``long freeze``: the same for ``--long-freeze`` seconds (past it: the peer looks dead).

``--journal`` runs the broker with ``--journal DIR --fsync FSYNC`` (a fresh directory per
run). ``--broker-kill-every S`` (needs ``--journal``) also ``kill -9``s the broker every
S seconds on average (exponential gaps, independent of the link faults) and restarts it at
once on the same port and journal (``LocalCluster.restart_broker``).

The task is ``netchaos:tally`` (this module, on the workers' ``PYTHONPATH``): ``abs(x)``
after appending ``x`` to a per-process file, so every execution is counted, including
those whose result the broker dropped (execution is at-least-once: a task taken back from
a silent worker, or running when the broker died, runs again).

Reports (JSON, written to ``--out``, by default ``bench/out/netchaos.json``,
``netchaos-journal.json`` or ``netchaos-kills.json`` by configuration):

- ``tasks_lost``: results missing, wrong or not back within ``--timeout`` (must be 0);
- ``delivered_twice``: a result the user got twice: a ``map`` value seen again, or a
  future completed twice (must be 0);
- information: ``executions`` (tasks run more than once, extra runs), the broker's
  counters summed over its lifetimes (read just before each kill: results it accepted
  beyond one per task, expired leases, steals, duplicate submits it ignored), faults by
  kind and link, broker kills and how long each restart took, tasks/s, and tasks/s of the
  same configuration without faults (a calm run first, in the same invocation).

Exit status 1 if anything was lost or delivered twice, in either run. Every loop is bounded
by ``--timeout``; workers and brokers are stopped by PID, also on SIGTERM.

    python bench/netchaos.py [--tasks 2000000] [--workers 4] [--fault-every 3] [--seed 1]
        [--journal [--fsync interval] [--broker-kill-every 15]] [--out FILE]
"""

from __future__ import annotations

import argparse
import array
import collections
import concurrent.futures as cf
import contextlib
import json
import logging
import os
import pathlib
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from typing import Iterator

from zfalkon import Executor, LocalCluster, ZfalkonError
from zfalkon.client import query_status
from zfalkon.linkproxy import LinkProxy

HERE = pathlib.Path(__file__).resolve().parent
TALLY_ENV = "ZFALKON_NETCHAOS_TALLY"
TASK = "netchaos:tally"
# Broker counters summed over its lifetimes (each restart starts them again).
COUNTERS = ("submitted", "done", "failed", "duplicate_submits", "expired_leases", "stolen")

_tally_fd: int | None = None


def tally(x: int) -> int:
    """The task (runs on the workers): record this execution of ``x``, return ``abs(x)``.

    One 8-byte record per execution, appended to a file per slot process (an O_APPEND
    write of 8 bytes is atomic and is on disk for the reader once ``write`` returns)."""
    global _tally_fd
    if _tally_fd is None:
        _tally_fd = os.open(os.path.join(os.environ[TALLY_ENV], str(os.getpid())),
                            os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.write(_tally_fd, x.to_bytes(8, "little", signed=True))
    return abs(x)


def count_executions(directory: str, n: int, m: int) -> dict:
    """Read the tally files: map inputs are ``-n+1..0``, futures' ``1..m``."""
    counts = bytearray(n + m + 1)  # index n-1+x: x=-n+1 -> 0 ... x=m -> n+m-1 (saturating)
    total = strays = 0
    for name in os.listdir(directory):
        raw = pathlib.Path(directory, name).read_bytes()
        values = array.array("q")
        values.frombytes(raw[:len(raw) // 8 * 8])
        if sys.byteorder != "little":
            values.byteswap()
        total += len(values)
        for x in values:
            i = n - 1 + x
            if 0 <= i < n + m:
                if counts[i] < 255:
                    counts[i] += 1
            else:
                strays += 1
    distinct = sum(1 for c in counts[:n + m] if c)
    return {"total": total, "tasks_run_more_than_once": sum(1 for c in counts[:n + m] if c > 1),
            "extra_runs": total - strays - distinct, "never_run": n + m - distinct,
            "unknown_inputs": strays}


@contextlib.contextmanager
def proxied_worker(broker: str, slots: int, rtt_ms: float,
                   env: dict[str, str]) -> Iterator[LinkProxy]:
    """A worker process behind its own link proxy; stopped by PID afterwards."""
    with LinkProxy(broker, delay_ms=rtt_ms / 2) as proxy:
        proc = subprocess.Popen([sys.executable, "-m", "zfalkon", "--log-level", "ERROR",
                                 "worker", "--broker", proxy.address, "--slots", str(slots)],
                                env=env)
        try:
            yield proxy
        finally:
            proxy.thaw()  # a frozen link would only slow the drain down
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


class Chaos:
    """One fault at a time on a random link, until stopped (or ``deadline``); counts what
    it did."""

    def __init__(self, links: dict[str, list[LinkProxy]], every: float, short: float,
                 long: float, seed: int, deadline: float) -> None:
        self.links = [(kind, link) for kind, group in links.items() for link in group]
        self.every = every
        self.holds = {"reset": 0.0, "short freeze": short, "long freeze": long}
        self.rng = random.Random(seed)
        self.deadline = deadline
        self.faults: collections.Counter[str] = collections.Counter()
        self.by_link: collections.Counter[str] = collections.Counter()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while (not self._stop.wait(self.rng.expovariate(1.0 / self.every))
               and time.monotonic() < self.deadline):
            which, link = self.rng.choice(self.links)
            kind = self.rng.choice(list(self.holds))
            if kind == "reset":
                if not link.reset():
                    continue  # nothing open on that link right now
            else:
                link.freeze()
                self._stop.wait(self.holds[kind])  # the fault's duration
                link.thaw()
            self.faults[kind] += 1
            self.by_link[which] += 1

    def __enter__(self) -> "Chaos":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(60)
        for _, link in self.links:
            link.thaw()


class BrokerKiller:
    """``kill -9`` the broker every ``every`` seconds on average (exponential gaps) and
    restart it on the same port and journal, until stopped (or ``deadline``). Reads the
    broker's counters just before each kill (they start again with each broker)."""

    def __init__(self, cluster: LocalCluster, every: float, seed: int,
                 deadline: float) -> None:
        self.cluster = cluster
        self.every = every
        self.rng = random.Random(seed + 1_000_003)  # its own stream: link faults unchanged
        self.deadline = deadline
        self.kills = 0
        self.restart_seconds: list[float] = []
        self.lifetimes: list[dict | None] = []  # each killed broker's last status
        self.error: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while (not self._stop.wait(self.rng.expovariate(1.0 / self.every))
               and time.monotonic() < self.deadline):
            try:
                self.lifetimes.append(query_status(self.cluster.address, timeout=5.0))
            except Exception:  # noqa: BLE001 (a broker too busy to answer: counters unknown)
                self.lifetimes.append(None)
            start = time.perf_counter()
            try:
                self.cluster.restart_broker(kill=True)
            except Exception as exc:  # noqa: BLE001 (recorded; the run then times out)
                self.error = f"broker restart failed: {type(exc).__name__}: {exc}"
                return
            self.restart_seconds.append(time.perf_counter() - start)
            self.kills += 1

    def __enter__(self) -> "BrokerKiller":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(120)


def run(args: argparse.Namespace, faults: bool) -> dict:
    n, m = args.tasks, args.futures
    with tempfile.TemporaryDirectory(prefix="zfalkon-netchaos-") as tmp:
        tally_dir = os.path.join(tmp, "tally")
        os.mkdir(tally_dir)
        path = os.environ.get("PYTHONPATH", "")
        env = {**os.environ, TALLY_ENV: tally_dir,
               "PYTHONPATH": path + os.pathsep + str(HERE) if path else str(HERE)}
        broker_args = (["--journal", os.path.join(tmp, "journal"), "--fsync", args.fsync]
                       if args.journal else [])
        figures = measure(args, faults, env, broker_args)
        figures["executions"] = count_executions(tally_dir, n, m)  # workers have stopped
    return figures


def measure(args: argparse.Namespace, faults: bool, env: dict[str, str],
            broker_args: list[str]) -> dict:
    n, m = args.tasks, args.futures
    kill_every = args.broker_kill_every if faults else 0.0
    with LocalCluster(workers=0, broker_args=broker_args) as cluster, \
            contextlib.ExitStack() as stack:
        workers = [stack.enter_context(proxied_worker(cluster.address, args.slots,
                                                      args.rtt_ms, env))
                   for _ in range(args.workers)]
        cluster.wait_for_slots(args.workers * args.slots, timeout=60)
        client = stack.enter_context(LinkProxy(cluster.address, delay_ms=args.rtt_ms / 2))
        deadline = time.monotonic() + args.timeout
        chaos = Chaos({"worker": workers, "client": [client]}, args.fault_every,
                      args.short_freeze, args.long_freeze, args.seed, deadline)
        killer = BrokerKiller(cluster, kill_every, args.seed, deadline) if kill_every else None
        ex = Executor(client.address, connect_timeout=30)
        seen = bytearray(n)  # map: abs values 0..n-1, each expected once
        fseen = bytearray(m + 1)  # futures: values 1..m
        fired: collections.Counter[int] = collections.Counter()  # done callbacks per input
        twice = wrong = misordered = 0
        errors: collections.Counter[str] = collections.Counter()
        first_error = None
        every = n // m if m else 0
        futures: collections.deque[tuple[int, cf.Future]] = collections.deque()

        def error(exc: BaseException) -> None:
            nonlocal first_error
            errors[type(exc).__name__] += 1
            first_error = first_error or f"{type(exc).__name__}: {exc}"

        def check_future(x: int, fut: cf.Future, timeout: float) -> None:
            nonlocal twice, wrong
            try:
                got = fut.result(timeout=max(0.0, timeout))
            except (cf.TimeoutError, cf.CancelledError, ZfalkonError) as exc:
                error(exc)
                return
            if got != x:
                wrong += 1
            elif fseen[x]:
                twice += 1
            else:
                fseen[x] = 1

        start = time.perf_counter()
        try:
            with (chaos if faults else contextlib.nullcontext()), \
                    (killer if killer else contextlib.nullcontext()):
                submitted = 0
                try:
                    for i, got in enumerate(ex.map(TASK, range(-n + 1, 1),
                                                   timeout=args.timeout)):
                        if not (isinstance(got, int) and 0 <= got < n):
                            wrong += 1
                        elif seen[got]:
                            twice += 1
                        else:
                            seen[got] = 1
                            misordered += got != n - 1 - i
                        if every and i % every == 0 and submitted < m:
                            submitted += 1
                            fut = ex.submit(TASK, submitted)
                            fut.add_done_callback(lambda f, x=submitted: fired.update([x]))
                            futures.append((submitted, fut))
                        while futures and futures[0][1].done():
                            check_future(*futures.popleft(), 0)
                except (cf.TimeoutError, ZfalkonError) as exc:  # e.g. WorkerLost
                    error(exc)
                while futures:  # the rest of the futures, within the same deadline
                    check_future(*futures.popleft(), deadline - time.monotonic())
            wall = time.perf_counter() - start
        finally:
            lost = (n - sum(seen)) + (m - sum(fseen))
            ex.shutdown(wait=not lost, cancel_futures=True, timeout=30)
        time.sleep(0.5)  # fired callbacks, late results: let them land before counting
        twice += sum(1 for c in fired.values() if c > 1)
        try:
            final: dict | None = cluster.status()
        except ZfalkonError:  # e.g. the last restart failed: counters unknown
            final = None
    lifetimes = (killer.lifetimes if killer else []) + [final]
    broker = {c: sum(s.get(c, 0) for s in lifetimes if s) for c in COUNTERS}
    return {
        "tasks": n + m, "map_tasks": n, "future_tasks": m,
        "tasks_lost": lost, "delivered_twice": twice, "wrong_results": wrong,
        "misordered_map_results": misordered,
        "errors": dict(errors), "error": first_error,
        "broker": {**broker, "results_accepted_beyond_tasks": max(0, broker["done"] - n - m),
                   "lifetimes": len(lifetimes),
                   "lifetimes_without_counters": sum(1 for s in lifetimes if not s)},
        "faults": dict(chaos.faults) if faults else {},
        "faults_by_link": dict(chaos.by_link) if faults else {},
        "broker_kills": killer.kills if killer else 0,
        "broker_restart_seconds": ([round(s, 3) for s in killer.restart_seconds]
                                   if killer else []),
        "broker_kill_error": killer.error if killer else None,
        "wall_seconds": round(wall, 3), "tasks_per_second": round((n + m) / wall, 1)}


def configuration(args: argparse.Namespace) -> str:
    parts = ["link faults"]
    if args.journal:
        parts.append(f"journal (fsync {args.fsync})")
    if args.broker_kill_every:
        parts.append(f"broker kill -9 every ~{args.broker_kill_every:g} s")
    return " + ".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=2_000_000, help="tasks through map")
    parser.add_argument("--futures", type=int, default=None,
                        help="more tasks through submit, spread over the run "
                             "(default: tasks / 20)")
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--slots", type=int, default=1)
    parser.add_argument("--rtt-ms", type=float, default=0.0)
    parser.add_argument("--fault-every", type=float, default=3.0,
                        help="mean seconds between link faults (exponential gaps)")
    parser.add_argument("--short-freeze", type=float, default=2.0)
    parser.add_argument("--long-freeze", type=float, default=10.0)
    parser.add_argument("--journal", action="store_true",
                        help="run the broker with --journal (a fresh directory per run)")
    parser.add_argument("--fsync", default="interval", choices=["always", "interval", "never"],
                        help="the journal's fsync policy")
    parser.add_argument("--broker-kill-every", type=float, default=0.0, metavar="S",
                        help="mean seconds between broker kill -9s (exponential gaps; each "
                             "restarted on the same port and journal); needs --journal")
    parser.add_argument("--timeout", type=float, default=600.0,
                        help="seconds a run may take before what is missing is lost")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", type=pathlib.Path, default=None,
                        help="JSON file (default: bench/out/netchaos[-journal|-kills].json)")
    args = parser.parse_args()
    if args.futures is None:
        args.futures = args.tasks // 20
    if args.tasks < 1 or not 0 <= args.futures <= args.tasks:
        parser.error("--tasks must be >= 1 and --futures between 0 and --tasks")
    if args.broker_kill_every < 0 or (args.broker_kill_every and not args.journal):
        parser.error("--broker-kill-every needs --journal (without one a restarted broker "
                     "knows nothing of the tasks) and a positive mean")
    # SIGTERM (e.g. tox or CI giving up): unwind, so the workers and broker are stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    # Expected while a killed broker restarts: say nothing of each refused connection.
    logging.getLogger("zfalkon.linkproxy").setLevel(logging.ERROR)
    calm = run(args, faults=False)
    chaotic = run(args, faults=True)
    figures = {"configuration": configuration(args),
               "command": " ".join(["python bench/netchaos.py", *sys.argv[1:]]), **chaotic,
               "workers": args.workers, "slots": args.slots, "rtt_ms": args.rtt_ms,
               "fault_every_seconds": args.fault_every,
               "short_freeze_seconds": args.short_freeze,
               "long_freeze_seconds": args.long_freeze,
               "journal": args.journal, "fsync": args.fsync if args.journal else None,
               "broker_kill_every_seconds": args.broker_kill_every or None,
               "seed": args.seed,
               "tasks_per_second_without_faults": calm["tasks_per_second"],
               "calm_run": calm}
    out = args.out or HERE / "out" / ("netchaos-kills.json" if args.broker_kill_every else
                                      "netchaos-journal.json" if args.journal else
                                      "netchaos.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(figures, indent=2) + "\n")
    print(json.dumps(figures, indent=2))
    bad = any(r["tasks_lost"] or r["delivered_twice"] for r in (calm, chaotic))
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
