"""The worker agent: one per machine. It registers, supervises slots and heartbeats.

The agent connects *out* to the broker (DEALER), so it works from behind NAT with no open
inbound port. It registers the machine (hostname, slots, cores, memory, tags, versions),
then starts one slot process per slot (:mod:`zfalkon.slot`); each slot connects to the
broker itself and runs tasks. When a slot process dies (a task segfaulted, called
``os._exit``, ran out of memory) the agent tells the broker which task it was running, so
that task counts a crash (the broker runs it again, or past ``--max-crashes`` fails it
with ``WorkerCrashed``) and the slot's other tasks are requeued, and starts a new slot.
If the agent itself dies while a slot runs a task, the slot (in a process group of its
own, so a ``killpg`` of the agent's group misses it) reports that task itself and stops.
SIGTERM or SIGINT stops the slots gracefully (each finishes its running task and hands
back what it had prefetched), then the agent says BYE and exits.
"""

from __future__ import annotations

import json
import logging
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field

import psutil
import zmq

from zfalkon import protocol as P
from zfalkon.cache import CACHE_BYTES
from zfalkon.constants import HEARTBEAT_SECONDS, OUTPUT_CAP_BYTES, STOP_GRACE_SECONDS
from zfalkon.errors import ConfigError, ProtocolError
from zfalkon.net import Waker, broker_endpoint, make_socket
from zfalkon.security import PeerKeys
from zfalkon.slot import StateFile, describe_exit

log = logging.getLogger("zfalkon.worker")

_RESTART_WINDOW = 10.0  # seconds over which slot restarts are counted
_RESTART_BURST = 5  # more restarts than this in the window: wait before the next one
_WAIT_LOG_SECONDS = 10.0  # while the broker is silent, say so this often


@dataclass
class _SlotProc:
    index: int
    ident: bytes
    state: StateFile
    running: StateFile  # the id of the task the slot's current task host runs (its word)
    proc: subprocess.Popen
    pidfd: int | None
    restarts: list[float] = field(default_factory=list)


