"""Front-ends on a LocalCluster (2 workers x 1 slot): Dask graphs and joblib calls on
zfalkon beside their own local schedulers. ``python bench/frontends.py [--out FILE]``

Measures wall-clock seconds, best of ``--repeat``: a Dask delayed graph of N no-op
tasks and a dask.bag of N partitions (zfalkon vs Dask's threaded and processes
schedulers), joblib ``Parallel`` over N tiny calls and a scikit-learn GridSearchCV on iris
(zfalkon backend vs joblib's default, loky).
"""

from __future__ import annotations

import argparse
import json
import sys
import time


def best(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tasks", type=int, default=1000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out")
    a = ap.parse_args()

    import dask
    import dask.bag as db
    import joblib
    from sklearn.datasets import load_iris
    from sklearn.model_selection import GridSearchCV
    from sklearn.svm import SVC

    import zfalkon.joblib_backend
    from zfalkon import Executor, LocalCluster

    n = a.tasks
    graph = dask.delayed(sum)([dask.delayed(abs)(i) for i in range(n)])
    bag = db.from_sequence(range(n * 10), npartitions=n).map(abs).sum()
    X, y = load_iris(return_X_y=True)
    grid = {"C": [0.1, 1, 10], "gamma": [0.01, 0.1, 1]}
    out: dict = {"tasks": n}
    zfalkon.joblib_backend.register()
    with LocalCluster(workers=2) as cluster, Executor(cluster.address, pickle=True) as ex:
        dask.compute(graph, scheduler=ex)  # (warm: imports on the workers)
        for name, sched in (("zfalkon", ex), ("threads", "threads"), ("processes", "processes")):
            out[f"dask_delayed_{name}"] = best(lambda: dask.compute(graph, scheduler=sched), a.repeat)
            out[f"dask_bag_{name}"] = best(lambda: bag.compute(scheduler=sched), a.repeat)
        calls = [joblib.delayed(abs)(i) for i in range(n)]
        gs = lambda: GridSearchCV(SVC(), grid, cv=3, n_jobs=2).fit(X, y)  # noqa: E731
        out["joblib_parallel_loky"] = best(lambda: joblib.Parallel(n_jobs=2)(calls), a.repeat)
        out["gridsearch_loky"] = best(gs, a.repeat)
        with joblib.parallel_backend("zfalkon", executor=ex):
            gs()  # (warm)
            out["joblib_parallel_zfalkon"] = best(lambda: joblib.Parallel(n_jobs=2)(calls), a.repeat)
            out["gridsearch_zfalkon"] = best(gs, a.repeat)
    for k, v in out.items():
        print(f"{k:28s} {v:.3f}" if isinstance(v, float) else f"{k:28s} {v}")
    if a.out:
        with open(a.out, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
