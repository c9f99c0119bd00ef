"""One iSCSI connection: the asyncio Protocol that carries a login and then a session.

Theory of operation.  Bytes from the socket go to a sans-IO ``PduReader``; each whole PDU is
decoded and handled in arrival order.  During login the ``LoginMachine`` answers; afterwards
SCSI commands become ``Task``s: write data is gathered (immediate, unsolicited, then solicited
with R2Ts within MaxOutstandingR2T and MaxBurstLength) into one buffer, the command runs as an
asyncio task against the LUN, and the answer is queued.  Everything queued during one pass of the
event loop goes out in a single ``writelines`` call: batching output is what keeps per-I/O CPU
low.  StatSN, ExpCmdSN and MaxCmdSN are read when a PDU is built, so they are always current.
"""

from __future__ import annotations

import asyncio
import logging
import struct
import time
from typing import TYPE_CHECKING, Any

from .backends.base import release_buffer
from .protocol.iscsi import pdu
from .protocol.iscsi.framing import DigestError, PduReader, frame
from .protocol.iscsi.pdu import PduError, RejectReason
from .protocol.iscsi.login import LoginMachine, SessionParams, TargetInfo
from .protocol.iscsi.text import TextHandler
from .protocol.scsi.types import ScsiCommand
from .session import Session
from .iscsi_tasks import Task, TaskTable, TmfHandler, send_data_in
from .lun import NOT_DONE, Lun
from .protocol.block import BlockOp
from .protocol.scsi.sbc import plain_read_write

if TYPE_CHECKING:
    from .targets import Portal, TargetRegistry, TargetView

log = logging.getLogger("vsand.iscsi")

LOGIN_MAX_DATA = 8192
# byte 0, flags, LUN, ITT, EDTL, CmdSN of a SCSI Command BHS
_FAST_BHS = struct.Struct(">BB6xQIII")
# Bytes of solicited write data this connection may have asked for and not yet received;
# bounds what R2Ts make us buffer, whatever EDTLs the initiator announces.
R2T_BUDGET = 64 << 20
MAX_COMMAND_BYTES = 32 << 20
HIGH_WATER = 4 << 20


