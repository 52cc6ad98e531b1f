"""zfalkon.protocol: message encoding, decoding and validation."""

from __future__ import annotations

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

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
    P.Submit: P.Submit(1, 0, [1, 2, 3], [b"a", b"", b"\x00\xff"], ["s3://b/k", "", ""]),
    P.Tasks: P.Tasks(3, 2, [(5 << P.ID_SHIFT) + 1], [b"blob"], [(5 << P.ID_SHIFT) + 7]),
    P.Results: P.Results(4, 3, 10, 1, [4, 5], [b"r4", b"r5"]),
    P.Deliver: P.Deliver(2, 1, "host-1/0", [9], [b"res"], b"\x01" * 8),
    P.Cancel: P.Cancel(2, 0, [1, 2], b"\x02" * 8, P.CANCEL_IF_QUEUED),
    P.StatusRequest: P.StatusRequest(),
    P.Status: P.Status({"version": "0.1.0", "worker_list": [{"name": "w"}], "rate": 1.5}),
    P.Heartbeat: P.Heartbeat([b"\x00slot-1", b"\x00slot-2"]),
    P.Bye: P.Bye("done"),
    P.SlotLost: P.SlotLost(b"\x01\x02", 42, "killed by SIGSEGV"),
    P.Ping: P.Ping(12.5, 3),
    P.Pong: P.Pong(12.5, 3, 4),
    P.Drain: P.Drain("stopping"),
    P.Holding: P.Holding(["s3://bucket/key"]),
    P.Ack: P.Ack(7, b"t" * 8),
    P.Resend: P.Resend(3),
    P.Started: P.Started([7, 8]),
    P.CancelRun: P.CancelRun(3, P.CANCEL_KILL),
    P.RunCancelled: P.RunCancelled(3, 10, 2),
}

#: Each message type's tag as field 0 of its frame.
T = P.TAGS


def test_examples_cover_every_message_type():
    assert set(EXAMPLES) == set(P.MESSAGE_TYPES) == set(P.TAGS)
    assert len(P.MESSAGE_TYPES) == len(set(P.TAGS[t] for t in P.MESSAGE_TYPES))  # unique


def test_tags_are_unique_positive_ints():
    tags = [P.TAGS[cls] for cls in P.MESSAGE_TYPES]
    assert len(set(tags)) == len(tags)
    assert all(type(t) is int and t > 0 for t in tags)
    assert 8 not in tags  # CREDIT's tag: retired with protocol 1, never reused
    assert not any(hasattr(cls, "TAG") for cls in P.MESSAGE_TYPES)  # tags live in TAGS


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
    assert raw[0] == P.TAGS[cls] and len(raw) == len(cls._fields) + 1


@pytest.mark.parametrize("msg", [
    P.Submit(1, 0, [], [], []),
    P.Tasks(1, 0, [], [], []),
    P.Cancel(1, 0, []),
    P.Results(1, 0, 5, 0, [], []),  # a RESULTS with no ids: just the window
    P.Deliver(1, 0, "w", [], [], b""),
    P.Heartbeat([]),
    P.Holding([]),
], ids=lambda m: type(m).__name__)
def test_empty_lists_round_trip(msg):
    assert P.decode(P.encode(msg)) == msg


@pytest.mark.parametrize("window", [0, 1, 2, 65536])
def test_results_window_round_trip(window):
    """CREDIT is gone: the window rides on RESULTS, with or without results in it."""
    announce = P.Results(1, 0, window, 0, [], [])
    back = P.decode(P.encode(announce))
    assert back == announce and back.window == window and back.ids == []
    batch = P.Results(2, 5, window, 1, [10, 11], [b"ok", b"err"])
    back = P.decode(P.encode(batch))
    assert back == batch and (back.seq, back.ack, back.window, back.failed) == (2, 5, window, 1)
    assert msgpack.unpackb(P.encode(batch)) == [P.TAGS[P.Results], 2, 5, window, 1, [10, 11],
                                               [b"ok", b"err"]]


