"""PREEMPT AND ABORT through the whole stack: the preempted initiator's command that is still
waiting for its data is aborted (no status ever comes), its registration is gone, and it hears
REGISTRATIONS PREEMPTED; the preempting initiator holds the reservation."""

from __future__ import annotations

import socket
import struct

from rawiscsi import RawInitiator
from rig.procs import VsandTarget

WR_EX = 1


def _prout(c: RawInitiator, sa: int, key: int, sark: int, rtype: int = 0) -> int:
    params = struct.pack(">QQ4xB3x", key, sark, 0)
    cdb = struct.pack(">BBBxxIB", 0x5F, sa, rtype, len(params), 0)
    c.command(cdb, edtl=len(params), write=True, data=params)
    p, _ = c.response()
    return p.bhs[3]


def _sense(c: RawInitiator, cdb: bytes) -> tuple[int, int, int, int]:
    c.command(cdb)
    p, _ = c.response()
    if p.bhs[3] != 2:
        return (p.bhs[3], 0, 0, 0)
    return (2, p.data[4] & 0x0F, p.data[14], p.data[15])


def test_preempt_and_abort(tmp_path) -> None:
    t = VsandTarget(tmp_path)
    t.start()
    try:
        a, b = RawInitiator(t.port), RawInitiator(t.port)
        b.isid += 1
        assert a.login(t.iqn, initiator="iqn.2026-11.org.vsand:pa-a").bhs[36:38] == b"\0\0"
        assert b.login(t.iqn, initiator="iqn.2026-11.org.vsand:pa-b").bhs[36:38] == b"\0\0"
        assert _prout(a, 0, 0, 0xA) == 0  # REGISTER
        assert _prout(b, 0, 0, 0xB) == 0
        assert _prout(b, 1, 0xB, 0, WR_EX) == 0  # RESERVE, write exclusive
        # b starts a 64 KiB write and never sends its data: the command waits in the target.
        cdb = struct.pack(">BBIBHB", 0x2A, 0, 0, 0, 128, 0)
        pending_itt = b.command(cdb, edtl=65536, write=True, final=True)
        r2t = b.recv()
        assert r2t.opcode == 0x31 and r2t.itt == pending_itt  # the target asks for the data
        assert _prout(a, 5, 0xA, 0xB, WR_EX) == 0  # PREEMPT AND ABORT
        b.sock.settimeout(1.0)
        try:
            p = b.recv()
            raise AssertionError(f"the aborted command answered: opcode 0x{p.opcode:02x}, "
                                 f"itt {p.itt:#x} (pending {pending_itt:#x})")
        except socket.timeout:
            pass
        b.sock.settimeout(5)
        assert _sense(b, bytes(6)) == (2, 0x6, 0x2A, 0x05)  # REGISTRATIONS PREEMPTED
        # a holds the reservation now: b's write conflicts, a's does not.
        w = struct.pack(">BBIBHB", 0x2A, 0, 8, 0, 1, 0)
        b.command(w, edtl=512, write=True, data=b"b" * 512)
        assert b.response()[0].bhs[3] == 0x18  # RESERVATION CONFLICT
        a.command(w, edtl=512, write=True, data=b"a" * 512)
        assert a.response()[0].bhs[3] == 0
        a.close()
        b.close()
    finally:
        t.stop()
