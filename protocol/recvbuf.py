"""A receive buffer for framed protocols that hands out payloads as views, not copies.

Bytes live in one preallocated ``bytearray`` that a socket can read straight into
(``writable``/``commit``, for ``asyncio.BufferedProtocol``) or that ``feed`` copies into.  A
framing reader built on it returns payloads as ``memoryview`` slices, so a write payload is
copied once, to its destination.  The buffer is never changed in place while such a view may
be alive: when room is needed and a view is still held, the unread bytes move to a fresh
buffer and the holder keeps the old one.  A reader that knows the length of a partly received
frame sets ``need`` so that the next read makes room for all of it at once.
"""

from __future__ import annotations

from typing import Any

EMPTY = memoryview(b"")


class ReceiveBuffer:
    __slots__ = ("_buf", "_pos", "_end", "need", "min_capacity")

    def __init__(self, min_capacity: int) -> None:
        self.min_capacity = min_capacity
        self._buf = bytearray(min_capacity)
        self._pos = 0  # first unread byte
        self._end = 0  # end of the received bytes
        self.need = 0  # length of the frame starting at _pos, once its header is known

    @property
    def buffered(self) -> int:
        return self._end - self._pos

    def capacity(self) -> int:
        """The buffer size to keep; a subclass may grow it with its negotiated limits."""
        return self.min_capacity

    def writable(self, min_room: int = 16 * 1024) -> memoryview:
        """Where the next received bytes go; follow with ``commit(n)``."""
        room = max(min_room, self.need - (self._end - self._pos))
        if len(self._buf) - self._end < room:
            self._make_room(room)
        return memoryview(self._buf)[self._end:]

    def commit(self, n: int) -> None:
        if n < 0 or self._end + n > len(self._buf):
            raise ValueError("commit beyond the writable area")
        self._end += n

    def feed(self, data: Any) -> None:
        n = memoryview(data).nbytes
        if len(self._buf) - self._end < n:
            self._make_room(n)
        self._buf[self._end:self._end + n] = data
        self._end += n

    def _make_room(self, room: int) -> None:
        unread = self._end - self._pos
        size = max(self.capacity(), unread + room)
        buf = self._buf
        if size <= len(buf) and unshared(buf):
            if unread and self._pos:
                buf[:unread] = buf[self._pos:self._end]
        else:
            fresh = bytearray(size)
            if unread:
                fresh[:unread] = memoryview(buf)[self._pos:self._end]
            self._buf = fresh
        self._pos = 0
        self._end = unread


def unshared(buf: bytearray) -> bool:
    """True when no view of ``buf`` is alive: a bytearray cannot resize while one is."""
    try:
        buf.append(0)
    except BufferError:
        return False
    buf.pop()
    return True
