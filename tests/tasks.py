"""Task functions the test workers import by reference ('tasks:NAME').

This module lives in tests/, which conftest.py puts on ``sys.path`` for the test process
and on ``PYTHONPATH`` for every worker process the tests start.
"""

from __future__ import annotations

import os
import signal
import time


def add(a, b):
    return a + b


def square(x):
    return x * x


def identity(x):
    return x


def boom(message="boom from a task"):
    raise ValueError(message)


def fail_on(x, bad):
    """Return ``x``, or raise ValueError when ``x == bad``."""
    if x == bad:
        raise ValueError(f"bad element {x}")
    return x


def segfault():
    os.kill(os.getpid(), signal.SIGSEGV)
    time.sleep(10)  # not reached: the signal kills the process


def hard_exit(code=3):
    os._exit(code)


def sleep_then(x, seconds):
    time.sleep(seconds)  # (the task body: it runs for ``seconds``)
    return x


def returns_unserializable():
    return object()


def echo_kwargs(**kw):
    return kw


def echo_args(*args, **kw):
    return [list(args), kw]


def raise_system_exit():
    raise SystemExit(7)


def getpid():
    return os.getpid()


def whoami():
    """This process's PID and its PID namespace (the inode of /proc/self/ns/pid): a task
    host in a sandbox has a PID namespace of its own (conftest.outer_pid finds it)."""
    return os.getpid(), os.stat("/proc/self/ns/pid").st_ino


def getenv(name):
    return os.environ.get(name)


class Holder:
    """For callable_ref tests: methods of a module-level class."""

    def method(self):
        return "method"

    @staticmethod
    def static(x):
        return ("static", x)

    @classmethod
    def klass(cls, x):
        return [cls.__name__, x]


def make_nested():
    def nested():
        return 1

    return nested


lambda_task = lambda: 1  # noqa: E731  (a module-level lambda: still refused by name)

not_callable = 42


class CustomError(Exception):
    """An exception type defined outside builtins."""


def raise_custom(message):
    raise CustomError(message)


def segfault_logged(path):
    """Append this process's PID to ``path``, then die of SIGSEGV."""
    with open(path, "a") as f:
        f.write(f"{os.getpid()}\n")
        f.flush()
        os.fsync(f.fileno())
    os.kill(os.getpid(), signal.SIGSEGV)
    time.sleep(10)  # not reached


def kill_slot_logged(path):
    """Append this process's PID to ``path``, then SIGKILL the slot running this task (the
    parent of this task host's zygote), as a task of the worker's Unix user can."""
    import psutil

    with open(path, "a") as f:
        f.write(f"{os.getpid()}\n")
        f.flush()
        os.fsync(f.fileno())
    os.kill(psutil.Process(os.getppid()).ppid(), signal.SIGKILL)
    time.sleep(10)  # not reached: the slot's death takes the zygote and this host along


def _own_agent(provisioner: int):
    """This task host's worker agent (host -> zygote -> slot -> agent), checked to be a
    ``zfalkon worker`` started by ``provisioner`` (a process the test started): a poison
    task never signals anything else."""
    import psutil

    slot = psutil.Process(os.getppid()).parent()
    agent = slot.parent()
    assert "zfalkon.slot" in slot.cmdline(), slot.cmdline()
    assert "worker" in agent.cmdline() and agent.ppid() == provisioner, agent.cmdline()
    return agent


def kill_agent_logged(path, provisioner):
    """Log, then SIGKILL this task's worker agent (found by PID ancestry, checked to be a
    child of ``provisioner``); hang on, as a task that killed its agent by accident would."""
    agent = _own_agent(provisioner)
    with open(path, "a") as f:
        f.write(f"{os.getpid()}\n")
    os.kill(agent.pid, signal.SIGKILL)
    time.sleep(30)  # (hangs on, as a task that killed its agent by accident would)


def kill_agent_group_logged(path, provisioner):
    """Log, then SIGKILL the process group of this task's worker agent (the issue's poison:
    it used to take the provisioner along); hang on."""
    agent = _own_agent(provisioner)
    group = os.getpgid(agent.pid)
    assert group not in (os.getpgid(provisioner), os.getpgrp()), "not the agent's own group"
    with open(path, "a") as f:
        f.write(f"{os.getpid()}\n")
    os.killpg(group, signal.SIGKILL)
    time.sleep(30)  # (hangs on, as a task that killed its agent by accident would)


def killpg_own_group():
    os.killpg(0, signal.SIGKILL)
    time.sleep(10)  # not reached


def session_ids():
    """(pid, process group, session) of the process running this task."""
    return os.getpid(), os.getpgid(0), os.getsid(0)


def kill_self():
    os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(10)  # not reached


def raise_from_module(name):
    """Raise an exception whose class lives in a module made here, on the worker only."""
    import sys
    import types

    module = types.ModuleType(name)
    exec("class ModuleOnlyError(Exception):\n    pass\n", module.__dict__)
    module.ModuleOnlyError.__module__ = name
    sys.modules[name] = module
    raise module.ModuleOnlyError("raised from a module the client does not have")


def raise_key_error(key):
    raise KeyError(key)


def make_path(text):
    import pathlib

    return pathlib.Path(text)


def mark_then_sleep(directory, i, seconds):
    """Leave a file named ``i`` in ``directory`` (the proof that the task ran), then sleep."""
    import os
    import time

    with open(os.path.join(directory, str(i)), "w"):
        pass
    time.sleep(seconds)
    return i


def pid_then_sleep(path, seconds):
    """Write this process's PID to ``path``, then sleep (a long task to time out or kill)."""
    with open(path, "w") as f:  # (read by conftest.written_pid)
        pid, ns = whoami()
        f.write(f"{pid} {ns}")
    time.sleep(seconds)
    return "slept"


def noisy(n, fail=False):
    """Write to stdout and stderr at the Python level and at the fd level."""
    import sys

    print("out" * n)
    sys.stderr.write("err" * n + "\n")
    os.write(1, b"fd1\n")
    os.write(2, b"fd2\n")
    if fail:
        raise ValueError("noisy failed")
    return n
