"""The broker's socket shell: one ROUTER socket, one event loop around :class:`BrokerCore`.

Clients, worker agents and slots all connect to the same port. Everything the broker
knows and decides lives in :mod:`zfalkon.core`, which does no I/O; this module binds the
socket, authenticates (ZAP), decodes frames and moves the core's messages. The loop, top
to bottom:

1. poll the socket (and a wake-up pipe for signals) until a message arrives or the next
   once-a-second tick is due: an idle broker sleeps;
2. take every message already waiting (up to a burst) and hand each to the core;
3. write what the core recorded to the journal (group commit), *before* anything the
   burst caused is sent: a task is acknowledged, and dispatched, only once it is logged;
4. dispatch (give each slot with room a share of the queue), then send the core's outbox;
5. on the tick: the core's timers (lost workers, leases, stealing, clients), the journal's
   fsync and compaction.

Tasks are kept as the clients' msgpack blobs: the broker never decodes user data.
"""

from __future__ import annotations

import logging
import resource
import signal
import time

import zmq

from zfalkon import protocol as P
from zfalkon._version import __version__
from zfalkon.constants import (
    DEFAULT_PORT,
    MAX_CRASHES,
    MAX_FRAME_BYTES,
    PROTOCOL_VERSION,
)
from zfalkon.core import BrokerCore
from zfalkon.errors import ConfigError, ProtocolError
from zfalkon.journal import Journal, JournalRecorder
from zfalkon.net import Waker, is_loopback, listen_endpoint, make_socket, readable
from zfalkon.security import BrokerAuthenticator, BrokerKeys
from zfalkon.taskqueue import DISPATCH_POLICIES, make_queue

_NOBLOCK = int(zmq.NOBLOCK)  # (plain ints: pyzmq enums are slow)
_SNDMORE_NOBLOCK = int(zmq.SNDMORE) | _NOBLOCK
log = logging.getLogger("zfalkon.broker")

_RECV_BURST = 4096  # messages handled before dispatching again
#: Seconds of receiving before the loop dispatches and sends again, however many messages
#: wait: peers that flood the broker cannot hold everyone else's answers back for long.
_RECV_BUDGET_SECONDS = 0.01
_TICK_SECONDS = 1.0
_LISTEN_BACKLOG = 4096  # pending TCP connections (capped by the kernel's somaxconn)
#: Frames queued in the broker for one peer (ZeroMQ's per-connection send high-water
#: mark); a peer that lets more pile up is treated as not listening (docs/protocol.md,
#: "Limits").
SEND_HWM = 256

__all__ = ["Broker", "run_broker", "DISPATCH_POLICIES"]


def _return_large_buffers() -> None:
    """Make glibc give large buffers (frames, results: 1 MiB and more) back to the system
    when they are freed: by default its mmap threshold rises after the first large free,
    and later large results then stay in the heap after the broker drops them (a client
    leaving 16 MiB results behind grew the broker by several times what it kept)."""
    try:
        import ctypes
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 1024 * 1024)  # M_MMAP_THRESHOLD (fixed: no dynamic raising)
    except (OSError, AttributeError):  # (not glibc)
        pass


