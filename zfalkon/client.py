"""The client: a ``concurrent.futures.Executor`` backed by a zfalkon broker.

One background I/O thread owns the DEALER socket. Calling threads encode tasks and put
them in an outbox; the I/O thread sends them in batches and routes results back. Futures
are real ``concurrent.futures.Future`` objects (``as_completed``, ``wait`` and
``asyncio.wrap_future`` work). ``map`` streams: it keeps ``buffersize`` tasks in flight
and creates no future per element, so a 10-million-element map uses bounded memory.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import concurrent.futures as cf
import itertools
import logging
import os
import select
import threading
import time
import uuid
import weakref
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence, cast

import zmq

from zfalkon import payload, staging
from zfalkon import protocol as P
from zfalkon.constants import (
    BROKER_ENV,
    CONNECT_TIMEOUT_SECONDS,
    MAP_BUFFER,
    FRAME_SOFT_BYTES,
    MAX_BATCH,
    MAX_TASK_BYTES,
    PING_SECONDS,
)
from zfalkon.errors import (
    BrokerUnavailable,
    ConfigError,
    ProtocolError,
    SerializationError,
    VersionMismatch,
)
from zfalkon.net import Waker, broker_endpoint, make_socket, readable
from zfalkon.payload import ShellResult
from zfalkon.security import PeerKeys, peer_keys
from zfalkon.clientcore import (
    CANCEL as _CANCEL,
    JOURNAL_UNAVAILABLE,
    SUBMIT as _SUBMIT,
    ClientSession,
)

_NOBLOCK = int(zmq.NOBLOCK)  # (a plain int: pyzmq enums are slow)
CANCEL_WAIT_SECONDS = 10.0  # TaskFuture.cancel() waits this long for the broker's answer
#: While a caller waits in ``result()`` (and so receives for every future), the I/O thread
#: watches only its wake-up pipe, looking again this often (ms) whether one still does: a
#: message that comes just after the last caller left waits at most this long.
_DRIVEN_POLL_MS = 2
_OUTPUT_KIND = bytes([payload.RESULT_OUTPUT])  # a result with captured output: [7, ...]
log = logging.getLogger("zfalkon.client")



def _resolve_address(address: str | None) -> str:
    address = address or os.environ.get(BROKER_ENV)
    if not address:
        raise ConfigError(f"no broker address: pass one or set {BROKER_ENV}")
    return broker_endpoint(address)


def _handshake(sock: zmq.Socket, address: str, role_info: dict, timeout: float,
               keys: PeerKeys | None) -> P.Welcome:
    """Send HELLO and wait for WELCOME; raise a clear error for anything else."""
    sock.send(P.encode(P.hello(P.ROLE_CLIENT, role_info)))
    if not sock.poll(int(timeout * 1000)):
        raise BrokerUnavailable(
            f"no answer from a zfalkon broker at {address} within {timeout:g} s" + (
                f" (with keys {keys.directory}: is the key {keys.name!r} authorized as a "
                "client, not revoked, and its broker.key this broker's?)" if keys else
                " (if the broker uses --keys, pass keys=BUNDLE or set $ZFALKON_KEYS)"))
    msg = P.decode(sock.recv())
    if isinstance(msg, P.Error):
        raise error_from(msg, f"broker at {address} refused this client")
    if not isinstance(msg, P.Welcome):
        raise ProtocolError(f"broker at {address} answered HELLO with {type(msg).__name__}")
    return msg


def error_from(msg: P.Error, context: str) -> ProtocolError:
    """The exception for an ERROR message (VersionMismatch for code ``version``)."""
    if msg.code == "version":
        return VersionMismatch(f"{context}: {msg.message}")
    return ProtocolError(f"{context}: {msg.message}", msg.code)


def _check_size(blob: bytes) -> bytes:
    if len(blob) > MAX_TASK_BYTES:
        raise SerializationError(
            f"task of {len(blob)} bytes exceeds the {MAX_TASK_BYTES} byte limit of one task")
    return blob


@contextlib.contextmanager
def _short_connection(address: str | None, keys: str | None, name: str,
                      timeout: float) -> Iterator[tuple[zmq.Socket, str]]:
    """A registered observer connection to a broker (not counted as a client) for one
    exchange: yields ``(socket, endpoint)``; says BYE (if the block returned) and closes."""
    endpoint = _resolve_address(address)
    bundle = peer_keys(keys)
    ctx = zmq.Context()
    sock = make_socket(ctx, zmq.DEALER, endpoint, bundle)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(endpoint)
        _handshake(sock, endpoint, {"name": name, "observer": True}, timeout, bundle)
        yield sock, endpoint
        sock.setsockopt(zmq.LINGER, 1000)  # let the BYE out, or the broker keeps a stale client
        sock.send(P.encode(P.Bye(f"{name} done")))
    finally:
        sock.close()
        ctx.term()


def _answer(sock: zmq.Socket, endpoint: str, what: str, timeout: float) -> P.Message:
    if not sock.poll(int(timeout * 1000)):
        raise BrokerUnavailable(f"broker at {endpoint} did not answer {what}")
    return P.decode(sock.recv())


def query_status(address: str | None = None, timeout: float = CONNECT_TIMEOUT_SECONDS,
                 keys: str | None = None) -> dict:
    """Ask a broker for its status (counters and worker list) over a short connection.

    ``keys``: a client key bundle (default ``$ZFALKON_KEYS``) for a broker with keys.
    """
    info: dict = {"partial": True}
    with _short_connection(address, keys, "status", timeout) as (sock, endpoint):
        token = b""
        for _ in range(2):  # (the first answer is the counters: the second, with its
            sock.send(P.encode(P.StatusRequest(token)))  # token, has the worker list)
            msg = _answer(sock, endpoint, "STATUS", timeout)
            if not isinstance(msg, P.Status):
                raise ProtocolError(f"broker answered STATUS with {type(msg).__name__}")
            info, token = msg.info, msg.token
            if not info.get("partial"):
                break
    return info


def cancel_run(run: int, address: str | None = None, *, kill: bool = True,
               timeout: float = CONNECT_TIMEOUT_SECONDS,
               keys: str | None = None) -> tuple[int, int]:
    """Cancel run ``run`` (its client key: STATUS ``runs``, ``Executor.key``) on a broker,
    over a short connection: its queued tasks are removed (their futures end cancelled)
    and, with ``kill``, its running and prefetched ones are killed. Allowed for a run of
    the same key identity (``keys``; without keys, any run). Returns ``(queued tasks
    cancelled, held tasks being killed)``; raises :class:`ProtocolError` (code
    ``unknown-run`` or ``unauthorized``) if refused."""
    with _short_connection(address, keys, "cancel", timeout) as (sock, endpoint):
        sock.send(P.encode(P.CancelRun(run, P.CANCEL_KILL if kill else P.CANCEL_IF_QUEUED)))
        msg = _answer(sock, endpoint, "CANCEL_RUN", timeout)
    if isinstance(msg, P.Error):
        raise error_from(msg, f"broker at {endpoint} refused to cancel run {run}")
    if not isinstance(msg, P.RunCancelled):
        raise ProtocolError(f"broker answered CANCEL_RUN with {type(msg).__name__}")
    return msg.queued, msg.killing


class TaskFuture(cf.Future):
    """A future for one zfalkon task; :attr:`task_id` names it on the broker.

    For a task submitted with ``capture_output=True`` (:meth:`Executor.options`),
    :attr:`stdout` and :attr:`stderr` hold what it wrote (text, each cut at the worker's
    output cap; :attr:`output_truncated` says if either was), set before the future is
    done, whether the task returned or raised. They stay None otherwise (and for a task
    killed at its time limit: its output dies with its process).
    """

    stdout: str | None = None
    stderr: str | None = None
    output_truncated: bool = False

    def __init__(self, executor: "Executor", task_id: int) -> None:
        super().__init__()
        self._executor = executor
        self.task_id = task_id

    def result(self, timeout: float | None = None) -> Any:
        """Wait for the task's result (driving the connection from this thread)."""
        return super().result(self._executor._drive(self, timeout))

    def exception(self, timeout: float | None = None) -> BaseException | None:
        """Wait for the task; return its exception or None."""
        return super().exception(self._executor._drive(self, timeout))

    def running(self) -> bool:
        """True once a slot has the task (the broker says so 1 to 2 s after, on its tick,
        and at once in answer to :meth:`cancel`), until it is done."""
        return not self.done() and self.task_id in self._executor._started

    def cancel(self, force: bool = False) -> bool:
        """Cancel the task if no slot has had it yet (or, with ``force``, even if it runs).

        Asks the broker and waits for its answer (one round trip): True once the broker
        has dropped the task, which then never runs; False if a slot has it (it may be
        running: its result comes as usual), if it is done, or if the broker did not answer
        within 10 seconds (the request stands: the task may still end cancelled).

        ``force=True`` (also :meth:`Executor.cancel_running`): a task a slot runs or holds
        is killed (the process running it, and a shell task's command with its process
        group; other tasks of this client queued in that process run again in a fresh
        one); waits for the slot's answer (at most 10 seconds). True once the future is
        cancelled; False if the task finished first (its result stands). A task that may
        have run before (its slot was lost) is cancelled too: side effects may remain.
        """
        if self.done():
            return self.cancelled()
        ex = self._executor
        if ex._closed:
            return False
        if force:
            return ex._cancel_queued(self, P.CANCEL_KILL)
        if self.task_id in ex._started:
            return False
        return ex._cancel_queued(self)

    def _abandon(self) -> None:
        """Cancelled here, whatever the broker does with the task (the executor is giving
        up on it: its result, if any, is dropped)."""
        if cf.Future.cancel(self):
            self.set_running_or_notify_cancel()  # (so that wait() and as_completed() see it)

    def _deliver(self, tid: int, blob: bytes, worker: str) -> None:
        if blob[1:2] == _OUTPUT_KIND:
            output = payload.split_output(blob)
            if output is not None:
                blob, self.stdout, self.stderr, self.output_truncated = output
        try:
            value = payload.result_value(blob, worker, self._executor._pickle)
        except cf.CancelledError:  # the broker cancelled it before any slot had it
            self._abandon()
            return
        except BaseException as exc:
            if not self.cancelled():
                try:
                    self.set_exception(exc)
                except cf.InvalidStateError:
                    pass
            return
        if not self.cancelled():
            try:
                self.set_result(value)
            except cf.InvalidStateError:
                pass

    def _fail(self, exc: BaseException) -> None:
        if not self.done():
            try:
                self.set_exception(exc)
            except cf.InvalidStateError:
                pass


