"""zfalkon.cache: hits, LRU eviction at the size limit, counters, concurrent slots."""

from __future__ import annotations

import os
import time
from concurrent.futures import ProcessPoolExecutor

import pytest

from zfalkon.cache import DataCache


def filler(data: bytes, calls: list | None = None):
    def fetch(tmp: str) -> None:
        if calls is not None:
            calls.append(tmp)
        with open(tmp, "wb") as f:
            f.write(data)
    return fetch


def test_second_get_is_a_hit_and_does_not_fetch(tmp_path):
    cache = DataCache(str(tmp_path), limit=1000)
    calls: list = []
    path, hit = cache.get("s3://b/k@etag1", filler(b"x" * 10, calls))
    assert not hit and open(path, "rb").read() == b"x" * 10
    path2, hit = cache.get("s3://b/k@etag1", filler(b"never", calls))
    assert hit and path2 == path and len(calls) == 1
    assert cache.stats() == {"hits": 1, "misses": 1, "downloaded": 10, "evicted": 0}


def test_another_version_is_another_entry(tmp_path):
    cache = DataCache(str(tmp_path), limit=1000)
    a, _ = cache.get("s3://b/k@v1", filler(b"old"))
    b, hit = cache.get("s3://b/k@v2", filler(b"new"))
    assert not hit and a != b and open(b, "rb").read() == b"new"


def test_least_recently_used_go_first_at_the_limit(tmp_path):
    cache = DataCache(str(tmp_path), limit=250)
    paths = {}
    past = time.time() - 100
    for age, name in enumerate("abc"):
        paths[name], _ = cache.get(name, filler(b"." * 100))
        os.utime(paths[name], (past + age, past + age))  # distinct mtimes, a the oldest
    # 300 bytes > 250: the oldest (a) went when c came in
    assert not os.path.exists(paths["a"]) and cache.size() == 200
    cache.get("b", filler(b"never"))  # b is used (its mtime now): now c is the oldest
    cache.get("d", filler(b"." * 100))
    assert os.path.exists(paths["b"]) and not os.path.exists(paths["c"])
    assert cache.stats()["evicted"] == 2


def test_a_file_larger_than_the_limit_stays_while_in_use(tmp_path):
    cache = DataCache(str(tmp_path), limit=10)
    path, _ = cache.get("big", filler(b"." * 100))
    assert os.path.exists(path)
    cache.get("next", filler(b"." * 5))
    assert not os.path.exists(path)


def test_a_failed_fetch_leaves_nothing(tmp_path):
    cache = DataCache(str(tmp_path), limit=1000)

    def broken(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(b"partial")
        raise OSError("connection reset")

    with pytest.raises(OSError):
        cache.get("k", broken)
    assert [n for n in os.listdir(tmp_path) if not n.startswith(".lock")] == []
    _, hit = cache.get("k", filler(b"ok"))
    assert not hit


def _worker(args: tuple[str, int]) -> bool:
    root, i = args
    return DataCache(root, limit=10_000).get(f"key{i % 3}", filler(b"." * 100))[1]


def test_slots_in_separate_processes_share_it(tmp_path):
    with ProcessPoolExecutor(4) as pool:
        hits = list(pool.map(_worker, [(str(tmp_path), i) for i in range(30)]))
    stats = DataCache(str(tmp_path)).stats()
    assert stats["hits"] + stats["misses"] == 30 and stats["hits"] == sum(hits)
    assert 3 <= stats["misses"] <= 12  # each key fetched once, or a few times when racing
    assert DataCache(str(tmp_path)).size() == 300
