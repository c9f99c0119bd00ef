"""Persistent reservations (SPC-5 5.14) and SPC-2 RESERVE / RELEASE."""

from __future__ import annotations

import struct

import pytest
from scsi_harness import GOOD, INVALID_CDB, INVALID_PARAM, Harness, rw10, sense

from vsand.protocol.block import BlockOp
from vsand.protocol.scsi import Status
from vsand.protocol.scsi.pr import (
    EX_AC,
    EX_AC_AR,
    EX_AC_RO,
    WR_EX,
    WR_EX_AR,
    WR_EX_RO,
    PrState,
    parse_transport_ids,
    split_nexus,
    transport_id,
)
from vsand.protocol.scsi.sbc import plain_read_write
from vsand.protocol.scsi.target import SPECS

TGT = "iqn.2026-01.io.vsand:disk1,t,0x0001"
A = f"iqn.1994-05.com.example:a,i,0x400000000001,{TGT}"
A2 = f"iqn.1994-05.com.example:a,i,0x400000000002,{TGT}"  # same initiator, another ISID
B = f"iqn.1994-05.com.example:b,i,0x400000000001,{TGT}"
C = f"iqn.1994-05.com.example:c,i,0x400000000001,{TGT}"
A_OTHER_PORT = "iqn.1994-05.com.example:a,i,0x400000000001,iqn.2026-01.io.vsand:disk1,t,0x0002"

CONFLICT = "conflict"
RESERVATIONS_PREEMPTED = (0x6, 0x2A, 0x03)
RESERVATIONS_RELEASED = (0x6, 0x2A, 0x04)
REGISTRATIONS_PREEMPTED = (0x6, 0x2A, 0x05)
PARAM_LEN = (0x5, 0x1A, 0x00)
INVALID_RELEASE = (0x5, 0x26, 0x04)

REGISTER, RESERVE, RELEASE, CLEAR, PREEMPT, PREEMPT_AND_ABORT, REG_IGNORE, REG_MOVE = range(8)
ALL_TYPES = (WR_EX, EX_AC, WR_EX_RO, EX_AC_RO, WR_EX_AR, EX_AC_AR)


def outcome(res):  # type: ignore[no-untyped-def]
    if res.status == Status.RESERVATION_CONFLICT:
        return CONFLICT
    return sense(res)


def prout_cdb(sa: int, rtype: int = 0, scope: int = 0, plen: int = 24) -> bytes:
    return struct.pack(">BBBHIB", 0x5F, sa, (scope << 4) | rtype, 0, plen, 0)


def params(key: int = 0, sark: int = 0, flags: int = 0, extra: bytes = b"") -> bytes:
    return struct.pack(">QQIBBH", key, sark, 0, flags, 0, 0) + extra


def prin_cdb(sa: int, alloc: int = 8192) -> bytes:
    return struct.pack(">BB5sHB", 0x5E, sa, bytes(5), alloc, 0)


class Pr:
    """A harness with PERSISTENT RESERVE helpers; every helper returns ``outcome``."""

    def __init__(self) -> None:
        self.h = Harness()
        self.lu = self.h.lu
        for n in (A, A2, B, C):
            self.h.target.attach(n)
        self.saved: list[bytes | None] = []
        self.lu.on_pr_change = self.saved.append

    def out(self, nexus: str, sa: int, key: int = 0, sark: int = 0,  # type: ignore[no-untyped-def]
            rtype: int = 0, flags: int = 0, scope: int = 0, extra: bytes = b"",
            plen: int | None = None):
        data = params(key, sark, flags, extra)
        n = len(data) if plen is None else plen
        return outcome(self.h.run(prout_cdb(sa, rtype, scope, n), data, nexus=nexus))

    def register(self, nexus: str, key: int, flags: int = 0):  # type: ignore[no-untyped-def]
        return self.out(nexus, REG_IGNORE, sark=key, flags=flags)

    def reserve(self, nexus: str, key: int, rtype: int):  # type: ignore[no-untyped-def]
        return self.out(nexus, RESERVE, key=key, rtype=rtype)

    def prin(self, nexus: str, sa: int, alloc: int = 8192) -> bytes:
        res = self.h.run(prin_cdb(sa, alloc), nexus=nexus)
        assert res.status == Status.GOOD, outcome(res)
        return bytes(res.data or b"")

    def keys(self, nexus: str = A) -> tuple[int, list[int]]:
        d = self.prin(nexus, 0)
        gen, n = struct.unpack_from(">II", d)
        return gen, [struct.unpack_from(">Q", d, 8 + i)[0] for i in range(0, n, 8)]

    def reservation(self, nexus: str = A) -> tuple[int, int] | None:
        d = self.prin(nexus, 1)
        if struct.unpack_from(">I", d, 4)[0] == 0:
            return None
        return struct.unpack_from(">Q", d, 8)[0], d[21] & 0x0F

    def read(self, nexus: str):  # type: ignore[no-untyped-def]
        return outcome(self.h.run(rw10(0x28, 1, 1), nexus=nexus))

    def write(self, nexus: str):  # type: ignore[no-untyped-def]
        return outcome(self.h.run(rw10(0x2A, 1, 1), bytes(512), nexus=nexus))

    def tur(self, nexus: str):  # type: ignore[no-untyped-def]
        return outcome(self.h.run(bytes(6), nexus=nexus))

    def drain_ua(self, nexus: str) -> list[tuple[int, int, int]]:
        got = []
        while (r := self.tur(nexus)) != GOOD:
            got.append(r)
        return got


