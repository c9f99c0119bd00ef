"""iSCSI sessions: TSIH allocation, reinstatement, and the CmdSN window.

A session lives as long as its (single, since MaxConnections=1) connection in full feature phase.
A login that names an ISID, initiator and target of a live session with TSIH 0 reinstates it:
the old connection is closed and its tasks end before the new session is admitted (RFC 7143
§6.3.5), so the initiator never sees two sessions of the same I_T nexus at once.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .iscsi_conn import Connection
    from .targets import TargetNode

log = logging.getLogger("vsand.session")

SERIAL_HALF = 1 << 31


def sn_lt(a: int, b: int) -> bool:
    """Serial number arithmetic (RFC 1982) on 32 bits: a < b."""
    return a != b and ((a < b and b - a < SERIAL_HALF) or (a > b and a - b > SERIAL_HALF))


def sn_le(a: int, b: int) -> bool:
    return a == b or sn_lt(a, b)


@dataclass(eq=False)
class Session:
    tsih: int
    isid: int
    initiator_name: str
    target_name: str
    portal_group_tag: int
    discovery: bool
    window: int
    exp_cmdsn: int
    in_flight: int = 0
    connection: Connection | None = None
    nexus: str = field(default="")

    def __post_init__(self) -> None:
        self.nexus = (f"{self.initiator_name},i,0x{self.isid:012x},"
                      f"{self.target_name},t,0x{self.portal_group_tag:04x}")

    @property
    def max_cmdsn(self) -> int:
        # Commands still running use part of the window: MaxCmdSN only moves forward when a
        # command completes, which bounds what one session can have queued at once.
        return (self.exp_cmdsn + self.window - 1 - self.in_flight) & 0xFFFFFFFF

    def cmdsn_in_window(self, cmdsn: int) -> bool:
        return sn_le(self.exp_cmdsn, cmdsn) and sn_le(cmdsn, self.max_cmdsn)


class SessionRegistry:
    """All sessions of this daemon, keyed by TSIH and by I_T nexus identity."""

    def __init__(self) -> None:
        self._by_tsih: dict[int, Session] = {}
        self._tsih = itertools.cycle(range(1, 0x10000))
        self.on_change: Callable[[], None] | None = None

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(list(self._by_tsih.values()))

    def __len__(self) -> int:
        return len(self._by_tsih)

    def find(self, isid: int, initiator_name: str, target_name: str,
             portal_group_tag: int) -> Session | None:
        for s in self._by_tsih.values():
            if (s.isid == isid and s.initiator_name == initiator_name
                    and s.target_name == target_name and s.portal_group_tag == portal_group_tag):
                return s
        return None

    def get(self, tsih: int) -> Session | None:
        return self._by_tsih.get(tsih)

    def create(self, isid: int, initiator_name: str, target_name: str, portal_group_tag: int,
               discovery: bool, window: int, exp_cmdsn: int) -> Session:
        for _ in range(0x10000):
            tsih = next(self._tsih)
            if tsih not in self._by_tsih:
                break
        else:  # pragma: no cover - 65535 live sessions
            raise RuntimeError("no free TSIH")
        session = Session(tsih, isid, initiator_name, target_name, portal_group_tag, discovery,
                          window, exp_cmdsn)
        self._by_tsih[tsih] = session
        return session

    def remove(self, session: Session) -> None:
        if self._by_tsih.get(session.tsih) is session:
            del self._by_tsih[session.tsih]

    def for_target(self, target: TargetNode) -> list[Session]:
        return [s for s in self._by_tsih.values() if s.target_name == target.name]