class Connection(asyncio.BufferedProtocol):
    def __init__(self, registry: TargetRegistry, portal: Portal) -> None:
        self.registry = registry
        self.portal = portal
        self.reader = PduReader(LOGIN_MAX_DATA)
        self.transport: asyncio.Transport | None = None
        self.peer = "?"
        self.session: Session | None = None
        self.params: SessionParams | None = None
        self.target = None  # TargetNode once logged in to a normal session
        self.view: TargetView | None = None  # the LUNs this session may use (LUN masking)
        self.login: LoginMachine | None = None
        self.text: TextHandler | None = None
        self.statsn = 0
        self.tasks = TaskTable()
        self.tmf = TmfHandler(self)
        self.closed = False
        self.closing = False
        self._out: list[Any] = []
        self._leases: list[Any] = []
        self._flush_scheduled = False
        self._paused_writing = False
        self.last_rx = time.monotonic()
        self._nop_ttt = 0
        self._nop_outstanding: tuple[int, float] | None = None
        self._watch: asyncio.TimerHandle | None = None
        self.r2t_budget = R2T_BUDGET
        self._loop = asyncio.get_event_loop()
        self.login_cmdsn = 0
        self.fast_luns: dict[int, Lun] | None = None
        self.logged_out = False
        self.local_addr: tuple[str, int] = ("", 0)

    # ---------------------------------------------------------------- asyncio Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if peer else "?"
        sock_local = transport.get_extra_info("sockname")
        self.local_addr = (sock_local[0], sock_local[1]) if sock_local else ("", 0)
        transport.set_write_buffer_limits(high=HIGH_WATER)
        self.registry.connections.add(self)
        self.login = LoginMachine(portal_group_tag=self.portal.group_tag,
                                  offer=self.registry.offer,
                                  lookup_target=self._lookup_target,
                                  admit=self._admit, cmd_window=self.registry.window,
                                  auth_policy=self.registry.auth_policy)
        self._watch = self._loop.call_later(self.registry.login_timeout, self._login_timeout)

    def get_buffer(self, sizehint: int) -> memoryview:
        # The socket reads straight into the PDU reader's buffer: no bytes object per read.
        return self.reader.writable()

    def buffer_updated(self, nbytes: int) -> None:
        self.reader.commit(nbytes)
        self._process()

    def data_received(self, data: bytes) -> None:
        """Bytes from elsewhere than the socket (tests, benchmarks): same processing."""
        self.reader.feed(data)
        self._process()

    def _process(self) -> None:
        self.last_rx = time.monotonic()
        gate = self.registry.gate
        if gate is not None:
            gate()
        reader = self.reader
        try:
            while not self.closing:
                item = reader.next_pdu()
                if item is None:
                    break
                bhs, ahs, payload = item
                if bhs[0] & 0x3F == 1 and self.fast_luns and not ahs and self._fast_command(
                        bhs, payload):
                    continue
                try:
                    msg = pdu.decode(bhs, ahs, payload)
                except PduError as e:
                    self._reject(e.reason, e.header or bhs, str(e))
                    continue
                if self.session is None:
                    self._on_login_pdu(msg, bhs)
                else:
                    self._dispatch(msg, bhs)
        except PduError as e:
            log.warning("%s: %s; closing the connection", self.peer, e)
            self._reject(e.reason, e.header, str(e))
            self.close()
        except DigestError as e:
            if e.is_header:
                log.warning("%s: header digest error; closing the connection", self.peer)
                self.close()
            else:
                # ERL 0: the PDU is discarded and the initiator told; the task it belonged to
                # will not complete, so the connection must be reset (RFC 7143 §7.8).
                self._reject(RejectReason.DATA_DIGEST_ERROR, e.header, "data digest error")
                self.close()
        except Exception:
            log.exception("%s: internal error while handling a PDU; closing", self.peer)
            self.close()
        # Answers to everything that completed while handling this read go out now, in one
        # writelines, rather than one loop iteration later.
        if self._out:
            self.flush()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.closing = True
        if self._watch:
            self._watch.cancel()
        self.registry.connections.discard(self)
        for buf in self._leases:
            release_buffer(buf)
        self._leases.clear()
        self._out.clear()
        self.tasks.abort_all()
        if self.session is not None:
            s = self.session
            if s.connection is self:
                s.connection = None
                self.registry.sessions.remove(s)
                if self.view is not None and not self.logged_out:
                    # A logout ends the nexus cleanly; only a lost connection is an I_T
                    # nexus loss the initiator must hear about (SAM-5 6.3.4).
                    self.view.scsi.nexus_lost(s.nexus)
                elif self.view is not None:
                    self.view.scsi.nexus_closed(s.nexus)  # RESERVE(6) ends with the nexus
                log.info("session closed: %s from %s (tsih %d)", s.initiator_name, self.peer, s.tsih)

    def pause_writing(self) -> None:
        # A reader that does not drain its socket must not make us buffer without bound:
        # stop reading its commands until it catches up.
        self._paused_writing = True
        if self.transport and not self.closing:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        self._paused_writing = False
        if self.transport and not self.closing:
            self.transport.resume_reading()
            self._release_leases_if_sent()

    # ---------------------------------------------------------------- output
    def send(self, header: bytes, data: Any = None, lease: Any = None) -> None:
        """Queue one PDU; ``lease`` is a pooled read buffer to recycle once it is sent."""
        if self.closed:
            if lease is not None:
                release_buffer(lease)
            return
        p = self.params
        self._out.extend(frame(header, data) if p is None or not (p.header_digest or p.data_digest)
                         else frame(header, data, self.registry.crc32c if p.header_digest else None,
                                    self.registry.crc32c if p.data_digest else None))
        if lease is not None:
            self._leases.append(lease)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self.flush)

    def flush(self) -> None:
        self._flush_scheduled = False
        if self._out and self.transport is not None and not self.closed:
            out, self._out = self._out, []
            self.transport.writelines(out)
            # Our slices of pooled buffers must be gone before the buffers can be recycled.
            del out
        self._release_leases_if_sent()

    def _release_leases_if_sent(self) -> None:
        # Read buffers are pooled: they may only be reused once the transport no longer holds
        # them, i.e. when nothing is left in its write buffer.
        if self._leases and (self.transport is None or self.closed
                             or self.transport.get_write_buffer_size() == 0):
            leases, self._leases = self._leases, []
            for buf in leases:
                release_buffer(buf)

    def next_statsn(self) -> int:
        sn = self.statsn
        self.statsn = (sn + 1) & 0xFFFFFFFF
        return sn

    def window(self) -> tuple[int, int]:
        s = self.session
        if s is None:
            return 0, 0
        return s.exp_cmdsn, s.max_cmdsn

    def close(self) -> None:
        if self.closing:
            return
        self.closing = True
        self.flush()
        if self.transport is not None:
            self.transport.close()

    def close_after_flush(self) -> None:
        self.flush()
        self.close()

    def _reject(self, reason: int, header: bytes, why: str) -> None:
        log.info("%s: reject (reason 0x%02x): %s", self.peer, reason, why)
        exp, mx = self.window()
        hdr = (header + bytes(pdu.BHS_LEN))[:pdu.BHS_LEN]
        self.send(pdu.reject(reason, self.next_statsn(), exp, mx), hdr)

    # ---------------------------------------------------------------- login
    def _lookup_target(self, name: str) -> TargetInfo | None:
        # The access list is checked once the initiator has authenticated (``admit``): a
        # name is only worth trusting after CHAP.
        node = self.registry.targets.get(name)
        if node is None:
            return None
        return self.registry.target_info(node, self.local_addr)

    def _admit(self, params: SessionParams) -> tuple[int, int, int]:
        return self.registry.admit(self, params)

    def _login_timeout(self) -> None:
        if self.session is None and not self.closing:
            log.warning("%s: login not completed within %.0f s; closing", self.peer,
                        self.registry.login_timeout)
            self.close()

    def _on_login_pdu(self, msg: Any, bhs: bytes) -> None:
        if not isinstance(msg, pdu.LoginRequest):
            # Before full feature phase only Login Requests are allowed: a protocol error
            # that ends the connection (RFC 7143 §6.1).
            log.warning("%s: %s before login completed; closing", self.peer, type(msg).__name__)
            self._reject(RejectReason.PROTOCOL_ERROR, bhs, "PDU before login completed")
            self.close()
            return
        assert self.login is not None
        self.login_cmdsn = msg.cmdsn
        reply = self.login.receive(msg, self.statsn)
        self.send(reply.header, reply.data)
        if reply.close:
            # The status says why (0x0201 authentication, 0x0202 access list, ...); the
            # initiator got no more than that.
            log.info("%s: login refused with status 0x%02x%02x (initiator %s)", self.peer,
                     reply.header[36], reply.header[37], self.login.initiator_name or "?")
            self.close_after_flush()
            return
        if reply.done:
            self.statsn = (self.statsn + 1) & 0xFFFFFFFF
            self._enter_full_feature(self.login.params)

    def _enter_full_feature(self, params: SessionParams | None) -> None:
        assert params is not None and self.session is not None
        self.params = params
        self.reader.max_data = params.max_recv_dsl_target
        if params.header_digest:
            self.reader.header_digest = self.registry.crc32c
        if params.data_digest:
            self.reader.data_digest = self.registry.crc32c
        self.text = TextHandler(params, self.registry.offer, self._all_targets,
                                self._lookup_target(params.target_name)
                                if params.session_type == "Normal" else None)
        self.login = None
        if self._watch:
            self._watch.cancel()
        if self.target is not None and self.session is not None:
            self.view = self.target.view(params.initiator_name)
            self.view.scsi.attach(self.session.nexus)
            # The fast path serves exactly the LUNs of the view, never a masked one.
            self.fast_luns = self.view.luns
        self._arm_nop()

    def _all_targets(self) -> list[TargetInfo]:
        # SendTargets lists only what this initiator may log in to.
        name = self.params.initiator_name if self.params is not None else ""
        return [self.registry.target_info(t, self.local_addr) for t in self.registry.targets.values()
                if t.allows(name)]

    # ---------------------------------------------------------------- NOP-In pings
    def _arm_nop(self) -> None:
        interval = self.registry.nop_interval
        if interval > 0 and not self.closing:
            self._watch = self._loop.call_later(interval, self._nop_check)

    def _nop_check(self) -> None:
        if self.closing:
            return
        now = time.monotonic()
        interval = self.registry.nop_interval
        if self._nop_outstanding is not None:
            ttt, sent = self._nop_outstanding
            if self.last_rx > sent:
                self._nop_outstanding = None
            elif now - sent >= self.registry.nop_timeout:
                log.warning("%s: no answer to NOP-In for %.0f s; closing the connection",
                            self.peer, now - sent)
                self.close()
                return
        elif now - self.last_rx >= interval:
            self._nop_ttt = (self._nop_ttt + 1) & 0x7FFFFFFF
            exp, mx = self.window()
            # A ping carries no status, so StatSN is the next one without advancing it.
            self.send(pdu.nop_in(pdu.RESERVED_TAG, self._nop_ttt, 0, self.statsn, exp, mx, 0))
            self._nop_outstanding = (self._nop_ttt, now)
        self._watch = self._loop.call_later(min(interval, 1.0) if self._nop_outstanding
                                            else interval, self._nop_check)

    # ---------------------------------------------------------------- full feature phase
    def _dispatch(self, msg: Any, bhs: bytes) -> None:
        t = type(msg)
        if t is pdu.ScsiCommandPdu:
            self._on_command(msg, bhs)
        elif t is pdu.DataOut:
            self.tasks.data_out(self, msg, bhs)
        elif t is pdu.NopOut:
            self._on_nop_out(msg, bhs)
        elif t is pdu.TaskMgmtRequest:
            if self._accept_cmdsn(msg.cmdsn, msg.immediate, bhs):
                self.tmf.handle(msg)
        elif t is pdu.TextRequest:
            self._on_text(msg, bhs)
        elif t is pdu.LogoutRequest:
            self._on_logout(msg, bhs)
        elif t is pdu.LoginRequest:
            self._reject(RejectReason.PROTOCOL_ERROR, bhs, "Login Request in full feature phase")
        else:
            self._reject(RejectReason.PROTOCOL_ERROR if self.params is None
                         or self.params.error_recovery_level == 0
                         else RejectReason.COMMAND_NOT_SUPPORTED, bhs,
                         f"{t.__name__} not supported at ErrorRecoveryLevel 0")

    def _accept_cmdsn(self, cmdsn: int, immediate: bool, bhs: bytes) -> bool:
        """Apply the CmdSN rules; False when the PDU must be ignored."""
        s = self.session
        assert s is not None
        if immediate:
            return True
        if cmdsn != s.exp_cmdsn:
            if not s.cmdsn_in_window(cmdsn):
                # Outside the window: silently ignored (RFC 7143 §4.2.2.1).
                log.debug("%s: CmdSN %d outside window [%d, %d]; ignored", self.peer, cmdsn,
                          s.exp_cmdsn, s.max_cmdsn)
                return False
            # With one connection per session commands arrive in order; a gap can only come
            # from a broken initiator.  Accept and move the window past it.
            log.debug("%s: CmdSN %d skips ahead of ExpCmdSN %d", self.peer, cmdsn, s.exp_cmdsn)
        s.exp_cmdsn = (cmdsn + 1) & 0xFFFFFFFF
        return True

    def _on_nop_out(self, msg: pdu.NopOut, bhs: bytes) -> None:
        if msg.itt == pdu.RESERVED_TAG:
            if not msg.immediate:
                self._reject(RejectReason.PROTOCOL_ERROR, bhs, "NOP-Out reply without I bit")
                return
            if self._nop_outstanding and msg.ttt == self._nop_outstanding[0]:
                self._nop_outstanding = None
            return
        if not self._accept_cmdsn(msg.cmdsn, msg.immediate, bhs):
            return
        if msg.ttt != pdu.RESERVED_TAG:
            self._reject(RejectReason.PROTOCOL_ERROR, bhs, "NOP-Out ping with a TTT")
            return
        exp, mx = self.window()
        data = bytes(msg.data) if len(msg.data) else None
        self.send(pdu.nop_in(msg.itt, pdu.RESERVED_TAG, msg.lun, self.next_statsn(), exp, mx,
                             len(msg.data)), data)

    def _on_text(self, msg: pdu.TextRequest, bhs: bytes) -> None:
        if not self._accept_cmdsn(msg.cmdsn, msg.immediate, bhs):
            return
        assert self.text is not None
        exp, mx = self.window()
        for header, data in self.text.respond(msg, self.statsn, exp, mx):
            self.next_statsn()
            self.send(header, data)
        self._apply_renegotiated()

    def _apply_renegotiated(self) -> None:
        p = self.params
        if p is not None:
            self.reader.max_data = p.max_recv_dsl_target

    def _on_logout(self, msg: pdu.LogoutRequest, bhs: bytes) -> None:
        if not self._accept_cmdsn(msg.cmdsn, msg.immediate, bhs):
            return
        exp, mx = self.window()
        if msg.reason == pdu.LogoutReason.REMOVE_FOR_RECOVERY:
            # ERL 0 has no connection recovery.
            self.send(pdu.logout_response(msg.itt, 2, self.next_statsn(), exp, mx))
            return
        if msg.reason not in (pdu.LogoutReason.CLOSE_SESSION, pdu.LogoutReason.CLOSE_CONNECTION):
            self._reject(RejectReason.INVALID_PDU_FIELD, bhs, f"logout reason {msg.reason}")
            return
        s = self.session
        if msg.reason == pdu.LogoutReason.CLOSE_CONNECTION and msg.cid != (
                self.params.cid if self.params else 0):
            self.send(pdu.logout_response(msg.itt, 1, self.next_statsn(), exp, mx))
            return
        log.info("logout: %s from %s", s.initiator_name if s else "?", self.peer)

        async def finish() -> None:
            await self.tasks.drain()
            self.logged_out = True
            e, m = self.window()
            self.send(pdu.logout_response(msg.itt, 0, self.next_statsn(), e, m,
                                          self.params.default_time2wait if self.params else 0,
                                          self.params.default_time2retain if self.params else 0))
            self.close_after_flush()

        self._loop.create_task(finish())

    def _fast_command(self, bhs: bytes, payload: memoryview) -> bool:
        """A plain READ/WRITE served from the page cache, start to status, without a Task.

        Returns False, having changed nothing, whenever anything is not plain (window, ITT in
        use, a pending unit attention, data not all immediate, the page cache would block...):
        the general path then handles the command from scratch.
        """
        b0, b1, lunf, itt, edtl, cmdsn = _FAST_BHS.unpack_from(bhs)
        if not b1 & 0x80 or lunf & 0xFFFFFFFFFFFF or lunf >> 56:
            return False
        lun = self.fast_luns.get(lunf >> 48)  # type: ignore[union-attr]
        session = self.session
        if lun is None or session is None:
            return False
        immediate = b0 & 0x40
        if not immediate and cmdsn != session.exp_cmdsn:
            return False
        req = plain_read_write(lun.unit, bhs[32:48], session.nexus)
        if req is None or edtl != req.blocks * lun.block_size or itt in self.tasks:
            return False
        if req.op is BlockOp.WRITE:
            if not b1 & 0x20 or b1 & 0x40 or len(payload) != edtl:
                return False
            req.data = payload
        elif not b1 & 0x40 or b1 & 0x20 or len(payload):
            return False
        try:
            result = lun.try_block(req)
        except OSError:
            return False  # the general path repeats it and reports the error properly
        if result is NOT_DONE:
            return False
        if not immediate:
            session.exp_cmdsn = (cmdsn + 1) & 0xFFFFFFFF
        if req.op is BlockOp.READ:
            send_data_in(self, itt, lunf, result, edtl, 0, 0)
        else:
            exp, mx = session.exp_cmdsn, session.max_cmdsn
            self.send(pdu.scsi_response(itt, 0, self.next_statsn(), exp, mx, 0, 0))
        return True

    def _on_command(self, msg: pdu.ScsiCommandPdu, bhs: bytes) -> None:
        s = self.session
        assert s is not None
        if not self._accept_cmdsn(msg.cmdsn, msg.immediate, bhs):
            return
        if self.target is None:
            # Discovery sessions carry no SCSI commands.
            self._reject(RejectReason.PROTOCOL_ERROR, bhs, "SCSI command in a discovery session")
            return
        if self.tasks.get(msg.itt) is not None:
            self._reject(RejectReason.TASK_IN_PROGRESS, bhs, f"ITT 0x{msg.itt:08x} in use")
            return
        p = self.params
        assert p is not None
        if len(msg.data) and (not p.immediate_data or not msg.write
                              or len(msg.data) > p.first_burst_length
                              or len(msg.data) > msg.edtl):
            self._reject(RejectReason.PROTOCOL_ERROR, bhs, "immediate data not allowed here")
            return
        s.in_flight += 1
        task = Task(self, msg, pdu.decode_lun(msg.lun))
        self.tasks.add(task)
        task.start()

    def execute(self, task: Task) -> None:
        """All data of ``task`` is here: run the SCSI command."""
        session = self.session
        assert session is not None and self.view is not None
        cmd = ScsiCommand(task.pdu.cdb, task.lun, session.nexus, task.data_view(),
                          task.pdu.edtl, task.pdu.attr)
        self.view.start(task, cmd)

    def complete(self, task: Task) -> None:
        """The task left the task table: free its window slot."""
        s = self.session
        if s is not None:
            s.in_flight -= 1


