"""SCSI tasks on an iSCSI connection: data transfer, responses and task management.

A ``Task`` gathers a write's data in one buffer: immediate data, unsolicited Data-Out up to
FirstBurstLength, then solicited bursts.  R2Ts are issued at most MaxOutstandingR2T at a time
and only while the connection's R2T byte budget allows, so the buffers a session makes us hold
are bounded by what the target chose to ask for, not by the EDTLs the initiator announces.
Responses go out as Data-In PDUs cut at the initiator's MaxRecvDataSegmentLength, with the F
bit at every MaxBurstLength and the status in the last one when there is no sense data.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections import deque
from typing import TYPE_CHECKING, Any

from .backends.base import DEFAULT_POOL, release_buffer
from .protocol.iscsi import pdu
from .protocol.block import BlockOp, BlockRequest
from .protocol.iscsi.pdu import RejectReason, TmfFunction, TmfResponse
from .protocol.scsi import shared
from .protocol.scsi.sense import CheckCondition
from .protocol.scsi.types import ScsiResult, Status

if TYPE_CHECKING:
    from .iscsi_conn import Connection

log = logging.getLogger("vsand.iscsi")

MAX_COMMAND_BYTES = 32 << 20
_NO_DATA = memoryview(b"")


def _sense(key: int, asc: int, ascq: int) -> bytes:
    return CheckCondition(key, (asc, ascq)).to_bytes()


class Task:
    __slots__ = ("conn", "pdu", "lun", "itt", "buf", "received", "unsol_end", "unsol_open",
                 "next_r2t", "r2ts", "r2tsn", "budget", "aborted", "runner", "oversize",
                 "executing", "done", "unsol_next", "unsol_datasn", "slot_held",
                 "__weakref__")

    def __init__(self, conn: Connection, cmd: pdu.ScsiCommandPdu, lun: int) -> None:
        self.conn = conn
        self.pdu = cmd
        self.lun = lun
        self.itt = cmd.itt
        self.buf: memoryview | None = None
        self.received = 0
        self.unsol_end = 0
        self.unsol_open = False
        self.next_r2t = 0
        self.r2ts: dict[int, list[int]] = {}  # ttt -> [next offset, end offset, next DataSN]
        self.unsol_next = len(cmd.data)
        self.unsol_datasn = 0
        self.slot_held = True
        self.r2tsn = 0
        self.budget = 0
        self.aborted = False
        self.runner: asyncio.Task[None] | None = None
        self.oversize = cmd.write and cmd.edtl > MAX_COMMAND_BYTES
        self.executing = False
        self.done = False

    # ------------------------------------------------------------------ data gathering
    def start(self) -> None:
        cmd = self.pdu
        if not cmd.write or cmd.edtl == 0:
            self._run()
            return
        p = self.conn.params
        assert p is not None
        imm = len(cmd.data)
        if p.initial_r2t or cmd.final:
            self.unsol_end = imm
        else:
            self.unsol_end = min(p.first_burst_length, cmd.edtl)
            self.unsol_open = self.unsol_end > imm
        self.next_r2t = self.unsol_end
        if imm:
            if not self.oversize:
                self._ensure_buffer()
                assert self.buf is not None
                self.buf[:imm] = cmd.data
            self.received = imm
            # The immediate data is a view into the receive buffer: let it go now that it is
            # copied, so the receive buffer can be reused in place.
            cmd.data = _NO_DATA
        self._progress()

    def _ensure_buffer(self) -> None:
        # From the pool: no zeroing and no fresh pages per write.  Its stale bytes are never
        # seen: the command gets only the first ``received`` bytes, all written by Data-Out.
        if self.buf is None:
            self.buf = DEFAULT_POOL.acquire(self.pdu.edtl)

    def data_view(self) -> memoryview | None:
        return self.buf[:self.received] if self.buf is not None else None

    def on_data(self, msg: pdu.DataOut, bhs: bytes) -> None:
        n = len(msg.data)
        off = msg.offset
        if msg.ttt == pdu.RESERVED_TAG:
            if not self.unsol_open or off != self.unsol_next or off + n > self.unsol_end:
                self._sequence_error(bhs, "unsolicited Data-Out out of place")
                return
            if msg.datasn != self.unsol_datasn:
                self._sequence_error(bhs, f"DataSN {msg.datasn}, expected {self.unsol_datasn}")
                return
            self.unsol_next = off + n
            self.unsol_datasn += 1
            if msg.final:
                self.unsol_open = False
                # An initiator may end its unsolicited burst short of FirstBurstLength; the
                # R2Ts then start where its data stopped.
                self.next_r2t = self.unsol_next
        else:
            seq = self.r2ts.get(msg.ttt)
            if seq is None or off != seq[0] or off + n > seq[1]:
                self._sequence_error(bhs, "Data-Out does not match an outstanding R2T")
                return
            if msg.datasn != seq[2]:
                self._sequence_error(bhs, f"DataSN {msg.datasn}, expected {seq[2]}")
                return
            seq[0] = off + n
            seq[2] += 1
            if msg.final or seq[0] == seq[1]:
                if seq[0] != seq[1] or not msg.final:
                    self._sequence_error(bhs, "R2T sequence ended early or without F bit")
                    return
                del self.r2ts[msg.ttt]
        if n:
            if not self.oversize:
                self._ensure_buffer()
                assert self.buf is not None
                self.buf[off:off + n] = msg.data
            self.received += n
        self._progress()

    def _sequence_error(self, bhs: bytes, why: str) -> None:
        # ErrorRecoveryLevel 0 has no within-command recovery: the data of this command can no
        # longer be trusted, so the PDU is rejected and the command ends at once with ABORTED
        # COMMAND / DATA PHASE ERROR; data still in flight for it is dropped as for an aborted
        # task.  Other commands on the connection are unaffected.
        self.conn._reject(RejectReason.PROTOCOL_ERROR, bhs, why)
        if not self.executing:
            self.executing = True
            self.respond(ScsiResult(Status.CHECK_CONDITION, _sense(0x0B, 0x4B, 0x00)))

    def _progress(self) -> None:
        if self.aborted or self.executing:
            return
        cmd = self.pdu
        if self.received >= cmd.edtl and not self.r2ts and not self.unsol_open:
            self._run()
            return
        if self.unsol_open:
            return  # R2Ts follow once the unsolicited burst is over: keeps sequences simple
        if self.oversize:
            if not self.r2ts:
                self._run()
            return
        self.conn.tasks.solicit(self)

    def issue_r2ts(self) -> bool:
        """Send R2Ts up to MaxOutstandingR2T; False when the budget stops us."""
        conn = self.conn
        p = conn.params
        assert p is not None
        edtl = self.pdu.edtl
        if self.budget == 0:
            if conn.r2t_budget < edtl and conn.tasks.budget_users:
                return False
            conn.r2t_budget -= edtl
            self.budget = edtl
            conn.tasks.budget_users += 1
        self._ensure_buffer()
        while self.next_r2t < edtl and len(self.r2ts) < p.max_outstanding_r2t:
            off = self.next_r2t
            length = min(p.max_burst_length, edtl - off)
            ttt = conn.tasks.new_ttt()
            self.r2ts[ttt] = [off, off + length, 0]
            self.next_r2t = off + length
            exp, mx = conn.window()
            conn.send(pdu.r2t(self.itt, self.pdu.lun, ttt, conn.statsn, exp, mx, self.r2tsn,
                              off, length))
            self.r2tsn += 1
        return True

    def _run(self) -> None:
        self.executing = True
        if self.oversize:
            self.respond(ScsiResult(Status.CHECK_CONDITION, _sense(0x05, 0x24, 0x00)))
            return
        self.conn.execute(self)

    # ------------------------------------------------------------------ responses
    def respond(self, result: ScsiResult, write_residual: int = 0) -> None:
        conn = self.conn
        data = result.data
        if self.aborted or conn.closed:
            release_buffer(data)
            self.finish()
            return
        p = conn.params
        assert p is not None
        self.release_slot()
        cmd = self.pdu
        edtl = cmd.edtl
        status = result.status
        sense = result.sense
        avail = len(data) if data is not None else 0
        # Residuals compare what the command moved with the EDTL: for Data-In the bytes the
        # command produced; for a write the SCSI layer consumed what it needed of the buffer.
        residual = write_residual if (cmd.write and not cmd.read) else edtl - avail
        n = min(avail, edtl) if cmd.read else 0
        expdatasn = self.r2tsn
        if n:
            assert data is not None
            collapse = sense is None and status == Status.GOOD
            datasn = send_data_in(conn, self.itt, cmd.lun, data, n,
                                  status if collapse else None, residual)
            if collapse:
                self.finish()
                return
            expdatasn = datasn
        else:
            release_buffer(data)
        payload = None
        if sense:
            payload = len(sense).to_bytes(2, "big") + sense
        exp, mx = conn.window()
        conn.send(pdu.scsi_response(self.itt, status, conn.next_statsn(), exp, mx,
                                    residual, len(payload) if payload else 0,
                                    expdatasn=expdatasn), payload)
        self.finish()

    def release_slot(self) -> None:
        """Free this command's CmdSN window slot, before its status is built so that the
        MaxCmdSN the status carries already counts the slot as free."""
        if self.slot_held:
            self.slot_held = False
            self.conn.complete(self)

    def finish(self) -> None:
        if self.done:
            return
        self.done = True
        self.release_slot()
        self.conn.tasks.remove(self)


def send_data_in(conn: Connection, itt: int, lunf: int, data: Any, n: int,
                 status: int | None, residual: int) -> int:
    """Queue ``n`` bytes of ``data`` as Data-In PDUs; returns how many were sent.

    Segments follow the initiator's MaxRecvDataSegmentLength, the F bit closes every
    MaxBurstLength sequence, and a ``status`` rides in the last PDU (phase collapse).  The
    pooled buffer is released once the transport no longer holds it.
    """
    p = conn.params
    assert p is not None
    view = data if type(data) is memoryview else memoryview(data)
    seg = p.max_send_dsl
    burst = p.max_burst_length
    off = 0
    datasn = 0
    while off < n:
        length = min(seg, n - off, burst - (off % burst))
        last = off + length >= n
        exp, mx = conn.window()
        if last and status is not None:
            hdr = pdu.data_in(itt, lunf, datasn, off, length, True, status,
                              conn.next_statsn(), exp, mx, residual)
        else:
            end_of_burst = last or (off + length) % burst == 0
            hdr = pdu.data_in(itt, lunf, datasn, off, length, end_of_burst, None, 0, exp, mx, 0)
        conn.send(hdr, view if length == len(view) else view[off:off + length],
                  data if last else None)
        off += length
        datasn += 1
    return datasn


class TaskTable:
    def __init__(self) -> None:
        self._tasks: dict[int, Task] = {}
        self._ttt = 0
        self.budget_users = 0
        self._waiting: deque[Task] = deque()
        self._idle: asyncio.Event | None = None

    def __len__(self) -> int:
        return len(self._tasks)

    def __contains__(self, itt: int) -> bool:
        return itt in self._tasks

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(list(self._tasks.values()))

    def get(self, itt: int) -> Task | None:
        return self._tasks.get(itt)

    def add(self, task: Task) -> None:
        self._tasks[task.itt] = task

    def new_ttt(self) -> int:
        self._ttt = (self._ttt + 1) & 0x7FFFFFFF
        return self._ttt

    def solicit(self, task: Task) -> None:
        if task in self._waiting:
            return
        if not task.issue_r2ts():
            self._waiting.append(task)

    def remove(self, task: Task) -> None:
        if self._tasks.get(task.itt) is task:
            del self._tasks[task.itt]
        if task.budget:
            task.conn.r2t_budget += task.budget
            task.budget = 0
            self.budget_users -= 1
            self._wake_waiting()
        if task.buf is not None:
            # Recycled only if nothing still holds a view of it (the pool checks).
            release_buffer(task.buf)
            task.buf = None
        if self._waiting and task in self._waiting:
            self._waiting.remove(task)
        if not self._tasks and self._idle is not None:
            self._idle.set()

    def _wake_waiting(self) -> None:
        while self._waiting:
            task = self._waiting[0]
            if task.done or task.aborted:
                self._waiting.popleft()
                continue
            if not task.issue_r2ts():
                break
            self._waiting.popleft()

    def data_out(self, conn: Connection, msg: pdu.DataOut, bhs: bytes) -> None:
        task = self._tasks.get(msg.itt)
        if task is None:
            # Data for a task that was aborted is discarded silently (RFC 7143 §11.7).
            log.debug("%s: Data-Out for unknown ITT 0x%08x dropped", conn.peer, msg.itt)
            return
        if not task.pdu.write or task.executing:
            conn._reject(RejectReason.PROTOCOL_ERROR, bhs,
                         f"Data-Out for ITT 0x{msg.itt:08x} that expects none")
            return
        task.on_data(msg, bhs)

    async def drain(self) -> None:
        """Wait until every task of this connection has finished."""
        while self._tasks:
            self._idle = asyncio.Event()
            await self._idle.wait()
        self._idle = None

    def abort(self, task: Task) -> asyncio.Task[None] | None:
        """Abort ``task``; returns the runner to wait for when the command is executing."""
        task.aborted = True
        runner = task.runner
        if runner is not None and not runner.done():
            return runner
        task.finish()
        return None

    def abort_all(self) -> None:
        for task in list(self._tasks.values()):
            self.abort(task)


class TmfHandler:
    """Task management functions (RFC 7143 §11.5), at ErrorRecoveryLevel 0."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn

    def handle(self, msg: pdu.TaskMgmtRequest) -> None:
        conn = self.conn
        fn = msg.function
        lun = pdu.decode_lun(msg.lun)
        target = conn.target
        view = conn.view
        if target is None or view is None:
            self._respond(msg, TmfResponse.REJECTED)
            return
        waits: list[asyncio.Task[None]] = []
        response = TmfResponse.COMPLETE
        after = None
        replicated = False  # ``after`` returns an awaitable: the reset goes through the mirror
        if fn == TmfFunction.ABORT_TASK:
            task = conn.tasks.get(msg.rtt)
            if task is None or task.lun != lun:
                s = conn.session
                # RFC 7143 §11.5.1: a task whose CmdSN is still in the window may simply not
                # have arrived yet; it counts as aborted, so "function complete".
                if s is not None and not task and self._refcmdsn_pending(msg.refcmdsn):
                    response = TmfResponse.COMPLETE
                else:
                    response = TmfResponse.NO_TASK
            else:
                waits += self._abort([task])
        elif fn in (TmfFunction.ABORT_TASK_SET, TmfFunction.CLEAR_TASK_SET):
            if lun not in view.luns:  # LUNs masked from this session do not exist
                response = TmfResponse.NO_LUN
            elif fn == TmfFunction.ABORT_TASK_SET:
                waits += self._abort([t for t in conn.tasks if t.lun == lun and t.itt != msg.itt])
            else:
                waits += self._abort_everywhere(target, lun)
        elif fn == TmfFunction.LOGICAL_UNIT_RESET:
            if lun not in view.luns:  # LUNs masked from this session do not exist
                response = TmfResponse.NO_LUN
            else:
                waits += self._abort_everywhere(target, lun)
                unit = view.luns[lun]
                replicated = unit.mirror is not None
                if replicated:
                    # Every replica resets (and raises 29/03) at the same point of the order.
                    record = shared.encode_lu_reset(conn.session.nexus)
                    after = lambda: unit.execute_block(  # noqa: E731
                        BlockRequest(BlockOp.STATE, data=record))
                else:
                    after = lambda: target.scsi.lun_reset(lun, conn.session.nexus)  # noqa: E731
        elif fn in (TmfFunction.TARGET_WARM_RESET, TmfFunction.TARGET_COLD_RESET):
            waits += self._abort_everywhere(target, None)
            # Only the LUNs this session can see: a masked LUN is not part of its target.
            after = lambda: view.scsi.target_reset(conn.session.nexus)  # noqa: E731
        elif fn == TmfFunction.CLEAR_ACA:
            response = TmfResponse.NOT_SUPPORTED
        elif fn == TmfFunction.TASK_REASSIGN:
            response = TmfResponse.REASSIGN_NOT_SUPPORTED
        else:
            response = TmfResponse.REJECTED
        log.info("%s: task management function %d on LUN %d: %s", conn.peer, fn, lun,
                 TmfResponse(response).name)
        cold = fn == TmfFunction.TARGET_COLD_RESET

        async def finish() -> None:
            if waits:
                await asyncio.gather(*waits, return_exceptions=True)
            if after is not None:
                done = after()
                if inspect.isawaitable(done):
                    try:
                        await done
                    except OSError as e:
                        log.warning("%s: LUN %d reset not applied on every replica: %s",
                                    conn.peer, lun, e)
            self._respond(msg, response)
            if cold and response == TmfResponse.COMPLETE:
                for c in list(conn.registry.connections):
                    if c.target is target and c is not conn:
                        c.close()
                conn.close_after_flush()

        if waits or cold or replicated:
            asyncio.get_event_loop().create_task(finish())
        else:
            if after is not None:
                after()
            self._respond(msg, response)

    def _refcmdsn_pending(self, refcmdsn: int) -> bool:
        s = self.conn.session
        assert s is not None
        from .session import sn_le
        return sn_le(s.exp_cmdsn, refcmdsn) and sn_le(refcmdsn, s.max_cmdsn)

    def _abort(self, tasks: list[Task]) -> list[asyncio.Task[None]]:
        waits = []
        for t in tasks:
            r = t.conn.tasks.abort(t)
            if r is not None:
                waits.append(r)
        return waits

    def _abort_everywhere(self, target: Any, lun: int | None) -> list[asyncio.Task[None]]:
        waits: list[asyncio.Task[None]] = []
        visible = self.conn.view.luns if self.conn.view is not None else {}
        for c in list(self.conn.registry.connections):
            if c.target is not target:
                continue
            # A target reset reaches only the LUNs the resetting session can see.
            waits += self._abort([t for t in c.tasks if t.lun == lun
                                  or (lun is None and t.lun in visible)])
        return waits

    def _respond(self, msg: pdu.TaskMgmtRequest, response: int) -> None:
        conn = self.conn
        exp, mx = conn.window()
        conn.send(pdu.task_mgmt_response(msg.itt, response, conn.next_statsn(), exp, mx))