# -- helpers ------------------------------------------------------------------------------
def test_split_nexus_and_transport_ids() -> None:
    assert split_nexus(A) == ("iqn.1994-05.com.example:a,i,0x400000000001", TGT)
    assert split_nexus("I1") == ("I1", "")
    tid = transport_id("iqn.x:y,i,0x400000000001")
    assert tid[0] == 0x45 and len(tid) % 4 == 0
    assert struct.unpack_from(">H", tid, 2)[0] == len(tid) - 4
    assert transport_id("iqn.x:y")[0] == 0x05 and len(transport_id("iqn.x:y")) >= 20
    both = tid + transport_id("iqn.x:y")
    assert parse_transport_ids(both, 0, len(both)) == ["iqn.x:y,i,0x400000000001", "iqn.x:y"]
    upper = transport_id("iqn.x:y,i,0x40000000000A")
    assert parse_transport_ids(upper, 0, len(upper)) == ["iqn.x:y,i,0x40000000000a"]


def test_opcodes_are_in_the_table() -> None:
    names = {s.name for s in SPECS}
    for n in ("RESERVE(6)", "RELEASE(6)", "RESERVE(10)", "RELEASE(10)",
              "PERSISTENT RESERVE IN READ FULL STATUS", "PERSISTENT RESERVE OUT REGISTER AND MOVE"):
        assert n in names
    h = Harness()
    res = h.run(struct.pack(">BBBBHIBB", 0xA3, 0x0C, 0x02, 0x5F, 0x07, 512, 0, 0))
    assert res.status == Status.GOOD and res.data[1] & 0x07 == 0x03  # REGISTER AND MOVE listed
    res = h.run(struct.pack(">BBBBHIBB", 0xA3, 0x0C, 0x01, 0x16, 0, 512, 0, 0))
    assert res.status == Status.GOOD and res.data[1] & 0x07 == 0x03  # RESERVE(6)


# -- REGISTER / REGISTER AND IGNORE EXISTING KEY --------------------------------------------
def test_register_rules() -> None:
    p = Pr()
    assert p.out(A, REGISTER, key=5, sark=7) == CONFLICT  # unregistered with a key
    assert p.out(A, REGISTER, key=0, sark=0) == GOOD  # nothing to do
    assert p.keys() == (0, [])
    assert p.out(A, REGISTER, sark=7) == GOOD
    assert p.keys() == (1, [7])
    assert p.out(A, REGISTER, key=0, sark=8) == CONFLICT  # wrong key (libiscsi's re-register)
    assert p.out(A, REGISTER, key=7, sark=8) == GOOD  # key change
    assert p.keys() == (2, [8])
    assert p.out(A, REG_IGNORE, key=999, sark=9) == GOOD
    assert p.keys() == (3, [9])
    assert p.out(A, REGISTER, key=9, sark=0) == GOOD  # unregister
    assert p.keys() == (4, [])
    assert p.register(A, 1) == GOOD and p.register(B, 2) == GOOD
    assert p.keys(C) == (6, [1, 2])
    assert p.out(A2, REGISTER, key=1, sark=3) == CONFLICT  # another I_T nexus: not registered


