"""The zfalkon exception tree.

::

    ZfalkonError                       every error zfalkon raises on purpose
    ├── ConfigError (ValueError)       bad address, option or argument
    ├── SerializationError (TypeError) arguments/results that msgpack cannot carry
    ├── BrokerUnavailable (ConnectionError)
    │                                  the broker did not answer in time, or went away
    ├── ProtocolError                  a peer sent a message that breaks the protocol
    │   └── VersionMismatch            a peer speaks another protocol version
    ├── RemoteTraceback                the ``__cause__`` of an exception re-raised from a
    │                                  task as its own type: the worker's traceback
    └── TaskError                      a task failed remotely (``remote_type``,
        │                              ``remote_message``, ``remote_traceback``)
        ├── TaskTimeout (TimeoutError) a task ran past its time limit and was killed
        ├── WorkerCrashed              the process running the task died (signal,
        │                              ``os._exit``, out of memory)
        └── WorkerLost                 the task's workers were lost (no heartbeat) on
                                       each of its ``attempts``

A task's exception is re-raised as its own type when that type is a builtin or already
imported in the client (a ``ValueError`` stays a ``ValueError``), else as ``TaskError``.

``concurrent.futures.TimeoutError`` (waiting on a future or ``map``) and
``concurrent.futures.CancelledError`` keep their standard meaning.
"""

from __future__ import annotations


class ZfalkonError(Exception):
    """Root of every error zfalkon raises on purpose."""


class ConfigError(ZfalkonError, ValueError):
    """A bad address, option or argument."""


class SerializationError(ZfalkonError, TypeError):
    """A value msgpack cannot carry (task arguments, a callable reference, a result)."""


class BrokerUnavailable(ZfalkonError, ConnectionError):
    """The broker did not answer within the timeout, or the connection was closed."""


class ProtocolError(ZfalkonError):
    """A peer sent a message that breaks the protocol.

    ``code`` is the short machine-readable reason the broker sends in its ERROR message.
    """

    def __init__(self, message: str, code: str = "protocol") -> None:
        super().__init__(message)
        self.code = code


class VersionMismatch(ProtocolError):
    """A peer speaks another protocol version; the message names both versions."""

    def __init__(self, message: str) -> None:
        super().__init__(message, code="version")


class RemoteTraceback(ZfalkonError):
    """The worker's traceback of a task's exception, attached as that exception's
    ``__cause__`` (so a traceback print shows where on the worker it was raised).

    Attributes:
        traceback: the formatted traceback text.
        worker: name of the worker that ran the task, when known.
    """

    def __init__(self, traceback: str, worker: str | None = None) -> None:
        super().__init__(traceback)
        self.traceback = traceback
        self.worker = worker

    def __str__(self) -> str:
        where = f" (worker {self.worker})" if self.worker else ""
        return f"the task's traceback{where}:\n\"\"\"\n{self.traceback}\"\"\""

    def __reduce__(self):
        return (type(self), (self.traceback, self.worker))


class TaskError(ZfalkonError):
    """A task failed on a worker.

    Attributes:
        remote_type: qualified name of the exception type raised on the worker.
        remote_message: ``str()`` of that exception.
        remote_traceback: the formatted traceback text from the worker.
        worker: name of the worker that ran the task, when known.
    """

    def __init__(
        self,
        remote_type: str,
        remote_message: str,
        remote_traceback: str = "",
        worker: str | None = None,
    ) -> None:
        super().__init__(f"{remote_type}: {remote_message}")
        self.remote_type = remote_type
        self.remote_message = remote_message
        self.remote_traceback = remote_traceback
        self.worker = worker

    def __reduce__(self):  # keep the attributes through pickling (e.g. into a log queue)
        return (
            type(self),
            (self.remote_type, self.remote_message, self.remote_traceback, self.worker),
        )


class TaskTimeout(TaskError, TimeoutError):
    """A task ran past its time limit and was killed: a shell task's command (its process
    group), or the process running a Python task (``Executor.options(timeout=...)``).

    ``stdout`` and ``stderr`` hold what a shell task printed before that (empty for a
    Python task: its captured output dies with its process).
    """

    def __init__(
        self,
        timeout: float,
        stdout: str = "",
        stderr: str = "",
        worker: str | None = None,
    ) -> None:
        super().__init__("TaskTimeout", f"task ran past its timeout of {timeout:g} s and was killed", "", worker)
        self.timeout = timeout
        self.stdout = stdout
        self.stderr = stderr

    def __reduce__(self):
        return (type(self), (self.timeout, self.stdout, self.stderr, self.worker))


class WorkerCrashed(TaskError):
    """The process running the task died before it could return a result."""

    def __init__(self, remote_message: str, worker: str | None = None) -> None:
        super().__init__("WorkerCrashed", remote_message, "", worker)

    def __reduce__(self):
        return (type(self), (self.remote_message, self.worker))


class WorkerLost(TaskError):
    """The workers holding this task were lost ``attempts`` times; it was not retried again.

    ``worker`` names the last one. A task is lost with a worker that stopped sending
    heartbeats (machine gone, network cut), or with a slot whose lease lapsed (it stopped
    answering while its agent lived on), while it held the task, running or prefetched.
    """

    def __init__(self, remote_message: str, worker: str | None = None, attempts: int = 0) -> None:
        super().__init__("WorkerLost", remote_message, "", worker)
        self.attempts = attempts

    def __reduce__(self):
        return (type(self), (self.remote_message, self.worker, self.attempts))


__all__ = [
    "ZfalkonError",
    "ConfigError",
    "SerializationError",
    "BrokerUnavailable",
    "ProtocolError",
    "VersionMismatch",
    "RemoteTraceback",
    "TaskError",
    "TaskTimeout",
    "WorkerCrashed",
    "WorkerLost",
]
