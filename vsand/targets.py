"""The iSCSI object model of one daemon: target nodes, their LUNs, portals and sessions.

Names follow the usual target vocabulary: a ``TargetNode`` (IQN) exposes LUNs through the
portals of a portal group; ``TargetRegistry`` is what every connection consults to log in, to
find its target, and to see the other sessions (reinstatement, resets that cross sessions).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .lun import Lun, release_result, start_scsi
from .protocol.iscsi.login import SessionParams, TargetInfo, TargetOffer
from .protocol.scsi import ScsiTarget
from .protocol.scsi.types import ScsiCommand, ScsiResult
from .session import SessionRegistry

if TYPE_CHECKING:
    from .iscsi_conn import Connection
    from .iscsi_tasks import Task

log = logging.getLogger("vsand.iscsi")

# Login status classes/details (RFC 7143 §11.13.5).
TARGET_NOT_FOUND = (0x02, 0x03)
SESSION_DOES_NOT_EXIST = (0x02, 0x0A)
TOO_MANY_CONNECTIONS = (0x02, 0x06)
OUT_OF_RESOURCES = (0x03, 0x02)


@dataclass(frozen=True)
class Portal:
    listen_host: str
    listen_port: int
    advertise_host: str
    advertise_port: int
    group_tag: int


@dataclass(eq=False)
class TargetNode:
    name: str
    alias: str
    luns: dict[int, Lun]
    scsi: ScsiTarget = field(init=False)

    def __post_init__(self) -> None:
        self.scsi = ScsiTarget({n: lun.unit for n, lun in self.luns.items()})

    def allows(self, conn: Connection) -> bool:
        # Open to every initiator until ACLs exist.
        return True

    def start(self, task: Task, cmd: ScsiCommand) -> None:
        """Run ``cmd``: inline when the page cache can serve it, else as an asyncio task."""
        outcome = start_scsi(self.scsi, cmd, self.luns)
        if type(outcome) is ScsiResult:
            self.answer(task, cmd, outcome)
        else:
            task.runner = asyncio.get_running_loop().create_task(
                self._finish(task, cmd, outcome))  # type: ignore[arg-type]

    async def _finish(self, task: Task, cmd: ScsiCommand,
                      outcome: Coroutine[Any, Any, ScsiResult]) -> None:
        self.answer(task, cmd, await outcome)

    def answer(self, task: Task, cmd: ScsiCommand, result: ScsiResult) -> None:
        try:
            write_residual = 0
            if task.pdu.write:
                needed = self.scsi.data_out_length(cmd)
                if needed is not None:
                    write_residual = cmd.edtl - needed
            task.respond(result, write_residual)
        except Exception:
            # A bug while answering must not leave the initiator waiting forever: the
            # connection is dropped and the initiator recovers as from any link failure.
            log.exception("%s: internal error answering ITT 0x%08x; closing the connection",
                          task.conn.peer, task.itt)
            release_result(result)
            task.finish()
            task.conn.close()


def _is_wildcard(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_unspecified
    except ValueError:
        return False


def _format_address(host: str, port: int, tag: int) -> tuple[str, int, int]:
    return (host, port, tag)


class TargetRegistry:
    def __init__(self, targets: list[TargetNode], portals: list[Portal], offer: TargetOffer,
                 *, window: int = 128, nop_interval: float = 5.0, nop_timeout: float = 15.0,
                 login_timeout: float = 15.0) -> None:
        self.targets = {t.name: t for t in targets}
        self.portals = portals
        self.offer = offer
        self.window = window
        self.nop_interval = nop_interval
        self.nop_timeout = nop_timeout
        self.login_timeout = login_timeout
        self.sessions = SessionRegistry()
        self.connections: set[Connection] = set()
        self.crc32c: Any = None

    def target_info(self, node: TargetNode, local: tuple[str, int] | None = None) -> TargetInfo:
        addrs = []
        for p in self.portals:
            host = p.advertise_host
            if _is_wildcard(host) and local is not None:
                host = local[0]
            addrs.append(_format_address(host, p.advertise_port, p.group_tag))
        return TargetInfo(node.name, node.alias, tuple(addrs))

    def admit(self, conn: Connection, params: SessionParams) -> tuple[int, int, int]:
        """Decide whether a login may enter full feature phase; returns (class, detail, tsih)."""
        discovery = params.session_type == "Discovery"
        node = None
        if not discovery:
            node = self.targets.get(params.target_name)
            if node is None or not node.allows(conn):
                return (*TARGET_NOT_FOUND, 0)
        if params.tsih:
            # Adding a connection to an existing session: MaxConnections is 1.
            if self.sessions.get(params.tsih) is None:
                return (*SESSION_DOES_NOT_EXIST, 0)
            return (*TOO_MANY_CONNECTIONS, 0)
        old = self.sessions.find(params.isid, params.initiator_name, params.target_name,
                                 conn.portal.group_tag)
        if old is not None:
            log.info("session reinstatement: %s isid 0x%012x replaces tsih %d",
                     params.initiator_name, params.isid, old.tsih)
            self.sessions.remove(old)
            if old.connection is not None:
                old_conn = old.connection
                old_conn.tasks.abort_all()
                old_conn.close()
        session = self.sessions.create(params.isid, params.initiator_name, params.target_name,
                                       conn.portal.group_tag, discovery, self.window,
                                       conn.login_cmdsn)
        session.connection = conn
        conn.session = session
        conn.target = node
        log.info("login: %s session from %s as %s (%s, tsih %d)",
                 "discovery" if discovery else "normal", conn.peer, params.initiator_name,
                 params.target_name or "-", session.tsih)
        return (0, 0, session.tsih)
