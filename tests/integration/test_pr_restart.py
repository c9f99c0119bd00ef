"""Persistent reservations across a daemon restart: kept with APTPL=1, gone with APTPL=0.

Drives PERSISTENT RESERVE OUT / IN as raw CDBs over the minimal initiator (there is no PR
tool among libiscsi's binaries) against a real vsand process that is stopped and started
again on the same data directory.
"""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
from rawiscsi import DATA_IN, LOGIN_RSP, RawInitiator
from rig.procs import MiB, LunSpec, VsandTarget

pytestmark = pytest.mark.integration

INIT_A = "iqn.2026-11.org.vsand:pr-a"
INIT_B = "iqn.2026-11.org.vsand:pr-b"
KEY = 0x0123456789ABCDEF
WR_EX = 0x1
GOOD, CHECK_CONDITION, RESERVATION_CONFLICT = 0x00, 0x02, 0x18


def prout(sa: int, key: int = 0, sark: int = 0, rtype: int = 0, aptpl: bool = False
          ) -> tuple[bytes, bytes]:
    data = struct.pack(">QQIBBH", key, sark, 0, 0x01 if aptpl else 0, 0, 0)
    return struct.pack(">BBBHIB", 0x5F, sa, rtype, 0, len(data), 0), data


class Session:
    def __init__(self, target: VsandTarget, name: str) -> None:
        self.ini = RawInitiator(target.port)
        reply = self.ini.login(target.iqn, initiator=name)
        assert reply.opcode == LOGIN_RSP and reply.bhs[36] == 0, reply.bhs[36:38].hex()
        for _ in range(8):  # power-on / nexus-loss unit attentions first
            if self.status(bytes(6))[0] == GOOD:
                break
        else:
            raise AssertionError("TEST UNIT READY never became GOOD")

    def status(self, cdb: bytes, data: bytes = b"", alloc: int = 0) -> tuple[int, bytes]:
        self.ini.command(cdb, edtl=len(data) or alloc, read=bool(alloc), write=bool(data),
                         data=data)
        pdu, payload = self.ini.response()
        assert pdu.opcode in (DATA_IN, 0x21), hex(pdu.opcode)
        return pdu.bhs[3], payload

    def out(self, cdb_data: tuple[bytes, bytes]) -> int:
        return self.status(*cdb_data)[0]

    def reservation(self) -> tuple[int, int] | None:
        st, d = self.status(struct.pack(">BB5sHB", 0x5E, 1, bytes(5), 64, 0), alloc=64)
        assert st == GOOD and len(d) >= 8
        if struct.unpack_from(">I", d, 4)[0] == 0:
            return None
        return struct.unpack_from(">Q", d, 8)[0], d[21] & 0x0F

    def keys(self) -> list[int]:
        st, d = self.status(struct.pack(">BB5sHB", 0x5E, 0, bytes(5), 256, 0), alloc=256)
        assert st == GOOD
        n = struct.unpack_from(">I", d, 4)[0]
        return [struct.unpack_from(">Q", d, 8 + i)[0] for i in range(0, n, 8)]

    def write_status(self) -> int:
        return self.status(struct.pack(">BBIBHB", 0x2A, 0, 8, 0, 1, 0), data=bytes(512))[0]

    def close(self) -> None:
        self.ini.close()


def test_reservation_survives_restart_only_with_aptpl(tmp_path: Path) -> None:
    target = VsandTarget(tmp_path, luns=(LunSpec(0, 16 * MiB, 512),)).start()
    try:
        a = Session(target, INIT_A)
        assert a.out(prout(6, sark=KEY, aptpl=True)) == GOOD  # REGISTER AND IGNORE, APTPL
        assert a.out(prout(1, key=KEY, rtype=WR_EX)) == GOOD  # RESERVE
        a.close()
        saved = list((tmp_path / "data" / "pr").glob("*.pr"))
        assert [p.name for p in saved] == [f"{target.iqn}-lun0.pr"]

        target.stop()
        target.restart()
        b = Session(target, INIT_B)
        assert b.reservation() == (KEY, WR_EX)
        assert b.keys() == [KEY]
        assert b.write_status() == RESERVATION_CONFLICT
        a = Session(target, INIT_A)
        assert a.write_status() == GOOD  # the same I_T nexus still holds it
        # Re-register without APTPL: the reservation stays for now, but not across a restart.
        assert a.out(prout(0, key=KEY, sark=KEY, aptpl=False)) == GOOD
        assert b.reservation() == (KEY, WR_EX)
        a.close()
        b.close()
        assert not list((tmp_path / "data" / "pr").glob("*.pr"))

        target.stop()
        target.restart()
        b = Session(target, INIT_B)
        assert b.reservation() is None and b.keys() == []
        assert b.write_status() == GOOD
        b.close()
    finally:
        target.stop()
