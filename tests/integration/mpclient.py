"""A queueing multipath client over raw iSCSI sessions, as dm-multipath with
``no_path_retry queue`` behaves for an application: one session per path, I/O spread over
the paths that work, a command that fails on a path for a path reason is sent again on
another one, and while no path works the I/O waits (up to ``queue_s``) instead of failing.

Path reasons: the connection broke or timed out, or CHECK CONDITION with NOT READY (ALUA
unavailable or transitioning, LU not ready) or UNIT ATTENTION (retried once on the same path,
as the SCSI mid-layer does).  Anything else (a MEDIUM ERROR, ILLEGAL REQUEST...) is the
application's error.  A failed path is tried again after ``probe_s``, as multipathd's path
checker would.  Each ``io`` records its latency; ``errors`` lists what reached the caller.

Thread-safe for callers that each own their blocks; no kernel initiator needed.
"""

from __future__ import annotations

import socket
import struct
import threading
import time
from dataclasses import dataclass, field

from rawiscsi import DATA_IN, SCSI_RSP, RawInitiator

GOOD, CHECK_CONDITION = 0x00, 0x02
NOT_READY, UNIT_ATTENTION = 0x2, 0x6


class PathError(Exception):
    """This path cannot do it now; another may."""


@dataclass
class Path:
    name: str
    host: str
    port: int
    iqn: str
    conn: RawInitiator | None = None
    down_until: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock)
    failures: int = 0


class MultipathClient:
    def __init__(self, paths: list[tuple[str, str, int, str]], *, queue_s: float = 60.0,
                 cmd_timeout_s: float = 10.0, probe_s: float = 1.0,
                 initiator: str = "iqn.2026-11.org.vsand:multipath") -> None:
        self.paths = [Path(*p) for p in paths]
        self.queue_s = queue_s
        self.cmd_timeout_s = cmd_timeout_s
        self.probe_s = probe_s
        self.initiator = initiator
        self.errors: list[str] = []
        self.latencies: list[float] = []
        self.switches = 0  # commands sent again on another path
        self._rr = 0
        self._lock = threading.Lock()
        self._isid = 0x1000

    # --- paths ------------------------------------------------------------------------
    def _session(self, p: Path) -> RawInitiator:
        if p.conn is None:
            conn = RawInitiator(p.port, p.host, timeout=self.cmd_timeout_s)
            with self._lock:
                self._isid += 1
                conn.isid += self._isid
            reply = conn.login(p.iqn, initiator=self.initiator)
            if reply.bhs[36] != 0:
                conn.close()
                raise PathError(f"login to {p.name} refused: {reply.bhs[36]:#x}")
            p.conn = conn
        return p.conn

    def _fail(self, p: Path) -> None:
        if p.conn is not None:
            p.conn.close()
            p.conn = None
        p.failures += 1
        p.down_until = time.monotonic() + self.probe_s

    def _order(self) -> list[Path]:
        with self._lock:
            self._rr += 1
            k = self._rr % len(self.paths)
        now = time.monotonic()
        ring = self.paths[k:] + self.paths[:k]
        return [p for p in ring if p.down_until <= now]

    def close(self) -> None:
        for p in self.paths:
            with p.lock:
                if p.conn is not None:
                    p.conn.close()
                    p.conn = None

    # --- I/O --------------------------------------------------------------------------
    def _on_path(self, p: Path, cdb: bytes, data: bytes, read_len: int) -> bytes:
        with p.lock:  # one command at a time per session: the raw initiator is not pipelined
            try:
                conn = self._session(p)
                for attempt in range(2):
                    conn.command(cdb, edtl=read_len or len(data), read=bool(read_len),
                                 write=bool(data), data=data)
                    rsp, got = conn.response()
                    if rsp.opcode not in (SCSI_RSP, DATA_IN):  # Data-In may carry status
                        raise PathError(f"opcode {rsp.opcode:#x}")
                    status = rsp.bhs[3]
                    if status == GOOD:
                        return got
                    sense = rsp.data[2:] if len(rsp.data) >= 2 else b""
                    key = sense[2] & 0x0F if len(sense) > 2 else -1
                    if status == CHECK_CONDITION and key == UNIT_ATTENTION and attempt == 0:
                        continue
                    asc = sense[12:14].hex() if len(sense) >= 14 else "?"
                    if status == CHECK_CONDITION and key in (NOT_READY, UNIT_ATTENTION):
                        raise PathError(f"sense {key:x}/{asc}")
                    raise RuntimeError(f"status {status:#x} sense {key:x}/{asc} via {p.name}")
                raise PathError("unit attention twice")
            except (OSError, EOFError, socket.timeout, PathError, AssertionError) as e:
                self._fail(p)
                raise PathError(f"{p.name}: {e!r}") from None

    def io(self, cdb: bytes, data: bytes = b"", read_len: int = 0) -> bytes | None:
        """One application I/O: its data (reads), b"" (writes), or None after an error
        (recorded in ``errors``)."""
        start = time.monotonic()
        deadline = start + self.queue_s
        last = ""
        tried = 0
        while time.monotonic() < deadline:
            for p in self._order():
                if tried:
                    self.switches += 1
                tried += 1
                try:
                    got = self._on_path(p, cdb, data, read_len)
                except PathError as e:
                    last = str(e)
                    continue
                except RuntimeError as e:
                    self.errors.append(str(e))
                    return None
                self.latencies.append(time.monotonic() - start)
                return got
            time.sleep(0.05)  # no path works: queue
        self.errors.append(f"no path for {self.queue_s:g} s (last: {last})")
        return None

    def write16(self, lba: int, data: bytes, block_size: int) -> bool:
        cdb = struct.pack(">BBQIBB", 0x8A, 0, lba, len(data) // block_size, 0, 0)
        return self.io(cdb, data=data) is not None

    def read16(self, lba: int, blocks: int, block_size: int) -> bytes | None:
        cdb = struct.pack(">BBQIBB", 0x88, 0, lba, blocks, 0, 0)
        return self.io(cdb, read_len=blocks * block_size)
