"""Task hosts: each client's tasks run in a process of their own, never shared.

Why
    A Python task runs arbitrary code: ``builtins:exec`` is a valid callable reference.
    Run in a long-lived slot process, one client's task could patch that process (swap
    :mod:`zfalkon.payload`'s encoder, hook ``builtins``, start a thread) and read or forge
    every later task of every other client the slot runs. So a slot never runs tasks of two
    client identities (client key: ``task_id >> ID_SHIFT``) in the same process.

Design
    The slot keeps its socket, its session with the broker and its state file; it runs
    tasks in a *task host*, a child process dedicated to one client key:

    * **Zygote.** Before it creates any ZeroMQ context (forking a process with ZeroMQ's
      I/O threads is unsafe) and before it reads its config (so no host inherits the
      slot's routing id, worker id or key paths), the slot forks a *zygote*: a fork server
      that has imported :mod:`zfalkon.execute` and what a :class:`~zfalkon.execute.Runner`
      needs. A fresh host costs one ``fork()`` of that warm process, not an interpreter
      start. The zygote talks to the slot over a ``SOCK_SEQPACKET`` socket pair: the slot
      sends ``fork`` with the host's pipe ends (``SCM_RIGHTS``); the zygote answers with
      the PID of a *spare* host it forked ahead of time (once the slot had been quiet
      for 5 ms, so that forking does not compete with the tasks on a small machine) (which has already run a no-op
      task, so its copy-on-write faults are paid too), hands it the pipes, and forks the
      next spare while the slot goes on. A spare never ran a client's code: it becomes
      that one client's host. ``kill`` SIGKILLs a host's process group and answers at
      once (after SIGKILL the host runs no more code; the zygote reaps it later); ``reap``
      also waits and answers its exit status (for a host that died). The zygote reaps a
      host only after the slot gave it up, so a PID the slot may signal is never reused.
    * **Host.** In its own session and process group (``setsid``: a task's ``killpg(0)``
      reaches its host alone). It reads ``(length, task id)``-prefixed task blobs from a
      pipe, runs them one at a time with a Runner, and writes ``(kind,
      seconds, blob)`` frames back, in batches: at the latest when it has nothing left to
      read, or when the oldest unsent result is 1 ms old. So consecutive tasks of one
      client cost a few microseconds each, not a round trip. A host does *not* die with its
      zygote (no parent-death signal): when the slot dies, its zygote SIGKILLs every host's
      process group and exits, on the end of the slot's socket or, should it not be
      reading it, on its parent-death signal (``SIGUSR1``, acted on once ``getppid()``
      shows the slot really gone); a host whose zygote was killed first ends when its task
      pipe does (after its current task).
    * **Switch.** A task of another client, or a host that died, means the old host is
      killed (SIGKILL to its process group, by PID) and reaped, and a fresh one forked.
      Tasks of one client are handed to the host in order; the slot never sends a task of
      another key while the host still has unanswered tasks.
    * **Crash.** Before each task the host writes its id in a shared 8-byte *running
      cell* (a file next to the slot's state file, which the slot and the agent map too;
      a memfd when no agent gave one). When the result pipe ends (the host died:
      ``os._exit``, a signal), the slot reaps it and knows which task was running: that
      task fails with a ``WorkerCrashed`` result, sent by the slot as any other result;
      tasks after it never started, and tasks before it whose results were still buffered
      in the host are run again (in a fresh host): the at-least-once rule the broker
      already applies to a lost slot. A host cannot hurt another client by lying in the
      cell: the slot takes its word only for a task it holds. (The slot alone writes the
      state file: the oldest task its host has not answered.) If the *slot* dies, the agent
      blames the task in the running cell when it is of the same client as the state
      file's (a host that only lies in its cell gets only its own client's tasks blamed),
      else the state file's. Both are files of the worker's Unix user: a task that writes
      another client's task id into the state file too gets that task blamed (see below).
      Limit: a task that kills its slot and returns may get the next task of its own
      client blamed, if that one was already queued in its host: the host starts it within
      microseconds, the slot's death reaches the zygote only after the slot's teardown.
    * **Lost zygote.** A task can find its zygote (``getppid()``) and kill or stop it (same
      Unix user). Hiding it (a double fork, so that ``getppid()`` is not the zygote) would
      only be obscurity (``/proc`` lists it) and would cost the zygote its children (their
      reaping, hence PIDs the slot may safely signal). Instead a lost zygote hurts no
      task: every request to it has a timeout (2 s; 30 s for a fresh zygote to say
      ``ready`` after its imports); a zygote found gone (EOF, EPIPE) or silent is SIGKILLed
      by PID (it is the slot's child, not yet reaped) and reaped, and a fresh one started,
      *by exec*: the slot has a ZeroMQ context by then, so forking it would be unsafe;
      ``python -m zfalkon.taskhost FD`` is a fresh interpreter that inherits only its end
      of a new socket pair (and the environment, as the first zygote did), none of the
      slot's memory. That costs an interpreter start and the imports (~0.23 s on a
      2-core machine), once per lost zygote. (Rejected: the slot exiting cleanly and
      handing its tasks back for its agent to restart it: a new slot, a new session and
      a new zygote cost more, and results not yet acknowledged would be run again.)
      The request is then made again (``fork``),
      or needs no zygote: the host the slot was giving up outlived its zygote, so the
      slot SIGKILLs it itself, through a pidfd it opened when the host was forked (so
      never a reused PID; whoever adopted the orphan reaps it). Meanwhile the host of the
      current client ran on, untouched. The zygote sits in its own process group, so that
      a ``killpg`` of its group hits it alone, not the agent and its slots.
    * **Time limits and forced cancellation.** A task with a time limit
      (``Executor.options(timeout=...)``, read by the slot from the task blob's first
      fields) is sent alone, to a host with nothing unanswered, and nothing follows it
      until it is answered: it starts when sent, so the slot's deadline is exact. While
      a host holds tasks, the slot waits on its result pipe (non-blocking: a read that
      finds results costs no extra wait) together with the broker's socket, until the
      deadline: past it, or on a TASKS ``kill`` naming a task the host runs or holds, the
      slot stops the host, SIGKILLs the process group of the shell command it runs (its
      PID is in a second shared cell, written by the host around each command), and
      kills and reaps the host. The task gets a timeout (or CANCELLED) result; the host's
      other unanswered tasks run again in a fresh host, as after a crash.
    * **Pipelining.** The slot keeps at most ~2 ms of estimated work (by the measured task
      length) and 60 KB of task bytes unanswered in a host: deep enough that no-op tasks
      never wait on the slot, shallow enough that tasks queued in the slot can still be
      revoked, and that a SIGTERM, which lets what the host holds finish, returns quickly.
      60 KB fits in a pipe, so the slot's write never blocks while the host writes
      results; a bigger task is sent alone, to a host with nothing unanswered.

What this does not isolate: hosts run as the same Unix user as the worker, so a task can
still read what the worker can read (files, the key files, the staging cache), signal or
(where ptrace is allowed) inspect the machine's other processes of that user, including the
other slots. Shell tasks run as before, as subprocesses, now spawned from the client's host.
So a task of one client can reach another client's work through that user: SIGSTOP the
spare host its zygote forked for the slot's next client (whose next task then hangs),
SIGKILL another slot's host, or write another client's task id into its slot's state file
(mapped by the slot, listed in ``/proc/SLOT/maps``) and kill the slot, so that the agent
blames that task. What would close this: a distinct Unix uid per host (the zygote forks as
root or with CAP_SETUID and drops to a per-client uid; state files not writable by hosts),
or a sandbox (a user/PID namespace per host).
"""

