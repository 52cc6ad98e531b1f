"""zfalkon.protocol: message encoding, decoding and validation."""

from __future__ import annotations

import msgpack
import pytest

from zfalkon import protocol as P
from zfalkon._version import __version__
from zfalkon.constants import PROTOCOL_VERSION
from zfalkon.errors import ProtocolError, VersionMismatch, ZfalkonError

EXAMPLES = {
    P.Hello: P.Hello(PROTOCOL_VERSION, __version__, P.ROLE_WORKER,
                     {"worker_id": "w1", "hostname": "h", "slots": 2, "cpus": 2,
                      "memory": 1 << 33, "tags": ["a", "b"]}),
    P.Welcome: P.Welcome(PROTOCOL_VERSION, __version__, 7, 2.0),
    P.Error: P.Error("malformed", "bad frame"),
    P.Submit: P.Submit([1, 2, 3], [b"a", b"", b"\x00\xff"], ["s3://b/k", "", ""]),
    P.Tasks: P.Tasks([(5 << P.ID_SHIFT) + 1], [b"blob"]),
    P.Results: P.Results(10, 1, [4, 5], [b"r4", b"r5"]),
    P.Deliver: P.Deliver("host-1/0", [9], [b"res"]),
    P.Credit: P.Credit(64),
    P.Cancel: P.Cancel([1, 2]),
    P.StatusRequest: P.StatusRequest(),
    P.Status: P.Status({"version": "0.1.0", "worker_list": [{"name": "w"}], "rate": 1.5}),
    P.Heartbeat: P.Heartbeat(),
    P.Bye: P.Bye("done"),
    P.SlotLost: P.SlotLost(b"\x01\x02", 42, "killed by SIGSEGV"),
    P.Ping: P.Ping(12.5),
    P.Pong: P.Pong(12.5),
    P.Drain: P.Drain("stopping"),
    P.Holding: P.Holding(["s3://bucket/key"]),
}


def test_examples_cover_every_message_type():
    assert set(EXAMPLES) == set(P.MESSAGE_TYPES)
    assert len(P.MESSAGE_TYPES) == len(set(t.TAG for t in P.MESSAGE_TYPES))  # tags are unique


def test_tags_are_unique_positive_ints():
    tags = [cls.TAG for cls in P.MESSAGE_TYPES]
    assert len(set(tags)) == len(tags)
    assert all(type(t) is int and t > 0 for t in tags)


@pytest.mark.parametrize("cls", P.MESSAGE_TYPES, ids=lambda c: c.__name__)
def test_round_trip(cls):
    msg = EXAMPLES[cls]
    frame = P.encode(msg)
    assert isinstance(frame, bytes)
    out = P.decode(frame)
    assert type(out) is cls
    assert out == msg
    # the wire form is a msgpack array starting with the tag
    raw = msgpack.unpackb(frame)
    assert raw[0] == cls.TAG and len(raw) == len(cls._fields) + 1


@pytest.mark.parametrize("cls", [P.Submit, P.Tasks, P.Cancel], ids=lambda c: c.__name__)
def test_empty_lists_round_trip(cls):
    msg = cls(*([] for _ in cls._fields))
    assert P.decode(P.encode(msg)) == msg


def test_welcome_heartbeat_accepts_int_as_float():
    frame = msgpack.packb([P.Welcome.TAG, PROTOCOL_VERSION, __version__, 1, 2])
    assert P.decode(frame) == P.Welcome(PROTOCOL_VERSION, __version__, 1, 2)


def test_hello_helper_uses_this_version():
    h = P.hello(P.ROLE_CLIENT, {"name": "x"})
    assert h.protocol == PROTOCOL_VERSION and h.version == __version__
    assert P.decode(P.encode(h)) == h


def test_client_key():
    tid = (12 << P.ID_SHIFT) | 99
    assert P.client_key(tid) == 12
    assert P.client_key(99) == 0


def test_error_codes_documented():
    assert {"malformed", "unknown-type", "version", "hello-required", "not-allowed",
            "bad-hello"} <= set(P.ERROR_CODES)


def _decode_error(frame: bytes) -> ProtocolError:
    with pytest.raises(ProtocolError) as info:
        P.decode(frame)
    assert isinstance(info.value, ZfalkonError)
    return info.value


