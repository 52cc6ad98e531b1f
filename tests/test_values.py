"""zfalkon.values: typed values on the wire (msgpack plus extension types)."""

from __future__ import annotations

import collections
import datetime as dt
import decimal
import enum
import math
import pathlib
import struct

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from zfalkon import values

np = pytest.importorskip("numpy")

scalars = (st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False)
           | st.text(max_size=20) | st.binary(max_size=20)
           | st.complex_numbers(allow_nan=False)
           | st.datetimes() | st.datetimes(timezones=st.just(dt.timezone.utc)) | st.dates()
           | st.times() | st.timedeltas() | st.decimals(allow_nan=False, allow_infinity=False))
hashable = st.none() | st.booleans() | st.integers() | st.text(max_size=10)
typed = st.recursive(
    scalars | st.frozensets(hashable, max_size=4) | st.sets(hashable, max_size=4),
    lambda inner: (st.lists(inner, max_size=4) | st.tuples(inner, inner)
                   | st.dictionaries(st.text(max_size=8) | st.integers(), inner, max_size=4)),
    max_leaves=20)


def same(a, b) -> bool:
    """Equal, and of the same type all the way down."""
    if type(a) is not type(b):
        return False
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    return a == b


@settings(max_examples=500, deadline=None)
@given(typed)
def test_every_typed_value_round_trips_with_its_type(value):
    assert same(values.unpack(values.pack(value)), value)


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(["<f8", "<i4", "|u1", "|b1", "<c16", "<f2", "|S3", "<U2", ">i8"]),
       st.lists(st.integers(0, 4), max_size=3))
def test_numpy_arrays_round_trip_writable_with_dtype_and_shape(dtype, shape):
    array = np.zeros(shape, dtype=dtype)
    got = values.unpack(values.pack(array))
    assert got.dtype == array.dtype and got.shape == array.shape
    assert np.array_equal(got, array) and got.flags.writeable


def test_numpy_views_scalars_and_structured_dtypes():
    base = np.arange(24, dtype=np.int16).reshape(4, 6)
    for array in (base.T, base[::2, 1:5], np.asfortranarray(base)):
        got = values.unpack(values.pack(array))
        assert np.array_equal(got, array) and got.dtype == array.dtype
    rec = np.array([(1, 2.5), (3, 4.5)], dtype=[("a", "<i4"), ("b", "<f8")])
    assert np.array_equal(values.unpack(values.pack(rec)), rec)
    for scalar in (np.float32(1.5), np.int64(-3), np.bool_(True), np.complex64(1j)):
        got = values.unpack(values.pack(scalar))
        assert got == scalar and type(got) is type(scalar)


def test_object_arrays_are_refused_without_pickle_and_kept_with_it():
    array = np.array([object(), 1], dtype=object)
    with pytest.raises(TypeError, match="pickle"):
        values.pack(array)
    got = values.unpack(values.pack(np.array([1, "a"], dtype=object), True), True)
    assert list(got) == [1, "a"]


Point = collections.namedtuple("Point", "x y")


class Color(enum.IntEnum):
    RED = 1


@pytest.mark.parametrize("value, plain", [
    (Point(1, 2), (1, 2)),
    (collections.OrderedDict(a=1), {"a": 1}),
    (collections.defaultdict(list, a=[1]), {"a": [1]}),
    (Color.RED, 1),
], ids=["namedtuple", "ordereddict", "defaultdict", "intenum"])
def test_builtin_subclasses_travel_as_their_base_unless_pickled(value, plain):
    got = values.unpack(values.pack(value))
    assert got == plain and type(got) is type(plain)
    assert type(values.unpack(values.pack(value, True), True)) is type(value)


def test_pickles_are_decoded_only_when_allowed():
    blob = values.pack(pathlib.Path("/x"), allow_pickle=True)
    with pytest.raises(ValueError, match="pickle"):
        values.unpack(blob)
    assert values.unpack(blob, allow_pickle=True) == pathlib.Path("/x")
    with pytest.raises(TypeError, match="pickle=True"):
        values.pack(pathlib.Path("/x"))


def test_pickled_buffers_travel_out_of_band():
    array = np.arange(1000.0)
    got = values.unpack(values.pack([array, pathlib.Path("/p")], True), True)
    assert np.array_equal(got[0], array) and got[1] == pathlib.Path("/p")


def test_what_pickle_cannot_name_is_pickled_by_value():
    # (Parsl's own tests pass such values: a class made in a function, a function of a
    # module loaded from a file; HTEX's serializer handles them too)
    def make():
        class Local:
            a = "X"
        return Local

    cls = values.unpack(values.pack(make(), True), True)
    assert cls.a == "X" and cls.__name__ == "Local"
    square = values.unpack(values.pack([lambda x: x * x], True), True)[0]
    assert square(7) == 49


def array_payload(head: list) -> bytes:
    packed = msgpack.packb(head)
    return struct.pack("<I", len(packed)) + packed


@pytest.mark.parametrize("code, data, words", [
    (99, b"", "extension type 99"),
    (values.BIGINT, b"9" * 20_000, "digits"),
    (values.NDARRAY, array_payload(["|O", [2]]), "object"),
    (values.NDARRAY, array_payload(["<f8", [1000]]) + b"x", "bytes"),
    (values.NDARRAY, array_payload(["<f8", [-1, -8]]) + b"x" * 64, "shape"),
    (values.NDARRAY, array_payload(["<f8", [2**40, 2**40]]), "bytes"),
], ids=["unknown", "huge-int", "object-dtype", "short-array", "negative-shape", "huge-shape"])
def test_hostile_extension_payloads_are_refused(code, data, words):
    with pytest.raises(ValueError, match=words):
        values.unpack(msgpack.packb([msgpack.ExtType(code, data)]))


def test_plain_data_is_plain_msgpack():
    value = [None, True, 1, 1.5, "s", b"b", {"k": [1]}]
    assert values.pack(value) == msgpack.packb(value)
    assert values.unpack(msgpack.packb(value)) == value
    assert math.isnan(values.unpack(values.pack(float("nan"))))


def test_a_large_value_does_not_keep_a_large_packer():
    values.pack(b"x" * (4 << 20))
    assert len(values.pack(b"y")) == 3


def test_decimal_and_aware_datetime():
    aware = dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.timezone(dt.timedelta(hours=-5)))
    assert values.unpack(values.pack(aware)) == aware
    assert values.unpack(values.pack(aware)).utcoffset() == dt.timedelta(hours=-5)
    assert values.unpack(values.pack(decimal.Decimal("1.10"))) == decimal.Decimal("1.10")
