"""Journal write speed: records framed and written through ``Journal`` (``fsync=never``).

``python bench/journal_write.py [--rounds N]`` prints, for one-task SUBMIT records (a
typical ~40-byte shell task) and 64-task records (the same task, 64 to a record), the
records per second: the best of N (30) timeit repeats, each of which records 20,000 (or
1,000) records then flushes them (one write: "written"), or records them and drops the
buffer ("framed": packing, framing and checksums only). To compare two checkouts in one
sitting, give ``--against OLD/zfalkon/journal.py``: that module is loaded too (under
another name, with this checkout's other modules) and the two are measured in turns in
this one process, the best of N turns each (fair on a shared machine).
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import tempfile
import time
import timeit

from zfalkon import payload
from zfalkon.journal import Journal


def rate(journal: Journal, per_record: int, n: int, rounds: int, write: bool) -> float:
    blob = payload.shell_task("echo hello from a benchmark task")
    ids = list(range(1, per_record + 1))
    blobs = [blob] * per_record
    submit, flush = journal.submit, journal.flush

    def batch() -> None:
        for _ in range(n):
            submit(ids, blobs)
        if write:
            flush(time.monotonic())
        else:
            journal._buffer.clear()

    best = min(timeit.repeat(batch, number=1, repeat=rounds))
    return n / best


def measure(journal_class: type, rounds: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        journal = journal_class(tmp, fsync="never", compact_bytes=1 << 40)
        try:
            journal.replay()
            return {f"{'written' if write else 'framed'} {per}": rate(
                        journal, per, 20_000 if per == 1 else 1_000, rounds, write)
                    for write in (False, True) for per in (1, 64)}
        finally:
            journal.close()


def load(path: str) -> type:
    spec = importlib.util.spec_from_file_location("journal_against", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # (dataclasses look their module up)
    spec.loader.exec_module(module)
    return module.Journal


def show(name: str, got: dict[str, float]) -> str:
    return (f"{name}: " + "; ".join(
        f"{key}-task records {value / 1e6:.2f} M/s" if key.endswith(" 1") else
        f"{key}-task records {value / 1e3:.0f} k/s" for key, value in got.items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--against", metavar="JOURNAL_PY",
                        help="another zfalkon/journal.py to measure in turns with this one")
    args = parser.parse_args()
    if not args.against:
        print(show("this checkout", measure(Journal, args.rounds)))
        return
    other = load(args.against)
    best: dict[str, dict[str, float]] = {"this": {}, "against": {}}
    for _ in range(args.rounds):
        for name, cls in (("against", other), ("this", Journal)):
            for key, value in measure(cls, 1).items():
                best[name][key] = max(best[name].get(key, 0.0), value)
    print(show(f"against ({args.against})", best["against"]))
    print(show("this checkout", best["this"]))
    print("this / against: " + ", ".join(
        f"{key} {best['this'][key] / best['against'][key]:.2f}" for key in best["this"]))


if __name__ == "__main__":
    main()
