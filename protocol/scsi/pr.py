"""Reservations: SPC-5 persistent reservations (5.14) and SPC-2 RESERVE / RELEASE.

Theory of operation: one ``PrState`` per logical unit holds everything about reservations:
the registrations, the persistent reservation, PRgeneration, the APTPL flag and the holder of
an SPC-2 ("legacy") reservation.  ``active`` is true while any reservation exists; the
target's dispatcher and the transport's fast path read only that flag on the hot path, and
ask ``conflicts`` for the verdict when it is set.

Registrations are keyed by a registrant id ``(initiator, target port)``.  ``initiator`` is an
iSCSI initiator port name ("iqn...,i,0x<isid>") or, for a name-only TransportID, an initiator
name; ``target port`` is "<target iqn>,t,0x<tpgt>", or None for an ALL_TG_PT registration
that covers every target port.  An I_T nexus string is "<initiator port>,<target port>"
(``split_nexus``), so the registration of a nexus is found with at most four dict lookups.

Every command of a conflict class (``OpSpec.pr``) is judged by ``conflicts``:
``a`` never conflicts (INQUIRY, REPORT LUNS, REQUEST SENSE, PRIN REPORT CAPABILITIES);
``A`` is allowed under every persistent reservation (SPC-5 "A" in all columns) but not
through another nexus' SPC-2 reservation; ``R`` reads (conflict under exclusive access);
``W`` writes and everything SPC-5 marks "C C A C C"; ``S`` is START STOP UNIT (allowed when
it starts the unit); ``P`` is PERSISTENT RESERVE IN/OUT, which conflict with any SPC-2
reservation (SPC-5 5.14.3) and otherwise decide for themselves; ``L`` is RESERVE / RELEASE,
whose handlers decide (any registration makes them conflict).

PREEMPT AND ABORT preempts like PREEMPT; the I_T nexuses whose tasks must be aborted are
appended to ``pending_aborts``; the transport aborts their commands on the LU before the
PREEMPT AND ABORT completes (vsand/targets.py).

State changes that matter after a power loss call ``lu.on_pr_change`` with ``to_bytes()``
while APTPL is set, or with None once it is not, so the daemon can keep (or drop) a copy.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Any

from .cdb import U16, U32, alloc_cut, data_out
from .sense import (
    INVALID_FIELD_IN_CDB,
    PARAMETER_LIST_LENGTH_ERROR,
    Asc,
    bad_param,
    illegal,
    sense_for_errno,
)
from .types import ScsiCommand, ScsiResult, Status

if TYPE_CHECKING:
    from .target import ScsiTarget
    from .unit import LogicalUnit

RESERVATIONS_PREEMPTED: Asc = (0x2A, 0x03)
RESERVATIONS_RELEASED: Asc = (0x2A, 0x04)
REGISTRATIONS_PREEMPTED: Asc = (0x2A, 0x05)
INVALID_RELEASE_OF_PERSISTENT_RESERVATION: Asc = (0x26, 0x04)
INSUFFICIENT_REGISTRATION_RESOURCES: Asc = (0x55, 0x04)

# Bounds on what initiators can make this state hold: registrations (SPEC_I_PT can name many
# initiators in one command) and nexuses awaiting a PREEMPT AND ABORT nobody has acted on.
MAX_REGISTRATIONS = 1024
MAX_PENDING_ABORTS = 256

# Persistent reservation types (SPC-5 table 189).
WR_EX, EX_AC, WR_EX_RO, EX_AC_RO, WR_EX_AR, EX_AC_AR = 0x1, 0x3, 0x5, 0x6, 0x7, 0x8
TYPES = frozenset((WR_EX, EX_AC, WR_EX_RO, EX_AC_RO, WR_EX_AR, EX_AC_AR))
_ALL_REGISTRANTS = frozenset((WR_EX_AR, EX_AC_AR))
_REGISTRANTS_ONLY = frozenset((WR_EX_RO, EX_AC_RO))
_EXCLUSIVE_ACCESS = frozenset((EX_AC, EX_AC_RO, EX_AC_AR))

# PERSISTENT RESERVE OUT service actions.
REGISTER, RESERVE, RELEASE, CLEAR, PREEMPT, PREEMPT_AND_ABORT = 0, 1, 2, 3, 4, 5
REGISTER_AND_IGNORE, REGISTER_AND_MOVE = 6, 7
# PERSISTENT RESERVE IN service actions.
READ_KEYS, READ_RESERVATION, REPORT_CAPABILITIES, READ_FULL_STATUS = 0, 1, 2, 3

ISCSI_PROTOCOL_ID = 0x5
_FORMAT_VERSION = 1

RegId = tuple[str, str | None]  # (initiator port or name, target port or None: all ports)


class _Conflict(Exception):
    """The command ends with RESERVATION CONFLICT status."""


@lru_cache(maxsize=4096)
def split_nexus(nexus: str) -> tuple[str, str]:
    """(initiator port, target port) of "<iqn>,i,0x<isid>,<target iqn>,t,0x<tpgt>".

    A string of another shape (unit tests use "I1") is all initiator port, no target port.
    """
    parts = nexus.split(",")
    if len(parts) == 6 and parts[1].lower() == "i" and parts[4].lower() == "t":
        return ",".join(parts[:3]), ",".join(parts[3:])
    return nexus, ""


def _initiator_name(port: str) -> str:
    return port.split(",", 1)[0]


@dataclass(slots=True)
class Reservation:
    holder: RegId  # who established it; for the all-registrants types every registrant holds
    type: int
    scope: int = 0  # LU_SCOPE, the only scope SPC-5 still defines


class PrState:
    """Reservation state of one logical unit (see the module docstring)."""

    def __init__(self) -> None:
        self.generation = 0
        self.aptpl = False
        self.regs: dict[RegId, int] = {}
        self.reservation: Reservation | None = None
        self.legacy: str | None = None  # nexus holding an SPC-2 reservation
        self.active = False
        self.persisted = False  # the daemon holds a copy (APTPL was set when last saved)
        self.pending_aborts: list[str] = []

    def _touch(self) -> None:
        self.active = self.reservation is not None or self.legacy is not None

    # -- lookups ----------------------------------------------------------------------
    def reg_of(self, nexus: str) -> RegId | None:
        port, tgt = split_nexus(nexus)
        regs = self.regs
        if not regs:
            return None
        name = _initiator_name(port)
        for rid in ((port, tgt), (port, None), (name, tgt), (name, None)):
            if rid in regs:
                return rid
        return None

    def is_holder(self, nexus: str) -> bool:
        res = self.reservation
        if res is None:
            return False
        rid = self.reg_of(nexus)
        if rid is None:
            return False
        return res.type in _ALL_REGISTRANTS or rid == res.holder

    def holds(self, rid: RegId) -> bool:
        res = self.reservation
        return res is not None and (res.type in _ALL_REGISTRANTS or res.holder == rid)

    @staticmethod
    def matches(rid: RegId, nexus: str) -> bool:
        port, tgt = split_nexus(nexus)
        init, rtgt = rid
        return (init == port or init == _initiator_name(port)) and rtgt in (None, tgt)

    def conflicts(self, nexus: str, cls: str, cdb: Any) -> bool:
        """Whether a command of conflict class ``cls`` from ``nexus`` gets RESERVATION
        CONFLICT (SPC-5 table "SPC commands that are allowed in the presence of various
        reservations", SBC-4's equivalent, and SPC-2 7.21 for RESERVE(6)/(10))."""
        if cls == "a" or cls == "L":
            return False
        if self.legacy is not None:
            # SPC-5 5.14.3: with an SPC-2 reservation every PRIN/PROUT conflicts, whoever
            # sends it; anything else conflicts only for the other nexuses.
            return cls == "P" or self.legacy != nexus
        res = self.reservation
        if res is None or cls == "A" or cls == "P":
            return False
        if cls == "S":
            # Starting the unit (START=1, POWER CONDITION=0) is allowed; stopping is not.
            if len(cdb) > 4 and cdb[4] & 0xF1 == 0x01:
                return False
            cls = "W"
        rid = self.reg_of(nexus)
        if rid is not None and (res.type in _ALL_REGISTRANTS or rid == res.holder):
            return False
        if res.type == WR_EX:
            return cls == "W"
        if res.type == EX_AC:
            return True
        if rid is not None:  # a registrant under a registrants-only / all-registrants type
            return False
        return cls == "W" or res.type in _EXCLUSIVE_ACCESS

    # -- SPC-2 reservations -----------------------------------------------------------
    def legacy_reserve(self, nexus: str) -> None:
        if self.regs or (self.legacy is not None and self.legacy != nexus):
            raise _Conflict
        self.legacy = nexus
        self._touch()

    def legacy_release(self, nexus: str) -> None:
        if self.regs:
            raise _Conflict
        if self.legacy == nexus:  # a RELEASE from anyone else is a no-op (SPC-2 7.17)
            self.legacy = None
            self._touch()

    def drop_legacy(self, nexus: str | None = None) -> None:
        """Release the SPC-2 reservation: on a reset (``nexus`` None), or when its holder's
        I_T nexus ends (loss or logout)."""
        if self.legacy is not None and (nexus is None or self.legacy == nexus):
            self.legacy = None
            self._touch()

    # -- PERSISTENT RESERVE OUT ---------------------------------------------------------
    def _registered(self, nexus: str, key: int) -> RegId:
        rid = self.reg_of(nexus)
        if rid is None or self.regs[rid] != key:
            raise _Conflict
        return rid

    def _release(self, notify: list[tuple[RegId, Asc]], code: Asc | None,
                 skip: RegId | None) -> None:
        self.reservation = None
        self._touch()
        if code is not None:
            notify.extend((r, code) for r in self.regs if r != skip)

    def _unregister(self, rid: RegId, notify: list[tuple[RegId, Asc]]) -> None:
        """SPC-5 5.14.11.2.3: a registration leaves; its holder's reservation goes too,
        except for the all-registrants types while registrants remain."""
        del self.regs[rid]
        res = self.reservation
        if res is None:
            return
        if res.type in _ALL_REGISTRANTS:
            if not self.regs:
                self._release(notify, None, None)
            elif res.holder == rid:
                res.holder = next(iter(self.regs))  # keep a live registrant as the anchor
        elif res.holder == rid:
            self._release(notify, RESERVATIONS_RELEASED if res.type in _REGISTRANTS_ONLY
                          else None, rid)

    def register(self, nexus: str, key: int, sark: int, ignore: bool, all_tg_pt: bool,
                 aptpl: bool, specified: list[str], notify: list[tuple[RegId, Asc]]) -> bool:
        """REGISTER / REGISTER AND IGNORE EXISTING KEY.  Returns whether anything changed."""
        rid = self.reg_of(nexus)
        if rid is not None:
            if specified:
                raise bad_param(20, 3)  # SPEC_I_PT from a registered I_T nexus
            if not ignore and self.regs[rid] != key:
                raise _Conflict
            if sark == 0:
                self._unregister(rid, notify)
            else:
                self.regs[rid] = sark
        else:
            if not ignore and key != 0:
                raise _Conflict
            if sark == 0:
                return False  # "do nothing": unregistered and asked to unregister
            port, tgt = split_nexus(nexus)
            target: str | None = None if all_tg_pt else tgt
            new: list[RegId] = [(port, target)]
            for init in specified:
                sid: RegId = (init, target)
                if sid in self.regs or sid in new:
                    raise _Conflict
                new.append(sid)
            if len(self.regs) + len(new) > MAX_REGISTRATIONS:
                raise illegal(INSUFFICIENT_REGISTRATION_RESOURCES)
            for r in new:
                self.regs[r] = sark
        self.aptpl = aptpl
        self.generation += 1
        return True

    def reserve(self, nexus: str, key: int, scope: int, rtype: int) -> bool:
        rid = self._registered(nexus, key)
        _check_scope_type(scope, rtype)
        res = self.reservation
        if res is None:
            self.reservation = Reservation(rid, rtype, scope)
            self._touch()
            return True
        if self.holds(rid) and res.type == rtype and res.scope == scope:
            return False  # re-reserving what it already holds
        raise _Conflict

    def release(self, nexus: str, key: int, scope: int, rtype: int,
                notify: list[tuple[RegId, Asc]]) -> bool:
        rid = self._registered(nexus, key)
        res = self.reservation
        if res is None or not self.holds(rid):
            return False  # nothing to release, or not the holder: GOOD, nothing happens
        if res.scope != scope or res.type != rtype:
            raise illegal(INVALID_RELEASE_OF_PERSISTENT_RESERVATION)
        released = res.type in _REGISTRANTS_ONLY or res.type in _ALL_REGISTRANTS
        self._release(notify, RESERVATIONS_RELEASED if released else None, rid)
        return True

    def clear(self, nexus: str, key: int, notify: list[tuple[RegId, Asc]]) -> bool:
        rid = self._registered(nexus, key)
        notify.extend((r, RESERVATIONS_PREEMPTED) for r in self.regs if r != rid)
        self.regs.clear()
        self.reservation = None
        self._touch()
        self.generation += 1
        return True

    def preempt(self, nexus: str, key: int, sark: int, scope: int, rtype: int,
                notify: list[tuple[RegId, Asc]]) -> list[RegId]:
        """PREEMPT (SPC-5 5.14.11.4); returns the registrations it removed."""
        me = self._registered(nexus, key)
        res = self.reservation
        holder_key = self.regs.get(res.holder) if res is not None else None
        if res is not None and res.type in _ALL_REGISTRANTS and sark == 0:
            _check_scope_type(scope, rtype)
            victims = [r for r in self.regs if r != me]
            new_holder = True
        elif res is None or res.type in _ALL_REGISTRANTS or sark != holder_key:
            # Preempting registrations only: the reservation (if any) stays as it is.
            if sark == 0:
                raise bad_param(8)
            victims = [r for r, k in self.regs.items() if k == sark]
            if not victims:
                raise _Conflict
            new_holder = False
        else:
            _check_scope_type(scope, rtype)
            victims = [r for r, k in self.regs.items() if k == sark and r != me]
            new_holder = True
        changed = new_holder and res is not None and (res.type, res.scope) != (rtype, scope)
        for r in victims:
            del self.regs[r]
            if r != me:
                notify.append((r, REGISTRATIONS_PREEMPTED))
        if new_holder:
            self.reservation = Reservation(me, rtype, scope)
            if changed:
                notify.extend((r, RESERVATIONS_RELEASED) for r in self.regs if r != me)
        elif res is not None and res.holder not in self.regs:
            if not self.regs:
                self.reservation = None
            else:
                res.holder = next(iter(self.regs))
        self._touch()
        self.generation += 1
        return victims

    def register_and_move(self, nexus: str, key: int, sark: int, dest: str, rel_port: int,
                          my_rel_port: int, unreg: bool, aptpl: bool) -> bool:
        me = self._registered(nexus, key)
        res = self.reservation
        if res is None or res.type in _ALL_REGISTRANTS or res.holder != me:
            raise _Conflict
        if sark == 0:
            raise bad_param(8)
        if rel_port != my_rel_port:
            raise bad_param(18)
        target = split_nexus(nexus)[1]
        drid: RegId = (dest, target)
        if self.matches(drid, nexus):
            raise bad_param(24)  # moving to the I_T nexus the command came through
        if drid not in self.regs:
            if len(self.regs) >= MAX_REGISTRATIONS:
                raise illegal(INSUFFICIENT_REGISTRATION_RESOURCES)
            self.regs[drid] = sark
        res.holder = drid
        if unreg:
            del self.regs[me]
        self.aptpl = aptpl
        self.generation += 1
        return True

    # -- persistence ----------------------------------------------------------------------
    def to_bytes(self) -> bytes:
        res = self.reservation
        doc = {
            "version": _FORMAT_VERSION,
            "generation": self.generation,
            "aptpl": self.aptpl,
            "registrations": [[i, t, k] for (i, t), k in self.regs.items()],
            "reservation": None if res is None else
            {"holder": list(res.holder), "type": res.type, "scope": res.scope},
        }
        return json.dumps(doc, sort_keys=True).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> PrState:
        """The state ``to_bytes`` saved; ValueError for anything else."""
        try:
            doc = json.loads(data)
            if doc.get("version") != _FORMAT_VERSION:
                raise ValueError(f"unsupported PR state version {doc.get('version')!r}")
            st = cls()
            st.generation = int(doc["generation"]) & 0xFFFFFFFF
            st.aptpl = bool(doc["aptpl"])
            for i, t, k in doc["registrations"]:
                if not isinstance(i, str) or not (t is None or isinstance(t, str)):
                    raise ValueError("bad registration")
                st.regs[(i, t)] = int(k) & 0xFFFFFFFFFFFFFFFF
            r = doc["reservation"]
            if r is not None:
                holder = (str(r["holder"][0]), r["holder"][1])
                if holder not in st.regs or int(r["type"]) not in TYPES:
                    raise ValueError("reservation without a registered holder")
                st.reservation = Reservation(holder, int(r["type"]), int(r.get("scope", 0)))
        except (KeyError, TypeError, IndexError, AttributeError) as e:
            raise ValueError(f"malformed PR state: {e}") from None
        st._touch()
        st.persisted = True
        return st


def _check_scope_type(scope: int, rtype: int) -> None:
    if scope != 0:
        raise illegal(INVALID_FIELD_IN_CDB, 2, 7)
    if rtype not in TYPES:
        raise illegal(INVALID_FIELD_IN_CDB, 2, 3)


# -- TransportIDs (SPC-5 7.6.4.6, iSCSI) ------------------------------------------------
def transport_id(initiator: str) -> bytes:
    """An iSCSI TransportID: format 01b for an initiator port, 00b for a bare name."""
    fmt = 0x40 if ",i,0x" in initiator.lower() else 0x00
    name = initiator.encode("utf-8") + b"\x00"
    name += bytes(-len(name) % 4)
    if len(name) < 16:
        name = name.ljust(16, b"\x00")  # at least 20 bytes in all (SPC-5 7.6.4.6)
    return bytes((fmt | ISCSI_PROTOCOL_ID, 0)) + U16.pack(len(name)) + name


def parse_transport_ids(data: Any, start: int, end: int) -> list[str]:
    """Initiators named by the TransportIDs in ``data[start:end]``."""
    out: list[str] = []
    pos = start
    while pos < end:
        if end - pos < 4:
            raise illegal(PARAMETER_LIST_LENGTH_ERROR)
        b0 = data[pos]
        fmt = b0 >> 6
        if b0 & 0x0F != ISCSI_PROTOCOL_ID or fmt > 1:
            raise bad_param(pos)
        n = U16.unpack_from(data, pos + 2)[0]
        if pos + 4 + n > end:
            raise illegal(PARAMETER_LIST_LENGTH_ERROR)
        raw = bytes(data[pos + 4 : pos + 4 + n]).split(b"\x00", 1)[0]
        try:
            name = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise bad_param(pos + 4) from None
        if fmt == 1:
            parts = name.split(",")
            if len(parts) != 3 or parts[1].lower() != "i":
                raise bad_param(pos + 4)
            try:
                isid = int(parts[2], 16)
            except ValueError:
                raise bad_param(pos + 4) from None
            name = f"{parts[0]},i,0x{isid:012x}"  # the spelling session nexus strings use
        if not name:
            raise bad_param(pos + 4)
        out.append(name)
        pos += 4 + n
    return out


# -- command handlers -----------------------------------------------------------------
def reservation_conflict() -> ScsiResult:
    return ScsiResult(Status.RESERVATION_CONFLICT)


def _nexuses(lu: LogicalUnit, rid: RegId) -> Iterable[str]:
    init, tgt = rid
    if tgt is not None and ",i,0x" in init:
        return (f"{init},{tgt}",)
    return [n for n in lu.nexuses if PrState.matches(rid, n)]


def _notify(lu: LogicalUnit, notify: list[tuple[RegId, Asc]], skip: str) -> None:
    for rid, code in notify:
        for n in _nexuses(lu, rid):
            if n != skip:
                lu.raise_ua(code, only=n)


def _persist(lu: LogicalUnit) -> None:
    """Give the daemon the state to keep across power loss (APTPL), or tell it to drop it."""
    pr = lu.pr
    hook = lu.on_pr_change
    if hook is None or not (pr.aptpl or pr.persisted):
        return
    try:
        hook(pr.to_bytes() if pr.aptpl else None)
    except OSError as e:
        # The new state is in effect but could not be made persistent: say so.
        raise sense_for_errno(e.errno, True) from None
    pr.persisted = pr.aptpl


def persistent_reserve_out(target: ScsiTarget, lu: LogicalUnit, cmd: ScsiCommand) -> ScsiResult:
    cdb = cmd.cdb
    sa, scope, rtype = cdb[1] & 0x1F, cdb[2] >> 4, cdb[2] & 0x0F
    plen = U32.unpack_from(cdb, 5)[0]
    if plen < 24:
        raise illegal(PARAMETER_LIST_LENGTH_ERROR)
    data = data_out(cmd, plen)
    key = int.from_bytes(data[0:8], "big")
    sark = int.from_bytes(data[8:16], "big")
    pr = lu.pr
    nexus = cmd.nexus
    notify: list[tuple[RegId, Asc]] = []
    try:
        if sa == REGISTER_AND_MOVE:
            flags = data[17]
            tid_len = U32.unpack_from(data, 20)[0]
            if plen < 24 + tid_len:
                raise illegal(PARAMETER_LIST_LENGTH_ERROR)
            dests = parse_transport_ids(data, 24, 24 + tid_len)
            if len(dests) != 1:
                raise bad_param(20)
            changed = pr.register_and_move(nexus, key, sark, dests[0],
                                           U16.unpack_from(data, 18)[0],
                                           lu.params.relative_port, bool(flags & 0x02),
                                           bool(flags & 0x01))
        else:
            flags = data[20]
            spec_i_pt, all_tg_pt, aptpl = flags & 0x08, flags & 0x04, bool(flags & 0x01)
            specified: list[str] = []
            if spec_i_pt:
                if sa != REGISTER:
                    raise bad_param(20, 3)
                if plen < 28:
                    raise illegal(PARAMETER_LIST_LENGTH_ERROR)
                tid_len = U32.unpack_from(data, 24)[0]
                if plen != 28 + tid_len:
                    raise illegal(PARAMETER_LIST_LENGTH_ERROR)
                specified = parse_transport_ids(data, 28, 28 + tid_len)
            elif plen != 24:
                raise illegal(PARAMETER_LIST_LENGTH_ERROR)
            if sa in (REGISTER, REGISTER_AND_IGNORE):
                changed = pr.register(nexus, key, sark, sa == REGISTER_AND_IGNORE,
                                      bool(all_tg_pt), aptpl, specified, notify)
            elif sa == RESERVE:
                changed = pr.reserve(nexus, key, scope, rtype)
            elif sa == RELEASE:
                changed = pr.release(nexus, key, scope, rtype, notify)
            elif sa == CLEAR:
                changed = pr.clear(nexus, key, notify)
            elif sa in (PREEMPT, PREEMPT_AND_ABORT):
                victims = pr.preempt(nexus, key, sark, scope, rtype, notify)
                if sa == PREEMPT_AND_ABORT:
                    for rid in victims:
                        pr.pending_aborts.extend(_nexuses(lu, rid))
                    del pr.pending_aborts[:-MAX_PENDING_ABORTS]
                changed = True
            else:
                raise illegal(INVALID_FIELD_IN_CDB, 1, 4)
    except _Conflict:
        return reservation_conflict()
    _notify(lu, notify, nexus)
    if changed:
        _persist(lu)
    return ScsiResult(Status.GOOD)


def _read_keys(pr: PrState) -> bytes:
    keys = b"".join(k.to_bytes(8, "big") for k in pr.regs.values())
    return U32.pack(pr.generation) + U32.pack(len(keys)) + keys


def _read_reservation(pr: PrState) -> bytes:
    res = pr.reservation
    if res is None:
        return U32.pack(pr.generation) + U32.pack(0)
    key = 0 if res.type in _ALL_REGISTRANTS else pr.regs[res.holder]
    body = key.to_bytes(8, "big") + bytes(5) + bytes(((res.scope << 4) | res.type,)) + bytes(2)
    return U32.pack(pr.generation) + U32.pack(len(body)) + body


def _report_capabilities(pr: PrState) -> bytes:
    d = bytearray(8)
    d[1] = 8
    d[2] = 0x10 | 0x08 | 0x04 | 0x01  # CRH, SIP_C, ATP_C, PTPL_C
    # TMV; ALLOW COMMANDS 010b: TEST UNIT READY passes every reservation, MODE SENSE and
    # REPORT SUPPORTED OPERATION CODES do not pass write exclusive ones (see conflicts()).
    d[3] = 0x80 | (0x2 << 4) | (0x01 if pr.aptpl else 0)
    d[4] = 0x80 | 0x40 | 0x20 | 0x08 | 0x02  # WR_EX_AR, EX_AC_RO, WR_EX_RO, EX_AC, WR_EX
    d[5] = 0x01  # EX_AC_AR
    return bytes(d)


def _read_full_status(pr: PrState, lu: LogicalUnit) -> bytes:
    out = bytearray()
    res = pr.reservation
    for rid, key in pr.regs.items():
        holder = pr.holds(rid)
        tid = transport_id(rid[0])
        d = bytearray(24)
        d[0:8] = key.to_bytes(8, "big")
        d[12] = (0x02 if rid[1] is None else 0) | (0x01 if holder else 0)
        if holder and res is not None:
            d[13] = (res.scope << 4) | res.type
        d[18:20] = U16.pack(lu.params.relative_port & 0xFFFF)
        d[20:24] = U32.pack(len(tid))
        out += d + tid
    return U32.pack(pr.generation) + U32.pack(len(out)) + bytes(out)


def persistent_reserve_in(target: ScsiTarget, lu: LogicalUnit, cmd: ScsiCommand) -> ScsiResult:
    cdb = cmd.cdb
    sa, alloc = cdb[1] & 0x1F, U16.unpack_from(cdb, 7)[0]
    pr = lu.pr
    if sa == READ_KEYS:
        data = _read_keys(pr)
    elif sa == READ_RESERVATION:
        data = _read_reservation(pr)
    elif sa == REPORT_CAPABILITIES:
        data = _report_capabilities(pr)
    elif sa == READ_FULL_STATUS:
        data = _read_full_status(pr, lu)
    else:
        raise illegal(INVALID_FIELD_IN_CDB, 1, 4)
    return ScsiResult(Status.GOOD, data=alloc_cut(data, alloc))


def reserve(target: ScsiTarget, lu: LogicalUnit, cmd: ScsiCommand) -> ScsiResult:
    """RESERVE(6) / RESERVE(10) (SPC-2 7.21): a reservation of the whole LU, no extents and
    no third parties (the CDB table refuses those bits)."""
    try:
        lu.pr.legacy_reserve(cmd.nexus)
    except _Conflict:
        return reservation_conflict()
    return ScsiResult(Status.GOOD)


def release(target: ScsiTarget, lu: LogicalUnit, cmd: ScsiCommand) -> ScsiResult:
    try:
        lu.pr.legacy_release(cmd.nexus)
    except _Conflict:
        return reservation_conflict()
    return ScsiResult(Status.GOOD)