def test_parameter_list_checks() -> None:
    p = Pr()
    assert p.out(A, REG_IGNORE, sark=1, plen=23) == PARAM_LEN
    assert p.out(A, REG_IGNORE, sark=1, extra=bytes(4)) == PARAM_LEN
    assert p.out(A, REG_IGNORE, sark=1, flags=0x08) == INVALID_PARAM  # SPEC_I_PT
    assert p.register(A, 1) == GOOD
    assert p.out(A, RESERVE, key=1, rtype=2) == INVALID_CDB
    assert p.out(A, RESERVE, key=1, rtype=WR_EX, scope=1) == INVALID_CDB
    assert p.out(A, RESERVE, key=1, rtype=WR_EX, flags=0x08) == INVALID_PARAM
    assert outcome(p.h.run(prout_cdb(8), params(1), nexus=A)) == INVALID_CDB  # no REPLACE LOST
    assert outcome(p.h.run(prin_cdb(4), nexus=A)) == INVALID_CDB


def test_all_tg_pt_registers_every_target_port() -> None:
    p = Pr()
    assert p.register(A, 1, flags=0x04) == GOOD
    assert p.reserve(A_OTHER_PORT, 1, EX_AC) == GOOD  # same registration through another port
    assert p.reservation() == (1, EX_AC)
    assert p.read(A2) == CONFLICT  # another initiator port (ISID) is another initiator
    full = p.prin(A, 3)
    assert full[8 + 12] == 0x03  # ALL_TG_PT, R_HOLDER


def test_spec_i_pt_registers_named_initiators() -> None:
    p = Pr()
    b_port = split_nexus(B)[0]
    tids = transport_id(b_port) + transport_id("iqn.1994-05.com.example:c")
    extra = struct.pack(">I", len(tids)) + tids
    assert p.out(A, REGISTER, sark=5, flags=0x08, extra=extra) == GOOD
    assert p.keys() == (1, [5, 5, 5])
    assert p.out(B, REGISTER, key=5, sark=6) == GOOD  # B is registered, with A's key
    assert p.out(C, REGISTER, key=5, sark=0) == GOOD  # C by name: any ISID of it
    assert sorted(p.keys()[1]) == [5, 6]
    # A registered I_T nexus may not use SPEC_I_PT; a TransportID already registered conflicts.
    assert p.out(A, REGISTER, key=5, sark=5, flags=0x08, extra=extra) == INVALID_PARAM
    tid = transport_id(b_port)
    assert p.out(A2, REGISTER, sark=9, flags=0x08,
                 extra=struct.pack(">I", len(tid)) + tid) == CONFLICT
    bad = bytes((0x41, 0, 0, 4)) + b"x\0\0\0"  # not iSCSI (protocol 1)
    assert p.out(A2, REGISTER, sark=9, flags=0x08,
                 extra=struct.pack(">I", len(bad)) + bad) == INVALID_PARAM


# -- RESERVE / RELEASE -------------------------------------------------------------------
@pytest.mark.parametrize("rtype", ALL_TYPES)
def test_reserve_and_release_each_type(rtype: int) -> None:
    p = Pr()
    assert p.register(A, 0xABC) == GOOD
    gen = p.keys()[0]
    assert p.reserve(A, 0xABC, rtype) == GOOD
    assert p.reserve(A, 0xABC, rtype) == GOOD  # again, same type: fine
    other = WR_EX if rtype != WR_EX else EX_AC
    assert p.reserve(A, 0xABC, other) == CONFLICT
    all_regs = rtype in (WR_EX_AR, EX_AC_AR)
    assert p.reservation() == (0 if all_regs else 0xABC, rtype)
    assert p.keys()[0] == gen  # RESERVE does not bump PRgeneration
    assert p.out(A, RELEASE, key=0xABC, rtype=other) == INVALID_RELEASE
    assert p.out(A, RELEASE, key=0xABC, rtype=rtype) == GOOD
    assert p.reservation() is None


