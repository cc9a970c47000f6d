"""Length-prefixed frames: a 13-byte header (body length, kind, request id) then the body.

The request id in the header lets a receiver answer a request whose body it could not even
unpickle, so a bad payload fails one request, never the connection.
"""

from __future__ import annotations

import struct

HEADER = struct.Struct("!IBQ")
HEADER_SIZE = HEADER.size
MAX_FRAME = 1 << 31


class Kind:
    """Frame kinds. Plain int class attributes, not an IntEnum: on Python 3.11 reading an enum
    member costs about ten times a class attribute, and every frame compares its kind a few times."""

    REQUEST = 1       # caller -> server: body = (method, args, kwargs, meta)
    OK = 2            # server -> caller: body = result
    ERROR = 3         # server -> caller: body = serialized exception
    ITEM = 4          # server -> caller: one streamed item
    END = 5           # server -> caller: the stream is over
    CANCEL = 6        # caller -> server: stop working on request id
    REJECT = 7        # server -> caller: replica at max_ongoing_requests; body = its ongoing count
    CAPACITY = 8      # server -> caller: a replica that rejected you has room again (id 0)
    NOTIFY = 9        # either way: one-way message, body = (topic, payload); e.g. a replica's "draining"
    PUSH = 10         # caller -> server: a message into a running request (WebSocket frames)


def pack(kind: int, rid: int, body: bytes = b"") -> bytes:
    return HEADER.pack(len(body), kind, rid) + body