@pytest.mark.parametrize("msg", [P.Ack(0), P.Ack(1, b"t" * 8), P.Ack(2**40), P.Resend(0),
                                 P.Resend(1, b"t" * 8), P.Resend(2**40)], ids=repr)
def test_ack_and_resend_round_trip(msg):
    frame = P.encode(msg)
    assert msgpack.unpackb(frame) == [P.TAGS[type(msg)], msg.ack, msg.token]
    out = P.decode(frame)
    assert type(out) is type(msg) and out == msg


@pytest.mark.parametrize("cls", [P.Ack, P.Resend])
def test_ack_token_may_be_left_out_and_must_be_bytes(cls):
    """A slot sends ACK and RESEND without a token (b""); a token that is not bin is
    malformed."""
    assert P.decode(msgpack.packb([P.TAGS[cls], 3])) == cls(3, b"")
    with pytest.raises(ProtocolError):
        P.decode(msgpack.packb([P.TAGS[cls], 3, "not bytes"]))


def test_deliver_requires_its_token():
    with pytest.raises(ProtocolError):
        P.decode(msgpack.packb([P.TAGS[P.Deliver], 1, 0, "w", [1], [b"x"]]))


def test_stream_fields_come_first():
    """Every stream message starts with (seq, ack): a receiver orders frames by them."""
    for cls in (P.Submit, P.Cancel, P.Deliver, P.Tasks, P.Results):
        assert cls._fields[:2] == ("seq", "ack"), cls


def test_trailing_fields_with_defaults_may_be_omitted():
    assert P.decode(msgpack.packb([T[P.Tasks], 1, 0, [1], [b"x"]])) == P.Tasks(1, 0, [1],
                                                                               [b"x"], [])
    assert P.decode(msgpack.packb([T[P.Heartbeat]])) == P.Heartbeat([])
    assert P.decode(msgpack.packb([T[P.Ping], 1.5])) == P.Ping(1.5, 0)
    assert P.decode(msgpack.packb([T[P.Pong], 1.5])) == P.Pong(1.5, 0, 0)
    assert P.decode(msgpack.packb([T[P.Pong], 1.5, 2])) == P.Pong(1.5, 2, 0)