from __future__ import annotations

import collections
import ctypes
import gc
import logging
import mmap
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import time
from typing import Any

import msgpack

from zfalkon.constants import OUTPUT_CAP_BYTES

__all__ = ["Zygote", "Host", "HostDied", "PIPE_BYTES", "TASK_HEAD_BYTES"]

log = logging.getLogger("zfalkon.taskhost")

#: Task bytes a slot keeps unanswered in a host (fits in a pipe, so its writes never block).
PIPE_BYTES = 60_000
_TASK_HEAD = struct.Struct("<IQ")  # blob length, task id
TASK_HEAD_BYTES = _TASK_HEAD.size  #: what a task costs in the pipe besides its blob
_RESULT_HEAD = struct.Struct("<IBd")  # blob length, kind, seconds
_OK, _FAILED, _HELD, _NEED = 0, 1, 2, 3  # _NEED: a task by digest, its function not loaded
_FLUSH_SECONDS = 0.001  # a host returns a result at the latest this long after it is ready
_FLUSH_BYTES = 60_000
_READ_SIZE = 1 << 16  # a pipe's capacity; a bigger read buys nothing and costs
#                     an mmap, an mremap and a munmap per call (glibc maps reads over 128 KiB)
_SPARE_AFTER_SECONDS = 0.005  # the zygote forks the next spare host once the slot is quiet
_ASK_SECONDS = 2.0  # a zygote that has not answered a request in this long is replaced
_READY_SECONDS = 30.0  # a new zygote has this long to import what hosts need and say ready
_SLOT_DIED = signal.SIGUSR1  # the zygote's parent-death signal


