"""A worker machine's cache of staged inputs, shared by all its slots.

Files are keyed by content identity: an S3 object's bucket, key and version id (or ETag
when the bucket is not versioned), so a changed object is never served stale. The cache
keeps at most ``limit`` bytes; when a new file pushes it over, the least recently used
files go (use refreshes a file's mtime). Slots are separate processes: the directory is
the shared state, writes land by rename, and eviction and the counters file are guarded
by an ``flock``. Cached files are read-only: tasks get hard links to them.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import tempfile
import time
from typing import Callable, Iterator

#: Default size limit of a worker's cache (``zfalkon worker --cache-bytes``).
CACHE_BYTES = 10 * 1024**3
_STALE_PART_SECONDS = 3600  # a partial download this old has no live writer


class DataCache:
    """The cache directory ``root``, at most ``limit`` bytes (plus the file in use)."""

    def __init__(self, root: str, limit: int = CACHE_BYTES) -> None:
        self.root = root
        self.limit = limit
        os.makedirs(root, mode=0o700, exist_ok=True)

    @staticmethod
    def key(identity: str) -> str:
        return hashlib.sha256(identity.encode()).hexdigest()

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        with open(os.path.join(self.root, ".lock"), "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def get(self, identity: str, fetch: Callable[[str], None]) -> tuple[str, bool]:
        """Path of the cached file for ``identity``, calling ``fetch(tmp_path)`` to fill it
        on a miss; returns ``(path, hit)``. The caller should link or copy it at once (a
        later eviction may remove it)."""
        path = os.path.join(self.root, self.key(identity))
        try:
            os.utime(path)  # a hit: most recently used now
            self._count(hits=1)
            return path, True
        except FileNotFoundError:
            pass
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=".part-")
        os.close(fd)
        try:
            fetch(tmp)
            size = os.path.getsize(tmp)
            os.chmod(tmp, 0o444)  # tasks get hard links to it: none may change it in place
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        self._count(misses=1, downloaded=size)
        self._evict(keep=path)
        return path, False

    def _evict(self, keep: str) -> None:
        with self._locked():
            entries = []
            now = time.time()
            for name in os.listdir(self.root):
                p = os.path.join(self.root, name)
                if name.startswith(".part-"):  # a download whose slot was killed
                    with contextlib.suppress(FileNotFoundError):
                        if now - os.stat(p).st_mtime > _STALE_PART_SECONDS:
                            os.unlink(p)
                    continue
                if name.startswith("."):
                    continue
                with contextlib.suppress(FileNotFoundError):
                    st = os.stat(p)
                    entries.append((st.st_mtime_ns, st.st_size, p))
            total = sum(size for _, size, _ in entries)
            for _, size, p in sorted(entries):
                if total <= self.limit:
                    break
                if p == keep:
                    continue  # the file being used now stays, even if it alone is over
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(p)
                    total -= size
                    self._count_locked(evicted=1)

    def _count(self, **inc: int) -> None:
        with self._locked():
            self._count_locked(**inc)

    def _count_locked(self, **inc: int) -> None:
        stats = self.stats()
        for k, v in inc.items():
            stats[k] = stats.get(k, 0) + v
        with open(os.path.join(self.root, ".stats.json"), "w") as f:
            json.dump(stats, f)

    def stats(self) -> dict[str, int]:
        """Counters since the directory was created: hits, misses, downloaded, evicted."""
        try:
            with open(os.path.join(self.root, ".stats.json")) as f:
                return json.load(f)
        except (FileNotFoundError, ValueError):
            return {"hits": 0, "misses": 0, "downloaded": 0, "evicted": 0}

    def size(self) -> int:
        return sum(os.path.getsize(os.path.join(self.root, n)) for n in os.listdir(self.root)
                   if not n.startswith("."))