def test_release_rules_and_unit_attentions() -> None:
    p = Pr()
    for n, k in ((A, 1), (B, 2), (C, 3)):
        assert p.register(n, k) == GOOD
    assert p.out(A2, RELEASE, key=1, rtype=WR_EX) == CONFLICT  # not registered
    assert p.out(A, RELEASE, key=2, rtype=WR_EX) == CONFLICT  # wrong key
    assert p.out(A, RELEASE, key=1, rtype=WR_EX) == GOOD  # nothing reserved
    assert p.reserve(A, 1, WR_EX_RO) == GOOD
    assert p.reserve(B, 2, WR_EX_RO) == CONFLICT
    assert p.out(B, RELEASE, key=2, rtype=WR_EX_RO) == GOOD  # not the holder: no-op
    assert p.reservation() == (1, WR_EX_RO)
    assert p.out(A, RELEASE, key=1, rtype=WR_EX_RO) == GOOD
    assert p.drain_ua(B) == [RESERVATIONS_RELEASED] and p.drain_ua(C) == [RESERVATIONS_RELEASED]
    assert p.drain_ua(A) == []
    # WR EX / EX AC: no unit attention on release.
    assert p.reserve(A, 1, EX_AC) == GOOD
    assert p.out(A, RELEASE, key=1, rtype=EX_AC) == GOOD
    assert p.drain_ua(B) == []


# -- conflicts for READ / WRITE: holder, registrant, non-registrant -----------------------
# (type, registrant may read, registrant may write, non-registrant read, non-registrant write)
MATRIX = [
    (WR_EX, True, False, True, False),
    (EX_AC, False, False, False, False),
    (WR_EX_RO, True, True, True, False),
    (EX_AC_RO, True, True, False, False),
    (WR_EX_AR, True, True, True, False),
    (EX_AC_AR, True, True, False, False),
]


@pytest.mark.parametrize("rtype,reg_r,reg_w,unreg_r,unreg_w", MATRIX)
def test_conflict_matrix(rtype: int, reg_r: bool, reg_w: bool, unreg_r: bool,
                         unreg_w: bool) -> None:
    p = Pr()
    assert p.register(A, 1) == GOOD and p.register(B, 2) == GOOD
    assert p.reserve(A, 1, rtype) == GOOD
    ok = lambda allowed: GOOD if allowed else CONFLICT  # noqa: E731
    assert p.read(A) == GOOD and p.write(A) == GOOD
    assert p.read(B) == ok(reg_r) and p.write(B) == ok(reg_w)
    assert p.read(C) == ok(unreg_r) and p.write(C) == ok(unreg_w)
    # Never conflicting, whatever the type: INQUIRY, REPORT LUNS, TUR, READ CAPACITY, PRIN.
    for cdb in (bytes((0x12, 0, 0, 0, 96, 0)), bytes((0xA0, 0, 0, 0, 0, 0, 0, 0, 0, 16, 0, 0)),
                bytes(6), bytes((0x25,)) + bytes(9), prin_cdb(0)):
        assert outcome(p.h.run(cdb, nexus=C)) == GOOD
    # MODE SENSE conflicts like a write (SPC-5 "C C A C C"); starting the unit never does.
    mode_sense = bytes((0x1A, 0, 0x3F, 0, 255, 0))
    assert outcome(p.h.run(mode_sense, nexus=C)) == CONFLICT
    assert outcome(p.h.run(bytes((0x1B, 0, 0, 0, 0x01, 0)), nexus=C)) == GOOD
    assert outcome(p.h.run(bytes((0x1B, 0, 0, 0, 0x00, 0)), nexus=C)) == CONFLICT
    # The transport's fast path stays out of the way while a reservation exists.
    assert plain_read_write(p.lu, rw10(0x28, 1, 1), A) is None


def test_fast_path_without_reservation() -> None:
    p = Pr()
    assert plain_read_write(p.lu, rw10(0x28, 1, 1), C) is not None
    assert p.register(A, 1) == GOOD  # registrations alone change nothing for I/O
    assert plain_read_write(p.lu, rw10(0x28, 1, 1), C) is not None
    assert p.reserve(A, 1, WR_EX) == GOOD
    assert plain_read_write(p.lu, rw10(0x2A, 1, 1), C) is None