def test_welcome_heartbeat_accepts_int_as_float():
    frame = msgpack.packb([T[P.Welcome], PROTOCOL_VERSION, __version__, 1, 2])
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
    "truncated msgpack": msgpack.packb([T[P.Submit], 1, 0, [1, 2], [b"a", b"b"]])[:-2],
    "trailing bytes": msgpack.packb([T[P.Heartbeat]]) + b"\x00",
    "empty frame": b"",
    "not an array (int)": msgpack.packb(5),
    "not an array (map)": msgpack.packb({"tag": 1}),
    "not an array (str)": msgpack.packb("hello"),
    "empty array": msgpack.packb([]),
    "tag is a string": msgpack.packb(["1", 1]),
    "tag is a float": msgpack.packb([12.0]),
    "tag is a bool": msgpack.packb([True]),
    "tag is nil": msgpack.packb([None]),
    "too few fields": msgpack.packb([T[P.Ack]]),
    "too many fields": msgpack.packb([T[P.Ack], 1, 2]),
    "resend too few fields": msgpack.packb([T[P.Resend]]),
    "fields on status request": msgpack.packb([T[P.StatusRequest], 1]),
    "too many fields on heartbeat": msgpack.packb([T[P.Heartbeat], [], 1]),
    "heartbeat busy is int": msgpack.packb([T[P.Heartbeat], 1]),
    "heartbeat busy holds str": msgpack.packb([T[P.Heartbeat], ["slot"]]),
    "hello without version": msgpack.packb([T[P.Hello]]),
    "hello too short": msgpack.packb([T[P.Hello], PROTOCOL_VERSION, __version__]),
    "welcome too long": msgpack.packb([T[P.Welcome], PROTOCOL_VERSION, "v", 1, 2.0, 9]),
    "results window is str": msgpack.packb([T[P.Results], 1, 0, "5", 0, [], []]),
    "results window is float": msgpack.packb([T[P.Results], 1, 0, 5.0, 0, [], []]),
    "results window is bool": msgpack.packb([T[P.Results], 1, 0, True, 0, [1], [b"x"]]),
    "results window is nil": msgpack.packb([T[P.Results], 1, 0, None, 0, [], []]),
    "results failed is bool": msgpack.packb([T[P.Results], 1, 0, 5, False, [], []]),
    "results without window (protocol 1 layout)": msgpack.packb(
        [T[P.Results], 5, 0, [1], [b"x"]]),
    "submit without seq and ack (protocol 1 layout)": msgpack.packb(
        [T[P.Submit], [1], [b"x"]]),
    "tasks without seq and ack (protocol 1 layout)": msgpack.packb([T[P.Tasks], [1], [b"x"]]),
    "deliver without seq and ack (protocol 1 layout)": msgpack.packb(
        [T[P.Deliver], "w", [1], [b"x"]]),
    "cancel without seq and ack (protocol 1 layout)": msgpack.packb([T[P.Cancel], [1]]),
    "seq is bool": msgpack.packb([T[P.Submit], True, 0, [1], [b"x"]]),
    "seq is float": msgpack.packb([T[P.Tasks], 1.0, 0, [1], [b"x"]]),
    "seq is str": msgpack.packb([T[P.Deliver], "1", 0, "w", [1], [b"x"]]),
    "ack is nil": msgpack.packb([T[P.Cancel], 1, None, [1]]),
    "ack is bool": msgpack.packb([T[P.Results], 1, False, 5, 0, [], []]),
    "ack message is float": msgpack.packb([T[P.Ack], 1.0]),
    "ack message is str": msgpack.packb([T[P.Ack], "1"]),
    "resend ack is bool": msgpack.packb([T[P.Resend], True]),
    "resend ack is nil": msgpack.packb([T[P.Resend], None]),
    "ping ack is float": msgpack.packb([T[P.Ping], 1.0, 1.5]),
    "pong seq is str": msgpack.packb([T[P.Pong], 1.0, 0, "1"]),
    "pong too long": msgpack.packb([T[P.Pong], 1.0, 0, 0, 0]),
    "heartbeat float is bool": msgpack.packb([T[P.Welcome], PROTOCOL_VERSION, "v", 1, True]),
    "welcome key is bool": msgpack.packb([T[P.Welcome], PROTOCOL_VERSION, "v", False, 2.0]),
    "ids contain bool": msgpack.packb([T[P.Cancel], 1, 0, [1, True]]),
    "ids contain str": msgpack.packb([T[P.Submit], 1, 0, ["1"], [b"x"]]),
    "ids contain float": msgpack.packb([T[P.Cancel], 1, 0, [1.0]]),
    "ids not a list": msgpack.packb([T[P.Cancel], 1, 0, 1]),
    "ids is a map": msgpack.packb([T[P.Cancel], 1, 0, {"a": 1}]),
    "revoke holds str": msgpack.packb([T[P.Tasks], 1, 0, [], [], ["1"]]),
    "revoke not a list": msgpack.packb([T[P.Tasks], 1, 0, [], [], 1]),
    "blobs are str": msgpack.packb([T[P.Submit], 1, 0, [1], ["x"]]),
    "blobs mixed": msgpack.packb([T[P.Submit], 1, 0, [1, 2], [b"x", "y"]]),
    "submit ids/blobs mismatch": msgpack.packb([T[P.Submit], 1, 0, [1, 2], [b"x"]]),
    "submit ids/hints mismatch": msgpack.packb([T[P.Submit], 1, 0, [1, 2], [b"x", b"y"], ["h"]]),
    "tasks ids/blobs mismatch": msgpack.packb([T[P.Tasks], 1, 0, [1], []]),
    "results ids/blobs mismatch": msgpack.packb([T[P.Results], 1, 0, 1, 0, [], [b"x"]]),
    "deliver ids/blobs mismatch": msgpack.packb(
        [T[P.Deliver], 1, 0, "w", [1, 2, 3], [b"a", b"b"]]),
    "hello role is bytes": msgpack.packb([T[P.Hello], PROTOCOL_VERSION, "v", b"client", {}]),
    "hello info is list": msgpack.packb([T[P.Hello], PROTOCOL_VERSION, "v", "client", []]),
    "hello info has int keys": msgpack.packb(
        [T[P.Hello], PROTOCOL_VERSION, "v", "client", {1: "x"}]),
    "error code is int": msgpack.packb([T[P.Error], 1, "m"]),
    "slotlost slot is str": msgpack.packb([T[P.SlotLost], "ab", 0, "r"]),
    "invalid utf-8 string": b"\x92\x0d\xa2\xff\xfe",
    "ext type top level": msgpack.packb(msgpack.ExtType(5, b"xx")),
    "ext type in field": msgpack.packb([T[P.Bye], msgpack.ExtType(1, b"x")]),
    "ext type in hello info": msgpack.packb(
        [T[P.Hello], PROTOCOL_VERSION, "v", "client", {"name": msgpack.ExtType(3, b"x")}]),
    "ext type in blobs": msgpack.packb([T[P.Submit], 1, 0, [1], [msgpack.ExtType(0, b"")]]),
}