def _raise_fd_limit() -> None:
    """Every connection is a file descriptor: raise the soft limit to the hard one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the open-file limit from %d: %s", soft, exc)
    log.info("open-file limit %d: room for about %d connections", soft, max(0, soft - 50))


class Broker:
    """Serves clients and workers on one ROUTER socket; see the module docstring."""

    def __init__(self, listen: str = f"tcp://0.0.0.0:{DEFAULT_PORT}",
                 journal: Journal | None = None, keys: BrokerKeys | None = None,
                 insecure: bool = False, dispatch: str = "data",
                 max_crashes: int = MAX_CRASHES, hold_seconds: float | None = None) -> None:
        self.endpoint = listen_endpoint(listen)
        if keys is None and not insecure and not is_loopback(self.endpoint):
            raise ConfigError(
                f"refusing to listen on {self.endpoint} without --keys: anyone who can reach "
                "it could run code on every worker. Create keys (zfalkon keys init DIR) and "
                "pass --keys DIR, or pass --insecure to accept the risk")
        if dispatch not in DISPATCH_POLICIES:
            raise ConfigError(f"--dispatch must be one of {', '.join(DISPATCH_POLICIES)}")
        self.journal = journal
        recorder = JournalRecorder(journal) if journal is not None else None
        if max_crashes < 1:
            raise ConfigError(f"--max-crashes must be at least 1, got {max_crashes}")
        self.core = BrokerCore(time.monotonic(), queue=make_queue(dispatch), recorder=recorder)
        self.core.max_crashes = max_crashes
        if hold_seconds is not None:
            if not hold_seconds > 0:
                raise ConfigError("--hold-seconds must be a positive number of seconds")
            self.core.hold_seconds = float(hold_seconds)
        if recorder is not None:
            self._recover(recorder)
        self.ctx = zmq.Context()
        self.keys = keys
        self.auth: BrokerAuthenticator | None = None
        self.sock = make_socket(self.ctx, zmq.ROUTER, self.endpoint)
        if keys is not None:
            # The ZAP handler runs in this context before the socket binds: no window in
            # which a connection is accepted unauthenticated.
            self.auth = BrokerAuthenticator(self.ctx, keys)
            self.auth.start()
            keys.serve(self.sock)
        self.sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        # A reconnecting peer takes its routing id back from a connection not yet known
        # dead (ROUTER_HANDOVER). With keys, never: a connection of another key that
        # presents a known id would take that peer's route (and its tasks or results);
        # libzmq refuses a second connection with an id in use, and a dead one is dropped
        # within the ZMTP heartbeat timeout (HEARTBEAT_SECONDS x HEARTBEAT_MISSES).
        self.sock.setsockopt(zmq.ROUTER_HANDOVER, 0 if keys is not None else 1)
        self.sock.setsockopt(zmq.MAXMSGSIZE, MAX_FRAME_BYTES)
        # A peer that does not read: past SEND_HWM frames queued for it, sends fail
        # (EAGAIN) and the core stops sending to it until it speaks again.
        self.sock.setsockopt(zmq.SNDHWM, SEND_HWM)
        self.sock.setsockopt(zmq.LINGER, 0)
        self._stopping = False
        self._waker = Waker()

    def _recover(self, recorder: JournalRecorder) -> None:
        """Queue the journal's unfinished tasks; hold its results for their clients."""
        got = recorder.journal.replay()
        self.core.restore(got, time.monotonic())
        log.info("journal %s: %d records; %d unfinished tasks queued, %d results held for "
                 "%d absent clients", recorder.journal.path, got.records, len(got.tasks),
                 len(got.held), len(self.core.clients))

    # -- lifecycle ---------------------------------------------------------------------

    def bind(self) -> str:
        """Bind the socket; return the address peers should connect to."""
        _raise_fd_limit()
        self.sock.setsockopt(zmq.BACKLOG, _LISTEN_BACKLOG)
        try:
            self.sock.bind(self.endpoint)
        except zmq.ZMQError as exc:
            raise ConfigError(f"cannot listen on {self.endpoint}: {exc}") from None
        return self.sock.getsockopt_string(zmq.LAST_ENDPOINT)

    def stop(self, *_: object) -> None:
        """Ask the loop to finish (safe from a signal handler)."""
        self._stopping = True
        self._waker.wake()

    def close(self) -> None:
        if self.journal is not None:
            self.journal.close()
        self.sock.close()
        if self.auth is not None:
            self.auth.stop()
        self.ctx.term()
        self._waker.close()

    def serve(self) -> None:
        """Run the event loop until :meth:`stop`."""
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        poller.register(self._waker.fd, zmq.POLLIN)
        core, journal = self.core, self.journal
        next_tick = time.monotonic() + _TICK_SECONDS
        while not self._stopping:
            timeout = max(0.0, next_tick - time.monotonic())
            for what, _ in poller.poll(int(timeout * 1000)):
                if what == self._waker.fd:
                    self._waker.drain()
            now = time.monotonic()
            self._receive(now)
            if journal is not None:
                journal.flush(now)  # before sending: tasks are logged before acknowledged
                core.submits_refused = journal.failure
            core.dispatch(now)
            self._send_outbox(now)
            if now >= next_tick:
                core.tick(now)
                self._send_outbox(now)
                if journal is not None:
                    self._journal_tick(now)
                next_tick = now + _TICK_SECONDS
        log.info("broker stopping")

    # -- moving frames -----------------------------------------------------------------

    def _receive(self, now: float) -> None:
        # Frame by frame with plain-int flags: recv_multipart and send_multipart turn
        # every flag into a pyzmq enum, several microseconds a message.
        sock = self.sock
        recv = sock.recv
        secure = self.keys is not None
        core = self.core
        deadline = now + _RECV_BUDGET_SECONDS
        for n in range(_RECV_BURST):
            if not readable(sock) or (n & 63 == 63 and time.monotonic() > deadline):
                return
            ident = recv(_NOBLOCK)  # (a ROUTER message is the routing id, then the body)
            body = recv(_NOBLOCK, copy=False)
            if body.more:
                extra = 1
                while recv(_NOBLOCK, copy=False).more:  # (the rest arrived with it)
                    extra += 1
                core.refuse(ident, ProtocolError(
                    f"expected one body frame, got {extra + 1}", "malformed"))
                continue
            buffer = body.buffer
            if len(buffer) > P.MAX_HELLO_BYTES and ident not in core.peers:
                # (a large frame from a peer that has not registered is not unpacked)
                core.refuse(ident, ProtocolError("a message before HELLO", "hello-required"))
                continue
            try:
                msg = P.decode(buffer)
            except ProtocolError as exc:
                core.refuse(ident, exc)
                continue
            core.message(ident, msg, str(body.get("User-Id")) if secure else None, now)

    def _send_outbox(self, now: float) -> None:
        outbox = self.core.outbox
        if not outbox:
            return
        self.core.outbox = []
        send = self.sock.send
        encode = P.encode
        for ident, msg in outbox:
            try:
                send(ident, _SNDMORE_NOBLOCK)  # (fails at once if the route is gone)
                send(encode(msg), _NOBLOCK)
            except zmq.ZMQError:  # EHOSTUNREACH: connection gone; EAGAIN: not reading
                self.core.send_failed(ident, now)

    def _journal_tick(self, now: float) -> None:
        """fsync as the policy says; compact the journal if due. After a disk error, try
        the write again (or a snapshot, if only that can mend the log); new tasks are
        refused until it works."""
        journal, core = self.journal, self.core
        assert journal is not None
        journal.flush(now)
        journal.retry(now)
        if not core.live:
            if journal.grown or journal.needs_snapshot:  # a tiny snapshot of the key owners
                journal.compact((), (), core.key_owner, now, core.functions())
        elif journal.wants_compaction():
            journal.compact(core.unfinished(), core.held(), core.key_owner, now,
                            core.functions())
        core.submits_refused = journal.failure

    def status(self) -> dict:
        """Counters and workers, as answered to STATUS (see docs/protocol.md)."""
        return self.core.status(time.monotonic())


