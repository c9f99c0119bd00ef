"""Reaching a LUN as an initiator does, through every node's portal (``vsanctl drill``).

A ``PathSession`` is one iSCSI session over one TCP connection: blocking socket, one command
at a time, a deadline on every command, NOP-In pings answered.  ``Multipath`` spreads
commands over its paths round robin, as dm-multipath does with every path of one
active/optimized ALUA group, and behaves like ``no_path_retry queue``: a command that fails
for a path reason is sent again on the next path, and while no path works it waits (up to
``queue_s``) instead of failing.  A failed path is tried again ``probe_s`` later, as
multipathd's path checker would.

Path reasons: the connection broke or did not answer in ``timeout``, a Reject, or CHECK
CONDITION with NOT READY (ALUA transitioning or unavailable, LU not ready) or UNIT ATTENTION
(the condition is reported once; the next try goes through).  Any other CHECK CONDITION is
the application's error (``IoFailed``).
"""

from __future__ import annotations

import contextlib
import itertools
import socket
import time
from collections.abc import Callable, Iterator
from typing import TypeVar

from .protocol.iscsi import initiator as wire
from .protocol.iscsi.pdu import BHS_LEN, RESERVED_TAG, Op

_T = TypeVar("_T")
_ISIDS = itertools.count(0x23_0000_0001)  # qualifier-format ISIDs, one per session


class PathError(Exception):
    """This path cannot carry the command now; another one may."""


class IoFailed(Exception):
    """The command failed for a reason no other path changes (what an application sees)."""


