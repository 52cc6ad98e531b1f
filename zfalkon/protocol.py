"""The zfalkon wire protocol: every message, its encoding and its validation.

Every message is one ZeroMQ frame holding a msgpack array ``[TAG, field, ...]``; the
broker's ROUTER socket adds the peer's routing id in front. Tasks and results travel as
opaque msgpack *blobs* (see :mod:`zfalkon.payload`) inside batch messages, in columnar
form (``ids`` and ``blobs`` side by side), so the broker never decodes user data.
``docs/protocol.md`` is the prose version of this module; keep them together.

Version rule: the first two fields of HELLO (``TAG``, ``protocol``) and the whole of ERROR
(``[3, code, message]``) are frozen forever, so any two zfalkon versions can at least tell
each other that they do not match.
"""

from __future__ import annotations

import types
import typing
from typing import Any, NamedTuple, Union

import msgpack

from zfalkon._version import __version__
from zfalkon.constants import PROTOCOL_VERSION
from zfalkon.errors import ProtocolError, VersionMismatch

ROLE_CLIENT = "client"  #: submits tasks, receives results, asks for status
ROLE_WORKER = "worker"  #: a worker agent: one per machine, registers resources
ROLE_SLOT = "slot"  #: one execution slot of a worker agent: receives tasks
ROLES = (ROLE_CLIENT, ROLE_WORKER, ROLE_SLOT)

#: Bits of a task id below the client key: ``task_id = client_key << ID_SHIFT | seq``.
ID_SHIFT = 40


class Hello(NamedTuple):
    """First message of every peer: who it is and which protocol it speaks.

    ``info`` by role: client ``{"name"}``, optionally ``"run"`` (a label for the run
    its session is: ``zfalkon runs``), ``"observer": True`` (a connection that only
    asks STATUS or CANCEL_RUN: not counted as a client) and ``"key"`` (its old key, when
    registering again); worker ``{"worker_id", "name", "hostname",
    "slots", "cpus", "memory", "tags", "pid"}``; slot ``{"worker_id", "slot"}``.
    """

    protocol: int
    version: str
    role: str
    info: dict


class Welcome(NamedTuple):
    """Broker's answer to HELLO. ``key``: the client key (clients), else 0."""

    protocol: int
    version: str
    key: int
    heartbeat: float


class Error(NamedTuple):
    """Something the peer sent was refused. ``code``: see :data:`ERROR_CODES`."""

    code: str
    message: str


class Submit(NamedTuple):
    """Client -> broker (stream): tasks to run. ``ids[i]`` names the task in ``blobs[i]``.

    ``seq``: this frame's number in the client's stream; ``ack``: the last DELIVER seq the
    client has (see :mod:`zfalkon.stream`). ``hints``: empty, or one data key per task
    (``""`` for none): the S3 input the broker's data-aware dispatch sends the task
    towards (see HOLDING). ``token``: the token of DELIVER ``ack`` (see :class:`Ack`).
    ``functions``: ``[digest, pickle, ...]`` pairs: functions the broker keeps under the
    client's key for its tasks *by digest* (see :func:`zfalkon.payload.stored_digest`),
    each in the first frame of a session whose tasks call it.
    """

    seq: int
    ack: int
    ids: list[int]
    blobs: list[bytes]
    hints: list[str] = []
    token: bytes = b""
    functions: list[bytes] = []


class Tasks(NamedTuple):
    """Broker -> slot (stream): tasks to run, never more than the slot's window allows.

    ``revoke``: tasks sent earlier that the broker has taken back (lease expired, or
    stolen for an idle slot): the slot drops them unless it has started them.
    ``kill``: tasks sent earlier that their client cancelled by force (CANCEL_KILL): the
    slot drops them if queued, kills the process running or holding them otherwise, and
    answers a CANCELLED result for each (unless its result is already on its way).
    ``functions``: ``[digest, pickle, ...]`` pairs for the tasks by digest in this frame
    whose function the slot was not sent before in its session; ``forget``: digests the
    slot may drop first (the broker no longer counts on it having them).
    """

    seq: int
    ack: int
    ids: list[int]
    blobs: list[bytes]
    revoke: list[int] = []
    kill: list[int] = []
    functions: list[bytes] = []
    forget: list[bytes] = []


class Results(NamedTuple):
    """Slot -> broker (stream): finished tasks, and the slot's ``window``: how many tasks
    it wants to hold (running, queued, or results not yet received by the broker).

    ``failed`` counts the results in the batch that are errors (for the broker's counters).
    A RESULTS with no ids just announces the window.
    """

    seq: int
    ack: int
    window: int
    failed: int
    ids: list[int]
    blobs: list[bytes]


