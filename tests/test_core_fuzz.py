"""zfalkon.core under hostile frames, without sockets: hypothesis draws messages from the
protocol's schema (every message type; each field of its own type with a random size, or
of a wrong type, or a wrong field count, or random bytes) from registered and unknown
peers, and feeds them through ``protocol.decode`` into a :class:`BrokerCore` that is
also serving an honest client and slot.

Invariants after every frame: the core never raises; its counters match its queues; no
frame makes the broker answer more than a bounded amount (no amplification); what it
keeps per peer stays within the limits of docs/protocol.md ("Limits per peer"); and at
the end the honest client's tasks all complete, each once. The test prints its rate in
frames per second (thousands, on one core).
"""

from __future__ import annotations

import os
import time
import typing

import msgpack
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from zfalkon import core as C
from zfalkon import protocol as P
from zfalkon.constants import PROTOCOL_VERSION
from zfalkon.core import BrokerCore
from zfalkon.errors import ProtocolError

EXAMPLES = int(os.environ.get("ZFALKON_CORE_EXAMPLES", "2000")) // 10

#: Routing ids: honest peers, and ones an attacker may use (including theirs).
CLIENT, WORKER, SLOT = b"honest-client", b"honest-worker", b"honest-slot"
IDENTS = [CLIENT, WORKER, SLOT, b"evil-1", b"evil-2", b"evil-worker", b"evil-slot"]

_ints = st.one_of(st.integers(-3, 3), st.integers(0, 2**64 - 1), st.integers(-2**63, 0))
_names = st.text(max_size=300)
_small_bytes = st.binary(max_size=64)


def _value(annotation) -> st.SearchStrategy:
    """Values of a field's own type, of random sizes (up to a few thousand items)."""
    origin = typing.get_origin(annotation)
    if origin is list:
        (item,) = typing.get_args(annotation)
        return st.lists(_value(item), max_size=50) | st.lists(_value(item), min_size=500,
                                                              max_size=1500)
    if annotation is int:
        return _ints
    if annotation is float:
        return st.floats(allow_nan=False) | _ints
    if annotation is str:
        return _names | st.sampled_from(P.ROLES)
    if annotation is bytes:
        return _small_bytes | st.sampled_from(IDENTS)
    if annotation is dict:
        return _info
    return st.none()


_info = st.one_of(
    st.dictionaries(  # anything at all
        st.sampled_from(["worker_id", "slots", "slot", "name", "hostname", "tags", "key",
                         "cpus", "memory", "pid", "junk"]),
        st.one_of(_ints, _names, st.lists(_names, max_size=200),
                  st.dictionaries(_names, _ints, max_size=20)),
        max_size=11),
    st.fixed_dictionaries(  # a worker HELLO that registers, with oversized fields
        {"worker_id": st.sampled_from(["w", "evil"]) | st.text(min_size=1, max_size=200),
         "slots": st.integers(1, 5000)},
        optional={"tags": st.lists(st.text(max_size=100), max_size=200)
                  | st.lists(st.text(max_size=100), min_size=60, max_size=200), "name": _names,
                  "hostname": _names, "cpus": _ints, "junk": st.lists(_ints, max_size=500)}),
    st.fixed_dictionaries(  # a slot HELLO naming a worker
        {"worker_id": st.sampled_from(["w", "evil"]), "slot": st.integers(0, 10)}),
)
_wrong = st.one_of(_ints, _names, _small_bytes, st.none(), st.booleans(),
                   st.lists(_ints, max_size=5), st.dictionaries(_names, _ints, max_size=3))


@st.composite
def frames(draw) -> bytes:
    """One hostile frame: usually a message of a real type with drawn fields."""
    kind = draw(st.integers(0, 9))
    if kind == 0:
        return draw(st.binary(max_size=200))
    if kind <= 2:  # a HELLO in a real role: registrations are where state is kept
        return msgpack.packb([P.TAGS[P.Hello], PROTOCOL_VERSION, draw(_names),
                              draw(st.sampled_from(P.ROLES)), draw(_info)])
    cls, tag = draw(st.sampled_from(sorted(P.TAGS.items(), key=lambda kv: kv[1])))
    hints = typing.get_type_hints(cls)
    fields = [draw(_wrong) if draw(st.integers(0, 7)) == 0 else draw(_value(hints[f]))
              for f in cls._fields]
    if cls is P.Hello:
        fields[0] = PROTOCOL_VERSION if draw(st.integers(0, 5)) else fields[0]
    cut = draw(st.integers(0, 9))
    if cut == 0 and fields:
        fields = fields[:-1]
    elif cut == 1:
        fields.append(draw(_wrong))
    return msgpack.packb([tag, *fields])