class WorkerAgent:
    """Registers a machine with the broker and keeps its slot processes running."""

    def __init__(self, broker: str, *, slots: int | None = None, name: str | None = None,
                 tags: list[str] | None = None, output_cap: int = OUTPUT_CAP_BYTES,
                 log_level: str = "WARNING", keys: str | None = None,
                 ready_file: str | None = None, idle_exit: float = 0.0,
                 cache_dir: str | None = None, cache_bytes: int = CACHE_BYTES,
                 sandbox: str = "auto") -> None:
        self.broker = broker_endpoint(broker)
        self.keys = PeerKeys(keys) if keys else None  # checked before anything starts
        self.ready_file = ready_file  # written once registered (for zfalkon vm-agent)
        self.idle_exit = idle_exit  # drain and exit after this long with no task (0: never)
        self.cache_dir = cache_dir  # staged S3 inputs, shared by the slots (None: a temp dir)
        self.cache_bytes = cache_bytes
        self.sandbox = _sandbox_mode(sandbox)  # (True: task hosts in namespaces)
        self.slots = (os.cpu_count() or 1) if slots is None else slots
        if self.slots < 1:
            raise ConfigError(f"a worker needs at least one slot, got {self.slots}")
        self.hostname = socket.gethostname()
        self.name = name or f"{self.hostname}-{os.getpid()}"
        self.worker_id = uuid.uuid4().hex
        self.tags = list(tags or [])
        self.output_cap = output_cap
        self.log_level = log_level
        self.stopping = False
        self.heartbeat = HEARTBEAT_SECONDS  # the broker's WELCOME says how often
        self._procs: dict[int, _SlotProc] = {}
        self._waker = Waker()

    def request_stop(self, *_: object) -> None:
        """Signal handler: drain and exit."""
        self.stopping = True
        self._waker.wake()

    def info(self) -> dict:
        """What the agent registers: the machine and this worker."""
        return {
            "worker_id": self.worker_id,
            "name": self.name,
            "hostname": self.hostname,
            "slots": self.slots,
            "cpus": os.cpu_count() or 1,
            "memory": psutil.virtual_memory().total,
            "tags": self.tags,
            "pid": os.getpid(),
        }

    def run(self) -> int:
        """Register, supervise slots until stopped; return the process exit status."""
        ctx = zmq.Context()
        sock = make_socket(ctx, zmq.DEALER, self.broker, self.keys)
        sock.setsockopt(zmq.ROUTING_ID, uuid.uuid4().bytes)
        sock.setsockopt(zmq.LINGER, 500)  # (its last words, BYE: a broker gone stops it no longer)
        sock.connect(self.broker)
        self.sock = sock
        self._dir = tempfile.mkdtemp(prefix="zfalkon-worker-")
        own_cache = self.cache_dir is None and self.cache_bytes > 0
        if own_cache:
            self.cache_dir = tempfile.mkdtemp(prefix="zfalkon-cache-")
        try:
            if not self._register():
                return 0 if self.stopping else 2
            for index in range(self.slots):
                self._start_slot(index)
            log.info("worker %s registered with %s, %d slots", self.name, self.broker, self.slots)
            if self.ready_file:
                with open(self.ready_file, "w") as f:
                    json.dump({"worker_id": self.worker_id, "name": self.name}, f)
            self._loop()
            sock.send(P.encode(P.Drain("worker stopping")))  # shows in status meanwhile
            self._stop_slots()
            sock.send(P.encode(P.Bye("worker stopping")))
            return 0
        finally:
            self._stop_slots()
            sock.close()
            ctx.term()
            for name in os.listdir(self._dir):
                os.unlink(os.path.join(self._dir, name))
            os.rmdir(self._dir)
            if own_cache and self.cache_dir:
                shutil.rmtree(self.cache_dir, ignore_errors=True)

    def _register(self) -> bool:
        self.sock.send(P.encode(P.hello(P.ROLE_WORKER, self.info())))
        waited = 0.0
        while not self.stopping:
            if self.sock.poll(200):
                try:
                    msg = P.decode(self.sock.recv())
                except ProtocolError as exc:
                    log.error("cannot register with %s: %s", self.broker, exc)
                    return False
                if isinstance(msg, P.Welcome):
                    self.heartbeat = msg.heartbeat
                    return True
                if isinstance(msg, P.Error):
                    log.error("broker %s refused this worker: %s", self.broker, msg.message)
                    return False
            else:
                waited += 0.2
                if waited >= _WAIT_LOG_SECONDS:
                    log.warning("still waiting for a broker at %s%s", self.broker,
                                " (is this worker's key authorized, not revoked, and its "
                                "broker.key this broker's?)" if self.keys else "")
                    waited = 0.0
        return False

    def _start_slot(self, index: int, restarts: list[float] | None = None) -> None:
        state_path = os.path.join(self._dir, f"slot-{index}")
        StateFile.create(state_path)
        running_path = state_path + ".running"
        StateFile.create(running_path)
        ident = uuid.uuid4().bytes
        config = {
            "broker": self.broker, "ident": ident.hex(), "worker_id": self.worker_id,
            "index": index, "state_path": state_path, "running_path": running_path,
            "output_cap": self.output_cap,
            "log_level": self.log_level,
            "keys": self.keys.directory if self.keys else None,
            "cache_dir": self.cache_dir, "cache_bytes": self.cache_bytes,
            # Task hosts in namespaces, this agent's directory (state files) out of sight.
            "sandbox": {"hide": [self._dir]} if self.sandbox else None,
        }
        # The config (broker address, routing id, worker id, key paths) goes through the
        # slot's stdin, never argv: /proc/PID/cmdline is readable by every local user, and
        # a routing id is enough to take over a slot's route on a broker without keys.
        # Each slot in a session (so a process group) of its own: a task that signals the
        # agent's group (killpg) reaches the agent alone; the slot, still alive, then reports the task
        # it ran (SLOT_LOST of itself) instead of vanishing with it. (The agent stops its
        # slots by PID; a terminal's ^C reaches the agent, which stops them.)
        proc = subprocess.Popen([sys.executable, "-m", "zfalkon.slot"], stdin=subprocess.PIPE,
                                start_new_session=True)  # (process_group: Python 3.11+)
        assert proc.stdin is not None
        try:
            proc.stdin.write(json.dumps(config).encode())
            proc.stdin.close()
        except BrokenPipeError:  # the slot died at once: _reap reports and replaces it
            pass
        try:
            pidfd: int | None = os.pidfd_open(proc.pid)
        except (AttributeError, OSError):
            pidfd = None
        self._procs[index] = _SlotProc(index, ident, StateFile(state_path),
                                       StateFile(running_path), proc, pidfd, restarts or [])

    def _loop(self) -> None:
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        poller.register(self._waker.fd, zmq.POLLIN)
        next_beat = time.monotonic() + self.heartbeat
        last_busy = time.monotonic()
        while not self.stopping:
            fds = {p.pidfd for p in self._procs.values() if p.pidfd is not None}
            for fd in fds:
                poller.register(fd, zmq.POLLIN)
            timeout = max(0.0, next_beat - time.monotonic())
            if any(p.pidfd is None for p in self._procs.values()):
                timeout = min(timeout, 0.2)
            poller.poll(int(timeout * 1000))
            for fd in fds:
                poller.unregister(fd)
            self._reap()
            self._receive()
            now = time.monotonic()
            if now >= next_beat:
                busy = self._beat()
                next_beat = now + self.heartbeat
                if busy:
                    last_busy = now
                elif self.idle_exit and now - last_busy >= self.idle_exit:
                    log.warning("worker %s idle for %.0f s: draining and exiting", self.name,
                                now - last_busy)
                    self.stopping = True
        self._waker.drain()

    def _beat(self) -> list[bytes]:
        """Send a HEARTBEAT naming the busy slots; return them. Sampled from the slots'
        state files: a slot running a task shows its id there (the broker renews those
        slots' leases)."""
        busy = [slot.ident for slot in self._procs.values() if slot.state.get()]
        self.sock.send(P.encode(P.Heartbeat(busy)))
        return busy

    def _receive(self) -> None:
        while True:
            try:
                frame = self.sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                msg = P.decode(frame)
            except ProtocolError as exc:
                log.error("bad message from broker: %s", exc)
                continue
            if isinstance(msg, P.Error) and msg.code == "hello-required" \
                    and not self.stopping:  # (stopping: no new registration to drain)
                # A new broker (restarted, or one that declared us lost): register again.
                log.warning("broker %s does not know this worker; registering again",
                            self.broker)
                self.sock.send(P.encode(P.hello(P.ROLE_WORKER, self.info())))
            elif isinstance(msg, P.Welcome):
                # (its slots notice by themselves: even an idle slot PINGs every second, and
                # is told hello-required)
                log.warning("worker %s registered again with %s", self.name, self.broker)
            elif isinstance(msg, P.Error):
                log.error("broker says: %s (%s)", msg.message, msg.code)

    def _reap(self) -> None:
        """Report and replace slot processes that died."""
        for index, slot in list(self._procs.items()):
            code = slot.proc.poll()
            if code is None:
                continue
            task = self._blame(slot)
            reason = describe_exit(code)
            if task:
                log.error("slot %d %s while running task %d", index, reason, task)
            elif not self.stopping:
                log.error("slot %d %s", index, reason)
            self.sock.send(P.encode(P.SlotLost(slot.ident, task, reason)))
            self._close_slot(slot)
            del self._procs[index]
            if self.stopping:
                continue
            now = time.monotonic()
            recent = [t for t in slot.restarts if now - t < _RESTART_WINDOW] + [now]
            if len(recent) > _RESTART_BURST:
                log.error("slot %d keeps dying (%d times in %.0f s); pausing 1 s",
                          index, len(recent), _RESTART_WINDOW)
                time.sleep(1.0)
            self._start_slot(index, recent)

    @staticmethod
    def _blame(slot: _SlotProc) -> int:
        """The task a dead slot was running, 0 if none. The slot writes in its state file
        the oldest task its task host has not answered; the host writes in the running
        cell the task it started last, which differs when the host ran several tasks
        since its last answer. The host's word is taken only for a task of the same client
        (same key): a host can only get its own client's tasks blamed."""
        task = slot.state.get()
        running = slot.running.get()
        if task and running and running >> P.ID_SHIFT == task >> P.ID_SHIFT:
            return running
        return task

    @staticmethod
    def _close_slot(slot: _SlotProc) -> None:
        slot.state.close()
        slot.running.close()
        if slot.pidfd is not None:
            os.close(slot.pidfd)
            slot.pidfd = None

    def _stop_slots(self) -> None:
        """SIGTERM every slot and wait for them to drain, heartbeating meanwhile (a slot
        finishing a task sends nothing: without beats the broker would take this worker
        for lost after HEARTBEAT_MISSES of them, requeue the task and refuse its result);
        SIGKILL what is left after STOP_GRACE_SECONDS, reported with no task blamed (its
        agent killed it, not its task: the broker requeues its tasks, counting nothing)."""
        procs = list(self._procs.values())
        for slot in procs:
            if slot.proc.poll() is None:
                slot.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_SECONDS
        next_beat = time.monotonic()
        while live := [slot for slot in procs if slot.proc.poll() is None]:
            now = time.monotonic()
            if now >= deadline:
                break
            if now >= next_beat:
                self._beat()
                next_beat = now + self.heartbeat
            self._receive()
            wait = min(deadline, next_beat) - now
            poller = select.poll()  # (a pidfd is readable once its process has exited)
            for slot in live:
                if slot.pidfd is None:
                    wait = min(wait, 0.2)
                else:
                    poller.register(slot.pidfd, select.POLLIN)
            poller.poll(int(wait * 1000) + 1)
        killed = set()
        for slot in procs:
            if slot.proc.poll() is None:
                log.warning("slot %d did not stop in %.0f s; killing it", slot.index,
                            STOP_GRACE_SECONDS)
                slot.proc.kill()
                slot.proc.wait()
                killed.add(slot.index)
        self._reap_stopped(procs, killed)

    def _reap_stopped(self, procs: list[_SlotProc], killed: set[int]) -> None:
        for slot in procs:
            if slot.index in self._procs:
                task = 0 if slot.index in killed else self._blame(slot)
                if slot.proc.returncode not in (0, None) or task:
                    self.sock.send(P.encode(
                        P.SlotLost(slot.ident, task, describe_exit(slot.proc.returncode))))
                self._close_slot(slot)
                del self._procs[slot.index]