# -- ownership: the holder unregisters ------------------------------------------------------
@pytest.mark.parametrize("rtype", ALL_TYPES)
def test_holder_unregisters(rtype: int) -> None:
    p = Pr()
    assert p.register(A, 1) == GOOD and p.register(B, 2) == GOOD
    assert p.reserve(A, 1, rtype) == GOOD
    assert p.out(A, REGISTER, key=1, sark=0) == GOOD
    if rtype in (WR_EX_AR, EX_AC_AR):
        assert p.reservation() == (0, rtype)  # B still holds it
        assert p.write(B) == GOOD
        assert p.out(B, RELEASE, key=2, rtype=rtype) == GOOD
    else:
        assert p.reservation() is None
    expect = [RESERVATIONS_RELEASED] if rtype in (WR_EX_RO, EX_AC_RO) else []
    assert p.drain_ua(B) == expect
    # All registrants: the last registrant leaving ends the reservation.
    assert p.reserve(B, 2, EX_AC_AR) == GOOD
    assert p.out(B, REGISTER, key=2, sark=0) == GOOD
    assert p.reservation() is None


# -- CLEAR / PREEMPT ---------------------------------------------------------------------
def test_clear() -> None:
    p = Pr()
    assert p.register(A, 1) == GOOD and p.register(B, 2) == GOOD
    assert p.reserve(A, 1, EX_AC) == GOOD
    gen = p.keys(A)[0]
    assert p.out(C, CLEAR, key=1) == CONFLICT
    assert p.out(B, CLEAR, key=1) == CONFLICT
    assert p.out(B, CLEAR, key=2) == GOOD
    assert p.keys(B) == (gen + 1, []) and p.reservation(B) is None
    assert p.drain_ua(A) == [RESERVATIONS_PREEMPTED] and p.drain_ua(B) == []


def test_preempt_registrations_without_reservation() -> None:
    p = Pr()
    assert p.register(A, 1) == GOOD and p.register(B, 2) == GOOD
    gen = p.keys()[0]
    assert p.out(B, PREEMPT, key=2, sark=0, rtype=EX_AC) == INVALID_PARAM
    assert p.out(B, PREEMPT, key=2, sark=77, rtype=EX_AC) == CONFLICT  # nobody has 77
    assert p.out(B, PREEMPT, key=2, sark=1, rtype=EX_AC) == GOOD
    assert p.drain_ua(A) == [REGISTRATIONS_PREEMPTED] and p.drain_ua(B) == []
    assert p.keys(B) == (gen + 1, [2]) and p.reservation() is None


def test_preempt_the_holder() -> None:
    p = Pr()
    for n, k in ((A, 1), (B, 2), (C, 3)):
        assert p.register(n, k) == GOOD
    assert p.reserve(A, 1, WR_EX) == GOOD
    assert p.out(B, PREEMPT, key=2, sark=0, rtype=EX_AC) == INVALID_PARAM
    assert p.out(B, PREEMPT, key=2, sark=1, rtype=EX_AC) == GOOD
    assert p.reservation(B) == (2, EX_AC)
    assert sorted(p.keys(B)[1]) == [2, 3]
    assert p.drain_ua(A) == [REGISTRATIONS_PREEMPTED]
    assert p.drain_ua(C) == [RESERVATIONS_RELEASED]  # type changed under a registrant
    assert p.read(A) == CONFLICT
    # Preempting a registrant that does not hold the reservation leaves the reservation.
    assert p.out(B, PREEMPT, key=2, sark=3, rtype=WR_EX) == GOOD
    assert p.reservation(B) == (2, EX_AC) and p.keys(B)[1] == [2]
    assert p.drain_ua(C) == [REGISTRATIONS_PREEMPTED]


def test_preempt_all_registrants_and_abort() -> None:
    p = Pr()
    for n, k in ((A, 1), (B, 2), (C, 3)):
        assert p.register(n, k) == GOOD
    assert p.reserve(A, 1, WR_EX_AR) == GOOD
    assert p.out(B, PREEMPT_AND_ABORT, key=2, sark=0, rtype=EX_AC) == GOOD
    assert p.reservation(B) == (2, EX_AC) and p.keys(B)[1] == [2]
    assert sorted(p.lu.pr.pending_aborts) == sorted([A, C])
    assert p.drain_ua(A) == [REGISTRATIONS_PREEMPTED]


