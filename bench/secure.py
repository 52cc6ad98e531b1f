"""The throughput cost of CurveZMQ: no-op tasks/s with and without keys, in one run.

Alternates ``zfalkon bench`` runs on a LocalCluster(workers=2) with and without
``secure=True`` (encryption and per-role allow-lists), ``--repeat`` times each, and
reports the medians and their ratio. Writes ``bench/out/secure.json``.

    python bench/secure.py [--repeat 5] [--tasks 200000]
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics

from zfalkon.bench import run_bench


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--tasks", type=int, default=200_000)
    parser.add_argument("--kind", default="noop", choices=["noop", "shell"])
    args = parser.parse_args()
    runs: dict[str, list[float]] = {"plain": [], "curve": []}
    for _ in range(args.repeat):
        for name, secure in (("plain", False), ("curve", True)):
            figures = run_bench(tasks=args.tasks, kind=args.kind, secure=secure)
            assert figures["errors"] == 0, figures
            runs[name].append(figures["tasks_per_second"])
    medians = {name: statistics.median(r) for name, r in runs.items()}
    out = {"tasks": args.tasks, "kind": args.kind, "repeat": args.repeat, "runs": runs,
           "median_plain": medians["plain"], "median_curve": medians["curve"],
           "ratio": medians["curve"] / medians["plain"]}
    path = pathlib.Path(__file__).parent / "out"
    path.mkdir(exist_ok=True)
    (path / "secure.json").write_text(json.dumps(out, indent=2))
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