class Deliver(NamedTuple):
    """Broker -> client (stream): results of its tasks, all run by ``worker``.

    ``token``: this frame's acknowledgement token, which the client sends back with any
    ``ack`` of this ``seq`` (see :class:`Ack`): only a client that read the frame has it.
    """

    seq: int
    ack: int
    worker: str
    ids: list[int]
    blobs: list[bytes]
    token: bytes


#: CANCEL modes. DROP: the client no longer wants these tasks (queued ones are skipped,
#: results of dispatched ones dropped). IF_QUEUED: cancel those never handed to a slot
#: (each gets a CANCELLED result in the client's stream); for the others, which may run,
#: the broker answers STARTED and their results come as usual. KILL: as IF_QUEUED for
#: tasks no slot holds (cancelled even if they may have run before), and the slots holding
#: the others are told to kill them (TASKS ``kill``): each ends with a CANCELLED result,
#: or its own result if it finished first. (Any other mode is taken as IF_QUEUED.)
CANCEL_DROP, CANCEL_IF_QUEUED, CANCEL_KILL = 0, 1, 2


class Cancel(NamedTuple):
    """Client -> broker (stream): cancel these tasks, as ``mode`` says (CANCEL_*).
    ``token``: the token of DELIVER ``ack`` (see :class:`Ack`)."""

    seq: int
    ack: int
    ids: list[int]
    token: bytes = b""
    mode: int = CANCEL_DROP


class Started(NamedTuple):
    """Broker -> client: these tasks of yours have been handed to a slot: they may run,
    and a CANCEL no longer stops them. Sent on the tick for tasks a slot has held since the tick
    before, and at once in answer to a CANCEL (IF_QUEUED) of such tasks. Not in a stream: a STARTED
    lost with a connection is only a later ``running()``."""

    ids: list[int]


class StatusRequest(NamedTuple):
    """Any registered peer -> broker: ask for a STATUS. ``token``: the one of the last
    STATUS this peer read: only a request that proves it read the last answer gets the
    worker list (see :class:`Status`)."""

    token: bytes = b""


class CancelRun(NamedTuple):
    """Client -> broker: cancel the *run* (client session) with client key ``key``: its
    queued tasks are removed (each gets a CANCELLED result in that client's stream) and,
    with ``mode`` CANCEL_KILL, the slots holding its other tasks are told to kill them
    (TASKS ``kill``); with CANCEL_IF_QUEUED those run on. Allowed only for a key that
    the asker's CURVE identity owns (without keys: anyone). Answered by RUN_CANCELLED,
    or ERROR ``unauthorized`` / ``unknown-run``."""

    key: int
    mode: int = CANCEL_KILL


class RunCancelled(NamedTuple):
    """Broker -> client: the answer to CANCEL_RUN: ``queued`` tasks of run ``key`` were
    removed from the queue (cancelled), ``killing`` running or prefetched ones are being
    killed by their slots."""

    key: int
    queued: int
    killing: int


class Status(NamedTuple):
    """Broker -> peer: counters and the worker list (see ``BrokerCore.status``). Without
    a proof of reading the previous answer (StatusRequest ``token``) the answer is the
    counters only (``partial``: true, ``worker_list`` empty): answers a peer never reads
    stay small. ``token``: to send with the next request."""

    info: dict
    token: bytes = b""


class Heartbeat(NamedTuple):
    """Worker agent -> broker, periodically: the machine is alive, and ``busy`` lists the
    routing ids of its slots running a task now (their leases are renewed)."""

    busy: list[bytes] = []


class Bye(NamedTuple):
    """Any peer -> broker: I am leaving; requeue whatever I held."""

    reason: str


class SlotLost(NamedTuple):
    """Worker agent -> broker: the slot with routing id ``slot`` died running ``task``.

    ``task`` is 0 when the slot was idle. The broker fails that task with a
    ``WorkerCrashed`` result and requeues the rest of what the slot held.
    """

    slot: bytes
    task: int
    reason: str


class Ping(NamedTuple):
    """Any registered peer -> broker: answer with PONG at once. ``sent``: the peer's clock;
    ``ack``: the last frame of the broker's stream the peer has (0 without a stream);
    ``token``: a client's token of DELIVER ``ack`` (see :class:`Ack`)."""

    sent: float
    ack: int = 0
    token: bytes = b""


