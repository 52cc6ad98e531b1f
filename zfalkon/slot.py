"""A slot: one process that runs tasks, started and supervised by a worker agent.

Each slot holds its own DEALER connection to the broker (one hop from broker to the code
that runs a task; see docs/protocol.md, "Why slots connect directly"). It runs tasks one at
a time, in the order it was sent them, each in a *task host* process dedicated to the task's
client (:mod:`zfalkon.taskhost`): no task can tamper with another client's. Everything it says to the broker (its window,
batched results kept until acknowledged, PINGs that find lost frames) is decided by its
:class:`~zfalkon.slotcore.SlotSession`; this module is the socket loop around it.

When the broker no longer knows the slot (it restarted, or declared the worker lost), the
slot registers again and starts a new session: the tasks it held are the broker's again.

While its task host holds tasks the slot keeps the oldest one's id in a small shared file
(the *state file*), and the host writes the id of each task it starts in another (the
*running cell*); if the slot dies, its agent reads both and reports which task killed it. A
task that kills only its host fails with a ``WorkerCrashed`` result the slot itself
returns; a task that kills or stops its host's zygote costs nothing but a fresh zygote.

Run as ``python -m zfalkon.slot`` by :mod:`zfalkon.worker` only, which writes the config
(JSON) to its stdin and closes it: nothing of it shows on the command line.
"""

from __future__ import annotations

import ctypes
import json
import logging
import mmap
import os
import signal
import sys
import time
from typing import BinaryIO

import zmq

from zfalkon import payload
from zfalkon import protocol as P
from zfalkon.constants import (
    CONNECT_TIMEOUT_SECONDS,
    OUTPUT_CAP_BYTES,
    RESULT_FLUSH_SECONDS,
    STOP_CONFIRM_SECONDS,
)
from zfalkon.errors import ProtocolError
from zfalkon.net import Waker, make_socket, readable
from zfalkon.security import PeerKeys
from zfalkon.slotcore import SlotSession
from zfalkon.taskhost import PIPE_BYTES, TASK_HEAD_BYTES, Host, HostDied, Zygote

log = logging.getLogger("zfalkon.slot")

#: While a stopping slot waits for its last results to be acknowledged, it PINGs this often.
_CONFIRM_PING_SECONDS = 0.5
#: How long the slot's last BYE may wait to be sent (a broker gone stops it no longer).
_BYE_LINGER_MS = 500

_IDLE_POLL_MS = 1000  # how often an idle slot checks that its agent is still alive
_HELLO_RETRY_SECONDS = 2.0  # a HELLO unanswered this long is sent again
_PIPELINE_SECONDS = 0.002  # estimated work a slot keeps queued in its task host
_MAX_PIPELINE = 1024  # tasks a slot keeps queued in its task host, at most
#: Functions a slot counts on its host having loaded (the host keeps 64): past this it
#: sends them again (a host that no longer has one sends the task back anyway)
_HOST_FUNCTIONS = 48
_HELD_KEYS = 4096  # data keys waiting to be reported (HOLDING), at most: hints, the rest dropped
_OPTIONS_HEAD = b"\x93\x03"  # how a task blob with options starts (payload.with_options)


def describe_exit(returncode: int) -> str:
    """Human wording for a process's exit status (negative: killed by a signal)."""
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"killed by {name}"
    return f"exited with status {returncode}"


class StateFile:
    """The shared 8-byte cell holding the id of the task a slot is running (0: idle)."""

    def __init__(self, path: str) -> None:
        with open(path, "r+b") as f:
            self._map = mmap.mmap(f.fileno(), 8)
        self._cell = memoryview(self._map).cast("q")

    @staticmethod
    def create(path: str) -> None:
        with open(path, "wb") as f:
            f.write(bytes(8))

    def set(self, task_id: int) -> None:
        self._cell[0] = task_id

    def get(self) -> int:
        return self._cell[0]

    def close(self) -> None:
        self._cell.release()
        self._map.close()