class Honest:
    """An honest client and a one-slot worker, driven through the core's own messages."""

    def __init__(self, core: BrokerCore, now: float) -> None:
        self.core = core
        core.message(WORKER, P.hello(P.ROLE_WORKER, {"worker_id": "w", "slots": 1}), None, now)
        core.message(SLOT, P.hello(P.ROLE_SLOT, {"worker_id": "w", "slot": 0}), None, now)
        core.message(SLOT, P.Results(1, 0, 16, 0, [], []), None, now)
        core.message(CLIENT, P.hello(P.ROLE_CLIENT, {"name": "honest"}), None, now)
        self.key = core.peers[CLIENT].key
        self.ids = [(self.key << P.ID_SHIFT) + i for i in range(1, 21)]
        core.message(CLIENT, P.Submit(1, 0, self.ids, [b"task"] * 20), None, now)


def check_invariants(core: BrokerCore) -> None:
    slots = [s for w in core.workers.values() for s in w.slots.values()]
    assert core.running == sum(len(s.inflight) for s in slots)
    assert core.active_slots == sum(s.active for s in slots)
    assert core.queue.count == len(core.queue)
    assert sum(1 for s in core.ready) == sum(s.ready for s in slots)
    for w in core.workers.values():
        assert len(w.data) <= C.MAX_DATA_KEYS
        assert len(w.info.get("tags", [])) <= C.MAX_TAGS
        assert len(w.slots) <= 2 * w.info["slots"] <= 2 * C.MAX_WORKER_SLOTS
        assert all(len(str(v)) <= 4 * C.MAX_NAME_CHARS for v in w.info.values()
                   if not isinstance(v, list))
    for c in core.clients.values():
        assert len(c.name) <= C.MAX_NAME_CHARS
        if c.quiet:
            assert c.held_bytes <= C.MAX_HELD_BYTES + C.SEND_WINDOW_BYTES + (1 << 20)


@settings(max_examples=EXAMPLES, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(st.lists(st.tuples(st.sampled_from(IDENTS), frames()), min_size=1, max_size=40),
       st.sampled_from(["fifo", "data"]))
def test_hostile_frames_against_the_core(attack, policy):
    from zfalkon.taskqueue import make_queue

    now = 1000.0
    core = BrokerCore(now, queue=make_queue(policy))
    honest = Honest(core, now)
    core.outbox.clear()
    for i, (ident, frame) in enumerate(attack):
        if ident in (CLIENT, WORKER, SLOT) and i % 3:
            ident = b"evil-1"  # (mostly strangers; sometimes a frame on an honest id)
        try:
            msg = P.decode(frame)
        except ProtocolError as exc:
            core.refuse(ident, exc)
        else:
            core.message(ident, msg, None, now)
        core.dispatch(now)
        out = len(msgpack.packb([list(m) for _, m in core.outbox], default=list))
        # No amplification: an answer is at most a constant plus what the honest
        # client's and slot's streams legitimately carry.
        assert out <= 8 * len(frame) + 64 * 1024 + 40 * len(b"task")
        core.outbox.clear()
        if i % 10 == 9:
            now += 1.0
            core.tick(now)
            core.outbox.clear()
        check_invariants(core)
    # The honest slot runs whatever it still holds; the honest client gets each of its
    # tasks at most once.
    slot = core.peers.get(SLOT)
    if isinstance(slot, C.Slot) and slot.inflight:
        ids = list(slot.inflight)
        core.message(SLOT, P.Results(slot.rx.last + 1, slot.tx.seq, 16, 0, ids,
                                     [b"r"] * len(ids)), None, now)
    client = core.clients.get(honest.key)
    if client is not None:
        delivered = [t for _, (_, ids, _) in client.tx.unacked for t in ids]
        assert len(delivered) == len(set(delivered))
        assert set(delivered) <= set(honest.ids)
    check_invariants(core)


def _drawn(n: int) -> list[bytes]:
    """About n frames drawn by one generate-only hypothesis run, ten per example (not
    ``.example()``: each call runs an engine of its own, and 300 of them once took more
    than 120 s on a loaded CI machine)."""
    sample: list[bytes] = []

    @settings(max_examples=n // 10, phases=[Phase.generate], deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(st.lists(frames(), min_size=10, max_size=10))
    def collect(batch: list[bytes]) -> None:
        sample.extend(batch)

    collect()
    return sample


def test_the_core_takes_thousands_of_hostile_frames_a_second():
    """Throughput of decode + core on a fixed stream of drawn frames (printed)."""
    sample = _drawn(300)
    assert len(sample) >= 200
    now = 1000.0
    core = BrokerCore(now)
    Honest(core, now)
    n, start = 0, time.perf_counter()
    for round_ in range(10):
        for frame in sample:
            try:
                core.message(b"evil-1", P.decode(frame), None, now)
            except ProtocolError as exc:
                core.refuse(b"evil-1", exc)
            n += 1
        core.dispatch(now)
        core.outbox.clear()
        now += 1.0
        core.tick(now)
    rate = n / (time.perf_counter() - start)
    print(f"\nhostile frames through decode and the core: {rate:,.0f} a second")
    assert rate > 1000