def run_broker(listen: str, *, journal: str | None = None, fsync: str = "interval",
               keys: str | None = None, insecure: bool = False, dispatch: str = "data",
               ready_line: bool = True, journal_repair: bool = False,
               max_crashes: int = MAX_CRASHES, hold_seconds: float | None = None) -> int:
    """Run a broker in this process until SIGTERM/SIGINT; return the exit status.

    ``journal``: a directory for the journal (see :mod:`zfalkon.journal`), or None;
    ``journal_repair``: mend a damaged journal (keeping the original) instead of refusing
    to start on it.
    ``hold_seconds``: how long a client that vanished (no BYE) is waited for before its
    run is cancelled (default CLIENT_AWAY_SECONDS, with a journal CLIENT_HOLD_SECONDS).
    ``keys``: a broker key directory (see :mod:`zfalkon.security`): CurveZMQ on, only
    allow-listed keys. Without keys a non-loopback ``listen`` needs ``insecure``.
    ``max_crashes``: crashes of the process running a task (its slot or agent died)
    after which the task fails with WorkerCrashed instead of running again.
    Prints ``zfalkon broker listening on ADDRESS`` on stdout once bound (LocalCluster and
    scripts read it to learn the port when ``--listen`` gave port 0).
    """
    if insecure and not keys and not is_loopback(listen_endpoint(listen)):
        log.warning("INSECURE: listening on %s with no keys: no encryption, and anyone who "
                    "can connect can run code on every worker and read every result", listen)
    if journal_repair and not journal:
        raise ConfigError("--journal-repair needs --journal DIR")
    # A file past RLIMIT_FSIZE must fail the write (EFBIG: the journal copes), not kill us.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    _return_large_buffers()
    opened = Journal(journal, fsync, repair=journal_repair) if journal else None
    try:
        broker = Broker(listen, opened, BrokerKeys(keys) if keys else None, insecure, dispatch,
                        max_crashes, hold_seconds)
    except BaseException:
        if opened is not None:
            opened.close()
        raise
    address = broker.bind()
    signal.signal(signal.SIGTERM, broker.stop)
    signal.signal(signal.SIGINT, broker.stop)
    if ready_line:
        print(f"zfalkon broker listening on {address}", flush=True)
    log.info("zfalkon %s broker listening on %s (protocol %d)", __version__, address,
                PROTOCOL_VERSION)
    try:
        broker.serve()
    finally:
        broker.close()
    return 0