class PathSession:
    def __init__(self, host: str, port: int, target: str, lun: int, *, initiator: str,
                 chap: tuple[str, bytes] | None = None, timeout: float = 5.0) -> None:
        self.host, self.port, self.target, self.lun = host, port, target, lun
        self.initiator = initiator
        self.chap = chap
        self.timeout = timeout
        self.name = f"{host}:{port}"
        self.sock: socket.socket | None = None
        self.down_until = 0.0
        self.failures = 0
        self._itt = 0
        self._cmdsn = 0
        self._expstatsn = 0
        self._max_send = 8192  # the target's MaxRecvDataSegmentLength
        self._immediate = False
        self._first_burst = 0
        self._buf = bytearray()

    # ------------------------------------------------------------------ connection
    def connect(self) -> None:
        self.close()
        with self._closed_on_error():
            self.sock = socket.create_connection((self.host, self.port), self.timeout)
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._buf.clear()
            self._login()

    @contextlib.contextmanager
    def _closed_on_error(self) -> Iterator[None]:
        """A session that failed midway is in no known state: the next use logs in again."""
        try:
            yield
        except OSError as e:
            self.close()
            raise PathError(f"{self.name}: {e}") from None
        except PathError:
            self.close()
            raise

    def close(self) -> None:
        if self.sock is not None:
            try:
                self.sock.close()
            finally:
                self.sock = None

    def logout(self) -> None:
        if self.sock is None:
            return
        try:
            self._send(wire.logout_request(itt=self._next_itt(), cmdsn=self._cmdsn,
                                           expstatsn=self._expstatsn))
            self._reply(lambda p: p.opcode == Op.LOGOUT_RSP, time.monotonic() + 2)
        except (OSError, PathError):
            pass
        self.close()

    def _login(self) -> None:
        isid, tsih = next(_ISIDS), 0
        deadline = time.monotonic() + self.timeout
        csg = wire.SECURITY
        pairs = wire.security_keys(self.initiator, self.target, self.chap is not None)
        transit = self.chap is None
        chap_step = 0
        while True:
            self._send(wire.login_request(isid=isid, tsih=tsih, itt=self._next_itt(),
                                          cmdsn=self._cmdsn, expstatsn=self._expstatsn,
                                          csg=csg, nsg=wire.OPERATIONAL if csg == wire.SECURITY
                                          else wire.FULL_FEATURE, pairs=pairs,
                                          transit=transit))
            rsp = self._reply(lambda p: p.opcode == Op.LOGIN_RSP, deadline)
            if rsp.login_status:
                raise PathError(f"{self.name}: login refused (status "
                                f"{rsp.login_status:#06x})")
            self._cmdsn = rsp.expcmdsn
            self._expstatsn = rsp.statsn + 1
            tsih = rsp.tsih
            got = wire.negotiated(rsp.data)
            if csg == wire.SECURITY:
                if rsp.transit and rsp.nsg == wire.OPERATIONAL:
                    csg, pairs, transit = wire.OPERATIONAL, wire.operational_keys(), True
                elif self.chap is not None and chap_step == 0 and got.get("AuthMethod") == "CHAP":
                    chap_step, pairs = 1, [("CHAP_A", wire.chap_algorithms())]
                elif self.chap is not None and chap_step == 1:
                    try:
                        pairs = wire.chap_answer(rsp.data, *self.chap)
                    except ValueError as e:
                        raise PathError(f"{self.name}: {e}") from None
                    chap_step, transit = 2, True
                else:
                    raise PathError(f"{self.name}: the security stage did not end "
                                    f"({sorted(got)})")
                continue
            self._apply(got)
            if rsp.transit and rsp.nsg == wire.FULL_FEATURE:
                return
            pairs = []

    def _apply(self, got: dict[str, str]) -> None:
        if "MaxRecvDataSegmentLength" in got:
            self._max_send = int(got["MaxRecvDataSegmentLength"])
        self._immediate = got.get("ImmediateData", "Yes") == "Yes"
        self._first_burst = int(got.get("FirstBurstLength", "65536"))

    # ------------------------------------------------------------------ commands
    def command(self, cdb: bytes, *, read_length: int = 0, data: bytes = b"") -> bytes:
        """Run one command; the data read.  PathError or IoFailed when it did not succeed."""
        if self.sock is None:
            self.connect()
        itt = self._next_itt()
        deadline = time.monotonic() + self.timeout
        first = data[:min(self._first_burst, self._max_send)] if self._immediate else b""
        with self._closed_on_error():
            self._send(wire.scsi_command(itt=itt, lun=self.lun, cmdsn=self._cmdsn,
                                         expstatsn=self._expstatsn, cdb=cdb,
                                         edtl=read_length or len(data), read=bool(read_length),
                                         write=bool(data), data=first))
            self._cmdsn += 1
            got = bytearray(read_length)
            while True:
                p = self._reply(lambda p: p.itt == itt, deadline)
                if p.opcode == Op.R2T:
                    self._data_out(itt, data, p)
                    continue
                if p.opcode == Op.DATA_IN:
                    got[p.offset:p.offset + len(p.data)] = p.data
                if p.has_status:
                    break
        if p.opcode == Op.SCSI_RSP and p.b2 != 0:
            raise PathError(f"{self.name}: iSCSI response {p.b2:#x}")
        if p.b3 == wire.GOOD:
            return bytes(got)
        sense = wire.sense_of(p.data) if p.opcode == Op.SCSI_RSP else None
        if p.b3 == wire.CHECK_CONDITION and sense is not None and sense.key in (
                wire.NOT_READY, wire.UNIT_ATTENTION):
            raise PathError(f"{self.name}: {sense}")
        raise IoFailed(f"{self.name}: SCSI status {p.b3:#x}" + (f", {sense}" if sense else ""))

    def _data_out(self, itt: int, data: bytes, r2t: wire.TargetPdu) -> None:
        offset, end = r2t.offset, r2t.offset + r2t.w11
        if end > len(data):
            raise PathError(f"{self.name}: R2T for bytes {offset}..{end} of {len(data)}")
        for datasn, pos in enumerate(range(offset, end, self._max_send)):
            chunk = data[pos:min(end, pos + self._max_send)]
            self._send(wire.data_out(itt=itt, lun=self.lun, ttt=r2t.ttt,
                                     expstatsn=self._expstatsn, datasn=datasn, offset=pos,
                                     data=chunk, final=pos + len(chunk) >= end))

    # ------------------------------------------------------------------ I/O
    def _next_itt(self) -> int:
        self._itt = (self._itt + 1) & 0x7FFFFFFF
        return self._itt

    def _send(self, pdu: bytes) -> None:
        assert self.sock is not None
        self.sock.sendall(pdu)

    def _reply(self, wanted: Callable[[wire.TargetPdu], bool],
               deadline: float) -> wire.TargetPdu:
        """The next PDU ``wanted`` takes; pings are answered, other PDUs dropped."""
        while True:
            p = self._read_pdu(deadline)
            if p.has_status or p.opcode == Op.LOGOUT_RSP:  # a ping's StatSN is not used up
                self._expstatsn = max(self._expstatsn, p.statsn + 1)
            if wire.is_ping(p):
                self._send(wire.nop_out(itt=RESERVED_TAG, ttt=p.ttt, lunf=p.lunf,
                                        cmdsn=self._cmdsn, expstatsn=self._expstatsn,
                                        data=p.data))
                continue
            if p.opcode == Op.REJECT:
                raise PathError(f"{self.name}: Reject, reason {p.b2:#x}")
            if wanted(p):
                return p

    def _read_pdu(self, deadline: float) -> wire.TargetPdu:
        bhs = self._read(BHS_LEN, deadline)
        ahs, padded = wire.data_length(bhs)
        rest = self._read(ahs + padded, deadline)
        length = int.from_bytes(bhs[5:8], "big")
        return wire.decode_target(bhs, rest[ahs:ahs + length])

    def _read(self, n: int, deadline: float) -> bytes:
        sock = self.sock
        assert sock is not None
        while len(self._buf) < n:
            left = deadline - time.monotonic()
            if left <= 0:
                raise PathError(f"{self.name}: no answer in {self.timeout:g} s")
            sock.settimeout(left)
            try:
                chunk = sock.recv(max(65536, n - len(self._buf)))
            except TimeoutError:
                raise PathError(f"{self.name}: no answer in {self.timeout:g} s") from None
            if not chunk:
                raise PathError(f"{self.name}: the target closed the connection")
            self._buf += chunk
        out = bytes(self._buf[:n])
        del self._buf[:n]
        return out