class Pong(NamedTuple):
    """Broker -> peer: the PING's ``sent``, echoed (the peer measures its round trip), with
    the broker's side of the peer's streams: ``ack``, the last frame it has from the
    peer, and ``seq``, the last frame it has sent to the peer. Frames sent before the
    PING (PONG) and still missing when the PONG arrives died with an older connection."""

    sent: float
    ack: int = 0
    seq: int = 0


class Holding(NamedTuple):
    """Slot -> broker: its machine's cache now holds these data keys (S3 URLs)."""

    keys: list[str]


class Drain(NamedTuple):
    """Worker agent -> broker: stopping; send my slots nothing more (they finish what runs)."""

    reason: str


class Ack(NamedTuple):
    """Either way: I have every frame of your stream up to ``ack``; forget them.

    ``token``: from a client, the ``token`` of the DELIVER numbered ``ack`` (b"" when
    ``ack`` is 0). The broker counts a client's acknowledgement only if its token is that
    frame's: sequence numbers are predictable, tokens are not (a keyed hash of ``seq``
    under a secret of the client's session), so a client cannot acknowledge results it
    has not read. Slots and the broker send none (b"").
    """

    ack: int
    token: bytes = b""


class Resend(NamedTuple):
    """Either way: I have your stream up to ``ack`` and missed what follows (a gap, or a
    replaced connection): send every frame after ``ack`` again. ``token``: as for
    :class:`Ack`."""

    ack: int
    token: bytes = b""


Message = Union[
    Hello, Welcome, Error, Submit, Tasks, Results, Deliver, Cancel,
    StatusRequest, Status, Heartbeat, Bye, SlotLost, Ping, Pong, Drain, Holding, Ack, Resend,
    Started, CancelRun, RunCancelled,
]

TAGS: dict[type, int] = {
    Hello: 1,
    Welcome: 2,
    Error: 3,
    Submit: 4,
    Tasks: 5,
    Results: 6,
    Deliver: 7,
    Cancel: 9,
    StatusRequest: 10,
    Status: 11,
    Heartbeat: 12,
    Bye: 13,
    SlotLost: 14,
    Ping: 15,
    Pong: 16,
    Holding: 18,
    Drain: 17,
    Ack: 19,
    Resend: 20,
    Started: 21,
    CancelRun: 22,
    RunCancelled: 23,
}
"""Each message type's tag: field 0 of its frame. Tags are never reused."""

MESSAGE_TYPES: tuple[type, ...] = typing.get_args(Message)

#: ERROR code: the broker cannot write its journal, a SUBMIT was not accepted (yet).
JOURNAL_UNAVAILABLE = "journal-unavailable"

#: ERROR codes the broker sends.
ERROR_CODES = {
    "malformed": "the frame is not a valid message (bad msgpack, wrong fields or types)",
    "unknown-type": "the message tag is not one this broker knows",
    "version": "the peer speaks another protocol version",
    "hello-required": "the peer sent something before HELLO",
    "not-allowed": "the message is not valid for the peer's role",
    "bad-hello": "HELLO's info is missing fields or has wrong types",
    "unauthorized": "the peer's key may not do this (wrong role, or another key's routing id)",
    "too-large": "a control frame (HELLO, PING, ...) over its size limit",
    "limit": "the peer asked for more than the broker keeps for one peer (see docs/protocol.md)",
    "unknown-run": "CANCEL_RUN names no run (client key with tasks) the broker knows",
    JOURNAL_UNAVAILABLE: "the broker cannot write its journal (disk full or failing): the "
                           "SUBMIT was not accepted; the client keeps the tasks and its stream "
                           "sends them again",
}


class _Map:
    """The annotation of a map field checked only to be a map (see :data:`_SHALLOW`)."""


def _field_hints(cls: Any) -> dict[str, Any]:
    """``cls``'s field annotations, with its shallow fields as :class:`_Map`."""
    hints = typing.get_type_hints(cls)
    for name in _SHALLOW.get(cls, ()):
        hints[name] = _Map
    return hints


def _checker(annotation: Any):
    """Return a predicate for one field annotation (the types messages use)."""
    if annotation is _Map:
        return lambda v: type(v) is dict
    origin = typing.get_origin(annotation)
    if origin is list:
        (item,) = typing.get_args(annotation)
        return lambda v: type(v) is list and (not v or set(map(type, v)) == {item})
    if annotation is float:
        return lambda v: type(v) is float or type(v) is int
    if origin in (Union, types.UnionType):
        checks = [_checker(a) for a in typing.get_args(annotation)]
        return lambda v: any(c(v) for c in checks)
    if annotation is type(None):
        return lambda v: v is None
    if annotation is dict:
        return _plain_dict
    return lambda v, t=annotation: type(v) is t


