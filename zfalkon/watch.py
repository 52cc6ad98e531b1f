"""Never silent: notice a broker that has no worker while tasks wait for one.

A :class:`WorkerWatch` asks the broker for its status (``query_status``, a short
connection of its own) while work is waiting and nothing finishes. When the broker has
had no worker registered for ``warn_after`` seconds it calls ``on_warn`` once, naming the
broker and its worker count (once per such stretch: workers that come and go again get a
new warning); after ``fail_after`` seconds, ``on_fail``. ``zfalkon run`` and ``zfalkon
bench`` use it with ``--wait-workers``; every :class:`~zfalkon.client.Executor` runs one
that logs the warning (logger ``zfalkon.client``) while its futures or maps wait.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from typing import TYPE_CHECKING, Callable

from zfalkon.errors import ZfalkonError

if TYPE_CHECKING:
    from zfalkon.client import Executor

#: Seconds without a registered worker (while tasks wait) before the warning.
NO_WORKER_WARNING_SECONDS = 10.0
log = logging.getLogger("zfalkon.client")


def no_worker_message(address: str, info: dict, seconds: float) -> str:
    """The warning: the broker, how long, and what it has."""
    return (f"the broker at {address} has had no worker for {seconds:.0f} s (it has "
            f"{info.get('workers', 0)} workers, {info.get('slots', 0)} slots, "
            f"{info.get('queued', 0)} tasks queued): tasks wait until a worker registers "
            f"(zfalkon worker --broker {address})")


class WorkerWatch:
    """A daemon thread that watches a broker's worker count (see the module).

    ``busy()``: whether work is waiting (the watch asks nothing otherwise);
    ``progress()``: a value that changes whenever a task finishes (then workers exist,
    and the watch asks nothing); ``on_warn(message)`` and ``on_fail(message)`` are called
    on the watch's thread."""

    def __init__(self, address: str, keys: str | None, *,
                 warn_after: float = NO_WORKER_WARNING_SECONDS,
                 fail_after: float | None = None,
                 on_warn: Callable[[str], None], on_fail: Callable[[str], None] | None = None,
                 busy: Callable[[], bool] = lambda: True,
                 progress: Callable[[], object] = lambda: None,
                 interval: float | None = None) -> None:
        self.address = address
        self.keys = keys
        self.warn_after = warn_after
        self.fail_after = fail_after
        self.on_warn = on_warn
        self.on_fail = on_fail
        self.busy = busy
        self.progress = progress
        first = min(warn_after, fail_after) if fail_after is not None else warn_after
        self.interval = interval if interval is not None else max(0.05, min(1.0, first / 5))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="zfalkon-worker-watch",
                                        daemon=True)

    def start(self) -> "WorkerWatch":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def __enter__(self) -> "WorkerWatch":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _run(self) -> None:
        from zfalkon.client import query_status

        since: float | None = None  # when a stretch of waiting with no worker began
        warned = failed = False
        last = object()
        while True:
            try:
                busy = self.busy()
                token = self.progress()
            except Exception:  # (the watched object is gone)
                return
            now = time.monotonic()
            if not busy or token != last:
                last = token
                since = None
                warned = False
            else:
                try:
                    info = query_status(self.address, timeout=5.0, keys=self.keys)
                except ZfalkonError:
                    info = None  # no answer: the client's own errors say it
                if info is not None and info.get("workers", 0) > 0 and \
                        info.get("slots", 0) > 0:  # (an agent with no slot runs nothing)
                    since = None
                    warned = False
                elif info is not None:
                    since = since if since is not None else now
                    waited = time.monotonic() - since
                    if not warned and waited >= self.warn_after:
                        warned = True
                        self.on_warn(no_worker_message(self.address, info, waited))
                    if (not failed and self.fail_after is not None and self.on_fail and
                            waited >= self.fail_after):
                        failed = True
                        self.on_fail(f"no worker registered with the broker at "
                                     f"{self.address} within {self.fail_after:g} s "
                                     f"(--wait-workers); it has {info.get('workers', 0)} "
                                     f"workers")
            if self._stop.wait(self.interval):
                return


def watch_executor(ex: "Executor", warn_after: float | None = None) -> WorkerWatch:
    """Log a warning (once per stretch) while ``ex`` has tasks waiting, none finishes,
    none is known to be held by a slot (STARTED: long tasks running ask nothing), and its
    broker has had no worker for ``warn_after`` seconds; it asks the broker every
    ``warn_after / 4`` seconds at most. The watch ends with the executor (it holds only a
    weak reference)."""
    if warn_after is None:
        warn_after = NO_WORKER_WARNING_SECONDS
    ref = weakref.ref(ex)
    keys = ex._keys.directory if ex._keys else None

    def live() -> "Executor":
        e = ref()
        if e is None or e._closed:
            raise LookupError("executor gone")
        return e

    def busy() -> bool:  # tasks wait, and the broker has said of none that a slot has it
        e = live()
        return bool(e._pending) and not e._started

    def progress() -> object:
        pending = live()._pending
        try:
            return next(iter(pending), None)  # the oldest pending task: changes as they end
        except RuntimeError:  # (changed while read: tasks are moving)
            return object()

    return WorkerWatch(ex.address, keys, warn_after=warn_after, busy=busy, progress=progress,
                       on_warn=log.warning, interval=max(1.0, warn_after / 4)).start()