class Multipath:
    """Commands over several paths to one LUN; see the module docstring."""

    def __init__(self, paths: list[PathSession], *, queue_s: float = 60.0,
                 probe_s: float = 1.0) -> None:
        if not paths:
            raise ValueError("no path")
        self.paths = paths
        self.queue_s = queue_s
        self.probe_s = probe_s
        self.retries = 0  # commands sent again on another path
        self.path_errors: list[str] = []
        self._next = 0

    def run(self, action: Callable[[PathSession], _T]) -> _T:
        deadline = time.monotonic() + self.queue_s
        while True:
            for _ in range(len(self.paths)):
                path = self.paths[self._next % len(self.paths)]
                self._next += 1
                if path.down_until > time.monotonic():
                    continue
                try:
                    return action(path)
                except PathError as e:
                    path.failures += 1
                    path.down_until = time.monotonic() + self.probe_s
                    self.path_errors.append(str(e))
                    self.retries += 1
            if time.monotonic() > deadline:
                raise IoFailed(f"no path worked for {self.queue_s:g} s")
            time.sleep(0.02)

    def write(self, lba: int, data: bytes, block_size: int) -> None:
        blocks = len(data) // block_size
        self.run(lambda p: p.command(wire.write16(lba, blocks), data=data))

    def read(self, lba: int, blocks: int, block_size: int) -> bytes:
        return self.run(lambda p: p.command(wire.read16(lba, blocks),
                                            read_length=blocks * block_size))

    def close(self) -> None:
        for p in self.paths:
            p.logout()
