"""Typed values on the wire: msgpack, plus extension types for what scientists pass around.

Plain data (None, bool, int within 64 bits, float, str, bytes, list, dict) is plain
msgpack, as fast as before. Other types travel as msgpack extension types, each decoded
without running any code named by the sender:

=====  ===================  ==========================================================
code   type                 payload
=====  ===================  ==========================================================
1      ``tuple``            the items, packed as an array (so tuples stay tuples)
2      ``set``              the items, packed as an array
3      ``frozenset``        the items, packed as an array
4      ``int`` > 64 bits    its decimal digits
5      ``complex``          ``[real, imag]``
6      ``datetime``         ISO 8601 text (an aware datetime keeps its UTC offset)
7      ``date``             ISO 8601 text
8      ``time``             ISO 8601 text
9      ``timedelta``        ``[days, seconds, microseconds]``
10     ``numpy.ndarray``    header length (u32 LE), ``[dtype descr, shape]``, raw bytes
                           (C order; no object dtype)
11     numpy scalar         ``[dtype descr, raw bytes]``
12     ``decimal.Decimal``  its text
20     anything else        a pickle (protocol 5, by cloudpickle), only where
                           pickling was allowed
=====  ===================  ==========================================================

Subclasses of the builtin containers and numbers (``namedtuple``, ``OrderedDict``,
``IntEnum``, ...) travel as their base type unless pickling is allowed, in which case they
are pickled and keep their type. numpy dtypes are described as in the ``.npy`` format
(:func:`numpy.lib.format.dtype_to_descr`), never pickled.

Trust: pickles are decoded only where the caller allows them. A worker runs whatever an
authorized client sends, so a client's pickles give it no power it did not have; a
worker's pickles could run code on the client, so a client decodes results without
pickle unless it opted in (``Executor(pickle=True)``).
"""

from __future__ import annotations

import datetime as _dt
import decimal
import pickle
import struct
import sys
import threading
from typing import Any, Callable

import msgpack

__all__ = ["pack", "unpack", "PICKLE"]

TUPLE, SET, FROZENSET, BIGINT, COMPLEX = 1, 2, 3, 4, 5
DATETIME, DATE, TIME, TIMEDELTA = 6, 7, 8, 9
NDARRAY, NDSCALAR, DECIMAL = 10, 11, 12
PICKLE = 20

_HEAD = struct.Struct("<I")  # length of an array's [descr, shape] header
_MAX_BIGINT_DIGITS = 10_000  # (int("9" * n) is quadratic in n: bound what a peer can ask)


class _Encoder:
    """msgpack's ``default`` hook; pickles what it cannot type if ``allow_pickle``."""

    __slots__ = ("allow_pickle",)

    def __init__(self, allow_pickle: bool) -> None:
        self.allow_pickle = allow_pickle

    def pack(self, obj: Any) -> bytes:
        return msgpack.packb(obj, default=self, strict_types=True)

    def __call__(self, obj: Any) -> Any:
        cls = type(obj)
        if cls is tuple:
            return msgpack.ExtType(TUPLE, self.pack(list(obj)))
        if cls is int:  # (only ints beyond 64 bits reach here)
            return msgpack.ExtType(BIGINT, str(obj).encode())
        if cls is set:
            return msgpack.ExtType(SET, self.pack(list(obj)))
        if cls is frozenset:
            return msgpack.ExtType(FROZENSET, self.pack(list(obj)))
        if cls is complex:
            return msgpack.ExtType(COMPLEX, self.pack([obj.real, obj.imag]))
        if cls is _dt.datetime:
            return msgpack.ExtType(DATETIME, obj.isoformat().encode())
        if cls is _dt.date:
            return msgpack.ExtType(DATE, obj.isoformat().encode())
        if cls is _dt.time:
            return msgpack.ExtType(TIME, obj.isoformat().encode())
        if cls is _dt.timedelta:
            return msgpack.ExtType(TIMEDELTA, self.pack([obj.days, obj.seconds,
                                                         obj.microseconds]))
        if cls is decimal.Decimal:
            return msgpack.ExtType(DECIMAL, str(obj).encode())
        if cls.__module__ == "numpy":
            ext = self._numpy(obj)
            if ext is not None:
                return ext
        if self.allow_pickle:
            return self._pickle(obj)
        base: Any
        for base in (dict, list, tuple, str, bytes, int, float):  # subclasses: as the base
            if isinstance(obj, base):
                if base is tuple:
                    return msgpack.ExtType(TUPLE, self.pack(list(obj)))
                return base(obj)
        raise TypeError(f"a {cls.__module__}.{cls.__qualname__} cannot be sent without "
                        "pickle (Executor(pickle=True) allows it)")

    def _numpy(self, obj: Any) -> msgpack.ExtType | None:
        np = sys.modules["numpy"]
        if isinstance(obj, np.ndarray) and not obj.dtype.hasobject:
            head = msgpack.packb([np.lib.format.dtype_to_descr(obj.dtype), list(obj.shape)])
            data = np.ascontiguousarray(obj).reshape(-1).view(np.uint8).data
            return msgpack.ExtType(NDARRAY, b"".join((_HEAD.pack(len(head)), head, data)))
        if isinstance(obj, np.generic) and not obj.dtype.hasobject:
            descr = np.lib.format.dtype_to_descr(obj.dtype)
            return msgpack.ExtType(NDSCALAR, msgpack.packb([descr, obj.tobytes()]))
        return None

    def _pickle(self, obj: Any) -> msgpack.ExtType:
        # cloudpickle, not pickle: what refers to __main__ (a script's functions, lambdas,
        # classes and their instances, e.g. inside a Dask graph) goes by value, since the
        # other side's __main__ is not the script; anything importable by reference, as
        # pickle does. Either way the other side reads it with pickle.loads.
        import cloudpickle

        buffers: list[pickle.PickleBuffer] = []
        try:
            data = cloudpickle.dumps(obj, protocol=5, buffer_callback=buffers.append)
        except Exception as exc:
            raise TypeError(f"a {type(obj).__qualname__} cannot be pickled: {exc}") from None
        return msgpack.ExtType(PICKLE, msgpack.packb([data, [b.raw() for b in buffers]]))


