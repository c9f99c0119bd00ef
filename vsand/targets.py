"""The iSCSI object model of one daemon: target nodes, their LUNs, portals and sessions.

Names follow the usual target vocabulary: a ``TargetNode`` (IQN) exposes LUNs through the
portals of a portal group; ``TargetRegistry`` is what every connection consults to log in, to
find its target, and to see the other sessions (reinstatement, resets that cross sessions).

Access control: a node's ``acl`` (initiator name -> its LUN numbers, None = all) decides who
may log in (``allows``; the others get status 0x0202 and do not see the target in discovery)
and what each session sees: ``view`` gives a ``TargetView`` whose ``ScsiTarget`` holds only
the permitted LUNs, so REPORT LUNS lists them alone and any other LUN number is LOGICAL UNIT
NOT SUPPORTED.  The ``LogicalUnit`` objects (and their reservations, unit attentions, data)
are the node's, shared by every view.  Authentication (CHAP) is the node's ``auth`` policy,
handed to each login by ``TargetRegistry.auth_policy``.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .config import AclEntry, AuthConfig
from .lun import Lun, release_result, start_scsi
from .protocol.iscsi.chap import ChapCredentials, ReplayGuard, chap_factory
from .protocol.iscsi.login import AuthPolicy, SessionParams, TargetInfo, TargetOffer
from .protocol.scsi import ScsiTarget
from .protocol.scsi.types import ScsiCommand, ScsiResult
from .session import SessionRegistry

if TYPE_CHECKING:
    from .iscsi_conn import Connection
    from .iscsi_tasks import Task

log = logging.getLogger("vsand.iscsi")

PERSISTENT_RESERVE_OUT = 0x5F

# Login status classes/details (RFC 7143 §11.13.5).
AUTHORIZATION_FAILURE = (0x02, 0x02)
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


class TargetView:
    """The LUNs one session may use, and the SCSI target device built from them."""

    __slots__ = ("scsi", "luns")

    def __init__(self, luns: dict[int, Lun]) -> None:
        self.luns = luns
        self.scsi = ScsiTarget({n: lun.unit for n, lun in luns.items()})

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
        if cmd.cdb[0] == PERSISTENT_RESERVE_OUT:
            self._abort_preempted(task, cmd.lun)
        # The command is done with its data: dropping this view lets the task's pooled
        # buffer be recycled when the task finishes (a live view would make the pool drop it).
        cmd.data_out = None
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


    def _abort_preempted(self, task: Task, lun: int) -> None:
        """PREEMPT AND ABORT: the preempted nexuses' commands on this LU end before its GOOD
        (SPC-5 5.14.11.2.6); with TAS=0 they get no status."""
        lu = self.scsi.luns.get(lun)
        if lu is None or not lu.pr.pending_aborts:
            return
        victims = set(lu.pr.pending_aborts)
        lu.pr.pending_aborts.clear()
        task.conn.registry.abort_tasks(self.luns[lun], victims, spare=task)


@dataclass(eq=False)
class TargetNode:
    name: str
    alias: str
    luns: dict[int, Lun]
    # initiator name (lower case) -> the LUN numbers it may see, None = all; no acl = open.
    acl: Mapping[str, tuple[int, ...] | None] | None = None
    auth: AuthPolicy = field(default_factory=AuthPolicy)
    full: TargetView = field(init=False)
    _views: dict[tuple[int, ...], TargetView] = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        self.full = TargetView(self.luns)

    @property
    def scsi(self) -> ScsiTarget:
        """The SCSI target device with every LUN (admin, resets that span the node)."""
        return self.full.scsi

    def allows(self, initiator_name: str) -> bool:
        return self.acl is None or initiator_name.lower() in self.acl

    def view(self, initiator_name: str) -> TargetView:
        """What a session of ``initiator_name`` sees (call ``allows`` first)."""
        permitted = None if self.acl is None else self.acl.get(initiator_name.lower())
        if permitted is None:
            return self.full
        # One view per LUN set, not per session: a view's ScsiTarget tracks its nexuses.
        view = self._views.get(permitted)
        if view is None:
            view = TargetView({n: self.luns[n] for n in permitted if n in self.luns})
            self._views[permitted] = view
        return view

    def views(self) -> list[TargetView]:
        """Every view sessions may hold: the full one and the cached restricted ones."""
        return [self.full, *self._views.values()]

    def set_acl(self, acl: Mapping[str, tuple[int, ...] | None] | None) -> None:
        """A new access list (reload); sessions keep the views they have until the caller
        ends those whose access changed."""
        self.acl = acl
        self._views = {}

    def start(self, task: Task, cmd: ScsiCommand) -> None:
        self.full.start(task, cmd)


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
                 login_timeout: float = 15.0,
                 discovery_auth: AuthPolicy | None = None) -> None:
        self.targets = {t.name: t for t in targets}
        self.portals = portals
        self.offer = offer
        self.window = window
        self.nop_interval = nop_interval
        self.nop_timeout = nop_timeout
        self.login_timeout = login_timeout
        self.sessions = SessionRegistry()
        self.connections: set[Connection] = set()
        self.discovery_auth = discovery_auth or AuthPolicy()
        self.crc32c: Callable[..., int] = crc32c_function()
        # Run before each batch of received PDUs is executed (the quorum's lease check).
        self.gate: Callable[[], None] | None = None

    def abort_tasks(self, lun: Lun, nexuses: set[str], spare: Task | None = None) -> None:
        """End the commands of ``nexuses`` on ``lun`` (PREEMPT AND ABORT, here or applied
        through the mirror from another node); ``spare`` is the preempting command."""
        for conn in list(self.connections):
            s, view = conn.session, conn.view
            if s is None or view is None or s.nexus not in nexuses:
                continue
            number = next((n for n, x in view.luns.items() if x is lun), None)
            if number is None:
                continue
            for t in list(conn.tasks):
                if t.lun == number and t is not spare:
                    conn.tasks.abort(t)
            log.info("PREEMPT AND ABORT: commands of %s on LUN %d aborted", s.initiator_name,
                     number)

    def auth_policy(self, session_type: str, target_name: str) -> AuthPolicy:
        """The authentication a login must pass (LoginMachine's ``auth_policy``)."""
        if session_type == "Normal":
            node = self.targets.get(target_name)
            if node is not None:
                return node.auth
        return self.discovery_auth

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
            if node is None:
                return (*TARGET_NOT_FOUND, 0)
            if not node.allows(params.initiator_name):
                log.warning("login refused: %s from %s is not in the access list of %s",
                            params.initiator_name, conn.peer, node.name)
                return (*AUTHORIZATION_FAILURE, 0)
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
        log.info("login: %s session from %s as %s (%s, tsih %d%s%s)",
                 "discovery" if discovery else "normal", conn.peer, params.initiator_name,
                 params.target_name or "-", session.tsih,
                 ", header digest CRC32C" if params.header_digest else "",
                 ", data digest CRC32C" if params.data_digest else "")
        return (0, 0, session.tsih)


def crc32c_function() -> Callable[..., int]:
    """CRC32C for iSCSI digests: ``f(data, crc=0)``, continuing from ``crc``.

    The ``crc32c`` package uses the CPU's CRC32 instruction (about 28 GB/s on 1 MiB buffers
    here, against 0.47 GB/s for crcmod's table code); crcmod stays as the fallback.
    """
    try:
        import crc32c
        return crc32c.crc32c  # type: ignore[no-any-return]
    except ImportError:
        import crcmod.predefined
        return crcmod.predefined.mkCrcFun("crc-32c")  # type: ignore[no-any-return]


def auth_policy(auth: AuthConfig, guard: ReplayGuard) -> AuthPolicy:
    """The login policy for a configured ``auth:`` section (CHAP challenges from os.urandom)."""
    if auth.method != "chap":
        return AuthPolicy(("None",))
    creds = ChapCredentials(auth.user, auth.secret, auth.mutual_user, auth.mutual_secret)
    return AuthPolicy(("CHAP",), {"CHAP": chap_factory(creds, os.urandom, guard)})


def acl_map(acl: tuple[AclEntry, ...] | None) -> dict[str, tuple[int, ...] | None] | None:
    """A configured ``acl:`` as TargetNode wants it: initiator name -> LUN numbers or None."""
    if acl is None:
        return None
    return {entry.initiator: entry.luns for entry in acl}
