"""A deliberately minimal raw iSCSI initiator for tests that must send what real initiators
never would (malformed PDUs, broken sequences).  Conformance is judged with libiscsi and QEMU;
this only builds bytes and reads replies, with a timeout on every read."""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass

import crcmod.predefined

# Not the library the daemon uses: digests are checked by an independent implementation.
independent_crc32c = crcmod.predefined.mkCrcFun("crc-32c")

BHS = struct.Struct(">BBBBIQI7I")
NOP_OUT, SCSI_CMD, TMF_REQ, LOGIN_REQ, TEXT_REQ, DATA_OUT, LOGOUT_REQ = 0, 1, 2, 3, 4, 5, 6
NOP_IN, SCSI_RSP, TMF_RSP, LOGIN_RSP, TEXT_RSP, DATA_IN, LOGOUT_RSP = (0x20, 0x21, 0x22, 0x23,
                                                                      0x24, 0x25, 0x26)
R2T, REJECT = 0x31, 0x3F
INITIATOR = "iqn.2026-11.org.vsand:rawtest"


def pad(n: int) -> int:
    return (n + 3) & ~3


def keys(**kv: str) -> bytes:
    return b"".join(f"{k.replace('_', '')}={v}".encode() + b"\0" for k, v in kv.items())


def kv_text(pairs: list[tuple[str, str]]) -> bytes:
    return b"".join(f"{k}={v}".encode() + b"\0" for k, v in pairs)


def parse_keys(data: bytes) -> dict[str, str]:
    out = {}
    for item in data.split(b"\0"):
        if b"=" in item:
            k, v = item.split(b"=", 1)
            out[k.decode()] = v.decode()
    return out


@dataclass
class Pdu:
    bhs: bytes
    data: bytes

    @property
    def opcode(self) -> int:
        return self.bhs[0] & 0x3F

    @property
    def fields(self) -> tuple[int, ...]:
        return BHS.unpack(self.bhs)

    @property
    def itt(self) -> int:
        return self.fields[6]

    def word(self, offset: int) -> int:
        return struct.unpack_from(">I", self.bhs, offset)[0]