_PLAIN = (str, int, float, bool, bytes, type(None))


def _plain(value: Any, depth: int = 0) -> bool:
    """True if ``value`` holds only msgpack's basic types (no Timestamp), not too deep."""
    if type(value) in _PLAIN:
        return True
    if depth > 32:
        return False
    if type(value) is list:
        return all(_plain(v, depth + 1) for v in value)
    if type(value) is dict:
        return all(_plain(k, depth + 1) and _plain(v, depth + 1) for k, v in value.items())
    return False


def _plain_dict(value: Any) -> bool:
    return type(value) is dict and _plain(value)


def _test_source(annotation: Any, v: str) -> str:
    """The expression :func:`_checker` evaluates, as source (for :func:`_validator`)."""
    if annotation is _Map:
        return f"type({v}) is dict"
    origin = typing.get_origin(annotation)
    if origin is list:
        (item,) = typing.get_args(annotation)
        return f"(type({v}) is list and (not {v} or set(map(type, {v})) == {{{item.__name__}}}))"
    if annotation is float:
        return f"(type({v}) is float or type({v}) is int)"
    if origin in (Union, types.UnionType):
        return "(" + " or ".join(_test_source(a, v) for a in typing.get_args(annotation)) + ")"
    if annotation is type(None):
        return f"{v} is None"
    if annotation is dict:
        return f"_plain_dict({v})"
    return f"type({v}) is {annotation.__name__}"


def _validator(cls: Any) -> Any:
    """One function that tests every field of a ``cls`` frame at once, generated from
    the annotations when this module is imported (as :mod:`dataclasses` generates
    ``__init__``): the per-field predicates cost a call each, several microseconds a
    message on every hop. The predicates stay for the error message."""
    hints = _field_hints(cls)
    tests = [_test_source(hints[f], f"o[{i}]") for i, f in enumerate(cls._fields, 1)]
    if "blobs" in cls._fields:
        tests.append(f"len(o[{cls._fields.index('ids') + 1}]) == "
                     f"len(o[{cls._fields.index('blobs') + 1}])")
    if cls is Submit:
        tests.append("(not o[5] or len(o[5]) == len(o[3]))")
    namespace = {"_plain_dict": _plain_dict}
    exec(f"def valid(o):\n    return {' and '.join(tests) or 'True'}\n", namespace)
    return namespace["valid"]


#: HELLO's ``info`` is checked only to be a map (its keys strings, by the unpacker): the
#: broker reads the few fields it keeps, each with its own type check (core.worker_info),
#: so walking every item of a peer's map in Python (milliseconds for a crafted 16 KiB
#: one) would only let one peer slow the broker's loop for everyone.
_SHALLOW: dict[type, set[str]] = {Hello: {"info"}}

#: tag -> (class, its fields with their predicates, all fields valid?, defaults)
_BY_TAG: dict[int, tuple[Any, list, Any, tuple]] = {}
for _cls, _tag in TAGS.items():
    _hints = _field_hints(_cls)
    _BY_TAG[_tag] = (_cls, [(f, _checker(_hints[f])) for f in _cls._fields],  # type: ignore[attr-defined]
                     _validator(_cls), tuple(_cls._field_defaults.values()))  # type: ignore[attr-defined]


def encode(msg: Message) -> bytes:
    """Encode a message as one frame."""
    return msgpack.packb((TAGS[type(msg)], *msg))


#: Largest frame of each message a peer sends the broker (bytes), checked before the frame
#: is unpacked: a control message never needs more, and unpacking and validating a frame
#: costs time and memory in proportion to its size. Batch messages (SUBMIT, RESULTS,
#: CANCEL, and what the broker sends) may use the whole MAX_FRAME_BYTES.
MAX_HELLO_BYTES = 16 * 1024
MAX_CONTROL_BYTES = 4 * 1024
MAX_HOLDING_BYTES = 256 * 1024
#: Heartbeats list the agent's busy slots (a routing id of ~17 bytes each).
MAX_HEARTBEAT_BYTES = 64 * 1024
_FRAME_CAPS: dict[int, int] = {
    TAGS[Hello]: MAX_HELLO_BYTES, TAGS[Heartbeat]: MAX_HEARTBEAT_BYTES,
    TAGS[Holding]: MAX_HOLDING_BYTES,
    **{TAGS[c]: MAX_CONTROL_BYTES for c in (StatusRequest, Bye, SlotLost, Ping, Pong, Drain,
                                            Ack, Resend, Error, Welcome, CancelRun,
                                            RunCancelled)},
}


