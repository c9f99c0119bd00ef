"""The SCSI target device: LUN map, command table, dispatch, unit attentions, task management.

Theory of operation: ``execute`` looks the opcode (and service action) up in one table,
reports a pending unit attention instead of running the command when SPC-5 5.14 says so,
checks the CDB against the table row (length, reserved bits, CONTROL byte), and calls the
handler.  Every ``CheckCondition`` raised on the way becomes a CHECK CONDITION result here;
nothing else escapes.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from . import alua, pr, sbc, shared, spc, xcopy
from ..block import BlockOp, BlockRequest
from .cdb import OpSpec, check_cdb
from .sense import (
    BUS_DEVICE_RESET_FUNCTION_OCCURRED,
    I_T_NEXUS_LOSS_OCCURRED,
    INVALID_COMMAND_OPERATION_CODE,
    INVALID_FIELD_IN_CDB,
    LU_NOT_SUPPORTED,
    POWER_ON_RESET,
    REPORTED_LUNS_DATA_HAS_CHANGED,
    UNIT_ATTENTION,
    CheckCondition,
    illegal,
)
from .types import ScsiCommand, ScsiResult, ScsiTask, Status
from .unit import LogicalUnit

_CC = Status.CHECK_CONDITION


def _u(*parts: int | tuple[int, ...]) -> bytes:
    out = bytearray()
    for p in parts:
        out += bytes(p) if isinstance(p, tuple) else bytes((p,))
    return bytes(out)


LBA4, LBA8, N2, N4 = (0xFF,) * 4, (0xFF,) * 8, (0xFF,) * 2, (0xFF,) * 4
GRP = 0x1F  # GROUP NUMBER: accepted and ignored
CTL = 0x00  # CONTROL: no bit supported (NACA and LINK are refused)
RD = 0xFE  # RDPROTECT, DPO, FUA, RARC, FUA_NV
WR = 0xFA  # WRPROTECT, DPO, FUA, FUA_NV
VR = 0xF6  # VRPROTECT/WRPROTECT, DPO, BYTCHK

# PERSISTENT RESERVE IN / OUT, one row per service action.  REPORT CAPABILITIES passes even
# an SPC-2 reservation (class "a"); the rest conflict with one (SPC-5 5.14.3).
_PRIN = ("READ KEYS", "READ RESERVATION", "REPORT CAPABILITIES", "READ FULL STATUS")
_PROUT = ("REGISTER", "RESERVE", "RELEASE", "CLEAR", "PREEMPT", "PREEMPT AND ABORT",
          "REGISTER AND IGNORE EXISTING KEY", "REGISTER AND MOVE")
PR_SPECS: tuple[OpSpec, ...] = (
    *(OpSpec(f"PERSISTENT RESERVE IN {n}", pr.persistent_reserve_in,
             _u(0x5E, sa, 0, 0, 0, 0, 0, N2, CTL), sa=sa, pr="a" if sa == 2 else "P")
      for sa, n in enumerate(_PRIN)),
    *(OpSpec(f"PERSISTENT RESERVE OUT {n}", pr.persistent_reserve_out,
             _u(0x5F, sa, 0xFF, 0, 0, N4, CTL), sa=sa, pr="P")
      for sa, n in enumerate(_PROUT)),
)

# The table.  The CDB usage data doubles as the reserved-bit mask (see OpSpec).
SPECS: tuple[OpSpec, ...] = (
    OpSpec("TEST UNIT READY", spc.test_unit_ready, _u(0x00, 0, 0, 0, 0, CTL), pr="A"),
    OpSpec("REQUEST SENSE", spc.request_sense, _u(0x03, 0x01, 0, 0, 0xFF, CTL),
           no_lu=True, ua_exempt=True, pr="a"),
    OpSpec("READ(6)", sbc.read6, _u(0x08, 0x1F, 0xFF, 0xFF, 0xFF, CTL), pr="R"),
    OpSpec("WRITE(6)", sbc.write6, _u(0x0A, 0x1F, 0xFF, 0xFF, 0xFF, CTL)),
    OpSpec("INQUIRY", spc.inquiry, _u(0x12, 0x01, 0xFF, 0xFF, 0xFF, CTL),
           no_lu=True, ua_exempt=True, pr="a"),
    OpSpec("MODE SELECT(6)", spc.mode_select6, _u(0x15, 0x11, 0, 0, 0xFF, CTL)),
    # SPC-2 reservations of the whole LU: no extents, no third-party bits.
    OpSpec("RESERVE(6)", pr.reserve, _u(0x16, 0, 0, 0, 0, CTL), pr="L"),
    OpSpec("RELEASE(6)", pr.release, _u(0x17, 0, 0, 0, 0, CTL), pr="L"),
    OpSpec("MODE SENSE(6)", spc.mode_sense6, _u(0x1A, 0x08, 0xFF, 0xFF, 0xFF, CTL)),
    OpSpec("START STOP UNIT", spc.start_stop_unit, _u(0x1B, 0x01, 0, 0x0F, 0xF7, CTL),
           pr="S"),
    OpSpec("READ CAPACITY(10)", sbc.read_capacity10, _u(0x25, 0, LBA4, 0, 0, 0x01, CTL),
           pr="A"),
    OpSpec("READ(10)", sbc.read10, _u(0x28, RD, LBA4, GRP, N2, CTL), pr="R"),
    OpSpec("WRITE(10)", sbc.write10, _u(0x2A, WR, LBA4, GRP, N2, CTL)),
    OpSpec("WRITE AND VERIFY(10)", sbc.write_and_verify, _u(0x2E, VR, LBA4, GRP, N2, CTL)),
    OpSpec("VERIFY(10)", sbc.verify, _u(0x2F, VR, LBA4, GRP, N2, CTL), pr="R"),
    OpSpec("PRE-FETCH(10)", sbc.prefetch, _u(0x34, 0x02, LBA4, GRP, N2, CTL), pr="R"),
    OpSpec("SYNCHRONIZE CACHE(10)", sbc.synchronize_cache, _u(0x35, 0x06, LBA4, GRP, N2, CTL)),
    OpSpec("WRITE SAME(10)", sbc.write_same10, _u(0x41, 0xF8, LBA4, GRP, N2, CTL)),
    OpSpec("UNMAP", sbc.unmap, _u(0x42, 0x01, 0, 0, 0, 0, GRP, N2, CTL), thin_only=True),
    OpSpec("MODE SELECT(10)", spc.mode_select10, _u(0x55, 0x11, 0, 0, 0, 0, 0, N2, CTL)),
    OpSpec("RESERVE(10)", pr.reserve, _u(0x56, 0, 0, 0, 0, 0, 0, 0, 0, CTL), pr="L"),
    OpSpec("RELEASE(10)", pr.release, _u(0x57, 0, 0, 0, 0, 0, 0, 0, 0, CTL), pr="L"),
    OpSpec("MODE SENSE(10)", spc.mode_sense10, _u(0x5A, 0x18, 0xFF, 0xFF, 0, 0, 0, N2, CTL)),
    *PR_SPECS,
    OpSpec("EXTENDED COPY(LID1)", xcopy.extended_copy,
           _u(0x83, 0x00, 0, 0, 0, 0, 0, 0, 0, 0, N4, 0, CTL), sa=0x00, timeout=120),
    *(OpSpec(f"RECEIVE COPY RESULTS {n}", xcopy.receive_copy_results,
             _u(0x84, sa, 0xFF, 0, 0, 0, 0, 0, 0, 0, N4, 0, CTL), sa=sa, pr="A")
      for sa, n in ((0x00, "COPY STATUS"), (0x01, "RECEIVE DATA"),
                    (0x03, "OPERATING PARAMETERS"), (0x04, "FAILED SEGMENT DETAILS"))),
    OpSpec("READ(16)", sbc.read16, _u(0x88, RD, LBA8, N4, GRP, CTL), pr="R"),
    OpSpec("COMPARE AND WRITE", sbc.compare_and_write,
           _u(0x89, WR, LBA8, 0, 0, 0, 0xFF, GRP, CTL)),
    OpSpec("WRITE(16)", sbc.write16, _u(0x8A, WR, LBA8, N4, GRP, CTL)),
    OpSpec("ORWRITE(16)", sbc.orwrite, _u(0x8B, WR, LBA8, N4, GRP, CTL)),
    OpSpec("WRITE AND VERIFY(16)", sbc.write_and_verify, _u(0x8E, VR, LBA8, N4, GRP, CTL)),
    OpSpec("VERIFY(16)", sbc.verify, _u(0x8F, VR, LBA8, N4, GRP, CTL), pr="R"),
    OpSpec("PRE-FETCH(16)", sbc.prefetch, _u(0x90, 0x02, LBA8, N4, GRP, CTL), pr="R"),
    OpSpec("SYNCHRONIZE CACHE(16)", sbc.synchronize_cache, _u(0x91, 0x06, LBA8, N4, GRP, CTL)),
    OpSpec("WRITE SAME(16)", sbc.write_same16, _u(0x93, 0xF9, LBA8, N4, GRP, CTL)),
    OpSpec("READ CAPACITY(16)", sbc.read_capacity16, _u(0x9E, 0x10, LBA8, N4, 0x01, CTL),
           sa=0x10, pr="A"),
    OpSpec("GET LBA STATUS", sbc.get_lba_status, _u(0x9E, 0x12, LBA8, N4, 0x03, CTL),
           sa=0x12, thin_only=True, pr="R"),
    OpSpec("REPORT LUNS", spc.report_luns, _u(0xA0, 0, 0xFF, 0, 0, 0, N4, 0, CTL),
           no_lu=True, ua_exempt=True, pr="a"),
    OpSpec("REPORT TARGET PORT GROUPS", spc.report_target_port_groups,
           _u(0xA3, 0xEA, 0, 0, 0, 0, N4, 0, CTL), sa=0x0A, pr="A"),
    OpSpec("REPORT SUPPORTED OPERATION CODES", spc.report_supported_opcodes,
           _u(0xA3, 0x0C, 0x87, 0xFF, 0xFF, 0xFF, N4, 0, CTL), sa=0x0C),
    OpSpec("READ(12)", sbc.read12, _u(0xA8, RD, LBA4, N4, GRP, CTL), pr="R"),
    OpSpec("WRITE(12)", sbc.write12, _u(0xAA, WR, LBA4, N4, GRP, CTL)),
    OpSpec("WRITE AND VERIFY(12)", sbc.write_and_verify, _u(0xAE, VR, LBA4, N4, GRP, CTL)),
    OpSpec("VERIFY(12)", sbc.verify, _u(0xAF, VR, LBA4, N4, GRP, CTL), pr="R"),
)


def _build_table(specs: Iterable[OpSpec]) -> dict[int, Any]:
    table: dict[int, Any] = {}
    for s in specs:
        op = s.usage[0]
        if s.sa is None:
            table[op] = s
        else:
            table.setdefault(op, {})[s.sa] = s
    return table


# opcode -> OpSpec, or for opcodes with service actions: opcode -> {service action: OpSpec}
TABLE: dict[int, Any] = _build_table(SPECS)


def _check_condition(e: CheckCondition) -> ScsiResult:
    return ScsiResult(_CC, e.to_bytes())


def _replicated(blob: bytes) -> ScsiTask:
    result = yield BlockRequest(BlockOp.STATE, data=blob)
    return result  # type: ignore[no-any-return]


class ScsiTarget:
    """A SCSI target device: the LUNs one iSCSI target exposes, keyed by LUN number."""

    def __init__(self, luns: dict[int, LogicalUnit] | None = None) -> None:
        self.luns: dict[int, LogicalUnit] = dict(luns or {})
        self._nexuses: set[str] = set()
        self.copy_manager = xcopy.CopyManager()  # EXTENDED COPY list IDs per nexus

    # -- command execution ----------------------------------------------------------------
    def execute(self, cmd: ScsiCommand) -> ScsiResult | ScsiTask:
        cdb = cmd.cdb
        try:
            if not cdb:
                raise illegal(INVALID_COMMAND_OPERATION_CODE, 0)
            spec = TABLE.get(cdb[0])
            sa_error: CheckCondition | None = None
            if type(spec) is dict:
                spec = spec.get(cdb[1] & 0x1F) if len(cdb) > 1 else None
                if spec is None:
                    # Unsupported service action of a supported opcode (SPC-5 4.2.5.1).
                    sa_error = illegal(INVALID_FIELD_IN_CDB, 1, 4)
            lu = self.luns.get(cmd.lun)
            nexus = cmd.nexus
            if nexus not in self._nexuses:
                self._attach(nexus)
            if lu is None:
                if spec is None or not spec.no_lu:
                    raise illegal(LU_NOT_SUPPORTED)
            elif lu.ua and (spec is None or not spec.ua_exempt):
                ua = lu.pop_ua(nexus)
                if ua is not None:
                    return _check_condition(CheckCondition(UNIT_ATTENTION, ua))
            if lu is not None and lu.alua_state not in alua.ACTIVE:
                alua.check_access(lu, cdb)
            if spec is None:
                raise sa_error or illegal(INVALID_COMMAND_OPERATION_CODE, 0)
            check_cdb(spec, cdb)
            if spec.thin_only and lu is not None and not lu.params.thin:
                raise illegal(INVALID_COMMAND_OPERATION_CODE, 0)
            if lu is not None and lu.pr.active and lu.pr.conflicts(nexus, spec.pr, cdb):
                return ScsiResult(Status.RESERVATION_CONFLICT)
            if lu is not None and lu.shared and cdb[0] in shared.SHARED_OPCODES:
                return _replicated(shared.encode_command(cmd))
            return spec.handler(self, lu, cmd)  # type: ignore[no-any-return]
        except CheckCondition as e:
            return _check_condition(e)

    def apply_shared(self, lun: int, blob: bytes | bytearray | memoryview) -> ScsiResult:
        """Apply a shared state change (``shared.decode``) to LU ``lun`` of this replica.

        The reservation check runs again here, against this replica's state at this point of
        the LUN's order: the check where the command arrived ran earlier and decides nothing.
        """
        lu = self.luns.get(lun)
        if lu is None:
            raise ValueError(f"shared state change for LUN {lun}, which is not here")
        kind, nexus, cdb, data = shared.decode(blob)
        if kind == shared.LU_RESET:
            self.lun_reset(lun, nexus)
            return ScsiResult(Status.GOOD)
        spec = TABLE.get(cdb[0])
        if type(spec) is dict:
            spec = spec.get(cdb[1] & 0x1F) if len(cdb) > 1 else None
        if spec is None:
            raise ValueError(f"shared state change with CDB {cdb.hex()}")
        try:
            if lu.pr.active and lu.pr.conflicts(nexus, spec.pr, cdb):
                return ScsiResult(Status.RESERVATION_CONFLICT)
            cmd = ScsiCommand(cdb, lun, nexus, data, len(data))
            return spec.handler(self, lu, cmd)  # type: ignore[no-any-return]
        except CheckCondition as e:
            return _check_condition(e)

    def data_out_length(self, cmd: ScsiCommand) -> int | None:
        """Bytes of Data-Out the CDB asks for (SPDTL), for residual counts; None if none."""
        lu = self.luns.get(cmd.lun)
        if lu is None or not cmd.cdb:
            return None
        return sbc.data_out_length(cmd.cdb[0], cmd.cdb, lu)

    def supported(self, lu: LogicalUnit | None) -> list[OpSpec]:
        """The commands this LU implements, for REPORT SUPPORTED OPERATION CODES."""
        thin = lu is not None and lu.params.thin
        return [s for s in SPECS if thin or not s.thin_only]

    # -- LUN map --------------------------------------------------------------------------
    def attach(self, nexus: str) -> None:
        """Make ``nexus`` known (for unit attentions) before any command of it runs, so a
        transport's fast path may skip ``execute``."""
        # Called once per login: a new session is a new nexus, whose list IDs are free again.
        self.copy_manager.forget(nexus)
        if nexus not in self._nexuses:
            self._attach(nexus)

    def _attach(self, nexus: str) -> None:
        self._nexuses.add(nexus)
        for lu in self.luns.values():
            lu.attach(nexus)

    def add_lun(self, n: int, lu: LogicalUnit) -> None:
        self.luns[n] = lu
        for nexus in self._nexuses:
            lu.attach(nexus)
        self._luns_changed(skip=lu)

    def remove_lun(self, n: int) -> None:
        if self.luns.pop(n, None) is not None:
            self._luns_changed()

    def _luns_changed(self, skip: LogicalUnit | None = None) -> None:
        # SPC-5 6.33: every nexus learns of the new inventory on whichever LU it talks to next.
        for lu in self.luns.values():
            if lu is not skip:
                lu.raise_ua(REPORTED_LUNS_DATA_HAS_CHANGED)

    def clear_reported_luns_ua(self, nexus: str) -> None:
        for lu in self.luns.values():
            lu.clear_ua(nexus, REPORTED_LUNS_DATA_HAS_CHANGED)

    # -- task management and nexus events -------------------------------------------------
    def lun_reset(self, lun: int, nexus: str) -> None:
        """LOGICAL UNIT RESET (SAM-5 7.7): defaults restored, 29/03 for every nexus.

        The issuing nexus gets the unit attention too: the reset changed state (mode pages,
        reservations) that it may have set itself, possibly through another path; libiscsi's
        MultipathIO.Reset checks it on every path.
        """
        lu = self.luns.get(lun)
        if lu is not None:
            lu.reset_mode_pages()
            lu.pr.drop_legacy()  # SPC-2 reservations end with a reset; persistent ones stay
            lu.raise_ua(BUS_DEVICE_RESET_FUNCTION_OCCURRED)

    def target_reset(self, nexus: str) -> None:
        """TARGET (WARM) RESET: a hard reset of every LU (SAM-5 6.3.2), 29/00 for the others."""
        for lu in self.luns.values():
            lu.reset_mode_pages()
            lu.pr.drop_legacy()
            lu.raise_ua(POWER_ON_RESET, exclude=nexus)

    def nexus_lost(self, nexus: str) -> None:
        """I_T nexus loss (SAM-5 6.3.4): older UAs are moot; 29/07 waits for its return."""
        self.copy_manager.forget(nexus)
        for lu in self.luns.values():
            lu.clear_ua(nexus)
            lu.pr.drop_legacy(nexus)
            lu.raise_ua(I_T_NEXUS_LOSS_OCCURRED, only=nexus)

    def nexus_closed(self, nexus: str) -> None:
        """The I_T nexus ended cleanly (iSCSI logout): its SPC-2 reservations end with it;
        registrations and persistent reservations outlive it (SPC-5 5.14.1)."""
        for lu in self.luns.values():
            lu.pr.drop_legacy(nexus)