#: ``--sandbox`` values: see the zfalkon.taskhost docstring, "Sandbox"
SANDBOX_MODES = ("auto", "namespaces", "none")


def _sandbox_mode(mode: str) -> bool:
    """Whether task hosts run in a sandbox: ``namespaces`` (refuse to start if this machine
    cannot), ``auto`` (if a probe at start succeeds, else say so once and run them as the
    worker's user, unsandboxed), ``none``."""
    if mode not in SANDBOX_MODES:
        raise ConfigError(f"--sandbox must be one of {', '.join(SANDBOX_MODES)}, not {mode!r}")
    if mode == "none":
        return False
    from zfalkon.taskhost import probe_sandbox

    reason = probe_sandbox()
    if reason is None:
        return True
    if mode == "namespaces":
        raise ConfigError(f"--sandbox namespaces: this machine refuses the namespaces task "
                          f"hosts need ({reason})")
    log.warning("task hosts run without a sandbox (user/PID/mount namespaces refused: %s): "
                "a task can reach other clients' tasks through the worker's Unix user; "
                "--sandbox none says this is intended", reason)
    return False


def run_worker(broker: str, **options) -> int:
    """Run a worker agent in this process until SIGTERM/SIGINT; return the exit status."""
    agent = WorkerAgent(broker, **options)
    signal.signal(signal.SIGTERM, agent.request_stop)
    signal.signal(signal.SIGINT, agent.request_stop)
    return agent.run()