MALFORMED = {
    "bad msgpack": b"\xc1",
    "truncated msgpack": msgpack.packb([4, [1, 2], [b"a", b"b"]])[:-2],
    "trailing bytes": msgpack.packb([12]) + b"\x00",
    "empty frame": b"",
    "not an array (int)": msgpack.packb(5),
    "not an array (map)": msgpack.packb({"tag": 1}),
    "not an array (str)": msgpack.packb("hello"),
    "empty array": msgpack.packb([]),
    "tag is a string": msgpack.packb(["1", 1]),
    "tag is a float": msgpack.packb([12.0]),
    "tag is a bool": msgpack.packb([True]),
    "tag is nil": msgpack.packb([None]),
    "too few fields": msgpack.packb([P.Credit.TAG]),
    "too many fields": msgpack.packb([P.Credit.TAG, 1, 2]),
    "fields on heartbeat": msgpack.packb([P.Heartbeat.TAG, 1]),
    "hello without version": msgpack.packb([P.Hello.TAG]),
    "hello too short": msgpack.packb([P.Hello.TAG, PROTOCOL_VERSION, __version__]),
    "welcome too long": msgpack.packb([P.Welcome.TAG, PROTOCOL_VERSION, "v", 1, 2.0, 9]),
    "credit is str": msgpack.packb([P.Credit.TAG, "5"]),
    "credit is float": msgpack.packb([P.Credit.TAG, 5.0]),
    "credit is bool": msgpack.packb([P.Credit.TAG, True]),
    "credit is nil": msgpack.packb([P.Credit.TAG, None]),
    "heartbeat float is bool": msgpack.packb([P.Welcome.TAG, PROTOCOL_VERSION, "v", 1, True]),
    "welcome key is bool": msgpack.packb([P.Welcome.TAG, PROTOCOL_VERSION, "v", False, 2.0]),
    "results credit is bool": msgpack.packb([P.Results.TAG, True, 0, [1], [b"x"]]),
    "ids contain bool": msgpack.packb([P.Cancel.TAG, [1, True]]),
    "ids contain str": msgpack.packb([P.Submit.TAG, ["1"], [b"x"]]),
    "ids contain float": msgpack.packb([P.Cancel.TAG, [1.0]]),
    "ids not a list": msgpack.packb([P.Cancel.TAG, 1]),
    "ids is a map": msgpack.packb([P.Cancel.TAG, {"a": 1}]),
    "blobs are str": msgpack.packb([P.Submit.TAG, [1], ["x"]]),
    "blobs mixed": msgpack.packb([P.Submit.TAG, [1, 2], [b"x", "y"]]),
    "submit ids/blobs mismatch": msgpack.packb([P.Submit.TAG, [1, 2], [b"x"]]),
    "tasks ids/blobs mismatch": msgpack.packb([P.Tasks.TAG, [1], []]),
    "results ids/blobs mismatch": msgpack.packb([P.Results.TAG, 1, 0, [], [b"x"]]),
    "deliver ids/blobs mismatch": msgpack.packb([P.Deliver.TAG, "w", [1, 2, 3], [b"a", b"b"]]),
    "hello role is bytes": msgpack.packb([P.Hello.TAG, PROTOCOL_VERSION, "v", b"client", {}]),
    "hello info is list": msgpack.packb([P.Hello.TAG, PROTOCOL_VERSION, "v", "client", []]),
    "hello info has int keys": msgpack.packb(
        [P.Hello.TAG, PROTOCOL_VERSION, "v", "client", {1: "x"}]),
    "error code is int": msgpack.packb([P.Error.TAG, 1, "m"]),
    "slotlost slot is str": msgpack.packb([P.SlotLost.TAG, "ab", 0, "r"]),
    "invalid utf-8 string": b"\x92\x0d\xa2\xff\xfe",
    "ext type top level": msgpack.packb(msgpack.ExtType(5, b"xx")),
    "ext type in field": msgpack.packb([P.Bye.TAG, msgpack.ExtType(1, b"x")]),
    "ext type in hello info": msgpack.packb(
        [P.Hello.TAG, PROTOCOL_VERSION, "v", "client", {"name": msgpack.ExtType(3, b"x")}]),
    "ext type in blobs": msgpack.packb([P.Submit.TAG, [1], [msgpack.ExtType(0, b"")]]),
}