def short(value: Any, limit: int = 64) -> str:
    """``repr`` of a peer's value for a log line or an ERROR, never more than ~``limit``
    characters, and never computed over the whole value (a peer's string may be
    megabytes long)."""
    if isinstance(value, (str, bytes)):
        return repr(value[:limit]) + ("..." if len(value) > limit else "")
    if isinstance(value, (int, float, bool)) or value is None:
        text = repr(value)
        return text if len(text) <= limit else text[:limit] + "..."
    return f"<{type(value).__name__}>"


def _refuse_ext(code: int, data: bytes) -> Any:
    raise ValueError(f"msgpack extension type {code} is not allowed")


def check_version(protocol: Any, version: Any) -> None:
    """Raise :class:`VersionMismatch`, naming both sides, if ``protocol`` is not ours."""
    if protocol != PROTOCOL_VERSION:
        raise VersionMismatch(
            f"protocol version mismatch: peer speaks zfalkon protocol {short(protocol)} "
            f"(package {short(version)}), this side speaks protocol {PROTOCOL_VERSION} "
            f"(package {__version__}); install matching zfalkon versions"
        )


def decode(frame: bytes | memoryview) -> Message:
    """Decode and validate one frame; raise :class:`ProtocolError` if it is not a message.

    A HELLO or WELCOME with another protocol version raises :class:`VersionMismatch`
    before its other fields are looked at.
    """
    # The tag, without unpacking: every message is a fixarray (under 16 fields) whose
    # first item is a positive fixint; a frame of any other shape is not a message, and
    # only a small one is unpacked to say why.
    if len(frame) > 1 and 0x90 <= frame[0] <= 0x9f and frame[1] in _BY_TAG:
        cap = _FRAME_CAPS.get(frame[1])
    else:
        cap = MAX_CONTROL_BYTES
    if cap is not None and len(frame) > cap:
        raise ProtocolError(f"a frame of this message type may be at most {cap} bytes, "
                            f"not {len(frame)}", "too-large")
    try:
        obj = msgpack.unpackb(frame, ext_hook=_refuse_ext, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types for bad input
        raise ProtocolError(f"undecodable frame ({type(exc).__name__}: {exc})", "malformed")
    if type(obj) is not list or not obj or type(obj[0]) is not int:
        raise ProtocolError("a message must be a msgpack array starting with an integer tag",
                            "malformed")
    entry = _BY_TAG.get(obj[0])
    if entry is None:
        raise ProtocolError(f"unknown message type {obj[0]}", "unknown-type")
    cls, fields, valid, defaults = entry
    if cls is Hello or cls is Welcome:
        if len(obj) < 2:
            raise ProtocolError(f"{cls.__name__} without a protocol version", "malformed")
        check_version(obj[1], obj[2] if len(obj) > 2 else "?")
    # Fields added to a message later go last, with a default: a peer that predates them
    # may leave them out (the same protocol version stays compatible).
    missing = len(fields) + 1 - len(obj)
    if not 0 <= missing <= len(defaults):
        raise ProtocolError(
            f"{cls.__name__} has {len(obj) - 1} fields, expected {len(fields)}", "malformed"
        )
    if missing:
        obj.extend(defaults[len(defaults) - missing:])
    if not valid(obj):
        _explain(cls, fields, obj)
    return _new_tuple(cls, obj[1:])


_new_tuple = tuple.__new__


def _explain(cls: Any, fields: list, obj: list) -> None:
    """Raise the ProtocolError that says what is wrong with a ``cls`` frame."""
    for (name, ok), value in zip(fields, obj[1:]):
        if not ok(value):
            raise ProtocolError(
                f"{cls.__name__}.{name} has the wrong type ({type(value).__name__})", "malformed"
            )
    names = [name for name, _ in fields]
    ids, blobs = obj[names.index("ids") + 1], obj[names.index("blobs") + 1]
    if len(ids) != len(blobs):
        raise ProtocolError(f"{cls.__name__} has {len(ids)} ids but {len(blobs)} blobs",
                            "malformed")
    raise ProtocolError(f"SUBMIT has {len(ids)} ids but {len(obj[5])} hints", "malformed")


def hello(role: str, info: dict) -> Hello:
    """A HELLO for this package's protocol and version."""
    return Hello(PROTOCOL_VERSION, __version__, role, info)


def client_key(task_id: int) -> int:
    """The key of the client that owns ``task_id``."""
    return task_id >> ID_SHIFT
