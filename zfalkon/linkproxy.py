"""A user-space TCP proxy that emulates a WAN link: one-way delay, jitter and a bandwidth cap.

Machines without ``tc netem`` can still put workers "behind a slow link": start a
:class:`LinkProxy` in front of the broker and give the workers its :attr:`LinkProxy.address`
instead of the broker's::

    with LinkProxy(cluster.address, delay_ms=25) as proxy:   # RTT + 50 ms
        start_worker(proxy.address)

Model (per direction, client->target is "up", target->client is "down"):

* A chunk read at time ``t`` (whatever ``recv`` returns, up to 256 KiB) leaves the link at
  ``release = max(previous_release, wire_done + delay + U(0, jitter))``, where
  ``wire_done = t`` without a bandwidth cap, and with one the end of its serialization on a
  shared wire: ``wire_done = max(wire_free, t) + n * 8 / bandwidth_bps``. The ``max`` with
  the previous release keeps byte order even with jitter. The bandwidth cap (one per
  direction) is shared by every connection through the proxy: it models one link.
* Released bytes are written at once (non-blocking, partial writes buffered, TCP_NODELAY on
  both sides). With no delay, jitter or cap a chunk is written as soon as it is read.
* End of stream travels like data (a FIN is released after the bytes before it) and is
  passed on with ``shutdown(SHUT_WR)``, so half-closed connections work; the connection is
  closed when both directions have ended. An error or reset on either side resets both.
* Each direction buffers at most ``buffer_bytes`` (less under a bandwidth cap: about
  0.1 s of wire time); beyond that the proxy stops reading and TCP flow control pushes back.

Everything runs on one background thread: a ``selectors`` loop plus a heap of release
times; it sleeps until the next socket event or the next due release (no polling). Timer
resolution is that of ``epoll`` (1 ms, rounded up: releases are never early).

Fault injection (for tests; thread-safe, each call takes effect before it returns). Every
accepted connection gets an *accept index* (0 for the first the proxy ever accepted);
``which`` selects connections by it: ``None`` for all, a predicate on the index, or a
collection of indexes.

* :meth:`LinkProxy.freeze` stops moving bytes both ways on the selected connections: the
  proxy neither reads nor writes them, so the kernel's buffers fill and each peer sees a
  stalled path (its keep-alives and heartbeats stop flowing too). The selection also
  freezes connections accepted later (they are accepted, and connected to the target, but
  move no bytes) until :meth:`LinkProxy.thaw`, which lets everything held go, in order.
  Freezes and thaws apply in the order they were made: the last one whose selection
  matches a new connection decides whether it starts frozen; ``thaw()`` clears them all.
* :meth:`LinkProxy.reset` closes the selected connections with a reset (RST, SO_LINGER 0)
  on both sides.
* :meth:`LinkProxy.connections` lists the accept indexes of the open connections.

``python -m zfalkon.linkproxy --target tcp://HOST:PORT --delay-ms 25`` runs one in the
foreground; ``python -m zfalkon.linkproxy --overhead`` measures what the proxy itself adds.
"""

from __future__ import annotations

import argparse
import collections
import errno
import heapq
import itertools
import json
import logging
import math
import os
import random
import selectors
import signal
import socket
import statistics
import struct
import sys
import threading
import time
from typing import Any, Callable, Collection, TypeVar, Union

from zfalkon.errors import ConfigError
from zfalkon.net import parse_address

__all__ = ["LinkProxy", "TcpServer", "echo", "proxy_overhead", "main"]

log = logging.getLogger(__name__)

READY_PREFIX = "zfalkon linkproxy listening on "
RECV_BYTES = 256 * 1024
DEFAULT_BUFFER_BYTES = 4 * 1024 * 1024
STOP_TIMEOUT_SECONDS = 5.0
_ACCEPTS_PER_EVENT = 64
_LINGER_RESET = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends RST

_T = TypeVar("_T")
#: Which connections a fault applies to: None (all), a predicate on the accept index, or a
#: collection of accept indexes.
Selection = Union[None, Callable[[int], bool], Collection[int]]


