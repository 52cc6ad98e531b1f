"""The client: a ``concurrent.futures.Executor`` backed by a zfalkon broker.

One background I/O thread owns the DEALER socket. Calling threads encode tasks and put
them in an outbox; the I/O thread sends them in batches and routes results back. Futures
are real ``concurrent.futures.Future`` objects (``as_completed``, ``wait`` and
``asyncio.wrap_future`` work). ``map`` streams: it keeps ``buffersize`` tasks in flight
and creates no future per element, so a 10-million-element map uses bounded memory.
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import itertools
import logging
import os
import select
import threading
import time
import uuid
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

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
from zfalkon.net import Waker, broker_endpoint, make_socket
from zfalkon.payload import ShellResult
from zfalkon.security import PeerKeys, peer_keys

log = logging.getLogger("zfalkon.client")

_SUBMIT = 0
_CANCEL = 1
_EVENTS = int(zmq.EVENTS)
_POLLIN = int(zmq.POLLIN)


def _resolve_address(address: str | None) -> str:
    address = address or os.environ.get(BROKER_ENV)
    if not address:
        raise ConfigError(f"no broker address: pass one or set {BROKER_ENV}")
    return broker_endpoint(address)


def _handshake(sock: zmq.Socket, address: str, role_info: dict, timeout: float,
               keys: PeerKeys | None) -> P.Welcome:
    """Send HELLO and wait for WELCOME; raise a clear error for anything else."""
    sock.send(P.encode(P.hello(P.ROLE_CLIENT, role_info)))
    if not sock.poll(timeout * 1000):
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


def query_status(address: str | None = None, timeout: float = CONNECT_TIMEOUT_SECONDS,
                 keys: str | None = None) -> dict:
    """Ask a broker for its status (counters and worker list) over a short connection.

    ``keys``: a client key bundle (default ``$ZFALKON_KEYS``) for a broker with keys.
    """
    endpoint = _resolve_address(address)
    bundle = peer_keys(keys)
    ctx = zmq.Context()
    sock = make_socket(ctx, zmq.DEALER, endpoint, bundle)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(endpoint)
        _handshake(sock, endpoint, {"name": "status"}, timeout, bundle)
        sock.send(P.encode(P.StatusRequest()))
        if not sock.poll(timeout * 1000):
            raise BrokerUnavailable(f"broker at {endpoint} did not answer STATUS")
        msg = P.decode(sock.recv())
        if not isinstance(msg, P.Status):
            raise ProtocolError(f"broker answered STATUS with {type(msg).__name__}")
        sock.setsockopt(zmq.LINGER, 1000)  # let the BYE out, or the broker keeps a stale client
        sock.send(P.encode(P.Bye("status done")))
        return msg.info
    finally:
        sock.close()
        ctx.term()


class TaskFuture(cf.Future):
    """A future for one zfalkon task; :attr:`task_id` names it on the broker."""

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

    def cancel(self) -> bool:
        """Cancel if no result has arrived; the broker drops the task if still queued."""
        if super().cancel():
            self._executor._cancel([self.task_id])
            return True
        return False

    def _deliver(self, tid: int, blob: bytes, worker: str) -> None:
        try:
            value = payload.result_value(blob, worker)
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


class _MapStream:
    """The state behind one ``Executor.map`` call: tasks in order, results as they come."""

    def __init__(self, executor: "Executor", ref: str, items: Iterator[tuple],
                 chunksize: int, buffersize: int, deadline: float | None) -> None:
        self.executor = executor
        self.ref = ref
        self.items = items
        self.chunksize = chunksize
        self.buffersize = buffersize
        self.deadline = deadline
        self.order: collections.deque[int] = collections.deque()
        self.results: dict[int, tuple[bytes, str]] = {}
        self.cond = threading.Condition()
        self.waiting = False
        self.exhausted = False
        self.refill_at = max(0, buffersize - chunksize)

    def fill(self) -> None:
        """Submit items until ``buffersize`` are in flight or the input is exhausted."""
        ex = self.executor
        encode = payload.python_task
        ref = self.ref
        while not self.exhausted and len(self.order) < self.buffersize:
            n = min(self.chunksize, self.buffersize - len(self.order))
            batch = list(itertools.islice(self.items, n))
            if len(batch) < n:
                self.exhausted = True
            if not batch:
                return
            blobs = [_check_size(encode(ref, args, None)) for args in batch]
            ids = ex._new_ids(len(blobs))
            ex._pending.update(zip(ids, itertools.repeat(self)))
            ex._blobs.update(zip(ids, blobs))
            self.order.extend(ids)
            ex._enqueue((_SUBMIT, ids, blobs))

    def _deliver(self, tid: int, blob: bytes, worker: str) -> None:
        self.results[tid] = (blob, worker)

    def wake(self) -> None:
        if self.waiting:
            with self.cond:
                self.cond.notify_all()

    def __iter__(self) -> "_MapStream":
        return self

    def __next__(self) -> Any:
        if not self.order:
            self.close()
            raise StopIteration
        tid = self.order[0]
        item = self.results.pop(tid, None)
        try:
            if item is None:
                item = self._wait_for(tid)
            self.order.popleft()
            if not self.exhausted and len(self.order) <= self.refill_at:
                self.fill()
            return payload.result_value(item[0], item[1])
        except BaseException:
            self.close()  # as in the standard library: a failure cancels the rest
            raise

    def close(self) -> None:
        """Stop: cancel the tasks still in flight (their results are not wanted)."""
        ex = self.executor
        ex._streams.discard(self)
        self.exhausted = True
        if self.order:
            left = [t for t in self.order if ex._pending.pop(t, None) is not None]
            self.order.clear()
            self.results.clear()
            if left and not ex._closed:
                ex._cancel(left)

    def __del__(self) -> None:
        self.close()

    def _wait_for(self, tid: int) -> tuple[bytes, str]:
        with self.cond:
            self.waiting = True
            try:
                while tid not in self.results:
                    self.executor._raise_if_broken()
                    remaining = None
                    if self.deadline is not None:
                        remaining = self.deadline - time.monotonic()
                        if remaining <= 0:
                            raise cf.TimeoutError()
                    self.cond.wait(remaining if remaining is not None else 1.0)
            finally:
                self.waiting = False
        return self.results.pop(tid)


class Executor(cf.Executor):
    """Run Python callables and shell commands on a zfalkon broker's workers.

    Args:
        address: the broker, ``tcp://HOST:PORT``; defaults to ``$ZFALKON_BROKER``.
        name: shown in the broker's status; defaults to ``host-pid``.
        connect_timeout: seconds to wait for the broker's welcome before raising
            :class:`~zfalkon.errors.BrokerUnavailable`.
        keys: a client key bundle directory (``zfalkon keys new NAME --role client``) for
            a broker started with ``--keys``; defaults to ``$ZFALKON_KEYS``.

    Callables travel by reference (``module:qualname``) and must be importable on the
    workers; arguments and results are msgpack values. Example::

        with LocalCluster(workers=2) as cluster, Executor(cluster.address) as ex:
            print(sum(ex.map(abs, range(-1000, 1000))))
            print(ex.shell("hostname").result().stdout)
    """

    def __init__(self, address: str | None = None, *, name: str | None = None,
                 connect_timeout: float = CONNECT_TIMEOUT_SECONDS,
                 keys: str | None = None) -> None:
        self.address = _resolve_address(address)
        bundle = self._keys = peer_keys(keys)
        self._ctx = zmq.Context()
        self._sock = make_socket(self._ctx, zmq.DEALER, self.address, bundle)
        self._sock.setsockopt(zmq.ROUTING_ID, uuid.uuid4().bytes)
        self._sock.setsockopt(zmq.LINGER, 1000)
        self._sock.setsockopt(zmq.SNDHWM, 0)
        self._sock.connect(self.address)
        self._sock_fd = self._sock.getsockopt(zmq.FD)
        self._name = name or f"{os.uname().nodename}-{os.getpid()}"
        try:
            welcome = _handshake(self._sock, self.address, {"name": self._name},
                                 connect_timeout, bundle)
        except BaseException:
            self._sock.close(0)
            self._ctx.term()
            raise
        self.key = welcome.key
        self._ids = itertools.count((welcome.key << P.ID_SHIFT) + 1)
        self._pending: dict[int, TaskFuture | _MapStream] = {}
        # Blobs of pending tasks, to submit again to a broker that restarted.
        self._blobs: dict[int, bytes] = {}
        self._hints: dict[int, str] = {}  # data keys of pending tasks that have one
        self._rejoining = False
        self._last_heard = time.monotonic()
        self._streams: set[_MapStream] = set()
        self._outbox: collections.deque[tuple] = collections.deque()
        self._waker = Waker()
        self._idle = False
        self._lock = threading.Lock()  # guards every use of self._sock after __init__
        self._shutdown = False
        self._closing = False
        self._closed = False  # set by the I/O thread when the socket is closed
        self._broken: BaseException | None = None
        self._thread = threading.Thread(target=self._io_main, name="zfalkon-io", daemon=True)
        self._thread.start()

    # -- public API --------------------------------------------------------------------

    def submit(self, fn: Callable[..., Any] | str, /, *args: Any, **kwargs: Any) -> TaskFuture:
        """Run ``fn(*args, **kwargs)`` on a worker; ``fn`` may be a ``module:qualname`` string."""
        return self._submit_blob(payload.python_task(payload.callable_ref(fn), args, kwargs))

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
        if chunksize < 1 or buffersize < 1:
            raise ConfigError("chunksize and buffersize must be at least 1")
        self._check_open()
        deadline = None if timeout is None else time.monotonic() + timeout
        stream = _MapStream(self, payload.callable_ref(fn), zip(*iterables),
                            min(chunksize, buffersize), buffersize, deadline)
        self._streams.add(stream)
        stream.fill()
        return stream

    def status(self, timeout: float = CONNECT_TIMEOUT_SECONDS) -> dict:
        """The broker's status: counters and the worker list."""
        return query_status(self.address, timeout, self._keys.directory if self._keys else None)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Stop accepting tasks; optionally cancel the pending ones; optionally wait.

        With ``wait`` (the default) this returns when every submitted task that was not
        cancelled has its result, then closes the connection.
        """
        if self._closing:  # already shut down (or shutting down): just wait if asked
            if wait:
                self._thread.join()
            return
        self._shutdown = True
        if cancel_futures:
            for owner in list(self._pending.values()):
                if isinstance(owner, TaskFuture):
                    owner.cancel()
        self._closing = True
        self._wake()
        if wait:
            self._thread.join()

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
        if idle and self._lock.acquire(blocking=False):
            # Nothing in flight: send now rather than hand over to the I/O thread (one
            # thread switch less on the latency path; bursts still batch in the outbox).
            try:
                self._sock.send(P.encode(P.Submit([tid], [blob], [hint] if hint else [])),
                                zmq.NOBLOCK)
                self._receive()  # the send may have consumed the fd's edge: drain now
                return fut
            except zmq.Again:
                pass
            finally:
                self._lock.release()
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
        if not fut.done() and threading.current_thread() is not self._thread:
            self._drive_until(fut, deadline)
        return None if deadline is None else max(0.0, deadline - time.monotonic())

    def _drive_until(self, fut: TaskFuture, deadline: float | None) -> None:
        poke = Waker()  # the future's done-callback wakes us if another thread delivers it
        fut.add_done_callback(lambda _f: poke.wake())
        poller = select.poll()
        poller.register(self._sock_fd, select.POLLIN)
        poller.register(poke.fd, select.POLLIN)
        try:
            while not fut.done() and self._broken is None:
                with self._lock:
                    if self._sock.closed:
                        return
                    self._receive()
                if fut.done():
                    return
                wait_ms = -1 if deadline is None else (deadline - time.monotonic()) * 1000
                if deadline is not None and wait_ms <= 0:
                    return
                poller.poll(min(wait_ms, 1000) if wait_ms >= 0 else 1000)
        finally:
            poke.close()

    def _cancel(self, ids: list[int]) -> None:
        for tid in ids:
            self._pending.pop(tid, None)
            self._blobs.pop(tid, None)
        self._enqueue((_CANCEL, ids))

    def _enqueue(self, item: tuple) -> None:
        self._outbox.append(item)
        if self._idle:
            self._wake()

    def _wake(self) -> None:
        self._waker.wake()

    # -- the I/O thread ----------------------------------------------------------------

    def _break(self, exc: BaseException) -> None:
        """The connection is unusable: fail every pending task with ``exc``."""
        if self._broken is None:
            log.error("zfalkon client: %s", exc)
            self._broken = exc
        self._fail_all(exc)
        self._wake()

    def _io_main(self) -> None:
        try:
            self._io_loop()
        except BaseException as exc:
            log.exception("zfalkon client I/O thread failed")
            self._break(BrokerUnavailable(f"client connection failed: {exc}"))
        finally:
            with self._lock:
                self._closed = True
                self._sock.close()
                self._waker.close()
            self._ctx.term()

    def _io_loop(self) -> None:
        """Wait on the socket's fd and the wake-up pipe; under the lock, move messages.

        The socket is used only under ``self._lock`` (callers send on it directly when
        nothing is in flight), so this thread waits with ``select.poll`` on zmq's
        edge-triggered fd and then drains ``ZMQ_EVENTS``, as zmq's docs prescribe.
        """
        sock = self._sock
        poller = select.poll()
        poller.register(self._sock_fd, select.POLLIN)
        poller.register(self._waker.fd, select.POLLIN)
        unsent: collections.deque[bytes] = collections.deque()
        while True:
            with self._lock:
                self._receive()
                unsent.extend(self._frames())
                while unsent:
                    try:
                        sock.send(unsent[0], zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    unsent.popleft()
                self._receive()  # sending may have consumed the fd's edge
                if self._broken is not None:
                    return
                if self._closing and not self._pending and not unsent and not self._outbox:
                    sock.send(P.encode(P.Bye("client shutdown")))
                    return
            self._idle = True
            if not self._outbox:
                poller.poll(10 if unsent else 1000)
            self._idle = False
            if self._pending and time.monotonic() - self._last_heard > PING_SECONDS:
                # Work is pending and the broker has been quiet: is it still the same one?
                # (A restarted broker answers hello-required.) A re-HELLO that went
                # unanswered this long is tried again on that answer.
                self._rejoining = False
                with self._lock:
                    if not self._sock.closed:
                        self._sock.send(P.encode(P.Ping(time.monotonic())), zmq.NOBLOCK)
                self._last_heard = time.monotonic()
            self._waker.drain()

    def _frames(self) -> Iterator[bytes]:
        """Encode the outbox as SUBMIT and CANCEL frames, in order, each within limits."""
        outbox = self._outbox
        ids: list[int] = []
        blobs: list[bytes] = []
        size = 0
        while outbox:
            item = outbox.popleft()
            if item[0] == _CANCEL:
                if ids:
                    yield self._submit_frame(ids, blobs)
                    ids, blobs, size = [], [], 0
                yield P.encode(P.Cancel(item[1]))
                continue
            for tid, blob in zip(item[1], item[2]):
                ids.append(tid)
                blobs.append(blob)
                size += len(blob)
                if len(ids) >= MAX_BATCH or size >= FRAME_SOFT_BYTES:
                    yield self._submit_frame(ids, blobs)
                    ids, blobs, size = [], [], 0
        if ids:
            yield self._submit_frame(ids, blobs)

    def _submit_frame(self, ids: list[int], blobs: list[bytes]) -> bytes:
        hints = self._hints
        return P.encode(P.Submit(ids, blobs, [hints.get(t, "") for t in ids] if hints else []))

    def _receive(self) -> None:
        sock = self._sock
        pending = self._pending
        blobs = self._blobs
        while sock.getsockopt(_EVENTS) & _POLLIN:
            try:
                msg = P.decode(sock.recv())
            except ProtocolError as exc:
                log.error("bad message from broker: %s", exc)
                continue
            self._last_heard = time.monotonic()
            if type(msg) is P.Deliver:
                worker = msg.worker
                for tid, blob in zip(msg.ids, msg.blobs):
                    owner = pending.pop(tid, None)
                    if owner is not None:
                        blobs.pop(tid, None)
                        if self._hints:
                            self._hints.pop(tid, None)
                        owner._deliver(tid, blob, worker)
                for stream in list(self._streams):
                    stream.wake()
            elif type(msg) is P.Error and msg.code == "hello-required":
                self._rejoin()
            elif type(msg) is P.Welcome:
                self._resubmit(msg)
            elif type(msg) is P.Error:
                if msg.code == "version":
                    self._break(error_from(msg, f"broker at {self.address}"))
                    return
                log.error("broker says: %s (%s)", msg.message, msg.code)

    def _rejoin(self) -> None:
        """The broker does not know us (it restarted): register again, asking for our key."""
        if not self._rejoining:
            self._rejoining = True
            log.warning("broker at %s restarted; registering again", self.address)
            self._sock.send(P.encode(P.hello(P.ROLE_CLIENT, {"name": self._name, "key": self.key})))

    def _resubmit(self, welcome: P.Welcome) -> None:
        """Registered again: submit every pending task again (task ids are idempotency keys)."""
        self._rejoining = False
        if welcome.key != self.key:
            self._break(BrokerUnavailable(
                f"broker at {self.address} restarted and gave this client another key; "
                "its pending tasks cannot be resubmitted"))
            return
        ids = [t for t in self._pending if t in self._blobs]
        log.warning("registered again; submitting %d pending tasks again", len(ids))
        self._outbox.appendleft((_SUBMIT, ids, [self._blobs[t] for t in ids]))
        self._wake()

    def _fail_all(self, exc: BaseException) -> None:
        for owner in list(self._pending.values()):
            if isinstance(owner, TaskFuture):
                owner._fail(exc)
        self._pending.clear()
        for stream in list(self._streams):
            stream.waiting = True
            stream.wake()


__all__ = ["Executor", "TaskFuture", "ShellResult", "query_status"]