@pytest.mark.parametrize("frame", list(MALFORMED.values()), ids=list(MALFORMED))
def test_malformed_frames(frame):
    exc = _decode_error(frame)
    assert exc.code == "malformed"
    assert type(exc) is ProtocolError
    assert str(exc)


def test_malformed_message_names_the_problem():
    exc = _decode_error(msgpack.packb([T[P.Results], 1, 0, "5", 0, [], []]))
    assert "Results.window" in str(exc)
    exc = _decode_error(msgpack.packb([T[P.Submit], 1, "0", [1], [b"x"]]))
    assert "Submit.ack" in str(exc)
    # hints came later: a SUBMIT without them is still valid
    assert P.decode(msgpack.packb([T[P.Submit], 1, 0, [1], [b"x"]])) == P.Submit(1, 0, [1],
                                                                                 [b"x"], [])
    exc = _decode_error(msgpack.packb([T[P.Submit], 1, 0, [1]]))
    assert "3 fields, expected 7" in str(exc)
    exc = _decode_error(msgpack.packb([T[P.Submit], 1, 0, [1, 2], [b"x"], []]))
    assert "2 ids" in str(exc) and "1 blobs" in str(exc)
    exc = _decode_error(msgpack.packb([T[P.Submit], 1, 0, [1, 2], [b"x", b"y"], ["h"]]))
    assert "2 ids" in str(exc) and "1 hints" in str(exc)
    exc = _decode_error(msgpack.packb([T[P.Ack], 1, b"t", 2]))
    assert "3 fields" in str(exc) and "expected 2" in str(exc)


def test_timestamp_extension_is_refused():
    """msgpack decodes ext type -1 (Timestamp) natively, without calling ext_hook.

    protocol.decode must still refuse it where it walks a map: extension types are not
    part of the protocol.
    """
    frame = msgpack.packb([T[P.Status], {"rate": msgpack.Timestamp(0)}])
    exc = _decode_error(frame)
    assert exc.code == "malformed"


def test_hello_info_is_checked_shallowly_and_the_broker_keeps_only_typed_fields():
    """A HELLO's info is only checked to be a map (walking a crafted 16 KiB map costs
    milliseconds of the broker's loop); the broker keeps only the fields it knows, each
    type-checked, so nothing unchecked is kept."""
    from zfalkon.core import BrokerCore

    frame = msgpack.packb([T[P.Hello], PROTOCOL_VERSION, __version__, P.ROLE_CLIENT,
                           {"name": msgpack.Timestamp(0), "junk": [[]] * 5000}])
    core = BrokerCore(0.0)
    core.message(b"c", P.decode(frame), None, 0.0)
    (client,) = core.clients.values()
    assert client.name == ""
    frame = msgpack.packb([T[P.Hello], PROTOCOL_VERSION, __version__, P.ROLE_WORKER,
                           {"worker_id": "w", "slots": 1, "name": msgpack.Timestamp(0),
                            "tags": ["a", msgpack.Timestamp(0)], "cpus": "x", "junk": {}}])
    core.message(b"w", P.decode(frame), None, 0.0)
    assert core.workers["w"].info == {"worker_id": "w", "slots": 1, "tags": ["a"],
                                      "name": None, "hostname": None, "cpus": None,
                                      "memory": None, "pid": None}


