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
      reaches its host alone). It reads batches of tasks from a pipe (a length-prefixed
      msgpack frame each: ``[ids, blobs]``), runs them one at a time with a Runner, and
      writes their results back in frames of its own, once it has run what it had read,
      past 60 KB of results, or (a thread does it) every 10 ms while it runs more. So
      consecutive tasks of one client cost a few microseconds each, not a round trip, and
      their framing is msgpack's C code, not a Python loop per task. A host does *not* die with its
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
      else the state file's. Both are files of the worker's Unix user: unsandboxed, a task
      that writes another client's task id into the state file too gets that task blamed
      (see "Sandbox").
      Limit: a task that kills its slot and returns may get the next task of its own
      client blamed, if that one was already queued in its host: the host starts it within
      microseconds, the slot's death reaches the zygote only after the slot's teardown.
    * **Lost zygote.** Unsandboxed, a task can find its zygote (``getppid()``) and kill or
      stop it (same Unix user). Hiding it (a double fork, so that ``getppid()`` is not the zygote) would
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

* **Sandbox** (worker ``--sandbox``, Linux). A task host runs as the worker's Unix user,
  so, unsandboxed, a task can signal or inspect every process of that user and write its
  files: SIGSTOP the spare host its zygote forked for the slot's next client, SIGKILL
  another slot's host, or write another client's task id into its slot's state file
  (listed in ``/proc/SLOT/maps``) and kill the slot, so that the agent blames that task.
  In a sandbox each host has namespaces of its own, entered by the spare before any
  client code runs (off the switch's path, as the spare is forked ahead of time):

  - the spare (the *shim*: the process the zygote forked and the slot knows, in its own
    process group) enters a user namespace U1 (the worker's uid and gid mapped to
    themselves) and a mount namespace, where it mounts an empty tmpfs over each
    directory the agent names (its directory of state files and running cells), then
    unshares a PID namespace and forks its *init*, PID 1 there;
  - the init mounts a ``/proc`` of that namespace, forks the *host* (PID 2), and reaps
    what is reparented to it; when the host ends it tells the shim its wait status and
    exits, which SIGKILLs everything left in the namespace. It ignores the host's signals
    (a namespace's init gets none it has no handler for, SIGKILL included) and is not
    dumpable (no ptrace, no ``/proc/1/*``), though it keeps U1's powers;
  - the host puts itself in a process group of its own and enters a nested user
    namespace U2 (same mapping) with a mount namespace of its own: the mounts made in U1
    are *locked* there, so a task cannot unmount the tmpfs, nor mount another ``/proc``
    (it has no power over U1, which owns the PID namespace).

  So a task sees in ``/proc`` only its host, the init and its own children; ``getpid()``
  is 2 in every host (so a PID no longer tells hosts apart: a file named after
  ``os.getpid()`` or ``$$`` in a shared directory may collide across slots); ``getppid()``
  is 1; it can name (signal, ptrace) no other process: not its zygote, slot, agent, the
  spare, other slots' hosts. Killing the shim's group (the zygote's ``kill``; the slot's
  own fallback) kills the init, hence every process of the host, shell commands in their
  own process groups and ``setsid`` escapees included: ``kill_command`` has nothing to do
  (and the command PID a sandboxed host writes is its namespace's). The shim exits as the
  host did (re-raising its signal, without a core), so crash reports read as before; a
  ``reap`` of a host that died gives the shim 1 s to do so before killing it. ``auto``
  (the default) uses the sandbox if a probe at worker start (``python -m zfalkon.taskhost
  --probe``: the whole setup, once) succeeds, else warns once and runs hosts as before;
  ``namespaces`` refuses to start without it (e.g. Ubuntu's AppArmor restriction of
  unprivileged user namespaces, ``kernel.apparmor_restrict_unprivileged_userns``, or
  ``user.max_user_namespaces=0``); ``none`` never uses it. A host that cannot enter its
  sandbox although the probe could exits with status 71 and says why on stderr (its first
  task fails with ``WorkerCrashed``): never unsandboxed. Cost: see ``bench/sandbox.py``.

What this does not isolate, even in a sandbox: hosts run as the worker's Unix user (its
uid mapped to itself: a root worker's tasks keep root's powers only over files of uid and
gid 0; files of other users are reached through their permission bits for "others", and
``chown`` to another uid fails), so a task can still read and write what that user can
outside the hidden directory: files, the worker's key directory, the staging cache shared
by the slots, other agents' state directories on the machine, other clients' shell tasks'
working files. There is no network namespace: a task reaches the network, the broker and
abstract Unix sockets as before. Without a sandbox (``--sandbox none``, or ``auto`` where
namespaces are refused) a task can also signal or (where ptrace is allowed) inspect the
machine's other processes of that user, including the other slots, and so reach another
client's work as described above. What closes the rest: a distinct Unix uid per host (the
zygote forks as root or with CAP_SETUID and drops to a per-client uid), or separate users
or machines.
"""

from __future__ import annotations

import collections
import ctypes
import gc
import itertools
import logging
import math
import mmap
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from typing import Any

import msgpack

from zfalkon.constants import MAX_RESULT_BYTES, OUTPUT_CAP_BYTES

__all__ = ["Zygote", "Host", "HostDied", "PIPE_BYTES", "TASK_HEAD_BYTES"]

log = logging.getLogger("zfalkon.taskhost")

#: Task bytes a slot keeps unanswered in a host (fits in a pipe, so its writes never block).
PIPE_BYTES = 60_000
#: The pipes carry frames. Slot -> host: a 4-byte length, then the msgpack array ``[ids,
#: blobs]``, a batch of tasks. Host -> slot (untrusted: a task can write to its host's
#: pipe): two 4-byte lengths, a *head* (the msgpack array ``[sizes, failed, need, held,
#: seconds]``) and a *body* (the results, one after the other: ``sizes`` says where they
#: end): the results of the next ``len(sizes)`` tasks in the order sent (``failed``: a
#: bool each; ``need``: the indices of tasks by digest sent back unrun, their function
#: not loaded; ``held``: data keys its stager cached; ``seconds``: the time they took
#: together). One frame per batch keeps the per-task work in C; results travel raw, so
#: what msgpack builds for a frame is bounded by its small head.
_FRAME_HEAD = struct.Struct("<I")
_RESULTS_HEAD = struct.Struct("<II")
#: What a task costs in the pipe besides its blob, at most (its id and blob header in
#: msgpack, and its share of a frame's header: every frame has a task).
TASK_HEAD_BYTES = 32
_FLUSH_BYTES = 60_000  # a host returns its results once they are this big
_HELD_PER_FRAME = 64  # data keys a frame of results reports, at most (more: the next)
_HELD_KEY_CHARS = 512  # a longer data key is not passed on (core.MAX_DATA_KEY_CHARS)
_HELD_KEPT = 4096  # data keys a slot keeps from its host between two sends, at most
_MAX_HEAD = 1 << 16  # a frame's head: up to 4,096 results' sizes and flags, 64 keys of 512 B
_MAX_HEAD_ITEMS = 4096  # items in a list of a head (msgpack refuses more, unbuilt)
#: A frame's body: its results are _FLUSH_BYTES and one result at the limit, at most (a
#: host that sends more is confused, or hostile: it is killed).
_MAX_BODY = MAX_RESULT_BYTES + _FLUSH_BYTES
#: A result waits at most about twice this in its host while the next task runs (the
#: flusher thread's period: a wake-up each, not a per-result timer, which would cost the
#: host's loop a thread switch a millisecond under load)
_LATE_SECONDS = 0.01
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


# -- the sandbox (Linux namespaces) -------------------------------------------------------

_CLONE_NEWNS, _CLONE_NEWUSER, _CLONE_NEWPID = 0x00020000, 0x10000000, 0x20000000
_MS_NOSUID, _MS_NODEV, _MS_NOEXEC, _MS_REC, _MS_PRIVATE = 0x2, 0x4, 0x8, 0x4000, 0x40000
_PR_SET_DUMPABLE = 4
_SANDBOX_FAILED = 71  # the exit status of a host that could not enter its sandbox
_HOST_DIED_SECONDS = 1.0  # a dead sandboxed host's shim has this long to exit on its own


class SandboxError(OSError):
    """A namespace, mapping or mount the sandbox needs was refused."""


def _libc_call(name: str, *args: object) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    try:
        func = getattr(libc, name)
    except AttributeError:
        raise SandboxError(f"no {name}() in this C library") from None
    if func(*args) != 0:
        err = ctypes.get_errno()
        raise SandboxError(err, f"{name}{args!r}: {os.strerror(err)}")


def _unshare(flags: int) -> None:
    _libc_call("unshare", ctypes.c_int(flags))


def _mount(source: str | None, target: str, fstype: str | None, flags: int,
           data: str | None = None) -> None:
    def enc(text: str | None) -> bytes | None:
        return None if text is None else os.fsencode(text)

    _libc_call("mount", enc(source), enc(target), enc(fstype), ctypes.c_ulong(flags),
               enc(data))


def _map_ids(uid: int, gid: int) -> None:
    """Map, in the user namespace just entered, the worker's uid and gid to themselves (the
    one mapping an unprivileged process may write for itself)."""
    for name, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"),
                       ("gid_map", f"{gid} {gid} 1")):
        try:
            with open(f"/proc/self/{name}", "w") as f:
                f.write(text)
        except OSError as exc:
            raise SandboxError(exc.errno, f"/proc/self/{name}: {exc.strerror}") from None


def _sandbox(hide: list[str]) -> None:
    """Enter a host's sandbox; see the module docstring ("Sandbox"). Called in a fresh spare
    (the *shim*, the zygote's child): returns in the task host only, PID 2 of a new PID
    namespace whose PID 1 (its *init*) is the shim's child; the shim and the init never
    return. Raises SandboxError (in the shim) if a namespace is refused."""
    uid, gid = os.getuid(), os.getgid()
    # The outer user namespace U1 (the shim's) owns the mount namespace where ``hide`` is
    # covered and the PID namespace: a task ends in a nested U2, where these mounts are
    # locked (a task cannot unmount them) and it has no power over the PID namespace.
    _unshare(_CLONE_NEWUSER | _CLONE_NEWNS)
    _map_ids(uid, gid)
    _mount(None, "/", None, _MS_REC | _MS_PRIVATE)  # (nothing propagates back out)
    for path in hide:
        _mount("tmpfs", path, "tmpfs", _MS_NOSUID | _MS_NODEV | _MS_NOEXEC,
               "size=4k,nr_inodes=2,mode=0")
    _unshare(_CLONE_NEWPID)  # (for the children: the next one forked is its PID 1)
    status_r, status_w = os.pipe()
    init = os.fork()
    if init == 0:  # PID 1 of the new namespace; stays in the shim's process group
        try:
            os.close(status_r)
            host = _init_start()
        except BaseException as exc:  # noqa: BLE001
            _say(f"cannot start its sandbox's init: {exc}")
            os._exit(_SANDBOX_FAILED)
        if host:
            code = 70
            try:
                code = _init_main(host, status_w)
            finally:
                os._exit(code)
        # The task host, PID 2.
        try:
            os.close(status_w)
            os.setpgid(0, 0)  # (its killpg(0) is its own; the shim's group it leaves)
            _unshare(_CLONE_NEWUSER | _CLONE_NEWNS)
            _map_ids(uid, gid)
        except BaseException as exc:  # noqa: BLE001
            _say(f"cannot enter its sandbox: {exc}")
            os._exit(_SANDBOX_FAILED)
        return
    os.close(status_w)
    _shim_main(init, status_r)


def _say(text: str) -> None:
    try:
        os.write(2, f"zfalkon task host {os.getpid()}: {text}\n".encode())
    except OSError:
        pass


def _init_start() -> int:
    """In the init (PID 1): mount a /proc of the new PID namespace, then fork the host."""
    # Not dumpable: a task (same uid) may not ptrace it, nor open its /proc entries; it
    # keeps the powers of U1 (it could unmount what hides the worker's files).
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0)
    _set_pdeathsig(signal.SIGKILL)  # (the shim killed: the namespace goes with it)
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # (a namespace's init ignores, from
    #                          inside, every signal it has no handler for: even SIGKILL)
    _mount("proc", "/proc", "proc", _MS_NOSUID | _MS_NODEV | _MS_NOEXEC)
    return os.fork()


def _init_main(host: int, status_w: int) -> int:
    """The init's loop: reap what is reparented to it; when the host ends, tell the shim
    its wait status and exit (which SIGKILLs whatever is left in the namespace)."""
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGCHLD})
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return 0
        if pid == host:
            os.write(status_w, struct.pack("<i", status))
            return 0
        if pid == 0:
            signal.sigwaitinfo({signal.SIGCHLD})


def _shim_main(init: int, status_r: int) -> None:
    """The shim: the process the zygote forked and the slot knows, in the root PID namespace.
    Waits for the namespace's init; exits as the host did (or as the init did)."""
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    code = 70
    try:
        status = os.waitpid(init, 0)[1]
        data = os.read(status_r, 4)
        if len(data) == 4:
            status = struct.unpack("<i", data)[0]
        code = os.waitstatus_to_exitcode(status)
        if code < 0:  # killed by a signal: the same, on itself (without a core)
            import resource

            resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
            if -code not in (signal.SIGKILL, signal.SIGSTOP):
                signal.signal(-code, signal.SIG_DFL)
                signal.pthread_sigmask(signal.SIG_UNBLOCK, {-code})
            os.kill(os.getpid(), -code)
            code = 128 - code  # (a signal whose default is not to end a process)
    finally:
        os._exit(code & 0xFF)


def probe_sandbox() -> str | None:
    """Whether task hosts can be sandboxed here: None if so, else why not. Tries the
    whole setup (``python -m zfalkon.taskhost --probe``, a fresh process) once."""
    try:
        proc = subprocess.run([sys.executable, "-m", "zfalkon.taskhost", "--probe"],
                              stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              timeout=30, check=False)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"the probe did not run: {exc}"
    if proc.returncode == 0:
        return None
    said = proc.stderr.strip().splitlines()
    return said[-1] if said else f"the probe exited with {proc.returncode}"


def _probe() -> int:
    import tempfile

    hidden = tempfile.mkdtemp(prefix="zfalkon-probe-")
    try:
        with open(os.path.join(hidden, "state"), "wb") as f:
            f.write(bytes(8))
        pid = os.fork()
        if pid == 0:
            code = 3
            try:
                _sandbox([hidden])
                procs = sorted(int(p) for p in os.listdir("/proc") if p.isdigit())
                if os.listdir(hidden):
                    _say("the sandbox hides nothing")
                elif (os.getpid(), procs) != (2, [1, 2]):
                    _say(f"the sandbox's /proc lists {procs}")
                else:
                    code = 0
            except BaseException as exc:  # noqa: BLE001
                _say(f"{exc}")
            finally:
                os._exit(code)
        code = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
        if code:
            sys.stderr.write(f"namespaces refused (the probe {code}: see above)\n")
        return 0 if code == 0 else 1
    finally:
        import shutil

        shutil.rmtree(hidden, ignore_errors=True)


class Answered:
    """Results a host returned: the tasks' ids, their results and failed flags, and the
    seconds they took together."""

    __slots__ = ("ids", "results", "failed", "seconds")

    def __init__(self) -> None:
        self.ids: list[int] = []
        self.results: list[bytes] = []
        self.failed: list[bool] = []
        self.seconds = 0.0


class HostDied(Exception):
    """The host's pipes broke: it died (or closed them)."""


# -- the slot's side ----------------------------------------------------------------------


class Host:
    """The slot's handle on one task host: its pipes and what it was sent."""

    def __init__(self, pid: int, key: int, task_w: int, result_r: int,
                 counter: memoryview, child: memoryview | None = None,
                 sandboxed: bool = False) -> None:
        self.pid = pid  #: in a sandbox, its shim's (the task host is PID 2 of its own)
        #: In a sandbox (its own PID namespace): killing its shim's group kills every
        #: process it started, and the PIDs it writes are its namespace's.
        self.sandboxed = sandboxed
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
        self.broken = ""  #: why the host is taken for dead (a bad frame), once it is

    def send(self, tasks: list[tuple[int, bytes]]) -> None:
        """Queue ``tasks`` (id, blob) in the host. Raises HostDied."""
        ids, blobs = [t for t, _ in tasks], [b for _, b in tasks]
        body = msgpack.packb([ids, blobs])
        data = _FRAME_HEAD.pack(len(body)) + body
        self.inflight.extend(tasks)
        self.inflight_bytes += sum(map(len, blobs)) + TASK_HEAD_BYTES * len(ids)
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(self.task_w, view):]
        except OSError as exc:  # EPIPE: the host is gone
            raise HostDied(str(exc)) from None

    def receive(self) -> Answered:
        """The results that arrived, in the order their tasks were sent (none if no frame
        is whole yet: wait for :attr:`result_r` to be readable). Tasks sent back unrun go
        to :attr:`needed`, data keys to :attr:`held`. Raises HostDied: for a frame an
        honest host never writes too (after returning the results before it)."""
        if self.broken:
            raise HostDied(self.broken)
        got = Answered()
        buf = self._buf
        size = _RESULTS_HEAD.size
        while True:
            try:
                chunk = os.read(self.result_r, _READ_SIZE)
            except BlockingIOError:
                return got
            except OSError as exc:
                raise HostDied(str(exc)) from None
            if not chunk:
                raise HostDied("end of the result pipe")
            buf += chunk
            pos, end = 0, len(buf)
            try:
                while end - pos >= size:
                    head, body = _RESULTS_HEAD.unpack_from(buf, pos)
                    if head > _MAX_HEAD or body > _MAX_BODY:
                        raise HostDied(f"a frame of {head} + {body} bytes")
                    if end - pos - size < head + body:
                        break
                    start = pos + size
                    with memoryview(buf) as view:  # (one copy of the body)
                        results = bytes(view[start + head:start + head + body])
                    self._take(buf[start:start + head], results, got)
                    pos = start + head + body
            except HostDied as exc:
                if not got.ids and not self.needed:
                    raise
                self.broken = str(exc)  # (what came before it stands: the next call raises)
                del buf[:]
                return got
            del buf[:pos]
            if got.ids or self.needed:
                return got  # (else a partial frame: wait for the rest)

    def _take(self, head: bytearray, body: bytes, got: Answered) -> None:
        """Add one frame of results to ``got`` (the tasks they answer leave inflight)."""
        try:
            sizes, failed, need, held, seconds = msgpack.unpackb(
                head, max_array_len=_MAX_HEAD_ITEMS, max_map_len=0, max_ext_len=0,
                max_bin_len=0, max_str_len=4 * _HELD_KEY_CHARS)
            n = len(sizes)
            ok = (type(sizes) is list and type(failed) is list and len(failed) == n
                  and type(need) is list and type(held) is list and type(seconds) is float
                  and math.isfinite(seconds) and seconds >= 0.0
                  and set(map(type, sizes)) <= {int} and set(map(type, failed)) <= {bool}
                  and set(map(type, need)) <= {int} and set(map(type, held)) <= {str}
                  and min(sizes, default=0) >= 0 and sum(sizes) == len(body)
                  and max(sizes, default=0) <= MAX_RESULT_BYTES)
        except Exception:  # (not msgpack, over its limits, not five fields, ...)
            ok = False
        if not ok or n > len(self.inflight):
            raise HostDied("a malformed frame of results")  # a confused (or hostile) host
        ends = list(itertools.accumulate(sizes))
        results = list(map(body.__getitem__, map(slice, [0, *ends], ends)))
        popleft = self.inflight.popleft
        answered = [popleft() for _ in range(n)]
        self.inflight_bytes -= sum(len(b) for _, b in answered) + TASK_HEAD_BYTES * n
        if held and len(self.held) < _HELD_KEPT:
            self.held += [k for k in held[:_HELD_PER_FRAME] if len(k) <= _HELD_KEY_CHARS]
        if need:
            sent_back = set(need)
            self.needed += [answered[i] for i in sorted(sent_back) if 0 <= i < n]
            keep = [i for i in range(n) if i not in sent_back]
            answered = [answered[i] for i in keep]
            results = [results[i] for i in keep]
            failed = [failed[i] for i in keep]
        got.ids.extend(t for t, _ in answered)
        got.results.extend(results)
        got.failed.extend(failed)
        got.seconds += seconds

    def running(self) -> int:
        """The id of the task the host started last (its own word, in the shared cell: to be
        checked against :attr:`inflight`; 0 if it started none)."""
        return int(self._counter[0])

    def kill_command(self) -> None:
        """SIGKILL the process group of the shell command the host runs, if any (it is in a
        group of its own, which killing the host's misses). The host is stopped first, so
        that it cannot reap the command meanwhile: the PID it wrote stays the command's.
        (A host may write any PID there; it could signal that process itself anyway.)
        Nothing to do for a sandboxed host: its command dies with its namespace when the
        host is killed (and the PID it wrote is its namespace's, not ours)."""
        if self._child is None or self.sandboxed:
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
        #: None, or the sandbox hosts are forked in: ``{"hide": [dir, ...]}``
        self.sandbox: dict[str, Any] | None = None
        fd = os.memfd_create("zfalkon-host-counter", os.MFD_CLOEXEC)
        os.ftruncate(fd, 8)
        self._use_cell(fd)
        # Where a host writes the PID of the shell command it runs (Host.kill_command).
        self._child_fd = os.memfd_create("zfalkon-host-child", os.MFD_CLOEXEC)
        os.ftruncate(self._child_fd, 8)
        self._child_map = mmap.mmap(self._child_fd, 8)
        self._child = memoryview(self._child_map).cast("q")

    def use_sandbox(self, sandbox: dict[str, Any]) -> None:
        """Fork every host from now on in a sandbox (see the module docstring), with the
        directories ``sandbox["hide"]`` (the agent's state files) hidden. Call before the
        first host: a spare the zygote forked already is discarded."""
        self.sandbox = sandbox
        self._send_sandbox()

    def _send_sandbox(self) -> None:
        if self.sandbox is None:
            return
        try:  # (no answer; a zygote found lost later is replaced and told again)
            self.sock.send(msgpack.packb(["sandbox", self.sandbox]), socket.MSG_DONTWAIT)
        except OSError:
            pass

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
        self._send_sandbox()

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
            return Host(int(reply[1]), key, task_w, result_r, self._counter, self._child,
                        bool(reply[2]) if len(reply) > 2 else False)
        raise AssertionError("unreachable")

    def reap(self, host: Host, died: bool = False) -> int:
        """Kill ``host`` (its process group) and reap it; return its exit status as
        :attr:`subprocess.Popen.returncode` words it (negative: killed by that signal).
        ``died``: its pipes broke (a sandboxed host's shim is given a moment to exit as
        the host did). If the zygote is lost, the slot kills the host itself (its status
        is lost)."""
        host.close()
        try:
            return int(self._ask(["reap", host.pid, died])[1])
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
    sandbox: dict | None = None  # (None: hosts run unsandboxed)
    boxed: set[int] = set()  # hosts (their shims) in a sandbox
    spare_boxed = False  # (whether the spare is in one)
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
                spare = _fork_spare(sock, sandbox)  # (when the slot is quiet)
                spare_boxed = sandbox is not None
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
            if message[0] == "sandbox":  # (no answer) hosts forked from now on: in one
                sandbox = message[1]
                if spare is not None:  # (made before: it never ran a client's code)
                    spare[1].close()
                    _kill_and_reap(spare[0])
                    spare = None
                continue
            if message[0] == "fork":
                if spare is None:
                    spare = _fork_spare(sock, sandbox)
                    spare_boxed = sandbox is not None
                (pid, line), spare = spare, None
                try:
                    socket.send_fds(line, [msgpack.packb(message[1])], fds)
                except OSError:  # (it died: the slot finds it dead, and reaps it)
                    pass
                finally:
                    line.close()
                    for fd in fds:
                        os.close(fd)
                hosts.add(pid)
                if spare_boxed:
                    boxed.add(pid)
                sock.send(msgpack.packb(["forked", pid, spare_boxed]))
            elif message[0] == "kill":
                pid = int(message[1])
                if pid in hosts:
                    _kill(pid)
                    hosts.discard(pid)
                    boxed.discard(pid)
                    killed.add(pid)
                sock.send(msgpack.packb(["killed", pid]))
            elif message[0] == "reap":  # ["reap", pid, died]
                pid = int(message[1])
                code = 0
                if pid in hosts:
                    if pid in boxed and len(message) > 2 and message[2]:
                        # (the host died: its shim exits as it did, once the namespace's
                        # init has told it: a SIGKILL first would say SIGKILL)
                        code = _reap_within(pid, _HOST_DIED_SECONDS)
                    else:
                        code = _kill_and_reap(pid)
                hosts.discard(pid)
                boxed.discard(pid)
                sock.send(msgpack.packb(["reaped", code]))
    finally:
        if spare is not None:
            hosts.add(spare[0])
        for pid in hosts:
            _kill_and_reap(pid)
        for pid in killed:
            os.waitpid(pid, 0)


def _fork_spare(sock: socket.socket, sandbox: dict | None) -> tuple[int, socket.socket]:
    """Fork a host that warms up, then waits for its pipes (and becomes a client's); in a
    sandbox (``{"hide": [dir, ...]}``) if ``sandbox`` is not None."""
    line, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            sock.close()
            line.close()
            _spare_main(theirs, sandbox)
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


def _reap_within(pid: int, seconds: float) -> int:
    """Reap ``pid`` if it exits within ``seconds``, else kill it and reap it."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.0005)
    return _kill_and_reap(pid)


# -- the host ----------------------------------------------------------------------------


def _spare_main(line: socket.socket, sandbox: dict | None = None) -> None:
    signal.signal(_SLOT_DIED, signal.SIG_DFL)
    try:
        # A session (and process group) of its own, with no controlling terminal: its
        # task's killpg(0), kill(0, ...) or terminal signals reach this host alone, never
        # its slot, agent or the provisioner that started the agent.
        os.setsid()
    except OSError:
        os.setpgid(0, 0)
    if sandbox is not None:
        try:  # (returns in the task host only)
            _sandbox(list(sandbox.get("hide", ())))
        except SandboxError as exc:
            _say(f"cannot enter its sandbox: {exc}")
            os._exit(_SANDBOX_FAILED)
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
    """The host's loop: run the tasks read from ``task_r``, write their results to
    ``result_w`` (frames: see _FRAME_HEAD), until ``task_r`` ends. Results go out in
    batches: when nothing is left to run, or past _FLUSH_BYTES; and, while the loop runs
    tasks, a *flusher* thread returns those done every _LATE_SECONDS (a result never
    waits for a long task behind it; a pure-Python task gives the flusher the interpreter
    every switch interval)."""
    from zfalkon import payload
    from zfalkon.execute import FUNCTION_NEEDED

    run = runner.run
    stager = runner.stager
    frame_size = _FRAME_HEAD.size
    clock = time.perf_counter
    buf = bytearray()
    # Done, not yet returned: the loop appends a result, then its flag; a flush takes as
    # many results as there are flags.
    results: list[bytes] = []
    failed: list[bool] = []
    lock = threading.Lock()  # a flush (taking from results and failed, writing result_w)
    wake = threading.Condition(lock)
    armed = False  # the flusher is to return results every _LATE_SECONDS
    since = 0.0  # when the tasks not yet returned started to run (with the lock)

    def flush(held: bool = True) -> None:  # (with the lock; held: from the loop's thread)
        nonlocal since
        n = len(failed)
        if not n:
            return
        done, flags = results[:n], failed[:n]
        del results[:n], failed[:n]
        need: list[int] = []
        if True in flags:  # (rare: failures, and tasks by digest sent back)
            need = [i for i, r in enumerate(done) if r is FUNCTION_NEEDED]
            for i in need:
                done[i] = b""
        if max(map(len, done)) > MAX_RESULT_BYTES:
            for i, r in enumerate(done):
                if len(r) > MAX_RESULT_BYTES:
                    done[i] = payload.error_result(
                        "SerializationError", f"the result is {len(r)} bytes, over the "
                        f"{MAX_RESULT_BYTES} byte limit of one result")
                    flags[i] = True
        keys = [k for k in stager.take_new_held(_HELD_PER_FRAME)  # (bytes: the head's bound)
                if len(k.encode()) <= _HELD_KEY_CHARS] if held and stager.new_held else []
        head = msgpack.packb([list(map(len, done)), flags, need, keys, clock() - since])
        body = b"".join(done)
        view = memoryview(_RESULTS_HEAD.pack(len(head), len(body)) + head + body)
        while view:
            view = view[os.write(result_w, view):]
        since = clock()  # (a write the slot is slow to take is no task's time)

    def flusher() -> None:  # (wakes every _LATE_SECONDS while armed, else sleeps)
        nonlocal armed
        with wake:
            while True:
                if not armed:
                    wake.wait()
                    continue
                wake.wait(_LATE_SECONDS)
                if failed:
                    flush(held=False)
                else:
                    armed = False  # (a whole period without a result: idle, or one long task)

    started = False  # (the flusher starts with the first batch: none for one task at a time)
    while True:
        if failed:
            with lock:
                flush()  # nothing (whole) left to run: return what is done
        chunk = os.read(task_r, _READ_SIZE)
        if not chunk:
            return
        buf += chunk
        pos, end = 0, len(buf)
        ids: list[int] = []
        blobs: list[bytes] = []
        while end - pos >= frame_size:
            (n,) = _FRAME_HEAD.unpack_from(buf, pos)
            if end - pos - frame_size < n:
                break
            more_ids, more_blobs = msgpack.unpackb(buf[pos + frame_size:pos + frame_size + n])
            ids += more_ids
            blobs += more_blobs
            pos += frame_size + n
        del buf[:pos]
        if not ids:
            continue
        with lock:
            if not failed:
                since = clock()
        size = 0
        for tid, blob in zip(ids, blobs):
            if failed and not armed:  # (results wait while this task runs)
                if not started:
                    threading.Thread(target=flusher, name="zfalkon-flusher",
                                     daemon=True).start()
                    started = True
                with wake:
                    armed = True
                    wake.notify()
            counter[0] = tid
            result, bad = run(blob)
            results.append(result)
            failed.append(bad)
            size += len(result)
            if size >= _FLUSH_BYTES:
                with lock:
                    flush()
                size = 0


if __name__ == "__main__" and sys.argv[1:] == ["--probe"]:  # probe_sandbox()
    os._exit(_probe())
if __name__ == "__main__":  # a replacement zygote (Zygote._spawn): its socket's fd in argv
    _code = 0
    try:
        _zygote_main(socket.socket(fileno=int(sys.argv[1])))
    except BaseException:
        _code = 1
    finally:
        os._exit(_code)
