"""Python work as scientists write it (issue 13): figures beside their baselines, one run.

On LocalCluster(workers=2, slots_per_worker=1) on 127.0.0.1:

1. a function defined in this script (``__main__``: it travels by value) on no-op work:
   ``list(ex.map(fn, range(N)))`` and one ``submit`` per task, beside the same with a
   by-reference builtin (``abs``) and beside ``ProcessPoolExecutor(2)`` running the same
   ``__main__`` function (chunksize 1: one task per element);
2. a 10 MiB numpy array as a task's argument (the task returns its sum), beside 10 MiB
   of raw ``bytes`` (the task returns its length): MiB/s of argument moved, and the ratio;
3. ``map`` of a closure over ``--closure-mib`` MiB of data (its pickle is that big: it
   crosses each link once, not with every task) beside the same closure over 1 byte.

Medians of ``--repeat`` runs; prints a Markdown table, writes ``bench/out/pyfuncs.json``.

    python bench/pyfuncs.py [--repeat 5] [--tasks 100000] [--submits 30000]
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import pathlib
import sys

from zfalkon import Executor, LocalCluster

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from core import median_rate  # noqa: E402  (bench/core.py, imported as bench/report does)


def noop(x):  # defined in __main__: zfalkon sends it by value
    return x


def array_sum(a):
    return float(a.sum())


def closure_over(data: bytes):
    def pick(i):
        return data[i % len(data)]
    return pick


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--tasks", type=int, default=100_000)
    parser.add_argument("--submits", type=int, default=30_000)
    parser.add_argument("--array-mib", type=int, default=10)
    parser.add_argument("--arrays", type=int, default=20)
    parser.add_argument("--closure-mib", type=int, default=1)
    parser.add_argument("--closure-tasks", type=int, default=20_000)
    args = parser.parse_args()
    import numpy as np

    n, m, repeat = args.tasks, args.submits, args.repeat
    out: dict = {"tasks": n, "submits": m, "repeat": repeat}
    with LocalCluster(workers=2, slots_per_worker=1) as cluster, \
            Executor(cluster.address) as ex:
        list(ex.map(noop, range(20_000)))  # warm up (and load the function on each slot)
        for name, fn in (("value", noop), ("reference", abs)):
            out[f"map_{name}"] = median_rate(n, lambda: list(ex.map(fn, range(n))), repeat)
            out[f"submit_{name}"] = median_rate(
                m, lambda: [f.result() for f in [ex.submit(fn, i) for i in range(m)]],
                repeat)
        array = np.random.default_rng(0).random(args.array_mib * 2**20 // 8)
        raw = array.tobytes()
        k = args.arrays
        ex.submit(array_sum, array).result()
        ex.submit(len, raw).result()
        mib = args.array_mib * k
        out["array_mib_s"] = median_rate(mib, lambda: [ex.submit(array_sum, array).result()
                                                       for _ in range(k)], repeat)
        out["bytes_mib_s"] = median_rate(mib, lambda: [ex.submit(len, raw).result()
                                                       for _ in range(k)], repeat)
        c = args.closure_tasks
        for name, size in (("closure_big", args.closure_mib * 2**20), ("closure_small", 1)):
            pick = closure_over(bytes(range(256)) * (size // 256) or b"x")
            out[name] = median_rate(c, lambda: list(ex.map(pick, range(c))), repeat)
    with cf.ProcessPoolExecutor(2) as pool:
        list(pool.map(noop, range(1000)))
        out["pool_map"] = median_rate(n, lambda: list(pool.map(noop, range(n))), repeat)
        out["pool_submit"] = median_rate(
            m, lambda: [f.result() for f in [pool.submit(noop, i) for i in range(m)]], repeat)

    def row(label: str, key: str, base: str, unit: str = "tasks/s") -> str:
        value, baseline = out[key][0], out[base][0]
        return f"| {label} | {value:,.0f} {unit} | {baseline:,.0f} {unit} | {value / baseline:.2f} |"

    print(f"\n{n} map tasks, {m} submits, {args.arrays} x {args.array_mib} MiB arguments; "
          f"medians of {repeat}\n")
    print("| measure | zfalkon | baseline (same run) | ratio |")
    print("|---|---|---|---|")
    print(row("map, `__main__` function (by value) vs ProcessPoolExecutor(2)", "map_value",
              "pool_map"))
    print(row("map, by value vs by reference (`abs`)", "map_value", "map_reference"))
    print(row("submit, `__main__` function vs ProcessPoolExecutor(2)", "submit_value",
              "pool_submit"))
    print(row("submit, by value vs by reference (`abs`)", "submit_value", "submit_reference"))
    print(row(f"{args.array_mib} MiB numpy argument vs raw bytes", "array_mib_s",
              "bytes_mib_s", "MiB/s"))
    print(row(f"map, closure over {args.closure_mib} MiB vs over 1 byte "
              f"({args.closure_tasks} tasks)", "closure_big", "closure_small"))
    path = pathlib.Path(__file__).resolve().parent / "out" / "pyfuncs.json"
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