def _selection(which: Selection) -> Callable[[int], bool]:
    """A predicate on accept indexes for a ``which`` argument."""
    if which is None:
        return lambda index: True
    if callable(which):
        return which
    try:
        chosen = frozenset(which)
    except TypeError:
        raise ConfigError("which must be None, a predicate on the accept index, or a "
                          f"collection of indexes, not {which!r}") from None
    return chosen.__contains__


class _Wire:
    """One direction of the emulated link: when its (shared) wire is next free."""

    __slots__ = ("free_at",)

    def __init__(self) -> None:
        self.free_at = 0.0


class _Pipe:
    """One direction of one connection: bytes read from ``src``, to be written to ``dst``."""

    __slots__ = ("conn", "src", "dst", "wire", "up", "queue", "out", "out_offset", "pending",
                 "last_release", "eof_read", "eof_due", "eof_sent", "timer_armed")

    def __init__(self, conn: "_Conn", src: socket.socket, dst: socket.socket, wire: _Wire,
                 up: bool) -> None:
        self.conn = conn
        self.src = src
        self.dst = dst
        self.wire = wire
        self.up = up
        self.queue: collections.deque[tuple[float, bytes]] = collections.deque()  # not yet due
        self.out: collections.deque[bytes] = collections.deque()  # due, not yet written
        self.out_offset = 0          # bytes of out[0] already written
        self.pending = 0             # bytes in queue + out (for flow control)
        self.last_release = 0.0
        self.eof_read = False        # src sent EOF (or the pipe is dead)
        self.eof_due = False         # the EOF has been released: shut dst down once out drains
        self.eof_sent = False        # dst has been shut down for writing
        self.timer_armed = False


class _Conn:
    """One proxied connection: the accepted client socket and the socket to the target."""

    __slots__ = ("index", "frozen", "client", "server", "connecting", "up", "down", "closed",
                 "masks")

    def __init__(self, index: int, client: socket.socket, server: socket.socket,
                 up_wire: _Wire, down_wire: _Wire, frozen: bool = False) -> None:
        self.index = index           # accept index: 0 for the proxy's first connection
        self.frozen = frozen         # no bytes move either way (see LinkProxy.freeze)
        self.client = client
        self.server = server
        self.connecting = True
        self.up = _Pipe(self, client, server, up_wire, up=True)
        self.down = _Pipe(self, server, client, down_wire, up=False)
        self.closed = False
        self.masks: dict[socket.socket, int] = {client: 0, server: 0}