@pytest.mark.parametrize("frame", list(MALFORMED.values()), ids=list(MALFORMED))
def test_malformed_frames(frame):
    exc = _decode_error(frame)
    assert exc.code == "malformed"
    assert type(exc) is ProtocolError
    assert str(exc)


def test_malformed_message_names_the_problem():
    exc = _decode_error(msgpack.packb([P.Credit.TAG, "5"]))
    assert "Credit.n" in str(exc)
    # hints came later: a SUBMIT without them is still valid
    assert P.decode(msgpack.packb([P.Submit.TAG, [1], [b"x"]])) == P.Submit([1], [b"x"], [])
    exc = _decode_error(msgpack.packb([P.Submit.TAG, [1]]))
    assert "1 fields, expected 3" in str(exc)
    exc = _decode_error(msgpack.packb([P.Submit.TAG, [1, 2], [b"x"], []]))
    assert "2 ids" in str(exc) and "1 blobs" in str(exc)
    exc = _decode_error(msgpack.packb([P.Submit.TAG, [1, 2], [b"x", b"y"], ["h"]]))
    assert "2 ids" in str(exc) and "1 hints" in str(exc)
    exc = _decode_error(msgpack.packb([P.Credit.TAG, 1, 2]))
    assert "2 fields" in str(exc) and "expected 1" in str(exc)


def test_timestamp_extension_is_refused():
    """msgpack decodes ext type -1 (Timestamp) natively, without calling ext_hook.

    protocol.decode must still refuse it: extension types are not part of the protocol,
    and a Hello/Status info dict is not type-checked below its top level.
    """
    frame = msgpack.packb([P.Hello.TAG, PROTOCOL_VERSION, __version__, P.ROLE_CLIENT,
                           {"name": msgpack.Timestamp(0)}])
    exc = _decode_error(frame)
    assert exc.code == "malformed"


@pytest.mark.parametrize("tag", [0, 19, 99, -1, 2**40])
def test_unknown_tag(tag):
    exc = _decode_error(msgpack.packb([tag, 1, 2]))
    assert exc.code == "unknown-type"
    assert str(tag) in str(exc)


@pytest.mark.parametrize("cls", [P.Hello, P.Welcome], ids=lambda c: c.__name__)
@pytest.mark.parametrize("other", [0, 2, 99])
def test_other_protocol_version(cls, other):
    if cls is P.Hello:
        frame = msgpack.packb([cls.TAG, other, "9.9.9", "client", {}])
    else:
        frame = msgpack.packb([cls.TAG, other, "9.9.9", 0, 2.0])
    with pytest.raises(VersionMismatch) as info:
        P.decode(frame)
    exc = info.value
    assert exc.code == "version"
    assert isinstance(exc, ProtocolError)
    text = str(exc)
    assert f"protocol {other}" in text
    assert f"protocol {PROTOCOL_VERSION}" in text
    assert "9.9.9" in text and __version__ in text


def test_version_checked_before_other_fields():
    """A future HELLO may have any other fields: the version is reported, not the shape."""
    frame = msgpack.packb([P.Hello.TAG, 2, "2.0.0", {"new": "layout"}, 1, 2, 3])
    with pytest.raises(VersionMismatch) as info:
        P.decode(frame)
    assert "protocol 2" in str(info.value)
    # the package version field may even be missing
    with pytest.raises(VersionMismatch) as info:
        P.decode(msgpack.packb([P.Hello.TAG, 5]))
    assert "protocol 5" in str(info.value) and "'?'" in str(info.value)


def test_same_version_wrong_shape_is_malformed_not_mismatch():
    exc = _decode_error(msgpack.packb([P.Hello.TAG, PROTOCOL_VERSION, __version__, "client"]))
    assert type(exc) is ProtocolError and exc.code == "malformed"


def test_check_version():
    P.check_version(PROTOCOL_VERSION, __version__)  # no error
    with pytest.raises(VersionMismatch, match="protocol 3"):
        P.check_version(3, "x")


def test_protocol_error_default_code():
    assert ProtocolError("x").code == "protocol"
    assert ProtocolError("x", "malformed").code == "malformed"
    assert VersionMismatch("x").code == "version"