def test_register_and_move() -> None:
    p = Pr()
    assert p.register(A, 1) == GOOD
    tid = transport_id(split_nexus(B)[0])
    extra_fields = struct.pack(">QQBBHI", 1, 9, 0, 0x02, 1, len(tid)) + tid  # UNREG, port 1
    cdb = prout_cdb(REG_MOVE, plen=len(extra_fields))
    assert outcome(p.h.run(cdb, extra_fields, nexus=A)) == CONFLICT  # no reservation
    assert p.reserve(A, 1, WR_EX) == GOOD
    bad_port = struct.pack(">QQBBHI", 1, 9, 0, 0x02, 7, len(tid)) + tid
    assert outcome(p.h.run(cdb, bad_port, nexus=A)) == INVALID_PARAM
    assert outcome(p.h.run(cdb, extra_fields, nexus=A)) == GOOD
    assert p.reservation() == (9, WR_EX) and p.keys()[1] == [9]
    assert p.write(B) == GOOD and p.write(A) == CONFLICT


def test_read_full_status_and_capabilities() -> None:
    p = Pr()
    assert p.register(A, 1) == GOOD and p.register(B, 2) == GOOD
    assert p.reserve(B, 2, EX_AC_RO) == GOOD
    d = p.prin(A, 3)
    gen, length = struct.unpack_from(">II", d)
    assert gen == 2 and length == len(d) - 8
    pos, seen = 8, {}
    while pos < len(d):
        key = struct.unpack_from(">Q", d, pos)[0]
        tid_len = struct.unpack_from(">I", d, pos + 20)[0]
        tid = d[pos + 24 : pos + 24 + tid_len]
        assert tid[0] == 0x45  # iSCSI, initiator port format
        name = tid[4:].split(b"\0")[0].decode()
        seen[name] = (key, d[pos + 12], d[pos + 13], struct.unpack_from(">H", d, pos + 18)[0])
        pos += 24 + tid_len
    assert seen == {split_nexus(A)[0]: (1, 0, 0, 1), split_nexus(B)[0]: (2, 1, EX_AC_RO, 1)}
    caps = p.prin(A, 2)
    assert caps[:2] == b"\x00\x08" and caps[2] & 0x1D == 0x1D and caps[3] & 0x80
    assert (caps[4], caps[5]) == (0xEA, 0x01) and (caps[3] >> 4) & 7 <= 5
    # Truncation never changes ADDITIONAL LENGTH (SPC-5 6.16.2).
    d = p.prin(A, 0, alloc=8)
    assert len(d) == 8 and struct.unpack_from(">I", d, 4)[0] == 16


# -- APTPL ---------------------------------------------------------------------------------
def test_aptpl_round_trip() -> None:
    p = Pr()
    assert p.register(A, 1, flags=0x01) == GOOD
    assert p.register(B, 2, flags=0x05) == GOOD  # ALL_TG_PT + APTPL
    assert p.reserve(A, 1, WR_EX_RO) == GOOD
    assert p.saved and p.saved[-1] is not None
    st = PrState.from_bytes(p.saved[-1])
    assert st.regs == p.lu.pr.regs and st.generation == p.lu.pr.generation
    assert st.reservation == p.lu.pr.reservation and st.aptpl and st.active
    assert p.prin(A, 2)[3] & 0x01  # PTPL_A
    # A register without APTPL turns persistence off: the daemon is told to forget it.
    assert p.out(B, REGISTER, key=2, sark=3) == GOOD
    assert p.saved[-1] is None
    n = len(p.saved)
    assert p.out(B, REGISTER, key=3, sark=4) == GOOD
    assert len(p.saved) == n  # nothing kept, nothing to drop again


def test_no_hook_calls_without_aptpl() -> None:
    p = Pr()
    assert p.register(A, 1) == GOOD and p.reserve(A, 1, WR_EX) == GOOD
    assert p.saved == []


def test_hook_failure_is_reported() -> None:
    p = Pr()

    def fail(data: bytes | None) -> None:
        raise OSError(28, "no space")

    p.lu.on_pr_change = fail
    assert p.register(A, 1, flags=0x01) == (0x7, 0x27, 0x07)


@pytest.mark.parametrize("data", [b"", b"{}", b'{"version": 99}', b"[1]",
                                  b'{"version": 1, "generation": 1, "aptpl": true, '
                                  b'"registrations": [], "reservation": {"holder": ["x", null], '
                                  b'"type": 1}}'])