@dataclasses.dataclass(frozen=True, eq=False, repr=False)
class TaskOptions:
    """A view of an :class:`Executor` that submits Python tasks with options; made by
    :meth:`Executor.options` (immutable: holds the executor and the options)."""

    executor: "Executor"
    _options: dict  # (their wire form: payload.task_options)

    @property
    def timeout(self) -> float | None:
        return self._options.get("timeout")

    @property
    def capture_output(self) -> bool:
        return bool(self._options.get("capture"))

    def __repr__(self) -> str:
        return f"<TaskOptions timeout={self.timeout!r} capture_output={self.capture_output!r}>"

    def submit(self, fn: Callable[..., Any] | str, /, *args: Any, **kwargs: Any) -> TaskFuture:
        """As :meth:`Executor.submit`, with these options."""
        ex = self.executor
        return ex._submit_blob(payload.with_options(payload.python_task(
            payload.function_spec(fn, ex._functions), args, kwargs, ex._flags), self._options))

    def map(self, fn: Callable[..., Any] | str, *iterables: Iterable[Any],
            timeout: float | None = None, chunksize: int = MAX_BATCH,
            buffersize: int = MAP_BUFFER) -> Iterator[Any]:
        """As :meth:`Executor.map`, with these options (``timeout`` here is ``map``'s own:
        how long to wait for the results, from this call)."""
        return self.executor._map(fn, iterables, timeout, chunksize, buffersize,
                                  self._options)


