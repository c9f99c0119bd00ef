"""Where the mirror keeps its metadata: a tiny named-blob store, injected by the owner.

The mirror's state modules (bitmap, activity log, generations) never touch files.  They turn
their state into bytes and hand them to a ``MetaStore``; the daemon implements it on disk in
``vsand/`` and the tests use ``MemoryMetaStore``.

Contract of ``write``: when it returns, the new blob is durable, and at every moment — crash
included — a reader sees either the old blob or the new one, never a mix.  A file
implementation gets that with: write a temp file, fsync it, rename it over the name, fsync the
directory.  ``write`` blocks; an asyncio caller runs it in a thread.  The encoded records still
carry a CRC of their own: the contract covers crashes, not disks that return other bytes than
were written.
"""

from __future__ import annotations

from collections import Counter
from typing import Protocol


class MetaStore(Protocol):
    def read(self, name: str) -> bytes | None:
        """The last blob written under ``name``, or None if there never was one."""
        ...

    def write(self, name: str, data: bytes) -> None:
        """Replace the blob under ``name`` atomically and durably (see the module docstring)."""
        ...


class SimulatedCrash(Exception):
    """Raised by ``MemoryMetaStore.write`` at an armed crash point."""


class MemoryMetaStore:
    """An in-memory ``MetaStore`` for tests, able to stage a crash in the middle of a write.

    ``arm_crash(after=n, lands=...)`` makes the (n+1)-th following write raise
    ``SimulatedCrash``; with ``lands=True`` the blob was stored before the "crash" (the power
    went out after the rename, before the caller heard of it), otherwise it was not.  Either way
    the store holds whole blobs only: that is the atomicity the real store promises.
    """

    def __init__(self) -> None:
        self._blobs: dict[str, bytes] = {}
        self.writes = 0
        self.writes_by_name: Counter[str] = Counter()
        self._crash_countdown: int | None = None
        self._crash_lands = False

    def read(self, name: str) -> bytes | None:
        return self._blobs.get(name)

    def write(self, name: str, data: bytes) -> None:
        if self._crash_countdown is not None:
            if self._crash_countdown == 0:
                self._crash_countdown = None
                if self._crash_lands:
                    self._store(name, data)
                raise SimulatedCrash(name)
            self._crash_countdown -= 1
        self._store(name, data)

    def arm_crash(self, after: int = 0, lands: bool = False) -> None:
        self._crash_countdown = after
        self._crash_lands = lands

    def corrupt(self, name: str, index: int) -> None:
        """Flip one bit of a stored blob: the disk lied (tests of the records' CRCs)."""
        blob = bytearray(self._blobs[name])
        blob[index] ^= 0x01
        self._blobs[name] = bytes(blob)

    def names(self) -> list[str]:
        return sorted(self._blobs)

    def _store(self, name: str, data: bytes) -> None:
        # bytes(...) so a caller that later mutates a bytearray cannot change what "hit disk".
        self._blobs[name] = bytes(data)
        self.writes += 1
        self.writes_by_name[name] += 1
