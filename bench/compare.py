"""This checkout against another one (a baseline), in the same sitting: has a change made
zfalkon slower?

Each round runs one measuring child per checkout, alternating (so drift in the machine's
load hits both alike); each child imports zfalkon from its own checkout and measures, on
LocalCluster(workers=2) on 127.0.0.1:

* ``map``: ``list(ex.map(abs, range(N)))`` no-op tasks per second;
* ``submit``: ``[ex.submit(abs, i) ...]`` then every result, tasks per second;
* ``serial``: the median round trip of one no-op task at a time, in ms;
* ``rss``: the broker's resident memory with ``--queued`` no-op tasks queued and no
  workers, in MiB.

Prints medians over the rounds, the ratio of this checkout's median to the baseline's, and
the median over rounds of each round's own ratio (the two children of a round run back to
back, so their ratio cancels the load of the moment), and writes them to
``bench/out/compare.json``::

    git worktree add /tmp/base HEAD~3      # or: git archive REV | tar -x -C /tmp/base
    python bench/compare.py --baseline /tmp/base [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import time

HERE = pathlib.Path(__file__).resolve().parent
MEASURES = ("map", "submit", "serial", "rss")
HIGHER_IS_BETTER = {"map": True, "submit": True, "serial": False, "rss": False}


def child(tasks: int, submits: int, serial: int, queued: int) -> dict:
    """Measure the zfalkon this interpreter imports (run with PYTHONPATH=checkout)."""
    import psutil

    from zfalkon import Executor, LocalCluster

    out: dict = {}
    with LocalCluster(workers=2) as cluster, Executor(cluster.address) as ex:
        list(ex.map(abs, range(20_000)))  # warm up
        start = time.perf_counter()
        assert list(ex.map(abs, range(tasks))) == list(range(tasks))
        out["map"] = tasks / (time.perf_counter() - start)
        start = time.perf_counter()
        futures = [ex.submit(abs, i) for i in range(submits)]
        assert [f.result() for f in futures] == list(range(submits))
        out["submit"] = submits / (time.perf_counter() - start)
        samples = []
        for i in range(serial):
            t0 = time.perf_counter()
            ex.submit(abs, i).result()
            samples.append(time.perf_counter() - t0)
        out["serial"] = statistics.median(samples) * 1000
    with LocalCluster(workers=0) as cluster, Executor(cluster.address) as ex:
        broker = psutil.Process(cluster.broker.pid)
        stream = ex.map(abs, range(queued), buffersize=queued)
        deadline = time.monotonic() + 300
        while cluster.status()["queued"] < queued and time.monotonic() < deadline:
            time.sleep(0.2)  # (polling the broker's own counter)
        out["rss"] = broker.memory_info().rss / 2**20
        stream.close()
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", help="the other checkout (a directory with zfalkon/)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tasks", type=int, default=200_000)
    parser.add_argument("--submit-tasks", type=int, default=50_000)
    parser.add_argument("--serial", type=int, default=3_000)
    parser.add_argument("--queued", type=int, default=1_000_000)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    sizes = (args.tasks, args.submit_tasks, args.serial, args.queued)
    if args.child:
        print(json.dumps(child(*sizes)))
        return 0
    if not args.baseline or not (pathlib.Path(args.baseline) / "zfalkon").is_dir():
        parser.error("--baseline must name a checkout that has a zfalkon/ directory")
    trees = {"baseline": str(pathlib.Path(args.baseline).resolve()), "this": str(HERE.parent)}
    runs: dict[str, list[dict]] = {name: [] for name in trees}
    for round_ in range(args.rounds):
        for name, tree in trees.items():
            env = dict(os.environ, PYTHONPATH=tree)
            cmd = [sys.executable, str(HERE / "compare.py"), "--child", "--tasks",
                   str(args.tasks), "--submit-tasks", str(args.submit_tasks), "--serial",
                   str(args.serial), "--queued", str(args.queued)]
            got = json.loads(subprocess.run(cmd, env=env, cwd=tree, check=True,
                                            capture_output=True, text=True).stdout)
            runs[name].append(got)
            print(f"round {round_ + 1} {name}: " + ", ".join(
                f"{k} {v:,.3g}" for k, v in got.items()), flush=True)
    medians = {name: {m: statistics.median(r[m] for r in rs) for m in MEASURES}
               for name, rs in runs.items()}
    # Each round's two children ran back to back: their ratio cancels the machine's load
    # of the moment, which on a shared machine drifts more than the effect measured.
    paired = {m: statistics.median(t[m] / b[m] for b, t in zip(runs["baseline"], runs["this"]))
              for m in MEASURES}
    print("\n| measure | baseline | this | this / baseline | median of the rounds' ratios |"
          "\n|---|---|---|---|---|")
    for m in MEASURES:
        base, this = medians["baseline"][m], medians["this"][m]
        unit = {"map": "tasks/s", "submit": "tasks/s", "serial": "ms", "rss": "MiB"}[m]
        print(f"| {m} ({unit}) | {base:,.4g} | {this:,.4g} | {this / base:.3f} "
              f"| {paired[m]:.3f} |")
    out = HERE / "out"
    out.mkdir(exist_ok=True)
    (out / "compare.json").write_text(json.dumps(
        {"trees": trees, "runs": runs, "medians": medians, "paired_ratios": paired,
         "args": vars(args)}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