def test_from_bytes_refuses_garbage(data: bytes) -> None:
    with pytest.raises(ValueError):
        PrState.from_bytes(data)


# -- SPC-2 RESERVE / RELEASE ----------------------------------------------------------------
RESERVE6, RELEASE6 = bytes((0x16, 0, 0, 0, 0, 0)), bytes((0x17, 0, 0, 0, 0, 0))
RESERVE10, RELEASE10 = bytes((0x56,)) + bytes(9), bytes((0x57,)) + bytes(9)


@pytest.mark.parametrize("res_cdb,rel_cdb", [(RESERVE6, RELEASE6), (RESERVE10, RELEASE10)])
def test_legacy_reserve_release(res_cdb: bytes, rel_cdb: bytes) -> None:
    p = Pr()
    run = lambda cdb, n, data=None: outcome(p.h.run(cdb, data, nexus=n))  # noqa: E731
    assert run(res_cdb, A) == GOOD and run(res_cdb, A) == GOOD
    assert run(res_cdb, B) == CONFLICT
    assert run(rel_cdb, B) == GOOD  # a no-op
    assert p.read(B) == CONFLICT and p.write(B) == CONFLICT and p.tur(B) == CONFLICT
    assert run(bytes((0x1A, 0, 0x3F, 0, 255, 0)), B) == CONFLICT
    assert run(bytes((0x12, 0, 0, 0, 96, 0)), B) == GOOD
    assert run(bytes((0x03, 0, 0, 0, 18, 0)), B) == GOOD
    assert p.read(A) == GOOD and p.write(A) == GOOD
    assert plain_read_write(p.lu, rw10(0x28, 1, 1), A) is None
    # With an SPC-2 reservation PRIN/PROUT conflict, even for the holder; REPORT
    # CAPABILITIES does not.
    assert run(prin_cdb(0), A) == CONFLICT and p.register(A, 1) == CONFLICT
    assert run(prin_cdb(2), B) == GOOD
    assert run(rel_cdb, A) == GOOD
    assert run(res_cdb, B) == GOOD and run(rel_cdb, B) == GOOD
    # Registrations make RESERVE and RELEASE conflict for everyone.
    assert p.register(C, 3) == GOOD
    assert run(res_cdb, A) == CONFLICT and run(rel_cdb, A) == CONFLICT
    assert run(bytes((0x16, 0x01, 0, 0, 0, 0)), A) == INVALID_CDB  # extents: unsupported


def test_legacy_reservation_ends_with_reset_and_nexus() -> None:
    p = Pr()
    t = p.h.target
    for end in (lambda: t.lun_reset(0, B), lambda: t.target_reset(B),
                lambda: t.nexus_lost(A), lambda: t.nexus_closed(A)):
        assert outcome(p.h.run(RESERVE6, nexus=A)) == GOOD
        assert p.lu.pr.legacy == A
        t.nexus_closed(B)  # another nexus ending changes nothing
        assert p.lu.pr.legacy == A
        end()
        assert p.lu.pr.legacy is None and not p.lu.pr.active
        p.drain_ua(A)
        p.drain_ua(B)
    # Persistent reservations survive all of them.
    assert p.register(A, 1) == GOOD and p.reserve(A, 1, EX_AC) == GOOD
    t.lun_reset(0, B)
    t.target_reset(B)
    t.nexus_lost(A)
    p.drain_ua(B)
    assert p.reservation(B) == (1, EX_AC)


def test_write_requests_reach_the_backend_for_the_holder() -> None:
    p = Pr()
    assert p.register(A, 1) == GOOD and p.reserve(A, 1, EX_AC) == GOOD
    p.h.backend.log.clear()
    assert p.write(C) == CONFLICT and not p.h.backend.log
    assert p.write(A) == GOOD and p.h.backend.log[-1].op == BlockOp.WRITE


def test_registrations_are_bounded() -> None:
    from vsand.protocol.scsi import pr as prmod

    p = Pr()
    names = [f"iqn.x:{i}" for i in range(prmod.MAX_REGISTRATIONS)]
    tids = b"".join(transport_id(n) for n in names)
    extra = struct.pack(">I", len(tids)) + tids
    assert p.out(A, REGISTER, sark=5, flags=0x08, extra=extra) == (0x5, 0x55, 0x04)
    assert p.keys() == (0, [])
