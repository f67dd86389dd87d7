"""Messages between a parent and its worker processes, over private pipes.

Objects are pickled with protocol 5. Large buffers (numpy arrays of 64 KiB or more)
travel out of band: each is sent as its own message straight from the array's memory
and received into a fresh writable ``bytearray`` that the unpickled array then uses, so
it is copied once by the pipe and never into the pickle stream. Smaller buffers ride in
the pickle stream, so a batch of many small arrays is one message. Pickle is read only
from these pipes, which connect a parent to the workers it spawned itself.
"""

from __future__ import annotations

import pickle
import struct
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

import cloudpickle
import numpy as np

__all__ = ["Encoded", "encode", "pack", "recv", "send", "unpack"]

_COUNT = struct.Struct("<I")
_SIZE = struct.Struct("<Q")
#: Buffers smaller than this are copied into the pickle stream instead: a message per
#: buffer costs a system call each way, more than copying a small buffer does.
_OUT_OF_BAND_MIN = 64 * 1024


@dataclass(slots=True)
class Stacked:
    """A list of same-shape numpy arrays, sent as one stacked array.

    Pickling 32 small arrays one by one costs ~75 µs (numpy's reduce, per array);
    stacking them costs ~15 µs and pickles as a single buffer. The receiver gets a list
    of rows of one array, which is what a batch of arrays is on the other side anyway.
    """

    array: np.ndarray[Any, Any]


def pack(values: list[Any]) -> Any:
    """``values``, or a :class:`Stacked` when they are same-shape, same-dtype arrays."""
    if len(values) < 2:
        return values
    first = values[0]
    if type(first) is not np.ndarray or first.dtype.hasobject:
        return values
    shape, dtype = first.shape, first.dtype
    for value in values:
        if type(value) is not np.ndarray or value.shape != shape or value.dtype != dtype:
            return values
    return Stacked(np.stack(values))


def unpack(packed: Any) -> Any:
    """The list :func:`pack` was given (rows of one array for a :class:`Stacked`)."""
    if type(packed) is Stacked:
        return list(packed.array)
    return packed


@dataclass(slots=True)
class Encoded:
    """A pickled object ready to send: the header-and-pickle message, then raw buffers."""

    head: bytes
    buffers: list[memoryview]


def encode(obj: Any) -> Encoded:
    """Pickle ``obj`` (raises whatever pickling raises)."""
    raws: list[memoryview] = []

    def out_of_band(buffer: pickle.PickleBuffer) -> bool:
        # Small buffers go in the pickle stream (one message for many small arrays);
        # large ones travel alone, straight from the array's memory. False = out of band.
        raw = buffer.raw()
        if raw.nbytes < _OUT_OF_BAND_MIN:
            return True
        raws.append(raw)
        return False

    # cloudpickle, not pickle, even for plain data: it sends classes defined in
    # __main__ or in a notebook by value, which a spawned worker could not import.
    payload = cloudpickle.dumps(obj, protocol=5, buffer_callback=out_of_band)
    head = b"".join([_COUNT.pack(len(raws)), *(_SIZE.pack(raw.nbytes) for raw in raws), payload])
    return Encoded(head, raws)


def send(conn: Connection, message: Encoded) -> None:
    """Send an encoded object. Only one thread may send on ``conn`` at a time."""
    conn.send_bytes(message.head)
    for raw in message.buffers:
        conn.send_bytes(raw)


def recv(conn: Connection) -> Any:
    """Receive one object sent with :func:`send`. Raises EOFError if the peer is gone."""
    head = conn.recv_bytes()
    (count,) = _COUNT.unpack_from(head, 0)
    offset = _COUNT.size
    buffers: list[bytearray] = []
    for _ in range(count):
        (size,) = _SIZE.unpack_from(head, offset)
        offset += _SIZE.size
        buffer = bytearray(size)
        if size:
            conn.recv_bytes_into(buffer)
        else:
            conn.recv_bytes()
        buffers.append(buffer)
    return pickle.loads(memoryview(head)[offset:], buffers=buffers)