class RawInitiator:
    def __init__(self, port: int, host: str = "127.0.0.1", timeout: float = 5.0) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.cmdsn = 1
        self.itt = 1
        self.statsn = 0
        self.isid = 0x800000001234

    def close(self) -> None:
        self.sock.close()

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def send(self, op: int, b1: int, lunf: int = 0, itt: int = 0, words: tuple[int, ...] = (),
             data: bytes = b"", immediate: bool = False, b2: int = 0, b3: int = 0,
             cdb: bytes | None = None) -> None:
        w = list(words) + [0] * (7 - len(words))
        hdr = BHS.pack(op | (0x40 if immediate else 0), b1, b2, b3, len(data), lunf, itt, *w)
        if cdb is not None:
            hdr = hdr[:32] + cdb.ljust(16, b"\0")
        self.sock.sendall(hdr + data + bytes(pad(len(data)) - len(data)))

    def recv(self, answer_pings: bool = True) -> Pdu:
        while True:
            bhs = self._exact(48)
            dlen = struct.unpack_from(">I", bhs, 4)[0] & 0xFFFFFF
            ahs = bhs[4] * 4
            rest = self._exact(ahs + pad(dlen)) if ahs + dlen else b""
            p = Pdu(bhs, rest[ahs:ahs + dlen])
            if answer_pings and p.opcode == NOP_IN and p.itt == 0xFFFFFFFF:
                # The target's keep-alive ping: answer it like a real initiator would.
                self.send(NOP_OUT, 0x80, itt=0xFFFFFFFF,
                          words=(p.word(20), self.cmdsn, self.statsn), immediate=True)
                continue
            return p

    def recv_or_eof(self, answer_pings: bool = True) -> Pdu | None:
        try:
            return self.recv(answer_pings)
        except (ConnectionError, EOFError):
            return None

    def _exact(self, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise EOFError("connection closed by target")
            buf += chunk
        return buf

    def next_itt(self) -> int:
        self.itt += 1
        return self.itt

    def login(self, target: str | None, extra: list[tuple[str, str]] | None = None,
              initiator: str = INITIATOR) -> Pdu:
        """Security + operational stage in one step (CSG=1 → FFP)."""
        pairs = [("InitiatorName", initiator)]
        if target is None:
            pairs.append(("SessionType", "Discovery"))
        else:
            pairs.append(("TargetName", target))
        pairs += extra or [("HeaderDigest", "None"), ("DataDigest", "None"),
                           ("MaxRecvDataSegmentLength", "65536"), ("ImmediateData", "Yes"),
                           ("InitialR2T", "No"), ("FirstBurstLength", "65536"),
                           ("MaxBurstLength", "262144")]
        self.send(LOGIN_REQ, 0x80 | (1 << 2) | 3, lunf=self.isid << 16, itt=self.next_itt(),
                  words=(0, self.cmdsn, self.statsn), data=kv_text(pairs), immediate=True)
        reply = self.recv()
        if reply.opcode == LOGIN_RSP and reply.bhs[36] == 0:
            self.statsn = reply.word(24) + 1
        return reply

    def command(self, cdb: bytes, edtl: int = 0, read: bool = False, write: bool = False,
                data: bytes = b"", lun: int = 0, final: bool = True) -> int:
        itt = self.next_itt()
        b1 = (0x80 if final else 0) | (0x40 if read else 0) | (0x20 if write else 0) | 1
        self.send(SCSI_CMD, b1, lunf=lun << 48, itt=itt,
                  words=(edtl, self.cmdsn, self.statsn), data=data, cdb=cdb)
        self.cmdsn += 1
        return itt

    def response(self) -> tuple[Pdu, bytes]:
        """Collect Data-In until a status; returns (status PDU, data)."""
        data = b""
        while True:
            p = self.recv()
            if p.opcode == DATA_IN:
                data += p.data
                if p.bhs[1] & 0x01:
                    return p, data
            elif p.opcode in (SCSI_RSP, REJECT):
                return p, data
            elif p.opcode == NOP_IN:
                continue
            else:
                raise AssertionError(f"unexpected opcode 0x{p.opcode:02x}")


class DigestInitiator(RawInitiator):
    """The raw initiator with header and data digests on, after login."""

    digests = False
    crc = staticmethod(independent_crc32c)
    corrupt_header = False
    corrupt_data = False

    def send(self, op: int, b1: int, lunf: int = 0, itt: int = 0, words: tuple[int, ...] = (),
             data: bytes = b"", immediate: bool = False, b2: int = 0, b3: int = 0,
             cdb: bytes | None = None) -> None:
        if not self.digests:
            return super().send(op, b1, lunf, itt, words, data, immediate, b2, b3, cdb)
        w = list(words) + [0] * (7 - len(words))
        hdr = BHS.pack(op | (0x40 if immediate else 0), b1, b2, b3, len(data), lunf, itt, *w)
        if cdb is not None:
            hdr = hdr[:32] + cdb.ljust(16, b"\0")
        hd = self.crc(hdr) ^ (1 if self.corrupt_header else 0)
        body = data + bytes(pad(len(data)) - len(data))
        out = hdr + struct.pack("<I", hd)
        if data:
            out += body + struct.pack("<I", self.crc(body) ^ (1 if self.corrupt_data else 0))
        self.sock.sendall(out)

    def recv(self, answer_pings: bool = True) -> Pdu:
        if not self.digests:
            return super().recv(answer_pings)
        bhs = self._exact(48)
        dlen = struct.unpack_from(">I", bhs, 4)[0] & 0xFFFFFF
        ahs = self._exact(bhs[4] * 4) if bhs[4] else b""
        (hd,) = struct.unpack("<I", self._exact(4))
        assert hd == self.crc(bhs + ahs), "header digest from the target is wrong"
        data = b""
        if dlen:
            body = self._exact(pad(dlen))
            (dd,) = struct.unpack("<I", self._exact(4))
            assert dd == self.crc(body), "data digest from the target is wrong"
            data = body[:dlen]
        return Pdu(bhs, data)
