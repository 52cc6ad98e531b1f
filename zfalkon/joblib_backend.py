"""A joblib parallel backend that runs ``joblib.Parallel`` work (scikit-learn's ``n_jobs``)
on a zfalkon broker's workers.

::

    import zfalkon.joblib_backend
    from joblib import parallel_backend

    zfalkon.joblib_backend.register()          # once: the backend is named "zfalkon"
    with parallel_backend("zfalkon", address="tcp://broker.example.org:7450"):
        GridSearchCV(SVC(), grid, n_jobs=-1).fit(X, y)

``address`` defaults to ``$ZFALKON_BROKER`` and ``keys`` to ``$ZFALKON_KEYS``; or pass
``executor=`` an open :class:`~zfalkon.Executor` made with ``pickle=True`` (it is then
reused and never shut down here). Otherwise each ``Parallel`` call opens its own Executor
(``pickle=True``) and closes it at the end of the call.

How it maps: joblib hands the backend batches of calls (``BatchedCalls``, sized by
joblib's auto-batching to take 0.2 to 1 s each); each batch is one zfalkon task, a call of
:func:`run_batch` (by reference: workers need zfalkon and the packages the batch's
functions come from, e.g. scikit-learn) with the batch pickled by cloudpickle. Results
and exceptions come back pickled (the client accepts worker pickles: a worker could run
code in this process, as with any pickle-based backend). ``n_jobs=-1`` (and ``None``, the
default here, as with joblib's Dask backend) means every slot connected to the broker;
``-2`` one fewer, and so on; a positive ``n_jobs`` is taken as asked. Nested ``Parallel``
calls inside a task run in threads on that worker (joblib's default for nested calls).

The data of each batch travels with it (no scatter yet): a task is at most 128 MiB.

joblib is imported only here: zfalkon itself does not need it.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import Future
from typing import Any, Callable

from joblib import register_parallel_backend
from joblib._parallel_backends import AutoBatchingMixin, ParallelBackendBase

from zfalkon.client import Executor, TaskFuture, query_status
from zfalkon.constants import BROKER_ENV, CONNECT_TIMEOUT_SECONDS
from zfalkon.errors import BrokerUnavailable, ConfigError, ProtocolError

NAME = "zfalkon"
RUN_BATCH = "zfalkon.joblib_backend:run_batch"  # what each task calls, by reference


def run_batch(batch: Callable[[], Any]) -> Any:
    """Run one joblib batch on a worker (a ``BatchedCalls``: a list of calls)."""
    return batch()


class ZfalkonBackend(AutoBatchingMixin, ParallelBackendBase):
    """joblib's ``ParallelBackendBase`` over a zfalkon :class:`~zfalkon.Executor`.

    Args:
        address: the broker (``tcp://HOST:PORT``); default ``$ZFALKON_BROKER``.
        keys: a client key bundle for a broker with keys; default ``$ZFALKON_KEYS``.
        executor: an open Executor (``pickle=True``) to use instead of opening one per
            ``Parallel`` call; it is not shut down here.
        connect_timeout: for the Executors this backend opens.
    """

    MIN_IDEAL_BATCH_DURATION = 0.2
    MAX_IDEAL_BATCH_DURATION = 1.0
    supports_retrieve_callback = True
    default_n_jobs = -1

    def __init__(self, address: str | None = None, *, keys: str | None = None,
                 executor: Executor | None = None,
                 connect_timeout: float = CONNECT_TIMEOUT_SECONDS,
                 nesting_level: int | None = None, inner_max_num_threads: int | None = None,
                 **backend_kwargs: Any) -> None:
        super().__init__(nesting_level=nesting_level,
                         inner_max_num_threads=inner_max_num_threads, **backend_kwargs)
        if executor is not None and not executor._pickle:
            raise ConfigError("the joblib backend sends joblib's batches as pickles: "
                              "pass an Executor made with pickle=True")
        if executor is None and not (address or os.environ.get(BROKER_ENV)):
            raise ConfigError(f"the zfalkon joblib backend needs a broker: "
                              f"parallel_backend('zfalkon', address=...) or ${BROKER_ENV}")
        self.address = executor.address if executor is not None else address
        self.keys = keys
        self.connect_timeout = connect_timeout
        self._given = executor
        self._executor: Executor | None = executor
        self._futures: set[TaskFuture] = set()
        self._lock = threading.Lock()

    def __reduce__(self) -> tuple:
        # (a BatchedCalls carries the nested backend, not this one; should this one
        # travel, it goes as an unconnected copy)
        return (_unpickle, (self.address, self.keys))

    # -- sizing --------------------------------------------------------------------------

    def _slots(self) -> int:
        if self._executor is not None:
            return self._executor._connected_slots()
        try:
            slots = int(query_status(self.address, self.connect_timeout, self.keys)
                        .get("slots") or 0)
        except (BrokerUnavailable, ProtocolError, TypeError, ValueError):
            slots = 0
        return slots if slots > 0 else (os.cpu_count() or 1)

    def effective_n_jobs(self, n_jobs: int | None) -> int:
        if n_jobs == 0:
            raise ValueError("n_jobs == 0 in Parallel has no meaning")
        if n_jobs is None or n_jobs < 0:
            return max(self._slots() + 1 + (n_jobs or -1), 1)
        return n_jobs

    # -- a Parallel call -----------------------------------------------------------------

    def configure(self, n_jobs: int = 1, parallel: Any = None, **backend_args: Any) -> int:
        self.parallel = parallel
        if self._executor is None:
            self._executor = Executor(self.address, keys=self.keys, pickle=True,
                                      connect_timeout=self.connect_timeout,
                                      name=f"joblib-{os.uname().nodename}-{os.getpid()}")
        return self.effective_n_jobs(n_jobs)

    def submit(self, func: Callable[[], Any], callback: Callable[[Any], Any] | None = None
               ) -> TaskFuture:
        ex = self._executor
        if ex is None:
            raise RuntimeError("the zfalkon joblib backend is not configured")
        fut = ex.submit(RUN_BATCH, func)
        with self._lock:
            self._futures.add(fut)
        fut.add_done_callback(self._forget)
        if callback is not None:
            fut.add_done_callback(callback)
        return fut

    def _forget(self, fut: "Future[Any]") -> None:
        with self._lock:
            self._futures.discard(fut)

    def retrieve_result_callback(self, out: TaskFuture) -> Any:
        return out.result()

    def abort_everything(self, ensure_ready: bool = True) -> None:
        """Give up on every batch still pending (a batch failed; joblib will not read the
        others): queued ones never run, their results are dropped."""
        with self._lock:
            futures = list(self._futures)
            self._futures.clear()
        ex = self._executor
        if ex is None or not futures:
            return
        for fut in futures:
            fut._abandon()
        ex._cancel([f.task_id for f in futures])

    def terminate(self) -> None:
        """The end of a Parallel call: close the Executor this backend opened for it."""
        ex, self._executor = self._executor, self._given
        if ex is not None and ex is not self._given:
            ex.shutdown(wait=False, cancel_futures=True)
        self.reset_batch_stats()


def _unpickle(address: str | None, keys: str | None) -> ZfalkonBackend:
    return ZfalkonBackend(address, keys=keys)


def register(make_default: bool = False) -> None:
    """Register the backend with joblib as ``"zfalkon"`` (``make_default``: for every
    ``Parallel`` with no backend named)."""
    register_parallel_backend(NAME, ZfalkonBackend, make_default=make_default)


__all__ = ["ZfalkonBackend", "register", "run_batch", "NAME"]
