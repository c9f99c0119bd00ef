"""A logical unit: its parameters, mode-page state and per-nexus unit attentions.

Theory of operation: everything about an LU that outlives a command lives here.  Unit
attentions (SAM-5 5.14) are kept per I_T nexus in arrival order, without duplicates; the
target reports and clears the oldest one on the next command that is not exempt.  Mode
parameters are shared by all nexuses (one task set); a change made through one nexus raises
MODE PARAMETERS CHANGED for the others.
"""

from __future__ import annotations

from collections.abc import Callable

from .pr import PrState
from .sense import (
    CAPACITY_DATA_HAS_CHANGED,
    MODE_PARAMETERS_CHANGED,
    Asc,
)
from .types import LunParams

ALUA_ACTIVE_OPTIMIZED = 0x0
ALUA_ACTIVE_NON_OPTIMIZED = 0x1
ALUA_STANDBY = 0x2
ALUA_UNAVAILABLE = 0x3
ALUA_TRANSITIONING = 0xF

# Bounded so that a stream of events for a nexus that never reads them cannot grow memory;
# SAM-5 lets a device server drop UAs when it runs out of room for them.
_MAX_UA = 16


class LogicalUnit:
    """The SCSI view of one LUN.  ``params`` is read by the emulation on every command."""

    def __init__(self, params: LunParams) -> None:
        self.params = params
        self._default_wce = params.write_cache
        # The daemon's cluster layer sets this; REPORT TARGET PORT GROUPS reports it.
        self.alua_state = ALUA_ACTIVE_OPTIMIZED
        self.nexuses: set[str] = set()
        self.ua: dict[str, list[Asc]] = {}
        self.zero_block = bytes(params.block_size)
        # Reservations (protocol/scsi/pr.py).  The daemon sets ``on_pr_change`` to keep the
        # state across restarts when the initiator asked for it (APTPL); it gets the state's
        # bytes, or None when nothing needs keeping any more.
        self.pr = PrState()
        self.on_pr_change: Callable[[bytes | None], None] | None = None
        # Set by a daemon that mirrors the LU: reservation changes and resets are yielded as
        # BlockOp.STATE requests for every replica to apply (protocol/scsi/shared.py).
        self.shared = False

    # -- state the daemon reads and writes ------------------------------------------------
    @property
    def write_cache(self) -> bool:
        """WCE: whether the daemon may acknowledge writes before they are stable."""
        return self.params.write_cache

    def set_write_cache(self, wce: bool, nexus: str | None = None) -> None:
        if wce != self.params.write_cache:
            self.params.write_cache = wce
            self.raise_ua(MODE_PARAMETERS_CHANGED, exclude=nexus)

    def resize(self, blocks: int) -> None:
        if blocks != self.params.blocks:
            self.params.blocks = blocks
            self.raise_ua(CAPACITY_DATA_HAS_CHANGED)

    def reset_mode_pages(self) -> None:
        """LU reset: mode parameters return to their defaults (no saved values, SPC-5 7.5)."""
        self.params.write_cache = self._default_wce

    # -- unit attentions ------------------------------------------------------------------
    def attach(self, nexus: str) -> None:
        self.nexuses.add(nexus)

    def raise_ua(self, code: Asc, exclude: str | None = None, only: str | None = None) -> None:
        targets = (only,) if only is not None else tuple(self.nexuses)
        for n in targets:
            if n == exclude:
                continue
            q = self.ua.setdefault(n, [])
            if code not in q and len(q) < _MAX_UA:
                q.append(code)

    def pop_ua(self, nexus: str) -> Asc | None:
        q = self.ua.get(nexus)
        if not q:
            return None
        code = q.pop(0)
        if not q:
            del self.ua[nexus]
        return code

    def clear_ua(self, nexus: str, code: Asc | None = None) -> None:
        q = self.ua.get(nexus)
        if not q:
            return
        if code is None:
            q.clear()
        elif code in q:
            q.remove(code)
        if not q:
            del self.ua[nexus]