class LinkProxy:
    """A TCP proxy on ``listen_host`` that relays to ``target`` through an emulated link.

    Args:
        target: ``tcp://HOST:PORT`` to relay to (e.g. a broker address).
        delay_ms: one-way delay added in each direction (RTT grows by twice this).
        jitter_ms: extra one-way delay per chunk, uniform in ``[0, jitter_ms]`` (byte order
            is kept: a chunk is never released before the one read before it).
        bandwidth_bps: bits per second of each direction of the link (shared by all
            connections through this proxy); ``None`` for no cap.
        listen_host: address to listen on.
        listen_port: port to listen on; 0 picks a free port (see :attr:`address`).
        buffer_bytes: most bytes buffered per connection and direction before the proxy
            stops reading (TCP flow control then pushes back on the sender).
        seed: seed for the jitter's random numbers (for reproducible runs).

    :meth:`start` binds and starts the one background thread; :meth:`stop` (or leaving the
    ``with`` block) closes the listener and every connection and joins the thread.

    Fault injection, from any thread: :meth:`freeze`, :meth:`thaw`, :meth:`reset` and
    :meth:`connections` (see the module docstring). :attr:`accepted` counts connections
    accepted so far (the next one's accept index).
    """

    def __init__(self, target: str, *, delay_ms: float = 0.0, jitter_ms: float = 0.0,
                 bandwidth_bps: float | None = None, listen_host: str = "127.0.0.1",
                 listen_port: int = 0, buffer_bytes: int = DEFAULT_BUFFER_BYTES,
                 seed: int | None = None) -> None:
        host, port = parse_address(target)
        if port == "*":
            raise ConfigError(f"proxy target {target!r} needs a real port")
        for name, value in (("delay_ms", delay_ms), ("jitter_ms", jitter_ms)):
            if not (math.isfinite(value) and value >= 0):
                raise ConfigError(f"{name} must be a finite number >= 0, not {value!r}")
        if bandwidth_bps is not None and not (math.isfinite(bandwidth_bps) and bandwidth_bps > 0):
            raise ConfigError(f"bandwidth_bps must be > 0 (or None), not {bandwidth_bps!r}")
        if not 0 <= listen_port < 65536:
            raise ConfigError(f"listen_port {listen_port} is outside 0-65535")
        if buffer_bytes < 1:
            raise ConfigError("buffer_bytes must be >= 1")
        self.target = target
        self._target_host = host.strip("[]")
        self._target_port = int(port)
        self.delay_ms = float(delay_ms)
        self.jitter_ms = float(jitter_ms)
        self.bandwidth_bps = None if bandwidth_bps is None else float(bandwidth_bps)
        self.listen_host = listen_host.strip("[]")
        self.listen_port = listen_port
        self._delay = self.delay_ms / 1000.0
        self._jitter = self.jitter_ms / 1000.0
        self._rng = random.Random(seed)
        if self.bandwidth_bps is None:
            self._recv_bytes = RECV_BYTES
            self._pipe_limit = buffer_bytes
        else:
            rate = self.bandwidth_bps / 8.0  # bytes per second
            # Chunks of ~2 ms of wire time so releases are smooth, and ~0.1 s of queue per
            # connection so one bulk transfer does not hold the shared wire for seconds.
            self._recv_bytes = int(min(RECV_BYTES, max(4096, rate * 0.002)))
            self._pipe_limit = int(min(buffer_bytes, max(64 * 1024, rate * 0.1)))
        self._up_wire = _Wire()
        self._down_wire = _Wire()
        self.bytes_up = 0      # bytes written to the target
        self.bytes_down = 0    # bytes written back to clients
        self.accepted = 0      # connections accepted so far (= the next accept index)
        self._conns: set[_Conn] = set()
        # freeze()/thaw() selections still applying to new connections, oldest first:
        # (freeze?, selection). The last one that matches a new connection decides.
        self._freeze_rules: list[tuple[bool, Callable[[int], bool]]] = []
        # Control calls for the relay thread: (function, done, [result or exception]).
        self._calls: collections.deque[tuple[Callable[[], Any], threading.Event, list]] = (
            collections.deque())
        self._calls_lock = threading.Lock()
        self._loop_done = False  # the relay thread has ended: run control calls directly
        self._heap: list[tuple[float, int, _Pipe]] = []
        self._seq = itertools.count()
        self._listener: socket.socket | None = None
        self._port: int | None = None
        self._target_addr: tuple[int, Any] | None = None
        self._selector: selectors.BaseSelector | None = None
        self._wake_r: socket.socket | None = None
        self._wake_w: socket.socket | None = None
        self._stopping = False
        self._accept_paused_until: float | None = None  # after accept() errors (EMFILE)
        self._thread: threading.Thread | None = None

    # -- public API --------------------------------------------------------------------

    @property
    def address(self) -> str:
        """``tcp://HOST:PORT`` the proxy listens on: give this to the workers."""
        if self._port is None:
            raise RuntimeError("the proxy is not started")
        port = self._port
        host = f"[{self.listen_host}]" if ":" in self.listen_host else self.listen_host
        return f"tcp://{host}:{port}"

    @property
    def open_connections(self) -> int:
        """Connections being relayed right now."""
        return len(self._conns)

    @property
    def running(self) -> bool:
        """True while the background thread runs."""
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> "LinkProxy":
        """Resolve the target, bind the listener and start the relay thread; return self."""
        if self._thread is not None:
            raise RuntimeError("a LinkProxy can be started once")
        try:
            infos = socket.getaddrinfo(self._target_host, self._target_port,
                                       type=socket.SOCK_STREAM)
        except socket.gaierror as exc:
            raise ConfigError(f"cannot resolve proxy target {self.target!r}: {exc}") from None
        family, _, _, _, sockaddr = infos[0]
        self._target_addr = (family, sockaddr)
        listen_family = socket.AF_INET6 if ":" in self.listen_host else socket.AF_INET
        listener = socket.socket(listen_family, socket.SOCK_STREAM)
        try:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind((self.listen_host, self.listen_port))
            listener.listen(128)
            listener.setblocking(False)
        except OSError as exc:
            listener.close()
            raise ConfigError(
                f"cannot listen on {self.listen_host}:{self.listen_port}: {exc}") from None
        self._listener = listener
        self._port = listener.getsockname()[1]
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._selector.register(listener, selectors.EVENT_READ, "listen")
        self._selector.register(self._wake_r, selectors.EVENT_READ, "wake")
        self._thread = threading.Thread(target=self._run, name="zfalkon-linkproxy", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = STOP_TIMEOUT_SECONDS) -> None:
        """Close the listener and every connection; join the thread (at most ``timeout`` s)."""
        self._stopping = True
        self._wake()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.warning("linkproxy thread did not stop within %.1f s", timeout)
        if self._thread is None:  # never started: release what start() did not get to
            self._close_resources()

    def __enter__(self) -> "LinkProxy":
        return self.start() if self._thread is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        where = self.address if self._port is not None else "unstarted"
        bw = "" if self.bandwidth_bps is None else f" bandwidth={self.bandwidth_bps:g}bps"
        return (f"<LinkProxy {where} -> {self.target} delay={self.delay_ms:g}ms "
                f"jitter={self.jitter_ms:g}ms{bw}>")

    # -- fault injection ---------------------------------------------------------------

    def freeze(self, which: Selection = None) -> list[int]:
        """Stop moving bytes, both ways, on the selected connections; return their indexes.

        ``which``: ``None`` for every connection, a predicate on the accept index, or a
        collection of indexes. The proxy stops reading and writing those sockets, so bytes
        in flight stay in its buffers and the kernel's, and both peers see a stalled path.
        Connections accepted later that ``which`` selects are frozen from the start (they
        are accepted and connected to the target, but move no bytes) until a :meth:`thaw`
        selecting them. Takes effect before it returns: no byte moves on a selected
        connection afterwards.
        """
        match = _selection(which)

        def apply() -> list[int]:
            if which is None:
                self._freeze_rules = [(True, match)]
            else:
                self._freeze_rules.append((True, match))
            hit = []
            for conn in self._conns:
                if match(conn.index):
                    hit.append(conn.index)
                    if not conn.frozen:
                        conn.frozen = True
                        self._update(conn)
            return sorted(hit)

        return self._control(apply)

    def thaw(self, which: Selection = None) -> list[int]:
        """Let the selected frozen connections move again; return their indexes.

        Everything held (in the proxy's buffers and the kernel's) goes on, in order, and
        new connections that ``which`` selects are no longer frozen at birth. ``thaw()``
        thaws every connection and forgets every freeze.
        """
        match = _selection(which)

        def apply() -> list[int]:
            if which is None:
                self._freeze_rules = []
            else:
                self._freeze_rules.append((False, match))
            hit = []
            now = time.monotonic()
            for conn in list(self._conns):
                if conn.frozen and match(conn.index):
                    hit.append(conn.index)
                    conn.frozen = False
                    for pipe in (conn.up, conn.down):
                        if not conn.closed:
                            self._release_due(pipe, now)  # flushes what is due, re-arms
                    if not conn.closed:
                        self._update(conn)
            return sorted(hit)

        return self._control(apply)

    def reset(self, which: Selection = None) -> list[int]:
        """Close the selected connections with a reset (RST) on both sides; return their
        indexes. Bytes the proxy still held for them are dropped."""
        match = _selection(which)

        def apply() -> list[int]:
            hit = [conn for conn in self._conns if match(conn.index)]
            for conn in hit:
                self._reset(conn)
            return sorted(conn.index for conn in hit)

        return self._control(apply)

    def connections(self, frozen: bool | None = None) -> list[int]:
        """Accept indexes of the connections open now, ascending (``frozen``: only the
        frozen ones, or only the others)."""
        return self._control(lambda: sorted(
            c.index for c in self._conns if frozen is None or c.frozen == frozen))

    def _frozen_at_birth(self, index: int) -> bool:
        for freeze, match in reversed(self._freeze_rules):
            try:
                if match(index):
                    return freeze
            except Exception:
                log.exception("linkproxy freeze selection failed on connection %d", index)
        return False

    def _control(self, fn: Callable[[], _T], timeout: float = STOP_TIMEOUT_SECONDS) -> _T:
        """Run ``fn`` on the relay thread (directly when there is none) and return its result."""
        done = threading.Event()
        box: list = []
        with self._calls_lock:
            direct = (self._thread is None or self._loop_done
                      or self._thread is threading.current_thread())
            if not direct:
                self._calls.append((fn, done, box))
        if direct:
            return fn()
        self._wake()
        if not done.wait(timeout):
            raise RuntimeError(f"the linkproxy thread did not answer within {timeout} s")
        if isinstance(box[0], BaseException):
            raise box[0]
        return box[0]

    def _run_calls(self) -> None:
        while True:
            with self._calls_lock:
                if not self._calls:
                    return
                fn, done, box = self._calls.popleft()
            try:
                box.append(fn())
            except BaseException as exc:  # handed back to the caller
                box.append(exc)
            done.set()

    def _wake(self) -> None:
        if self._wake_w is not None:
            try:
                self._wake_w.send(b"x")
            except OSError:
                pass  # full (a wake-up is pending anyway), or closed by stop()

    # -- event loop --------------------------------------------------------------------

    def _run(self) -> None:
        assert self._selector is not None
        try:
            while not self._stopping:
                wake_at = self._heap[0][0] if self._heap else None
                if self._accept_paused_until is not None:
                    wake_at = min(wake_at or math.inf, self._accept_paused_until)
                timeout = None if wake_at is None else max(0.0, wake_at - time.monotonic())
                for key, events in self._selector.select(timeout):
                    if self._stopping:
                        break
                    self._dispatch(key.data, key.fileobj, events)
                self._fire_timers()
        except Exception:  # never leave a dead proxy with live sockets behind
            log.exception("linkproxy event loop failed")
        finally:
            self._close_resources()
            with self._calls_lock:
                self._loop_done = True  # later control calls run on their caller's thread
            self._run_calls()

    def _dispatch(self, data: Any, sock: Any, events: int) -> None:
        if data == "listen":  # (a _Conn never equals a str)
            self._accept()
        elif data == "wake":
            try:
                self._wake_r.recv(4096)  # type: ignore[union-attr]
            except OSError:
                pass
            self._run_calls()
        else:
            conn: _Conn = data
            try:
                self._on_socket(conn, sock, events)
            except Exception:
                log.exception("linkproxy connection failed; resetting it")
                self._reset(conn)

    def _fire_timers(self) -> None:
        now = time.monotonic()
        if self._accept_paused_until is not None and self._accept_paused_until <= now:
            self._accept_paused_until = None
            assert self._selector is not None and self._listener is not None
            self._selector.register(self._listener, selectors.EVENT_READ, "listen")
        while self._heap and self._heap[0][0] <= now:
            _, _, pipe = heapq.heappop(self._heap)
            pipe.timer_armed = False
            if pipe.conn.closed:
                continue
            self._release_due(pipe, now)

    def _accept(self) -> None:
        assert self._listener is not None and self._target_addr is not None
        family, sockaddr = self._target_addr
        for _ in range(_ACCEPTS_PER_EVENT):
            try:
                client, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # e.g. EMFILE: leave it queued
                self._pause_accepting(exc)
                return
            try:
                server = socket.socket(family, socket.SOCK_STREAM)
            except OSError as exc:
                _hard_close(client)
                self._pause_accepting(exc)
                return
            client.setblocking(False)
            server.setblocking(False)
            for s in (client, server):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            err = server.connect_ex(sockaddr)
            if err not in (0, errno.EINPROGRESS, errno.EAGAIN):
                log.warning("linkproxy cannot connect to %s: %s", self.target, _strerror(err))
                _hard_close(client)
                server.close()
                continue
            index = self.accepted
            self.accepted += 1
            conn = _Conn(index, client, server, self._up_wire, self._down_wire,
                         frozen=self._frozen_at_birth(index))
            self._conns.add(conn)
            self._update(conn)

    def _pause_accepting(self, exc: OSError) -> None:
        """Out of descriptors (or similar): stop accepting for 0.1 s instead of spinning."""
        log.warning("linkproxy cannot accept a connection: %s", exc)
        assert self._selector is not None and self._listener is not None
        self._selector.unregister(self._listener)
        self._accept_paused_until = time.monotonic() + 0.1

    def _on_socket(self, conn: _Conn, sock: socket.socket, events: int) -> None:
        if conn.closed or conn.frozen:  # frozen: an event from before the freeze; ignored
            return
        is_server = sock is conn.server
        if is_server and conn.connecting:
            if not events & selectors.EVENT_WRITE:
                return
            err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                log.warning("linkproxy cannot connect to %s: %s", self.target, _strerror(err))
                self._reset(conn)
                return
            conn.connecting = False
            self._flush(conn.up)
            if conn.closed:
                return
            self._update(conn)
            return
        if events & selectors.EVENT_WRITE:
            self._flush(conn.up if is_server else conn.down)
            if conn.closed:
                return
        if events & selectors.EVENT_READ:
            self._read(conn.up if sock is conn.client else conn.down)
        if not conn.closed:
            self._update(conn)

    def _read(self, pipe: _Pipe) -> None:
        if pipe.eof_read:
            return
        try:
            data = pipe.src.recv(self._recv_bytes)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._reset(pipe.conn)
            return
        now = time.monotonic()
        n = len(data)
        if not n:
            pipe.eof_read = True
        wire = pipe.wire
        done = now
        if self.bandwidth_bps is not None:
            done = max(wire.free_at, now)
            if n:
                done += n * 8.0 / self.bandwidth_bps
                wire.free_at = done
        due = done + self._delay
        if self._jitter:
            due += self._rng.uniform(0.0, self._jitter)
        due = max(due, pipe.last_release)
        pipe.last_release = due
        if not pipe.queue and due <= now:
            self._release(pipe, data)
            self._flush(pipe)
            return
        pipe.queue.append((due, data))
        pipe.pending += n
        self._arm(pipe)

    def _arm(self, pipe: _Pipe) -> None:
        if pipe.queue and not pipe.timer_armed:
            pipe.timer_armed = True
            heapq.heappush(self._heap, (pipe.queue[0][0], next(self._seq), pipe))

    def _release_due(self, pipe: _Pipe, now: float) -> None:
        while pipe.queue and pipe.queue[0][0] <= now:
            _, data = pipe.queue.popleft()
            pipe.pending -= len(data)
            self._release(pipe, data)
        self._arm(pipe)
        self._flush(pipe)
        if not pipe.conn.closed:
            self._update(pipe.conn)

    def _release(self, pipe: _Pipe, data: bytes) -> None:
        if data:
            pipe.out.append(data)
            pipe.pending += len(data)
        else:
            pipe.eof_due = True

    def _flush(self, pipe: _Pipe) -> None:
        """Write what is due to ``pipe.dst``; pass the EOF on when everything is out."""
        conn = pipe.conn
        if conn.closed or conn.frozen or (pipe.up and conn.connecting):
            return
        while pipe.out:
            head = pipe.out[0]
            try:
                sent = pipe.dst.send(memoryview(head)[pipe.out_offset:])
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                self._reset(conn)
                return
            pipe.pending -= sent
            if pipe.up:
                self.bytes_up += sent
            else:
                self.bytes_down += sent
            pipe.out_offset += sent
            if pipe.out_offset >= len(head):
                pipe.out.popleft()
                pipe.out_offset = 0
            else:
                break  # the kernel buffer is full; wait for EVENT_WRITE
        if not pipe.out and pipe.eof_due and not pipe.eof_sent:
            pipe.eof_sent = True
            try:
                pipe.dst.shutdown(socket.SHUT_WR)
            except OSError:
                pass
            if conn.up.eof_sent and conn.down.eof_sent:
                self._close(conn, reset=False)

    def _update(self, conn: _Conn) -> None:
        """Register the interest each socket needs now (reads throttled by the buffer)."""
        assert self._selector is not None
        for sock, src_pipe, dst_pipe in ((conn.client, conn.up, conn.down),
                                         (conn.server, conn.down, conn.up)):
            mask = 0
            if conn.frozen:
                pass  # neither read nor write (nor notice a finished connect) until thawed
            elif conn.connecting and sock is conn.server:
                mask = selectors.EVENT_WRITE  # connect() done; the client is read meanwhile
            else:
                if not src_pipe.eof_read and src_pipe.pending < self._pipe_limit:
                    mask |= selectors.EVENT_READ
                if dst_pipe.out:
                    mask |= selectors.EVENT_WRITE
            old = conn.masks[sock]
            if mask == old:
                continue
            if not old:
                self._selector.register(sock, mask, conn)
            elif not mask:
                self._selector.unregister(sock)
            else:
                self._selector.modify(sock, mask, conn)
            conn.masks[sock] = mask

    def _reset(self, conn: _Conn) -> None:
        self._close(conn, reset=True)

    def _close(self, conn: _Conn, *, reset: bool) -> None:
        if conn.closed:
            return
        conn.closed = True
        self._conns.discard(conn)
        for sock in (conn.client, conn.server):
            if conn.masks[sock] and self._selector is not None:
                try:
                    self._selector.unregister(sock)
                except (KeyError, ValueError):
                    pass
            conn.masks[sock] = 0
            if reset:
                _hard_close(sock)
            else:
                sock.close()
        for pipe in (conn.up, conn.down):
            pipe.queue.clear()
            pipe.out.clear()
            pipe.pending = 0

    def _close_resources(self) -> None:
        for conn in list(self._conns):
            self._close(conn, reset=False)
        self._heap.clear()
        for sock in (self._listener, self._wake_r, self._wake_w):
            if sock is not None:
                sock.close()
        if self._selector is not None:
            self._selector.close()