def _die_with_parent() -> None:
    """Ask Linux to SIGTERM this process when its parent (the agent) dies."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass  # not Linux: the idle loop's getppid() check covers it


class Slot:
    """The slot's event loop around its :class:`SlotSession`; see the module docstring."""

    def __init__(self, broker: str, ident: bytes, worker_id: str, index: int,
                 state_path: str, zygote: Zygote, output_cap: int = OUTPUT_CAP_BYTES,
                 keys: str | None = None, cache_dir: str | None = None,
                 cache_bytes: int = 0) -> None:
        self.broker = broker
        self.keys = PeerKeys(keys) if keys else None
        self.ident = ident
        self.worker_id = worker_id
        self.index = index
        self.state = StateFile(state_path)
        self.zygote = zygote
        zygote.runner_config = {"output_cap": output_cap, "cache_dir": cache_dir,
                                "cache_bytes": cache_bytes}
        self.host: Host | None = None  # the task host of the client whose tasks run now
        self.held: list[str] = []  # data keys staged into the cache, not yet reported
        self.session = SlotSession()
        self.stopping = False
        self.parent = os.getppid()
        #: Readable when the agent dies (None: no pidfd; then polled by getppid()).
        self.agent_fd = _pidfd(self.parent)
        self.orphaned = False  # the agent died while a task ran: said SLOT_LOST, no BYE
        self.hello_due = 0.0  # when to send HELLO again (0: not due)
        self.hello_sent = 0.0  # when the HELLO not yet answered with WELCOME left (0: none)
        # The task with a time limit in the host (alone there): (id, limit, started at).
        self.timed: tuple[int, float, float] | None = None
        self._waiter: tuple[Host, zmq.Poller] | None = None  # polls a host's pipe and sock
        self._waker = Waker()  # (a stop request ends the idle loop's wait at once)

    def request_stop(self, *_: object) -> None:
        """Signal handler: finish the running task, return results, hand back the rest."""
        self.stopping = True
        self._waker.wake()

    def _hello(self) -> None:
        self.sock.send(P.encode(P.hello(P.ROLE_SLOT, {"worker_id": self.worker_id,
                                                      "slot": self.index})))
        self.hello_due = 0.0
        self.hello_sent = time.monotonic()

    def run(self) -> int:
        ctx = zmq.Context()
        sock = make_socket(ctx, zmq.DEALER, self.broker, self.keys)
        sock.setsockopt(zmq.ROUTING_ID, self.ident)
        sock.setsockopt(zmq.LINGER, 5000)
        sock.connect(self.broker)
        self.sock = sock
        try:
            code = self._handshake()
            if code == 0:
                self._loop()
                self._send_out()
                if not self.orphaned:
                    self._confirm()
                    sock.setsockopt(zmq.LINGER, _BYE_LINGER_MS)  # (the results are in,
                    sock.send(P.encode(P.Bye("stopping")))  # or waited for: don't linger)
            return code
        finally:
            if self.host is not None:
                self.zygote.reap(self.host)
                self.host = None
            sock.close()
            ctx.term()
            self.state.close()
            self._waker.close()
            if self.agent_fd is not None:
                os.close(self.agent_fd)

    def _send_out(self) -> None:
        out = self.session.out
        if out:
            self.session.out = []
            send, encode = self.sock.send, P.encode
            for msg in out:
                send(encode(msg))
            if self.held:  # tell data-aware dispatch what our machine caches
                send(encode(P.Holding(self.held)))
                self.held = []

    def _confirm(self) -> None:
        """Stopping: wait until the broker has acknowledged every RESULTS frame sent (a
        PING's PONG says what it has), at most STOP_CONFIRM_SECONDS. The agent says BYE for
        its whole worker, on a connection of its own, once this process has exited; a
        result still on its way would then reach a broker that had taken its task back
        (to run it again, on whatever worker is left, or on none)."""
        session = self.session
        if not session.welcomed or not len(session.tx):
            return
        monotonic = time.monotonic
        deadline = monotonic() + STOP_CONFIRM_SECONDS
        next_ping = 0.0
        while len(session.tx) and not self.orphaned:
            now = monotonic()
            if now >= deadline:
                log.warning("slot %d: stopping with %d result frames the broker has not "
                            "acknowledged (their tasks may run again)", self.index,
                            len(session.tx))
                return
            if now >= next_ping:  # (again and again: a PING or its PONG may die with a
                session.ping(now)  # replaced connection, and a PONG shows frames lost)
                self._send_out()
                next_ping = now + _CONFIRM_PING_SECONDS
            if self.sock.poll(int((min(deadline, next_ping) - now) * 1000) + 1):
                self._receive()  # (ACK, PONG; a RESEND or a lost frame is sent again)

    def _handshake(self) -> int:
        self._hello()
        deadline = time.monotonic() + CONNECT_TIMEOUT_SECONDS
        while not self.stopping:
            if self.sock.poll(200):
                msg = P.decode(self.sock.recv())
                if isinstance(msg, P.Welcome):
                    self.hello_sent = 0.0
                    self.session.start(time.monotonic())
                    self._send_out()
                    return 0
                if isinstance(msg, P.Error):
                    log.error("broker refused slot %d: %s", self.index, msg.message)
                    return 3
            elif time.monotonic() > deadline:
                log.error("no welcome from broker %s for slot %d", self.broker, self.index)
                return 4
        return 0

    def _loop(self) -> None:
        sock = self.sock
        poller = zmq.Poller()  # one poller for the life of the loop (Socket.poll makes one a call)
        poller.register(sock, zmq.POLLIN)
        poller.register(self._waker.fd, zmq.POLLIN)
        session = self.session
        monotonic = time.monotonic
        while not self.stopping:
            now = monotonic()
            session.poll(now)
            self._send_out()  # (results go out before a HELLO that would end the session)
            if self.hello_sent and now - self.hello_sent > _HELLO_RETRY_SECONDS:
                self.hello_due = now  # the HELLO or its WELCOME was lost: again
            if self.hello_due and now >= self.hello_due:
                self._hello()
            if not session.queue:
                if not poller.poll(_IDLE_POLL_MS):
                    if os.getppid() != self.parent:
                        log.warning("slot %d: agent is gone, exiting", self.index)
                        return
                    continue
            self._receive()
            self._run_queued()
        session.flush(monotonic())

    def _run_queued(self) -> None:
        """Run the queued tasks in task hosts until none is left (or, once stopping, until
        the host has finished what it was given). Returns with no task in a host."""
        session = self.session
        state = self.state
        monotonic = time.monotonic
        while True:
            if not self.stopping:
                self._feed()
            host = self.host
            if host is None or not host.inflight:
                return
            try:
                got = host.receive()
            except HostDied:
                self._host_died()
                continue
            if host.needed:  # (its function not loaded there: again, with the function)
                now = monotonic()
                again = []
                for tid, blob in host.needed:
                    digest = payload.stored_digest(blob)
                    if digest is None:  # (not a task by digest the slot could complete)
                        session.finished(tid, payload.error_result(
                            "ProtocolError", "a task by digest cannot be wrapped with "
                            "options"), True, 0.0, now)
                        continue
                    host.functions.discard(digest)
                    again.append((tid, blob))
                session.queue.extendleft(reversed(again))
                host.needed = []
                if self.timed is not None and not host.inflight:
                    self.timed = None
            if host.held:
                if len(self.held) < _HELD_KEYS:
                    self.held += host.held
                host.held = []
            if not got.ids:
                if host.inflight:
                    self._wait(host)
                continue
            session.finished_many(got.ids, got.results, got.failed, got.seconds, monotonic())
            state.set(host.inflight[0][0] if host.inflight else 0)
            if self.timed is not None and not host.inflight:
                self.timed = None  # (it was alone in the host: answered)
            if session.out:
                self._send_out()
                self._receive()

    def _wait(self, host: Host) -> None:
        """Wait until the host has results, the broker has sent something (which may kill
        a task), results waiting here are due (then send them: a result never waits
        for a long task behind it), or the timed task's limit is past (then kill it)."""
        if self._waiter is None or self._waiter[0] is not host:
            poller = zmq.Poller()
            poller.register(self.sock, zmq.POLLIN)
            poller.register(host.result_r, zmq.POLLIN)
            if self.agent_fd is not None:
                poller.register(self.agent_fd, zmq.POLLIN)
            self._waiter = (host, poller)
        session = self.session
        now = time.monotonic()
        wait = -1.0  # (forever)
        if session.result_ids:
            wait = max(0.0, session.first_result_at + RESULT_FLUSH_SECONDS - now)
        timed = self.timed
        if self.agent_fd is None:  # (no pidfd: look at getppid() now and then)
            wait = _IDLE_POLL_MS / 1000 if wait < 0 else min(wait, _IDLE_POLL_MS / 1000)
        if timed is not None:
            tid, limit, started = timed
            left = started + limit - now
            if left <= 0:
                log.warning("slot %d: task %d ran past its time limit of %g s: killing it",
                            self.index, tid, limit)
                self._abort({tid: payload.timeout_result(limit, now - started)})
                return
            wait = left if wait < 0 else min(wait, left)
        ready = self._waiter[1].poll(None if wait < 0 else int(wait * 1000) + 1)
        if session.result_ids and \
                time.monotonic() - session.first_result_at >= RESULT_FLUSH_SECONDS:
            session.flush(time.monotonic())
            self._send_out()
        if (not ready or any(s == self.agent_fd for s, _ in ready)) and self._agent_gone():
            self._agent_died()
            return
        if any(s is self.sock for s, _ in ready):
            self._receive()

    def _agent_gone(self) -> bool:
        return os.getppid() != self.parent

    def _agent_died(self) -> None:
        """The agent died while the host ran a task (a task may have killed it): kill the
        host, send the results it had returned, and tell the broker itself (SLOT_LOST of
        this slot, naming the task the host ran: it counts a crash, see
        docs/protocol.md R18), then stop. Without its agent no heartbeat renews this
        slot's lease: waiting for the task would only see it taken back."""
        host = self.host
        assert host is not None and host.inflight
        said = host.running()
        tid = said if any(t == said for t, _ in host.inflight) else host.inflight[0][0]
        reason = f"its worker agent (pid {self.parent}) died"
        log.error("slot %d: %s while task %d ran; killing it and stopping", self.index,
                  reason, tid)
        self._abort({})  # (kills the host; its unanswered tasks go back to our queue)
        self.session.queue = type(self.session.queue)(
            t for t in self.session.queue if t[0] != tid)
        self.sock.send(P.encode(P.SlotLost(self.ident, tid, reason)))
        self.orphaned = self.stopping = True

    def _abort(self, results: dict[int, bytes]) -> None:
        """Kill the host (and the shell command it runs) for tasks it runs or holds: each
        of ``results``' tasks gets its result (timeout, CANCELLED), unless its own was
        already written; the host's other answered tasks keep their results, the
        unanswered ones run again in a fresh host, as after a crash."""
        host = self.host
        assert host is not None
        self.host = None
        self.timed = None
        host.kill_command()
        self.zygote.reap(host)
        session = self.session
        now = time.monotonic()
        again: list[tuple[int, bytes]] = []
        for _ in range(1024):  # what it wrote before it died (the pipe holds ~64 KiB)
            try:
                got = host.receive()
            except HostDied:
                break
            if not got.ids and not host.needed:
                break
            session.finished_many(got.ids, got.results, got.failed, got.seconds, now)
            again += host.needed  # (sent back unrun: they run again)
            host.needed = []
        for tid, blob in host.inflight:
            if tid in results:
                session.finished(tid, results[tid], results[tid] != payload.CANCELLED,
                                 max(session.mean, 0.0), now)
            else:
                again.append((tid, blob))
        session.queue.extendleft(reversed(again))
        self.state.set(0)
        session.flush(now)
        self._send_out()

    def _kill(self, ids: list[int]) -> None:
        """Tasks cancelled by force that were not queued here: kill the host if it runs or
        holds one (the others are done: their results are on their way)."""
        host = self.host
        if host is None or not host.inflight:
            return
        held = {tid for tid, _ in host.inflight}
        mine = [t for t in ids if t in held]
        if mine:
            log.info("slot %d: killing the process of task(s) %s (cancelled)", self.index,
                     mine)
            self._abort(dict.fromkeys(mine, payload.CANCELLED))

    def _pipeline(self) -> int:
        """How many tasks to keep queued in the host: ~_PIPELINE_SECONDS of work by the
        measured task length (one until a task was timed)."""
        mean = self.session.mean
        if mean < 0:
            return 1
        return max(1, min(_MAX_PIPELINE, int(_PIPELINE_SECONDS / max(mean, 1e-7))))

    def _feed(self) -> None:
        """Hand the host the next queued tasks of its client (a fresh host first if the
        next task is another client's: once the old one has answered all it holds)."""
        session = self.session
        queue = session.queue
        if not queue:
            return
        shift = P.ID_SHIFT
        key = queue[0][0] >> shift
        host = self.host
        if self.timed is not None:
            return  # (a task with a time limit is alone in its host)
        if host is not None and host.key != key:
            if host.inflight:
                return  # the other client's tasks finish first, in their own host
            self.zygote.kill(host)
            host = self.host = None
        if host is None:
            host = self.host = self.zygote.fork_host(key)
        room = self._pipeline() - len(host.inflight)
        budget = PIPE_BYTES - host.inflight_bytes
        batch: list[tuple[int, bytes]] = []
        now = time.monotonic()
        limit = 0.0
        stored_digest = payload.stored_digest
        while room > 0 and queue and queue[0][0] >> shift == key:
            blob = queue[0][1]
            if blob[:2] == _OPTIONS_HEAD:
                limit = _time_limit(queue[0][1])
                if limit:  # alone, in a host with nothing else: it starts when sent
                    if batch or host.inflight:
                        limit = 0.0
                        break
                    task = session.next_task(now)
                    assert task is not None
                    batch.append(task)
                    break
            size = len(blob) + TASK_HEAD_BYTES
            digest = stored_digest(blob)
            function = None
            if digest is not None and digest not in host.functions:
                function = session.functions.get(payload.scoped_digest(key, digest))
                if function is None:  # (the broker did not have it to send)
                    tid, _ = session.next_task(now) or (0, b"")
                    session.finished(tid, _function_unavailable(digest), True, 0.0, now)
                    continue
                size += len(function) + 5
            if size > budget and (batch or host.inflight):
                break  # (a task bigger than a pipe goes alone, to an idle host)
            task = session.next_task(now)
            assert task is not None
            if function is not None:  # the host's first task calling it: it goes along
                if len(host.functions) >= _HOST_FUNCTIONS:
                    host.functions.clear()  # (a host that dropped one sends the task back)
                host.functions.add(digest)  # type: ignore[arg-type]
                task = (task[0], payload.with_function(task[1], function))
            batch.append(task)
            room -= 1
            budget -= size
        if batch:
            if not host.inflight:
                self.state.set(batch[0][0])
            try:
                host.send(batch)
            except HostDied:
                self._host_died()
                return
            if limit:
                self.timed = (batch[0][0], limit, time.monotonic())

    def _host_died(self) -> None:
        """The host's pipes broke: reap it; fail the task it was running (its own count
        says which) with a crash result; run again, in a fresh host, the tasks it had not
        started or whose results it had not yet returned."""
        host = self.host
        assert host is not None
        self.host = None
        self.timed = None
        reason = describe_exit(self.zygote.reap(host, died=True))
        pending = list(host.inflight)
        session = self.session
        session.queue.extendleft(reversed(host.needed))  # (sent back unrun: run them again)
        said = host.running()
        running = next((i for i, (tid, _) in enumerate(pending) if tid == said), 0)
        # (0 also for a host that lied, or died between tasks: its first unanswered task)
        if pending:
            tid = pending[running][0]
            log.error("slot %d: the process running task %d %s", self.index, tid, reason)
            session.finished(tid, payload.crashed_result(
                f"the process running this task died ({reason})"), True,
                max(session.mean, 0.0), time.monotonic())
            del pending[running]
            session.queue.extendleft(reversed(pending))
        self.state.set(0)
        if session.out:
            self._send_out()

    def _receive(self) -> None:
        """Take every message already waiting, without blocking."""
        sock = self.sock
        session = self.session
        while readable(sock):
            try:
                msg = P.decode(sock.recv())
            except ProtocolError as exc:
                log.error("slot %d: bad message from broker: %s", self.index, exc)
                continue
            now = time.monotonic()
            if session.receive(msg, now):
                continue
            if isinstance(msg, P.Welcome):  # registered again (a new broker, or it forgot us)
                log.warning("slot %d registered again; dropped %d queued tasks", self.index,
                            len(session.queue))
                self.hello_sent = self.hello_due = 0.0
                session.start(now)
                if self.host is not None:  # (client keys are unique within one broker
                    self.zygote.kill(self.host)  # session only: a new one may reuse its key)
                    self.host = self.timed = None
                    self.state.set(0)
            elif isinstance(msg, P.Error) and msg.code in ("hello-required", "bad-hello"):
                # The broker does not know us: register again (after our agent has). While
                # a HELLO is unanswered, a hello-required answers a frame sent before it.
                if not self.hello_due and (msg.code == "bad-hello" or not self.hello_sent
                                           or now - self.hello_sent > _HELLO_RETRY_SECONDS):
                    self.hello_due = now + (0 if msg.code == "hello-required" else 1)
            elif isinstance(msg, P.Error):
                log.error("broker says: %s (%s)", msg.message, msg.code)
        if session.kills:
            kills, session.kills = session.kills, []
            self._kill(kills)
        self._send_out()