@pytest.mark.parametrize("tag", [0, 8, 24, 99, -1, 2**40])  # 8: CREDIT, retired
def test_unknown_tag(tag):
    exc = _decode_error(msgpack.packb([tag, 1, 2]))
    assert exc.code == "unknown-type"
    assert str(tag) in str(exc)


@pytest.mark.parametrize("cls", [P.Hello, P.Welcome], ids=lambda c: c.__name__)
@pytest.mark.parametrize("other", [0, PROTOCOL_VERSION - 1, PROTOCOL_VERSION + 1, 99])
def test_other_protocol_version(cls, other):
    if cls is P.Hello:
        frame = msgpack.packb([T[cls], other, "9.9.9", "client", {}])
    else:
        frame = msgpack.packb([T[cls], other, "9.9.9", 0, 2.0])
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
    future = PROTOCOL_VERSION + 1
    frame = msgpack.packb([T[P.Hello], future, "9.0.0", {"new": "layout"}, 1, 2, 3])
    with pytest.raises(VersionMismatch) as info:
        P.decode(frame)
    assert f"protocol {future}" in str(info.value)
    # the package version field may even be missing
    with pytest.raises(VersionMismatch) as info:
        P.decode(msgpack.packb([T[P.Hello], 5]))
    assert "protocol 5" in str(info.value) and "'?'" in str(info.value)


def test_same_version_wrong_shape_is_malformed_not_mismatch():
    exc = _decode_error(msgpack.packb([T[P.Hello], PROTOCOL_VERSION, __version__, "client"]))
    assert type(exc) is ProtocolError and exc.code == "malformed"


def test_check_version():
    P.check_version(PROTOCOL_VERSION, __version__)  # no error
    with pytest.raises(VersionMismatch, match="protocol 2"):
        P.check_version(2, "x")  # (protocol 2: acknowledgements without tokens)


def test_protocol_error_default_code():
    assert ProtocolError("x").code == "protocol"
    assert ProtocolError("x", "malformed").code == "malformed"
    assert VersionMismatch("x").code == "version"


# Values of every type the fields use, and some they never do.
_VALUES = st.one_of(
    st.integers(-2**63, 2**64 - 1), st.floats(allow_nan=False), st.text(max_size=3),
    st.binary(max_size=3), st.none(), st.booleans(),
    st.lists(st.one_of(st.integers(0, 9), st.binary(max_size=2), st.text(max_size=2)),
             max_size=3),
    st.dictionaries(st.text(max_size=2), st.integers(0, 3), max_size=2))


@settings(max_examples=500, deadline=None)
@given(st.sampled_from(list(P.TAGS.items())), st.data())
def test_generated_validator_agrees_with_field_predicates(entry, data):
    """decode's one generated test per message type accepts exactly what the per-field
    predicates (and the ids/blobs/hints length rules) accept."""
    cls, tag = entry
    values = [data.draw(_VALUES) for _ in cls._fields]
    if values and data.draw(st.booleans()):  # well-typed frames, to reach the length rules
        values = list(EXAMPLES[cls])
        for i in data.draw(st.lists(st.integers(0, len(values) - 1), max_size=2)):
            values[i] = data.draw(_VALUES)
    _, fields, valid, _ = P._BY_TAG[tag]
    by_field = all(ok(v) for (_, ok), v in zip(fields, values))
    if by_field and "blobs" in cls._fields:
        named = dict(zip(cls._fields, values))
        by_field = len(named["ids"]) == len(named["blobs"]) and (
            cls is not P.Submit or not named["hints"]
            or len(named["hints"]) == len(named["ids"]))
    assert bool(valid([tag, *values])) == by_field
    if cls not in (P.Hello, P.Welcome):  # (their version field is checked first)
        frame = msgpack.packb([tag, *values])
        if by_field:
            assert P.decode(frame) == cls(*values)
        else:
            with pytest.raises(ProtocolError):
                P.decode(frame)