class _MapSink:
    """Where one ``map`` call's results land (the executor's ``_pending`` points here, not
    at the iterator, so an abandoned iterator can be collected and cancel its tasks)."""

    def __init__(self) -> None:
        self.results: dict[int, tuple[bytes, str]] = {}
        self.cond = threading.Condition()
        self.waiting = False

    def _deliver(self, tid: int, blob: bytes, worker: str) -> None:
        self.results[tid] = (blob, worker)

    def wake(self) -> None:
        if self.waiting:
            with self.cond:
                self.cond.notify_all()


class _MapStream:
    """The iterator behind one ``Executor.map`` call: tasks in order, results as they come."""

    def __init__(self, executor: "Executor", fn: "str | payload.Function",
                 items: Iterator[tuple], chunksize: int, buffersize: int,
                 deadline: float | None, options: dict | None = None) -> None:
        self.executor = executor
        self.fn = fn
        self.options = options
        self.items = items
        self.chunksize = chunksize
        self.buffersize = buffersize
        self.deadline = deadline
        self.order: collections.deque[int] = collections.deque()
        self.sink = _MapSink()
        self.exhausted = False
        self.refill_at = max(0, buffersize - chunksize)

    def fill(self) -> None:
        """Submit items until ``buffersize`` are in flight or the input is exhausted."""
        ex = self.executor
        encode = payload.task_encoder(self.fn, ex._flags,
                                      not self.options and ex._by_digest(self.fn))
        while not self.exhausted and len(self.order) < self.buffersize:
            n = min(self.chunksize, self.buffersize - len(self.order))
            batch = list(itertools.islice(self.items, n))
            if len(batch) < n:
                self.exhausted = True
            if not batch:
                return
            blobs = list(map(encode, batch))
            if self.options:
                wrap, options = payload.with_options, self.options
                blobs = [wrap(blob, options) for blob in blobs]
            _check_size(max(blobs, key=len))
            ids = ex._new_ids(len(blobs))
            ex._blobs.update(zip(ids, blobs))
            ex._pending.update(zip(ids, itertools.repeat(self.sink)))
            self.order.extend(ids)
            ex._enqueue((_SUBMIT, ids, blobs))

    def __iter__(self) -> "_MapStream":
        return self

    def __next__(self) -> Any:
        if not self.order:
            self.close()
            raise StopIteration
        tid = self.order[0]
        item = self.sink.results.pop(tid, None)
        try:
            if item is None:
                item = self._wait_for(tid)
            self.order.popleft()
            if not self.exhausted and len(self.order) <= self.refill_at:
                self.fill()
            return payload.result_value(item[0], item[1], self.executor._pickle)
        except BaseException:
            self.close()  # as in the standard library: a failure cancels the rest
            raise

    def close(self) -> None:
        """Stop: cancel the tasks still in flight (their results are not wanted)."""
        ex = self.executor
        ex._sinks.discard(self.sink)
        self.exhausted = True
        if self.order:
            left = [t for t in self.order if ex._pending.pop(t, None) is not None]
            self.order.clear()
            self.sink.results.clear()
            if left and not ex._closed:
                ex._cancel(left)

    def __del__(self) -> None:
        self.close()  # an abandoned iterator cancels what it left in flight

    def _wait_for(self, tid: int) -> tuple[bytes, str]:
        sink = self.sink
        with sink.cond:
            sink.waiting = True
            try:
                while tid not in sink.results:
                    self.executor._raise_if_broken()
                    remaining = None
                    if self.deadline is not None:
                        remaining = self.deadline - time.monotonic()
                        if remaining <= 0:
                            raise cf.TimeoutError()
                    sink.cond.wait(remaining if remaining is not None else 1.0)
            finally:
                sink.waiting = False
        return sink.results.pop(tid)