def _strerror(err: int) -> str:
    """``strerror`` that never raises."""
    try:
        return os.strerror(err)
    except ValueError:
        return f"error {err}"


def _hard_close(sock: socket.socket) -> None:
    """Close so the peer sees a reset (RST), not an orderly EOF."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    except OSError:
        pass
    sock.close()


# -- overhead measurement ------------------------------------------------------------------


class TcpServer:
    """A small threaded TCP server on 127.0.0.1 running ``handler(conn)`` per connection.

    What handlers return goes to :attr:`results`, what they raise to :attr:`errors`. Used
    by :func:`proxy_overhead` (an echo server) and by the tests.
    """

    def __init__(self, handler: Callable[[socket.socket], Any], *,
                 conn_timeout: float | None = None) -> None:
        self.handler = handler
        self.conn_timeout = conn_timeout
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.1)
        self.address = f"tcp://127.0.0.1:{self.sock.getsockname()[1]}"
        self.results: list[Any] = []
        self.errors: list[BaseException] = []
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._conns: list[socket.socket] = []
        self._acceptor = threading.Thread(target=self._accept, name="zfalkon-tcpserver",
                                          daemon=True)

    def __enter__(self) -> "TcpServer":
        self._acceptor.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._acceptor.join(5)
        for conn in self._conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for t in self._threads:
            t.join(5)
        for conn in self._conns:
            conn.close()
        self.sock.close()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            conn.settimeout(self.conn_timeout)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._conns.append(conn)
            t = threading.Thread(target=self._handle, args=(conn,), daemon=True)
            self._threads.append(t)
            t.start()

    def _handle(self, conn: socket.socket) -> None:
        try:
            self.results.append(self.handler(conn))
        except BaseException as exc:  # reported to the owner through .errors
            self.errors.append(exc)


def echo(conn: socket.socket) -> None:
    """A :class:`TcpServer` handler: echo until EOF, then close."""
    while True:
        data = conn.recv(RECV_BYTES)
        if not data:
            break
        conn.sendall(data)
    conn.close()


def _connect(address: str) -> socket.socket:
    host, port = parse_address(address)
    sock = socket.create_connection((host.strip("[]"), int(port)), timeout=10)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _round_trip(sock: socket.socket, message: bytes) -> float:
    """Seconds to send ``message`` and read it back."""
    start = time.perf_counter()
    sock.sendall(message)
    got = 0
    while got < len(message):
        chunk = sock.recv(len(message) - got)
        if not chunk:
            raise ConnectionError("echo connection closed")
        got += len(chunk)
    return time.perf_counter() - start


def proxy_overhead(samples: int = 2000, *, message_bytes: int = 64,
                   time_limit: float = 20.0) -> dict[str, float]:
    """Median round trip of small messages to a local echo server, direct and proxied.

    Starts an echo server on 127.0.0.1 and a :class:`LinkProxy` with no delay, then times
    ``samples`` round trips of ``message_bytes`` each way, alternating direct and proxied
    so machine noise hits both alike (stopping early after ``time_limit`` seconds).
    Returns ``{"direct_ms", "proxied_ms", "added_ms"}`` (medians; added = proxied - direct).
    """
    if samples < 1:
        raise ConfigError("samples must be >= 1")
    message = b"z" * message_bytes
    direct: list[float] = []
    proxied: list[float] = []
    with TcpServer(echo) as server, LinkProxy(server.address) as proxy:
        with _connect(server.address) as d, _connect(proxy.address) as p:
            for _ in range(min(50, samples)):  # warm up both paths
                _round_trip(d, message)
                _round_trip(p, message)
            deadline = time.monotonic() + time_limit
            for _ in range(samples):
                direct.append(_round_trip(d, message))
                proxied.append(_round_trip(p, message))
                if time.monotonic() > deadline:
                    break
    direct_ms = statistics.median(direct) * 1000.0
    proxied_ms = statistics.median(proxied) * 1000.0
    return {"direct_ms": direct_ms, "proxied_ms": proxied_ms, "added_ms": proxied_ms - direct_ms}


# -- command line --------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """``python -m zfalkon.linkproxy``: run a proxy until SIGTERM/SIGINT, or ``--overhead``."""
    parser = argparse.ArgumentParser(
        prog="python -m zfalkon.linkproxy",
        description="TCP proxy that emulates a WAN link (delay, jitter, bandwidth cap).")
    parser.add_argument("--target", help="tcp://HOST:PORT to relay to (e.g. the broker)")
    parser.add_argument("--delay-ms", type=float, default=0.0, help="one-way delay per direction")
    parser.add_argument("--jitter-ms", type=float, default=0.0,
                        help="extra one-way delay, uniform in [0, J] per chunk (order kept)")
    parser.add_argument("--bandwidth-mbps", type=float, default=None,
                        help="bandwidth of each direction in Mbit/s (default: no cap)")
    parser.add_argument("--listen-host", default="127.0.0.1")
    parser.add_argument("--listen-port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--seed", type=int, default=None, help="seed for the jitter")
    parser.add_argument("--overhead", action="store_true",
                        help="measure the proxy's own added round trip at 0 ms and print JSON")
    parser.add_argument("--samples", type=int, default=2000, help="round trips for --overhead")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    try:
        if args.overhead:
            print(json.dumps(proxy_overhead(args.samples)), flush=True)
            return 0
        if not args.target:
            parser.error("--target is required (or use --overhead)")
        bandwidth = None if args.bandwidth_mbps is None else args.bandwidth_mbps * 1e6
        proxy = LinkProxy(args.target, delay_ms=args.delay_ms, jitter_ms=args.jitter_ms,
                          bandwidth_bps=bandwidth, listen_host=args.listen_host,
                          listen_port=args.listen_port, seed=args.seed)
    except ConfigError as exc:
        print(f"zfalkon linkproxy: {exc}", file=sys.stderr)
        return 2
    stop = threading.Event()

    def _on_signal(signum: int, _frame: object) -> None:
        stop.set()

    previous = {sig: signal.signal(sig, _on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        try:
            proxy.start()
        except ConfigError as exc:
            print(f"zfalkon linkproxy: {exc}", file=sys.stderr)
            return 2
        try:
            print(f"{READY_PREFIX}{proxy.address}", flush=True)
            while not stop.wait(1.0) and proxy.running:
                pass
        finally:
            proxy.stop()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0 if stop.is_set() else 1


if __name__ == "__main__":
    sys.exit(main())
