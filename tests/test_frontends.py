"""Front-ends (issue 15): Dask's scheduler, joblib's backend (scikit-learn's n_jobs) and
Snakemake's executor plugin, each end to end on the shared LocalCluster.

Each part is skipped only when its library is not installed (dask, joblib and
scikit-learn are in the test extra; Snakemake is not: ``tox -e snakemake`` runs its part
with Snakemake's own test base)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap

import pytest

from conftest import child_env
from zfalkon import Executor, SerializationError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PLUGIN_DIR = os.path.join(ROOT, "snakemake-executor-plugin-zfalkon")


def inc(x: int) -> int:
    return x + 1


def fails(x: int) -> int:
    raise KeyError(f"no {x}")


@pytest.fixture
def pickling(cluster):
    ex = Executor(cluster.address, pickle=True)
    try:
        yield ex
    finally:
        ex.shutdown(wait=True, cancel_futures=True)


def test_zfalkon_imports_none_of_the_front_ends():
    code = ("import sys, zfalkon, zfalkon.client, zfalkon.values; "
            "print(sorted(m for m in ('dask', 'joblib', 'sklearn', 'snakemake') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=child_env(), check=True, timeout=60).stdout
    assert out.strip() == "[]"


# -- Dask ---------------------------------------------------------------------------------

def test_dask_bag_computes_on_the_fabric(pickling):
    db = pytest.importorskip("dask.bag")
    bag = (db.from_sequence(range(200), npartitions=8)
           .map(lambda x: x * x).filter(lambda x: x % 3 == 1).map(inc))
    expected = bag.compute(scheduler="sync")
    assert bag.compute(scheduler=pickling) == expected
    assert bag.sum().compute(scheduler=pickling) == sum(expected)
    assert pickling._max_workers == 4  # (dask keeps that many in flight: 2 per slot)


def test_dask_delayed_graph_computes_on_the_fabric(pickling):
    dask = pytest.importorskip("dask")
    offset = 7
    layer = [dask.delayed(inc)(i) for i in range(10)]
    pairs = [dask.delayed(lambda a, b: (a * b + offset, {a}))(x, y)  # a closure, tuples, sets
             for x, y in zip(layer, layer[1:])]
    total = dask.delayed(lambda ps: sum(p[0] for p in ps))(pairs)
    expected = dask.compute(total, pairs, scheduler="sync")
    assert dask.compute(total, pairs, scheduler=pickling) == expected
    with pytest.raises(KeyError, match="no 3"):  # the task's exception, its type kept
        dask.compute(dask.delayed(fails)(3), scheduler=pickling)


def test_dask_needs_pickle_and_says_so(executor):
    dask = pytest.importorskip("dask")
    with pytest.raises(SerializationError, match=r"pickle=True"):
        dask.compute(dask.delayed(inc)(1), scheduler=executor)


# -- joblib and scikit-learn ----------------------------------------------------------------

def test_joblib_backend_runs_parallel_calls(cluster):
    joblib = pytest.importorskip("joblib")
    from zfalkon import joblib_backend

    joblib_backend.register()
    with joblib.parallel_backend("zfalkon", address=cluster.address):
        assert joblib.Parallel(n_jobs=2)(
            joblib.delayed(inc)(i) for i in range(50)) == list(range(1, 51))
        assert joblib.Parallel()(  # n_jobs None: every slot; a lambda travels by value
            joblib.delayed(lambda i: -i)(i) for i in range(5)) == [0, -1, -2, -3, -4]
        assert joblib.effective_n_jobs() == 2
        with pytest.raises(KeyError, match="no [4-7]"):  # (whichever fails first)
            joblib.Parallel(n_jobs=2)(joblib.delayed(fails)(i) for i in range(4, 8))


def test_joblib_backend_refuses_an_executor_without_pickle(executor):
    pytest.importorskip("joblib")
    from zfalkon import ConfigError
    from zfalkon.joblib_backend import ZfalkonBackend

    with pytest.raises(ConfigError, match="pickle=True"):
        ZfalkonBackend(executor=executor)


def test_grid_search_under_the_zfalkon_backend_matches_the_default(cluster, pickling):
    joblib = pytest.importorskip("joblib")
    pytest.importorskip("sklearn")
    from sklearn.datasets import load_iris
    from sklearn.model_selection import GridSearchCV
    from sklearn.svm import SVC

    from zfalkon import joblib_backend

    X, y = load_iris(return_X_y=True)
    grid = {"C": [0.1, 1, 10], "gamma": [0.01, 0.1, 1]}
    default = GridSearchCV(SVC(), grid, cv=3, n_jobs=2).fit(X, y)
    joblib_backend.register()
    before = pickling.status()["done"]
    with joblib.parallel_backend("zfalkon", executor=pickling):
        fabric = GridSearchCV(SVC(), grid, cv=3, n_jobs=2).fit(X, y)
    assert fabric.best_params_ == default.best_params_
    assert fabric.best_score_ == pytest.approx(default.best_score_)
    assert pickling.status()["done"] > before  # the fits ran on the fabric


# -- Snakemake ------------------------------------------------------------------------------

SNAKEFILE = textwrap.dedent("""\
    rule all:
        input: "total.txt"

    rule square:
        output: "sq/{i}.txt"
        shell: "echo $(( {wildcards.i} * {wildcards.i} )) > {output}"

    rule total:
        input: expand("sq/{i}.txt", i=range(3))
        output: "total.txt"
        shell: "cat {input} | paste -sd+ | bc > {output}"
    """)


def test_snakemake_runs_a_workflow_through_the_plugin(cluster, tmp_path):
    pytest.importorskip("snakemake")
    pytest.importorskip("snakemake_interface_executor_plugins")
    if shutil.which("bc") is None:
        pytest.skip("needs bc")
    (tmp_path / "Snakefile").write_text(SNAKEFILE)
    env = child_env()
    env["PYTHONPATH"] = os.pathsep.join([PLUGIN_DIR, ROOT, env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, "-m", "snakemake", "--executor", "zfalkon",
         "--zfalkon-broker", cluster.address, "-j", "2", "--latency-wait", "5"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=110)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert (tmp_path / "total.txt").read_text().strip() == "5"  # 0 + 1 + 4
    assert "5 of 5 steps (100%) done" in proc.stderr