def _pidfd(pid: int) -> int | None:
    try:
        fd = os.pidfd_open(pid)
    except (AttributeError, OSError):  # (not Linux >= 5.3)
        return None
    os.set_inheritable(fd, False)
    return fd


def _function_unavailable(digest: bytes) -> bytes:
    return payload.error_result(
        "FunctionUnavailable", f"the function this task calls (digest {digest.hex()}) was "
        "not sent to this worker: its client's session ended before the task ran")


def _time_limit(blob: bytes) -> float:
    """A task blob's time limit in seconds (0: none)."""
    limit = (payload.read_options(blob) or {}).get("timeout")
    if isinstance(limit, (int, float)) and 0 < limit < 1e9:
        return float(limit)
    return 0.0


def read_config(stream: BinaryIO) -> dict:
    """The slot's config, written by its agent to the slot's stdin and closed; stdin is
    then /dev/null. (Never on argv: anyone on the machine can read a command line.)"""
    data = stream.read()
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    return json.loads(data)


def main() -> int:
    """Entry point of the slot process."""
    _die_with_parent()
    # The zygote first: before any ZeroMQ context, and before the config is read, so that
    # no task host inherits the routing id, worker id or key paths.
    zygote = Zygote.start()
    try:
        config = read_config(sys.stdin.buffer)
        logging.basicConfig(level=config.get("log_level", "WARNING"),
                            format="%(asctime)s zfalkon-slot %(levelname)s %(message)s")
        if config.get("running_path"):  # hosts say there which task they run (for the agent)
            zygote.use_cell(config["running_path"])
        if config.get("sandbox"):  # (before the first host)
            zygote.use_sandbox(config["sandbox"])
        slot = Slot(config["broker"], bytes.fromhex(config["ident"]), config["worker_id"],
                    config["index"], config["state_path"], zygote,
                    config.get("output_cap", OUTPUT_CAP_BYTES), config.get("keys"),
                    config.get("cache_dir"), config.get("cache_bytes", 0))
        signal.signal(signal.SIGTERM, slot.request_stop)
        signal.signal(signal.SIGINT, slot.request_stop)
        return slot.run()
    finally:
        zygote.close()


if __name__ == "__main__":
    sys.exit(main())