class Executor(cf.Executor):
    """Run Python callables and shell commands on a zfalkon broker's workers.

    Args:
        address: the broker, ``tcp://HOST:PORT``; defaults to ``$ZFALKON_BROKER``.
        name: shown in the broker's status; defaults to ``host-pid``.
        run: a label for this executor's *run* (its session: ``zfalkon runs`` lists it
            with its counters, ``zfalkon cancel`` cancels it; its id is :attr:`key`).
        connect_timeout: seconds to wait for the broker's welcome before raising
            :class:`~zfalkon.errors.BrokerUnavailable`.
        keys: a client key bundle directory (``zfalkon keys new NAME --role client``) for
            a broker started with ``--keys``; defaults to ``$ZFALKON_KEYS``.

        functions: how callables travel: ``"auto"`` (the default) sends those of the
            standard library, installed packages and zfalkon by reference
            (``module:qualname``, imported on the worker) and the rest by value
            (cloudpickle: functions from ``__main__`` or a notebook, lambdas, closures,
            methods, functions from the user's own modules); ``"reference"`` or
            ``"value"`` for all of them.
        pickle: allow pickles both ways: arguments and results that have no typed
            encoding are pickled (protocol 5, by cloudpickle) instead of refused, and
            exceptions keep their exact type and attributes. Off by default: a pickle
            from a worker can run code in this process. Dask's scheduler needs it.

    Arguments and results are typed values (:mod:`zfalkon.values`: msgpack plus tuples,
    sets, big ints, complex, datetimes, numpy arrays, ...). A task's exception is raised
    here as its own type when that type is a builtin or already imported, else as
    :class:`~zfalkon.errors.TaskError`. Example::

        with LocalCluster(workers=2) as cluster, Executor(cluster.address) as ex:
            print(sum(ex.map(abs, range(-1000, 1000))))
            print(ex.shell("hostname").result().stdout)
    """

    def __init__(self, address: str | None = None, *, name: str | None = None,
                 connect_timeout: float = CONNECT_TIMEOUT_SECONDS,
                 keys: str | None = None, functions: str = "auto",
                 pickle: bool = False, run: str | None = None) -> None:
        if functions not in payload.FUNCTION_POLICIES:
            raise ConfigError(f"functions must be one of "
                              f"{', '.join(payload.FUNCTION_POLICIES)}, not {functions!r}")
        self._functions = functions
        self._pickle = bool(pickle)
        self._flags = payload.FLAG_PICKLE if pickle else 0
        self.address = _resolve_address(address)
        bundle = self._keys = peer_keys(keys)
        self._ctx = zmq.Context()
        self._sock = make_socket(self._ctx, zmq.DEALER, self.address, bundle)
        self._sock.setsockopt(zmq.ROUTING_ID, uuid.uuid4().bytes)
        self._sock.setsockopt(zmq.LINGER, 1000)
        self._sock.setsockopt(zmq.SNDHWM, 0)
        self._sock.connect(self.address)
        self._sock_fd = cast(int, self._sock.getsockopt(zmq.FD))
        self._name = name or f"{os.uname().nodename}-{os.getpid()}"
        self._run = run or ""
        try:
            welcome = _handshake(self._sock, self.address, {"name": self._name} | (
                {"run": self._run} if self._run else {}), connect_timeout, bundle)
        except BaseException:
            self._sock.close(0)
            self._ctx.term()
            raise
        self.key = welcome.key
        self._ids = itertools.count((welcome.key << P.ID_SHIFT) + 1)
        self._pending: dict[int, TaskFuture | _MapSink] = {}
        self._started: set[int] = set()  # pending tasks a slot has had (STARTED)
        # Blobs of pending tasks, to submit again to a broker that restarted.
        self._blobs: dict[int, bytes] = {}
        self._hints: dict[int, str] = {}  # data keys of pending tasks that have one
        # Functions its tasks by digest call, by digest (the broker keeps them for its key).
        self._stored: dict[bytes, bytes] = {}
        self._stored_bytes = 0
        self._stored_lock = threading.Lock()
        self._last_heard = time.monotonic()
        self._sinks: weakref.WeakSet[_MapSink] = weakref.WeakSet()  # of live map calls
        # The session's rules (streams, resends, registering again): used under the lock.
        self._session = ClientSession(welcome.key, self._name, self._blobs, self._hints,
                                      self._stored, self._run)
        self._outbox: collections.deque[tuple] = collections.deque()
        self._unsent: collections.deque[bytes] = collections.deque()  # frames zmq refused
        self._waker = Waker()
        self._idle = False
        self._drivers = 0  # threads receiving in _drive_until (changed under the lock)
        self._undriven_at = 0.0  # when the last of them stopped receiving
        self._lock = threading.Lock()  # guards every use of self._sock after __init__
        self._shutdown = False
        self._closing = False
        self._abandon = False  # shutdown timed out: close without waiting for anything
        self._closed = False  # set by the I/O thread when the socket is closed
        self._broken: BaseException | None = None
        self._thread = threading.Thread(target=self._io_main, name="zfalkon-io", daemon=True)
        self._thread.start()
        _watch_workers(self)

    # -- public API --------------------------------------------------------------------

    def submit(self, fn: Callable[..., Any] | str, /, *args: Any, **kwargs: Any) -> TaskFuture:
        """Run ``fn(*args, **kwargs)`` on a worker; ``fn`` may be a ``module:qualname`` string."""
        spec = payload.function_spec(fn, self._functions)
        return self._submit_blob(payload.python_task(spec, args, kwargs, self._flags,
                                                     self._by_digest(spec)))

    def _by_digest(self, spec: "str | payload.Function") -> bool:
        """Whether tasks calling ``spec`` go by digest (its pickle sent once per session
        beside them, kept by the broker, sent once to each slot): a function by value,
        if the broker keeps it (within its limits per client; a bigger one, or one past
        them, travels in every task)."""
        if type(spec) is str:
            return False
        assert isinstance(spec, payload.Function)
        stored = self._stored
        if spec.digest in stored:
            return True
        with self._stored_lock:
            if spec.digest in stored:
                return True
            size = len(spec.blob)
            if size > payload.MAX_STORED_FUNCTION_BYTES or \
                    len(stored) >= payload.MAX_CLIENT_FUNCTIONS or \
                    self._stored_bytes + size > payload.MAX_CLIENT_FUNCTION_BYTES:
                return False
            self._stored_bytes += size
            stored[spec.digest] = spec.blob
            return True

    def options(self, *, timeout: float | None = None,
                capture_output: bool = False) -> "TaskOptions":
        """A view of this executor whose :meth:`~TaskOptions.submit` and
        :meth:`~TaskOptions.map` run Python tasks with these options (the function's own
        keyword arguments stay its own)::

            fut = ex.options(timeout=60, capture_output=True).submit(f, x)

        ``timeout``: seconds a task may run (counted on the worker from its start); past
        them its process is killed and the future raises
        :class:`~zfalkon.errors.TaskTimeout`. (Other tasks of this client queued in that
        process run again in a fresh one.) A task with a time limit runs alone in its
        process: fine for long tasks, slower for streams of tiny ones.
        ``capture_output``: the task's stdout and stderr (``print``, ``sys.stderr``, and
        what its subprocesses write to fds 1 and 2) are captured, each cut at the worker's
        output cap, and set on the future as :attr:`TaskFuture.stdout` and
        :attr:`TaskFuture.stderr` (``map`` drops them). Raises
        :class:`~zfalkon.errors.ConfigError` for a bad value.
        """
        return TaskOptions(self, payload.task_options(
            {"timeout": timeout, "capture_output": capture_output}))

    def cancel_running(self, future: TaskFuture) -> bool:
        """Cancel ``future``'s task even if it is running: ``future.cancel(force=True)``."""
        return future.cancel(force=True)

    def cancel_all(self) -> int:
        """Cancel every task of this executor not yet finished, queued or running (running
        ones are killed: CANCEL mode 2, one request), and return how many were asked. It
        does not wait: each future ends cancelled as the broker or its slot answers (or
        with its result, if that came first); a ``map`` still iterating raises
        ``CancelledError`` when it reaches a cancelled element."""
        ids = [t for t, o in self._pending.copy().items()
               if not (isinstance(o, TaskFuture) and o.done())]
        if ids:
            self._enqueue((_CANCEL, ids, P.CANCEL_KILL))
        return len(ids)

    def shell(self, command: str | Sequence[str], *, env: Mapping[str, str] | None = None,
              cwd: str | None = None, timeout: float | None = None,
              inputs: Mapping[str, bytes | str] | None = None,
              outputs: Sequence[str] | Mapping[str, str] | None = None) -> TaskFuture:
        """Run a shell command on a worker; the future's result is a :class:`ShellResult`.

        A string runs through ``/bin/sh -c``; a list is an argv run directly. ``env`` is
        added to the worker's environment. A non-zero exit is a normal result (check
        ``returncode``); running past ``timeout`` raises :class:`~zfalkon.errors.TaskTimeout`.

        ``inputs`` ``{name: bytes | "s3://bucket/key" | shared path}`` are placed in the
        task's own fresh directory; ``outputs`` (names, or ``{name: "s3://bucket/key"}``)
        are collected after a zero exit, inline ones into ``ShellResult.files``. A missing
        file fails the task with a ``StagingError`` (see :mod:`zfalkon.staging`).
        """
        return self._submit_blob(payload.shell_task(command, env, cwd, timeout, inputs, outputs),
                                 staging.locality(inputs))

    def map(self, fn: Callable[..., Any] | str, *iterables: Iterable[Any],
            timeout: float | None = None, chunksize: int = MAX_BATCH,
            buffersize: int = MAP_BUFFER) -> Iterator[Any]:
        """Like ``concurrent.futures.Executor.map``, streaming.

        Each element is its own task. ``chunksize`` tasks go to the broker per frame;
        at most ``buffersize`` are in flight (submitted, result not yet consumed), so the
        input may be endless. Results come in input order; a failed task raises its
        error when its turn comes, and the rest are cancelled. ``timeout`` counts from
        this call, as in the standard library.
        """
        return self._map(fn, iterables, timeout, chunksize, buffersize, None)

    def _map(self, fn: Callable[..., Any] | str, iterables: tuple[Iterable[Any], ...],
             timeout: float | None, chunksize: int, buffersize: int,
             options: dict | None) -> Iterator[Any]:
        if chunksize < 1 or buffersize < 1:
            raise ConfigError("chunksize and buffersize must be at least 1")
        self._check_open()
        deadline = None if timeout is None else time.monotonic() + timeout
        stream = _MapStream(self, payload.function_spec(fn, self._functions), zip(*iterables),
                            min(chunksize, buffersize), buffersize, deadline, options)
        self._sinks.add(stream.sink)
        stream.fill()
        return stream

    def _connected_slots(self) -> int:
        """The broker's connected slots now (this machine's cores if none, or no answer)."""
        try:
            slots = int(self.status().get("slots") or 0)
        except (BrokerUnavailable, ProtocolError, TypeError, ValueError):
            slots = 0
        return slots if slots > 0 else (os.cpu_count() or 1)

    @property
    def _max_workers(self) -> int:
        """How many tasks to keep in flight: twice the broker's connected slots (so that
        a round trip to the broker is hidden). ``dask.compute(scheduler=executor)`` reads
        it, as it does a ``ThreadPoolExecutor``'s: with one task per slot Dask's graphs of
        short tasks ran ~1.5x slower."""
        return 2 * self._connected_slots()

    def status(self, timeout: float = CONNECT_TIMEOUT_SECONDS) -> dict:
        """The broker's status: counters and the worker list."""
        return query_status(self.address, timeout, self._keys.directory if self._keys else None)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False,
                 timeout: float | None = None) -> None:
        """Stop accepting tasks; optionally cancel the pending ones; optionally wait.

        With ``wait`` (the default) this returns when every submitted task that was not
        cancelled has its result, then closes the connection. ``timeout``: wait at most
        this long; tasks still pending then are cancelled (their futures raise
        ``CancelledError``) and the connection is closed.
        """
        if self._closing:  # already shut down (or shutting down): just wait if asked
            if wait:
                self._thread.join(timeout)
            return
        self._shutdown = True
        if cancel_futures:
            self._cancel_futures()
        self._closing = True
        self._wake()
        if wait:
            self._thread.join(timeout)
            if self._thread.is_alive():  # timed out: give up on what is left
                self._cancel_futures(streams=True)
                self._abandon = True  # (even if the broker cannot be told: it is away)
                self._wake()
                self._thread.join()

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        """Leaving ``with`` normally waits for every task; leaving it by an exception
        cancels what has not finished and closes without waiting."""
        if exc_type is None:
            self.shutdown(wait=True)
        else:
            self.shutdown(wait=True, cancel_futures=True, timeout=0)

    def _cancel_futures(self, streams: bool = False) -> None:
        """Cancel every pending future no slot has had yet (their futures end cancelled
        when the broker confirms; the others run to the end), as the standard library's
        ``shutdown(cancel_futures=True)``. ``streams``: giving up on everything: every
        future is cancelled here at once and every map's remaining tasks are dropped."""
        owners = self._pending.copy()  # (user threads may be adding to it)
        if not streams:
            started = self._started
            ids = [t for t, o in owners.items()
                   if isinstance(o, TaskFuture) and t not in started and not o.done()]
            if ids:
                self._enqueue((_CANCEL, ids, P.CANCEL_IF_QUEUED))
            return
        for owner in owners.values():
            if isinstance(owner, TaskFuture):
                owner._abandon()
        if owners:
            self._cancel(list(owners))
        for sink in list(self._sinks):
            sink.wake()

    # -- used by futures and map streams -----------------------------------------------

    def _check_open(self) -> None:
        if self._shutdown:
            raise RuntimeError("cannot schedule new futures after shutdown")
        self._raise_if_broken()

    def _raise_if_broken(self) -> None:
        if self._broken is not None:
            raise BrokerUnavailable(f"executor is broken: {self._broken}") from self._broken

    def _new_ids(self, n: int) -> list[int]:
        return list(itertools.islice(self._ids, n))

    def _submit_blob(self, blob: bytes, hint: str = "") -> TaskFuture:
        self._check_open()
        _check_size(blob)
        tid = next(self._ids)
        fut = TaskFuture(self, tid)
        idle = not self._pending and not self._outbox
        self._pending[tid] = fut
        self._blobs[tid] = blob
        if hint:
            self._hints[tid] = hint
        if idle and not self._session.rejoining and self._lock.acquire(blocking=False):
            # Nothing in flight: send now rather than hand over to the I/O thread (one
            # thread switch less on the latency path; bursts still batch in the outbox).
            done: list = []
            try:
                if not self._sock.closed:
                    frames = self._session.submit([tid], [blob])
                    for i, frame in enumerate(frames):
                        try:
                            self._sock.send(P.encode(frame), _NOBLOCK)
                        except zmq.Again:
                            if i:  # (the rest wait with the frames zmq refused)
                                self._unsent.extend(P.encode(f) for f in frames[i:])
                                break
                            self._session.unsubmit(len(frames))
                            raise
                    done = self._receive()  # the send may have consumed the fd's edge
                    return fut
            except zmq.Again:
                pass  # not sent: it goes through the outbox instead
            finally:
                self._lock.release()
                self._complete(done)
        self._enqueue((_SUBMIT, [tid], [blob]))
        return fut

    def _drive(self, fut: TaskFuture, timeout: float | None) -> float | None:
        """Receive on the calling thread until ``fut`` is done or ``timeout`` passes.

        Returns the time left of ``timeout``, for the standard wait that follows.

        Waiting here instead of on the future's condition saves a thread switch on every
        result (about 0.15 ms of a 0.5 ms round trip on a 2-core machine). The I/O thread
        may still take the message first; the done-callback's pipe then wakes us.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        if not fut.done():  # (on the I/O thread too: a done-callback may wait on a future)
            self._drive_until(fut, deadline)
        return None if deadline is None else max(0.0, deadline - time.monotonic())

    def _cancel_queued(self, fut: TaskFuture, mode: int = P.CANCEL_IF_QUEUED) -> bool:
        """Ask the broker to cancel ``fut``'s task if no slot has had it (``mode``
        CANCEL_KILL: even if one runs it); wait for the answer (a CANCELLED result, or
        STARTED; with CANCEL_KILL: the task's result) at most CANCEL_WAIT_SECONDS."""
        tid = fut.task_id
        self._enqueue((_CANCEL, [tid], mode))
        started = self._started
        self._drive_until(fut, time.monotonic() + CANCEL_WAIT_SECONDS,
                          None if mode == P.CANCEL_KILL else lambda: tid in started)
        return fut.cancelled()

    def _drive_until(self, fut: TaskFuture, deadline: float | None,
                     until: Callable[[], bool] | None = None) -> None:
        """Receive until ``fut`` is done (or ``until()``), or ``deadline`` passes."""
        io_thread = threading.current_thread() is self._thread
        poke = Waker()  # the future's done-callback wakes us if another thread delivers it
        fut.add_done_callback(lambda _f: poke.wake())
        poller = select.poll()
        poller.register(self._sock_fd, select.POLLIN)
        poller.register(poke.fd, select.POLLIN)
        with self._lock:
            self._drivers += 1
        try:
            while not fut.done() and self._broken is None and not (until and until()):
                with self._lock:
                    if self._sock.closed:
                        return
                    # (the I/O thread, waiting in a done-callback, must also send and ping)
                    done = self._pump() if io_thread else self._receive()
                    if done:  # (its callbacks may block: the I/O thread receives meanwhile)
                        self._undrive()
                if done:
                    try:
                        self._complete(done)  # user callbacks run with no lock held
                    finally:
                        with self._lock:
                            self._drivers += 1
                if fut.done() or (until and until()):
                    return
                wait_ms = -1 if deadline is None else (deadline - time.monotonic()) * 1000
                if deadline is not None and wait_ms <= 0:
                    return
                most = 1000 if until is None else 20  # (STARTED wakes no future: look often)
                poller.poll(min(wait_ms, most) if wait_ms >= 0 else most)
        finally:
            with self._lock:
                self._undrive()
            poke.close()

    def _undrive(self) -> None:
        """A thread stops receiving in :meth:`_drive_until` (under the lock)."""
        self._drivers -= 1
        if not self._drivers:
            self._undriven_at = time.monotonic()

    def _cancel(self, ids: list[int]) -> None:
        """Give up on these tasks: forget them here, the broker drops them (CANCEL_DROP)."""
        for tid in ids:
            self._pending.pop(tid, None)
            self._blobs.pop(tid, None)
        if self._started:
            self._started.difference_update(ids)
        self._enqueue((_CANCEL, ids))

    def _enqueue(self, item: tuple) -> None:
        self._outbox.append(item)
        if self._idle:
            self._wake()

    def _wake(self) -> None:
        self._waker.wake()

    # -- the I/O thread ----------------------------------------------------------------

    def _break(self, exc: BaseException) -> None:
        """The connection is unusable: the I/O thread stops and fails every pending task
        with ``exc`` (outside the lock: failing a future runs its callbacks)."""
        if self._broken is None:
            log.error("zfalkon client: %s", exc)
            self._broken = exc
        self._wake()

    def _io_main(self) -> None:
        try:
            self._io_loop()
        except BaseException as exc:
            log.exception("zfalkon client I/O thread failed")
            self._break(BrokerUnavailable(f"client connection failed: {exc}"))
        finally:
            if self._broken is not None:
                self._fail_all(self._broken)
            with self._lock:
                self._closed = True
                self._sock.close()
                self._waker.close()
            self._ctx.term()

    def _io_loop(self) -> None:
        """Wait on the socket's fd and the wake-up pipe; under the lock, move messages;
        with no lock held, complete futures (their callbacks are user code).

        The socket is used only under ``self._lock`` (callers send on it directly when
        nothing is in flight, and receive on it while they wait for a result: one thread
        switch less per result), so this thread waits with ``select.poll`` on zmq's
        edge-triggered fd and then drains ``ZMQ_EVENTS``, as zmq's docs prescribe. While a
        caller waits in ``result()`` it receives for every future, and this thread
        watches only the wake-up pipe (else both wake at each message and this one, taking
        it first, must wake the caller again: two thread switches more per result); it
        looks every _DRIVEN_POLL_MS whether one still waits, and keeps the session alive.
        """
        sock = self._sock
        poller = select.poll()
        poller.register(self._sock_fd, select.POLLIN)
        poller.register(self._waker.fd, select.POLLIN)
        driven = select.poll()
        driven.register(self._waker.fd, select.POLLIN)
        while True:
            with self._lock:
                done = self._pump()
                finished = self._broken is not None or (self._closing and (self._abandon or (
                    not self._pending and not self._unsent and not self._outbox)))
                if finished and self._broken is None:
                    self._session.ack()
                    self._send_session()
                    sock.send(P.encode(P.Bye("client shutdown")))
            self._complete(done)
            if finished:
                return
            self._idle = True
            self._wait_for_work(poller, driven)
            self._idle = False
            self._waker.drain()

    def _wait_for_work(self, poller: select.poll, driven: select.poll) -> None:
        """The I/O thread's wait: until there is something to send, a message no caller
        will take, or a ping is due. ``poller`` watches the socket and the wake-up pipe,
        ``driven`` only the pipe (while a caller receives, see :meth:`_io_loop`)."""
        if self._unsent:  # (frames zmq refused: try again in 10 ms)
            (driven if self._drivers else poller).poll(10)
            return
        sock_fd, session, blind = self._sock_fd, self._session, _DRIVEN_POLL_MS / 1000
        while not self._outbox:
            if self._drivers or time.monotonic() - self._undriven_at < blind:
                # A caller receives (or did just now, and a serial loop of result() calls
                # comes back at once): look again soon whether one still does.
                if driven.poll(_DRIVEN_POLL_MS) or time.monotonic() >= session.next_ping:
                    return
                continue
            ready = poller.poll(int(PING_SECONDS * 1000))
            if not ready or not self._drivers or any(fd != sock_fd for fd, _ in ready):
                return
            # (only the socket, and a caller came to receive meanwhile: it takes it)

    def _pump(self) -> list:
        """One turn of the connection (under the lock): receive, send what is queued,
        keep the session alive; return the deliveries to complete (with no lock held)."""
        done = self._receive()
        unsent = self._unsent
        if not self._session.rejoining:  # (between HELLO and WELCOME nothing is sent)
            unsent.extend(self._frames())
        while unsent:
            try:
                self._sock.send(unsent[0], _NOBLOCK)
            except zmq.Again:
                break
            unsent.popleft()
        self._session.tick(time.monotonic(), waiting=bool(self._pending))
        self._send_session()
        done += self._receive()  # sending may have consumed the fd's edge
        return done

    def _send_session(self) -> None:
        """Send what the session has to say (under the lock)."""
        out = self._session.out
        if out:
            self._session.out = []
            for msg in out:
                self._sock.send(P.encode(msg), _NOBLOCK)

    def _frames(self) -> Iterator[bytes]:
        """Encode the outbox as SUBMIT and CANCEL frames, in order, each within limits."""
        outbox = self._outbox
        session = self._session
        ids: list[int] = []
        blobs: list[bytes] = []
        size = 0
        while outbox:
            item = outbox.popleft()
            if item[0] == _CANCEL:
                if ids:
                    yield from map(P.encode, session.submit(ids, blobs))
                    ids, blobs, size = [], [], 0
                mode = item[2] if len(item) > 2 else P.CANCEL_DROP
                for i in range(0, len(item[1]), MAX_BATCH):
                    yield P.encode(session.cancel(item[1][i:i + MAX_BATCH], mode))
                continue
            for tid, blob in zip(item[1], item[2]):
                ids.append(tid)
                blobs.append(blob)
                size += len(blob)
                if len(ids) >= MAX_BATCH or size >= FRAME_SOFT_BYTES:
                    yield from map(P.encode, session.submit(ids, blobs))
                    ids, blobs, size = [], [], 0
        if ids:
            yield from map(P.encode, session.submit(ids, blobs))

    def _receive(self) -> list:
        """Take every message waiting (under the lock); return the deliveries, to be
        completed by :meth:`_complete` once the lock is released."""
        sock = self._sock
        pending = self._pending
        blobs = self._blobs
        hints = self._hints
        session = self._session
        done: list = []
        while readable(sock):
            try:
                msg = P.decode(sock.recv())
            except ProtocolError as exc:
                log.error("bad message from broker: %s", exc)
                continue
            now = self._last_heard = time.monotonic()
            if isinstance(msg, P.Welcome) and session.rejoining:
                # Registered again: the session submits every pending task again, those
                # queued here included (cleared first: a task submitted from now on is
                # queued here after its blob is pending, so it is sent at least once).
                self._outbox.clear()
            if type(msg) is P.Started:
                self._started.update(t for t in msg.ids if t in pending)
                continue
            delivered = session.receive(msg, now)
            if delivered is not None:
                if self._started:
                    self._started.difference_update(delivered.ids)
                worker = delivered.worker
                for tid, blob in zip(delivered.ids, delivered.blobs):
                    owner = pending.pop(tid, None)
                    if owner is not None:
                        blobs.pop(tid, None)
                        if hints:
                            hints.pop(tid, None)
                        if type(owner) is _MapSink:  # (no user code: stored at once)
                            owner.results[tid] = (blob, worker)
                            done.append(None)
                        else:
                            done.append((owner, tid, blob, worker))
            if isinstance(msg, P.Welcome) and session.broken:
                self._break(BrokerUnavailable(f"broker at {self.address}: {session.broken}"))
                break
            elif isinstance(msg, P.Error) and msg.code not in ("hello-required", "limit",
                                                                JOURNAL_UNAVAILABLE):
                if msg.code == "version":
                    self._break(error_from(msg, f"broker at {self.address}"))
                    break
                log.error("broker says: %s (%s)", msg.message, msg.code)
            if session.out:
                self._send_session()
        return done

    def _complete(self, done: list) -> None:
        """Complete futures and feed map streams (no lock held: callbacks are user code)."""
        if done:
            error: BaseException | None = None
            for item in done:
                if item is not None:  # a future: its callbacks run here, no lock held
                    try:
                        item[0]._deliver(*item[1:])
                    except BaseException as exc:  # (KeyboardInterrupt, SystemExit from a
                        error = error or exc  # callback: the others are out of _pending)
            if self._sinks:
                for sink in list(self._sinks):
                    sink.wake()
            if error is not None:
                raise error

    def _fail_all(self, exc: BaseException) -> None:
        owners = self._pending.copy()
        self._pending.clear()
        for owner in owners.values():
            if isinstance(owner, TaskFuture):
                owner._fail(exc)
        for sink in list(self._sinks):
            sink.waiting = True
            sink.wake()


def _watch_workers(ex: Executor) -> None:
    """Never silent: log a warning while tasks wait on a broker with no worker (a thread
    of :mod:`zfalkon.watch`, asking the broker's status only while nothing finishes)."""
    from zfalkon.watch import watch_executor

    watch_executor(ex)


__all__ = ["Executor", "TaskFuture", "ShellResult", "query_status"]
