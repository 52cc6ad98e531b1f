"""zfalkon: a fast many-task execution fabric.

A broker on one static host; workers that connect out to it from anywhere (VMs behind NAT
included); clients that submit Python callables and shell commands through a
``concurrent.futures.Executor``. See the README for the delivery semantics.
"""

from zfalkon._version import __version__
from zfalkon.client import Executor, TaskFuture, TaskOptions, cancel_run, query_status
from zfalkon.cluster import LocalCluster
from zfalkon.errors import (
    BrokerUnavailable,
    ConfigError,
    ProtocolError,
    RemoteTraceback,
    SerializationError,
    TaskError,
    TaskTimeout,
    VersionMismatch,
    WorkerCrashed,
    WorkerLost,
    ZfalkonError,
)
from zfalkon.payload import ShellResult

__all__ = [
    "__version__",
    "Executor",
    "TaskFuture",
    "TaskOptions",
    "LocalCluster",
    "ShellResult",
    "query_status",
    "cancel_run",
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