def _set_pdeathsig(sig: int) -> None:
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, sig)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class HostDied(Exception):
    """The host's pipes broke: it died (or closed them)."""


# -- the slot's side ----------------------------------------------------------------------


class Host:
    """The slot's handle on one task host: its pipes and what it was sent."""

    def __init__(self, pid: int, key: int, task_w: int, result_r: int,
                 counter: memoryview, child: memoryview | None = None) -> None:
        self.pid = pid
        try:  # (the zygote has not reaped it: the PID is the host's)
            self.pidfd: int | None = os.pidfd_open(pid)
        except (AttributeError, OSError):
            self.pidfd = None
        self.key = key  #: the client key whose tasks it runs
        self.task_w = task_w
        self.result_r = result_r
        os.set_blocking(result_r, False)  # (the slot waits on it with the broker's socket)
        self._counter = counter
        self._child = child  # the PID of the shell command it runs (0: none)
        self.inflight: collections.deque[tuple[int, bytes]] = collections.deque()
        self.inflight_bytes = 0
        self._buf = bytearray()
        self.held: list[str] = []  #: data keys the host's stager reported (HOLDING)
        #: Digests of the functions (tasks by digest) it was sent, as far as the slot
        #: knows; a host that no longer has one sends the task back (:attr:`needed`).
        self.functions: set[bytes] = set()
        #: Tasks by digest it sent back unrun: their function is not loaded there.
        self.needed: list[tuple[int, bytes]] = []

    def send(self, tasks: list[tuple[int, bytes]]) -> None:
        """Queue ``tasks`` (id, blob) in the host. Raises HostDied."""
        head = _TASK_HEAD.pack
        data = b"".join(head(len(blob), tid) + blob for tid, blob in tasks)
        self.inflight.extend(tasks)
        self.inflight_bytes += len(data)
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(self.task_w, view):]
        except OSError as exc:  # EPIPE: the host is gone
            raise HostDied(str(exc)) from None

    def receive(self) -> list[tuple[int, bytes, bool, float]]:
        """Results that arrived, as ``(task id, blob, failed, seconds)`` in the order sent
        (none if none is whole yet: wait for :attr:`result_r` to be readable). Raises
        HostDied."""
        out: list[tuple[int, bytes, bool, float]] = []
        buf = self._buf
        while True:
            try:
                chunk = os.read(self.result_r, _READ_SIZE)
            except BlockingIOError:
                return out
            except OSError as exc:
                raise HostDied(str(exc)) from None
            if not chunk:
                raise HostDied("end of the result pipe")
            buf += chunk
            pos, end = 0, len(buf)
            unpack_from, size = _RESULT_HEAD.unpack_from, _RESULT_HEAD.size
            while end - pos >= size:
                n, kind, seconds = unpack_from(buf, pos)
                if end - pos - size < n:
                    break
                blob = bytes(buf[pos + size:pos + size + n])
                pos += size + n
                if kind == _HELD:
                    self.held.extend(str(k) for k in msgpack.unpackb(blob))
                    continue
                if not self.inflight:
                    raise HostDied("a result for no task")  # a confused host
                tid, sent = self.inflight.popleft()
                self.inflight_bytes -= _TASK_HEAD.size + len(sent)
                if kind == _NEED:
                    self.needed.append((tid, sent))
                    continue
                out.append((tid, blob, kind == _FAILED, seconds))
            del buf[:pos]
            if out or self.needed:
                return out  # (else a partial frame: wait for the rest)

    def running(self) -> int:
        """The id of the task the host started last (its own word, in the shared cell: to be
        checked against :attr:`inflight`; 0 if it started none)."""
        return int(self._counter[0])

    def kill_command(self) -> None:
        """SIGKILL the process group of the shell command the host runs, if any (it is in a
        group of its own, which killing the host's misses). The host is stopped first, so
        that it cannot reap the command meanwhile: the PID it wrote stays the command's.
        (A host may write any PID there; it could signal that process itself anyway.)"""
        if self._child is None:
            return
        try:
            if self.pidfd is not None:
                signal.pidfd_send_signal(self.pidfd, signal.SIGSTOP)
            else:  # (not yet given up, so not reaped: its PID is its own)
                os.kill(self.pid, signal.SIGSTOP)
        except (ProcessLookupError, PermissionError):
            pass
        child = int(self._child[0])
        if child > 0:
            try:
                os.killpg(child, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass

    def close(self) -> None:
        for fd in (self.task_w, self.result_r):
            if fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self.task_w = self.result_r = -1  # (closed once: the numbers may be reused)

    def kill(self) -> None:
        """SIGKILL the host (and its process group while it lives) without its zygote, for
        a host whose zygote is lost: through its pidfd, so never another process that got
        its PID (the host is no longer the zygote's child: whoever adopted it reaps it)."""
        if self.pidfd is None:
            return
        try:
            signal.pidfd_send_signal(self.pidfd, 0)
            os.killpg(self.pid, signal.SIGKILL)  # (alive: its PID, so its group, is its own)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    def release(self) -> None:
        """Close the pipes and the pidfd (the host is given up)."""
        self.close()
        if self.pidfd is not None:
            os.close(self.pidfd)
            self.pidfd = None


class ZygoteLost(Exception):
    """The zygote did not answer (it died, or is stopped) and was replaced."""


class Zygote:
    """The slot's handle on its fork server; see the module docstring."""

    def __init__(self, sock: socket.socket, pid: int,
                 proc: subprocess.Popen | None = None) -> None:
        self.sock = sock
        self.pid = pid
        self._proc = proc  # (a zygote started by exec, as a replacement)
        self._ready = False  # (its "ready" not yet read)
        self.replaced = 0  #: zygotes found dead or stuck and replaced
        self.runner_config: dict[str, Any] = {}  #: output_cap, cache_dir, cache_bytes
        fd = os.memfd_create("zfalkon-host-counter", os.MFD_CLOEXEC)
        os.ftruncate(fd, 8)
        self._use_cell(fd)
        # Where a host writes the PID of the shell command it runs (Host.kill_command).
        self._child_fd = os.memfd_create("zfalkon-host-child", os.MFD_CLOEXEC)
        os.ftruncate(self._child_fd, 8)
        self._child_map = mmap.mmap(self._child_fd, 8)
        self._child = memoryview(self._child_map).cast("q")

    def _use_cell(self, fd: int) -> None:
        self._counter_fd = fd
        self._counter_map = mmap.mmap(fd, 8)
        self._counter = memoryview(self._counter_map).cast("q")

    def use_cell(self, path: str) -> None:
        """Hand hosts the 8-byte file ``path`` (the agent reads it if the slot dies) instead
        of a memfd as the cell where they write the id of the task they run. Call before
        the first host."""
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        self._close_cell()
        self._use_cell(fd)

    def _close_cell(self) -> None:
        self._counter.release()
        self._counter_map.close()
        os.close(self._counter_fd)

    def _close_child_cell(self) -> None:
        self._child.release()
        self._child_map.close()
        os.close(self._child_fd)

    @classmethod
    def start(cls) -> "Zygote":
        """Fork the zygote. Call before any ZeroMQ context exists and before reading
        anything secret: the zygote, and every host, inherits this process's memory."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        pid = os.fork()
        if pid == 0:  # the zygote
            code = 0
            try:
                ours.close()
                _zygote_main(theirs)
            except BaseException:
                code = 1
            finally:
                os._exit(code)
        theirs.close()
        return cls(ours, pid)

    def _spawn(self) -> None:
        """Start a replacement zygote by exec: a fresh interpreter (``python -m
        zfalkon.taskhost FD``) that inherits only its end of a new socket pair, never this
        process's memory (its ZeroMQ threads, its config). Costs an interpreter start and
        the imports, once per replacement."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            proc = subprocess.Popen(
                [sys.executable, "-m", "zfalkon.taskhost", str(theirs.fileno())],
                stdin=subprocess.DEVNULL, close_fds=True, pass_fds=(theirs.fileno(),))
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        self.sock, self.pid, self._proc, self._ready = ours, proc.pid, proc, False

    def _replace(self, reason: str) -> None:
        """SIGKILL the zygote by PID, reap it, start a fresh one. (Its hosts outlive it:
        the slot kills the one it gives up itself, see :meth:`Host.kill`.)"""
        log.warning("the task host zygote (pid %d) %s: starting a fresh one", self.pid,
                    reason)
        self.replaced += 1
        self.sock.close()
        self._stop(0.0)
        self._spawn()

    def _recv(self, timeout: float) -> list:
        if not select.select([self.sock], [], [], timeout)[0]:
            raise ZygoteLost(f"did not answer in {timeout:g} s")
        try:
            reply = self.sock.recv(4096)
        except OSError as exc:
            raise ZygoteLost(f"is gone ({exc})") from None
        if not reply:
            raise ZygoteLost("is gone")
        return msgpack.unpackb(reply)

    def _ask(self, message: list, fds: list[int] | None = None) -> list:
        """Send ``message``, return the answer. Every wait has a timeout: a zygote that is
        gone, or does not answer (stopped, wedged), is replaced and ZygoteLost raised."""
        try:
            if not self._ready:
                if self._recv(_READY_SECONDS)[0] != "ready":
                    raise ZygoteLost("said something other than ready")
                self._ready = True
            data = msgpack.packb(message)
            try:  # (it reads every request before the next: its buffer has room)
                socket.send_fds(self.sock, [data], fds or [], socket.MSG_DONTWAIT)
            except OSError as exc:  # EPIPE, ECONNRESET: gone; EAGAIN: not reading
                raise ZygoteLost(f"is gone ({exc})") from None
            return self._recv(_ASK_SECONDS)
        except ZygoteLost as exc:
            self._replace(str(exc))
            raise

    def fork_host(self, key: int) -> Host:
        """A fresh task host for client ``key`` (from a fresh zygote if need be)."""
        for attempt in (1, 2):
            task_r, task_w = os.pipe()
            result_r, result_w = os.pipe()
            try:
                self._counter[0] = 0
                self._child[0] = 0
                reply = self._ask(["fork", self.runner_config],
                                  [task_r, result_w, self._counter_fd, self._child_fd])
            except ZygoteLost:
                os.close(task_w)
                os.close(result_r)
                if attempt == 2:
                    raise RuntimeError("the fresh task host zygote failed too") from None
                continue
            finally:
                os.close(task_r)
                os.close(result_w)
            return Host(int(reply[1]), key, task_w, result_r, self._counter, self._child)
        raise AssertionError("unreachable")

    def reap(self, host: Host) -> int:
        """Kill ``host`` (its process group) and reap it; return its exit status as
        :attr:`subprocess.Popen.returncode` words it (negative: killed by that signal).
        If the zygote is lost, the slot kills the host itself (its status is lost)."""
        host.close()
        try:
            return int(self._ask(["reap", host.pid])[1])
        except ZygoteLost:
            host.kill()  # (its status is lost with its zygote: say SIGKILL)
            return -signal.SIGKILL
        finally:
            host.release()

    def kill(self, host: Host) -> None:
        """SIGKILL ``host`` (its process group); the zygote reaps it later. (If the zygote
        is lost, the slot kills the host itself.)"""
        host.close()
        try:
            self._ask(["kill", host.pid])
        except ZygoteLost:
            host.kill()
        finally:
            host.release()

    def _stop(self, timeout: float) -> None:
        """Reap the zygote, SIGKILLing it if it is still there after ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            done, status = os.waitpid(self.pid, os.WNOHANG)
            if done or time.monotonic() >= deadline:
                break
            time.sleep(0.005)
        if not done:
            os.kill(self.pid, signal.SIGKILL)  # (our child, not yet reaped: its PID still)
            status = os.waitpid(self.pid, 0)[1]
        if self._proc is not None:  # (reaped here: Popen must not wait for it again)
            self._proc.returncode = os.waitstatus_to_exitcode(status)
            self._proc = None

    def close(self, timeout: float = 5.0) -> None:
        """Stop the zygote (it SIGKILLs and reaps a host still alive) and reap it."""
        try:
            self.sock.close()
        finally:
            self._stop(timeout)
            self._close_cell()
            self._close_child_cell()


# -- the zygote --------------------------------------------------------------------------


def _zygote_main(sock: socket.socket) -> None:
    hosts: set[int] = set()  # hosts handed to the slot, not yet reaped
    killed: set[int] = set()  # hosts killed, to reap
    spare: tuple[int, socket.socket] | None = None
    me = os.getpid()

    def slot_died(*_: object) -> None:
        # The parent-death signal: the slot is gone, take every host with us. (Hosts do not
        # die with their zygote: a task that kills its zygote must not kill the tasks after
        # it in its host. A stray _SLOT_DIED from a task, or in a host just forked, is
        # ignored: the slot must really be gone.)
        if os.getpid() != me or os.getppid() == slot:
            return
        for pid in hosts | killed | ({spare[0]} if spare else set()):
            _kill(pid)
        os._exit(0)

    slot = os.getppid()
    signal.signal(_SLOT_DIED, slot_died)
    _set_pdeathsig(_SLOT_DIED)
    if os.getppid() != slot:
        return  # (the slot died before the prctl)
    try:
        os.setpgid(0, 0)  # (a host's killpg of its parent's group hits the zygote alone)
    except OSError:
        pass
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's ^C is for the agent
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)  # (the slot's stdin carries its config: not ours to read)
    os.close(devnull)
    import zfalkon.cache  # noqa: F401  (preloaded: a host costs a fork, not imports)
    import zfalkon.execute  # noqa: F401
    import zfalkon.payload  # noqa: F401
    import zfalkon.staging  # noqa: F401

    gc.collect()
    gc.freeze()  # keep the collector off the shared pages in the hosts
    sock.send(msgpack.packb(["ready"]))
    try:
        while True:
            if spare is None and not select.select([sock], [], [], _SPARE_AFTER_SECONDS)[0]:
                spare = _fork_spare(sock)  # (when the slot is quiet: not amid its work)
            for pid in list(killed):
                if os.waitpid(pid, os.WNOHANG)[0]:
                    killed.discard(pid)
            try:
                data, fds, _, _ = socket.recv_fds(sock, 4096, 4)
            except InterruptedError:
                continue
            if not data:
                return  # the slot closed its end
            message = msgpack.unpackb(data)
            if message[0] == "fork":
                pid, line = spare or _fork_spare(sock)
                spare = None
                try:
                    socket.send_fds(line, [msgpack.packb(message[1])], fds)
                finally:
                    line.close()
                    for fd in fds:
                        os.close(fd)
                hosts.add(pid)
                sock.send(msgpack.packb(["forked", pid]))
            elif message[0] == "kill":
                pid = int(message[1])
                if pid in hosts:
                    _kill(pid)
                    hosts.discard(pid)
                    killed.add(pid)
                sock.send(msgpack.packb(["killed", pid]))
            elif message[0] == "reap":
                pid = int(message[1])
                code = _kill_and_reap(pid) if pid in hosts else 0
                hosts.discard(pid)
                sock.send(msgpack.packb(["reaped", code]))
    finally:
        if spare is not None:
            hosts.add(spare[0])
        for pid in hosts:
            _kill_and_reap(pid)
        for pid in killed:
            os.waitpid(pid, 0)


def _fork_spare(sock: socket.socket) -> tuple[int, socket.socket]:
    """Fork a host that warms up, then waits for its pipes (and becomes a client's)."""
    line, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            sock.close()
            line.close()
            _spare_main(theirs)
        except BaseException:
            code = 70
        finally:
            os._exit(code)
    theirs.close()
    # (No setpgid from here: the host makes itself a session, which a group leader cannot.
    # Until it has, killing it by group misses; _kill and Host.kill also kill by PID.)
    return pid, line


def _kill(pid: int) -> None:
    for kill in (os.killpg, os.kill):
        try:
            kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def _kill_and_reap(pid: int) -> int:
    _kill(pid)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


# -- the host ----------------------------------------------------------------------------


def _spare_main(line: socket.socket) -> None:
    signal.signal(_SLOT_DIED, signal.SIG_DFL)
    try:
        # A session (and process group) of its own, with no controlling terminal: its
        # task's killpg(0), kill(0, ...) or terminal signals reach this host alone, never
        # its slot, agent or the provisioner that started the agent.
        os.setsid()
    except OSError:
        os.setpgid(0, 0)
    # (No parent-death signal: a host outlives a zygote that a task killed or stopped, and
    # the slot goes on using it. When the slot dies, the zygote kills its hosts; if the
    # zygote was gone too, the host ends when its task pipe does.)
    # Python's own SIGINT disposition again (the zygote ignores it; an ignored signal would
    # stay ignored in the shell commands the host spawns). In its own process group, a
    # host gets no terminal ^C.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    from zfalkon import payload
    from zfalkon.execute import Runner

    # Warm up: run a no-op task, so the pages the hot path touches are this process's own
    # before the first real task (and never with a client's data in them).
    Runner().run(payload.python_task("builtins:len", ([],), {}))
    data, fds, _, _ = socket.recv_fds(line, 4096, 4)
    line.close()
    if len(fds) != 4:
        return  # the zygote is gone
    _host_main(fds[0], fds[1], fds[2], msgpack.unpackb(data), fds[3])


def _host_main(task_r: int, result_w: int, counter_fd: int, config: dict,
               child_fd: int) -> None:
    counter_map = mmap.mmap(counter_fd, 8)
    os.close(counter_fd)
    counter = memoryview(counter_map).cast("q")
    child_map = mmap.mmap(child_fd, 8)
    os.close(child_fd)
    for fd in (task_r, result_w):
        os.set_inheritable(fd, False)  # (SCM_RIGHTS fds: shell tasks must not get them)
    from zfalkon.cache import DataCache
    from zfalkon.execute import Runner
    from zfalkon.staging import Stager

    cache_dir, cache_bytes = config.get("cache_dir"), config.get("cache_bytes", 0)
    stager = Stager(DataCache(cache_dir, cache_bytes) if cache_dir and cache_bytes > 0
                    else None)
    runner = Runner(config.get("output_cap", OUTPUT_CAP_BYTES), stager)
    runner.child_cell = memoryview(child_map).cast("q")
    serve(task_r, result_w, runner, counter)


def serve(task_r: int, result_w: int, runner: Any, counter: memoryview) -> None:
    """The host's loop: run the tasks read from ``task_r``, write results to ``result_w``,
    until ``task_r`` ends."""
    from zfalkon.execute import FUNCTION_NEEDED

    run = runner.run
    stager = runner.stager
    head, size = _TASK_HEAD.unpack_from, _TASK_HEAD.size
    result_head = _RESULT_HEAD.pack
    clock = time.perf_counter
    buf = bytearray()
    pos = 0
    out: list[bytes] = []
    out_bytes = 0
    first_at = 0.0

    def flush() -> None:
        nonlocal out, out_bytes
        view = memoryview(b"".join(out))
        while view:
            view = view[os.write(result_w, view):]
        out, out_bytes = [], 0

    while True:
        if len(buf) - pos < size or len(buf) - pos - size < head(buf, pos)[0]:
            if out:
                flush()  # nothing (whole) left to run: return what is done
            del buf[:pos]
            pos = 0
            chunk = os.read(task_r, _READ_SIZE)
            if not chunk:
                return
            buf += chunk
            continue
        n, tid = head(buf, pos)
        blob = bytes(buf[pos + size:pos + size + n])
        pos += size + n
        counter[0] = tid
        t0 = clock()
        result, failed = run(blob)
        now = clock()
        if not out:
            first_at = now
        out.append(result_head(len(result), _NEED if result is FUNCTION_NEEDED
                               else _FAILED if failed else _OK, now - t0))
        out.append(result)
        out_bytes += len(result)
        if stager.new_held:
            held = msgpack.packb(stager.take_new_held())
            out.append(result_head(len(held), _HELD, 0.0))
            out.append(held)
        if out_bytes >= _FLUSH_BYTES or now - first_at >= _FLUSH_SECONDS:
            flush()


if __name__ == "__main__":  # a replacement zygote (Zygote._spawn): its socket's fd in argv
    _code = 0
    try:
        _zygote_main(socket.socket(fileno=int(sys.argv[1])))
    except BaseException:
        _code = 1
    finally:
        os._exit(_code)