_SAFE = _Encoder(False)
_PICKLING = _Encoder(True)


class _Packers(threading.local):
    """A packer of each kind per thread (reusing one halves the cost of a small blob)."""

    def __init__(self) -> None:
        self.safe = msgpack.Packer(default=_SAFE, strict_types=True)
        self.pickling = msgpack.Packer(default=_PICKLING, strict_types=True)


_PACKERS = _Packers()
_KEEP_PACKER_BYTES = 1 << 20  # a packer that grew past this is replaced (its buffer stays)


def pack(obj: Any, allow_pickle: bool = False) -> bytes:
    """Encode ``obj``; raises TypeError (or OverflowError, ValueError) for what cannot be
    sent. ``allow_pickle``: pickle what has no typed encoding instead of refusing it."""
    blob: bytes = (_PACKERS.pickling if allow_pickle else _PACKERS.safe).pack(obj)
    if len(blob) > _KEEP_PACKER_BYTES:
        _PACKERS.__init__()  # type: ignore[misc]
    return blob


def encoder(allow_pickle: bool = False) -> Callable[[Any], Any]:
    """msgpack's ``default`` hook, for callers that pack values inside their own arrays
    (``msgpack.packb(x, default=encoder(), strict_types=True)``)."""
    return _PICKLING if allow_pickle else _SAFE


class _Decoder:
    """msgpack's ``ext_hook``."""

    __slots__ = ("allow_pickle",)

    def __init__(self, allow_pickle: bool) -> None:
        self.allow_pickle = allow_pickle

    def unpack(self, data: bytes) -> Any:
        return msgpack.unpackb(data, strict_map_key=False, ext_hook=self)

    def __call__(self, code: int, data: bytes) -> Any:
        if code == TUPLE:
            return tuple(self.unpack(data))
        if code == SET:
            return set(self.unpack(data))
        if code == FROZENSET:
            return frozenset(self.unpack(data))
        if code == BIGINT:
            if len(data) > _MAX_BIGINT_DIGITS:
                raise ValueError(f"an integer of over {_MAX_BIGINT_DIGITS} digits")
            return int(data)
        if code == COMPLEX:
            real, imag = self.unpack(data)
            return complex(real, imag)
        if code == DATETIME:
            return _dt.datetime.fromisoformat(data.decode())
        if code == DATE:
            return _dt.date.fromisoformat(data.decode())
        if code == TIME:
            return _dt.time.fromisoformat(data.decode())
        if code == TIMEDELTA:
            days, seconds, micro = self.unpack(data)
            return _dt.timedelta(days, seconds, micro)
        if code == DECIMAL:
            return decimal.Decimal(data.decode())
        if code == NDARRAY:
            return _ndarray(data)
        if code == NDSCALAR:
            return _ndscalar(msgpack.unpackb(data))
        if code == PICKLE:
            if not self.allow_pickle:
                raise ValueError("a pickled value, and pickles are not accepted here "
                                 "(Executor(pickle=True) accepts them)")
            blob, buffers = msgpack.unpackb(data)
            return pickle.loads(blob, buffers=buffers)
        raise ValueError(f"unknown msgpack extension type {code}")


def _numpy() -> Any:
    try:
        import numpy
    except ImportError:
        raise ValueError("a numpy value, and numpy is not installed here") from None
    return numpy


def _dtype(np: Any, descr: Any) -> Any:
    dtype = np.lib.format.descr_to_dtype(descr)
    if dtype.hasobject:
        raise ValueError("a numpy value of object dtype")
    return dtype


def _ndarray(data: bytes) -> Any:
    np = _numpy()
    (size,) = _HEAD.unpack_from(data)
    descr, shape = msgpack.unpackb(data[_HEAD.size:_HEAD.size + size])
    dtype = _dtype(np, descr)
    shape = tuple(shape)
    if len(shape) > 64 or not all(type(n) is int and n >= 0 for n in shape):
        raise ValueError("a numpy array with a bad shape")
    start = _HEAD.size + size
    count = 1
    for n in shape:
        count *= n
    if count * dtype.itemsize != len(data) - start:
        raise ValueError(f"numpy array of shape {shape} and dtype {dtype} has "
                         f"{len(data) - start} bytes, not {count * dtype.itemsize}")
    # A writable array of its own (a view of ``data``, a bytes object, is read-only).
    return np.frombuffer(data, dtype=dtype, count=count, offset=start).reshape(shape).copy()


def _ndscalar(fields: list) -> Any:
    np = _numpy()
    return np.frombuffer(fields[1], dtype=_dtype(np, fields[0]))[0]


_STRICT = _Decoder(False)
_LENIENT = _Decoder(True)


def unpack(blob: bytes, allow_pickle: bool = False) -> Any:
    """Decode what :func:`pack` encoded. ``allow_pickle``: decode pickles (run code)."""
    return (_LENIENT if allow_pickle else _STRICT).unpack(blob)


def decoder(allow_pickle: bool = False) -> Callable[[int, bytes], Any]:
    """msgpack's ``ext_hook``, for callers that unpack values inside their own arrays."""
    return _LENIENT if allow_pickle else _STRICT
