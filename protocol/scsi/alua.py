"""Asymmetric logical unit access (SPC-5 5.16): what each access state lets a command do.

Each node is one target port group; a logical unit's state at this node is
``LogicalUnit.alua_state``.  In the active states every command runs.  In the others only the
commands SPC-5 lists for that state run; the rest end in CHECK CONDITION, NOT READY with the
ASC/ASCQ naming the state, which is what makes a multipath initiator move its I/O to another
path.  Every change raises ASYMMETRIC ACCESS STATE CHANGED for every I_T nexus.
"""

from __future__ import annotations

from typing import Any

from .sense import NOT_READY, Asc, CheckCondition
from .unit import (ALUA_ACTIVE_NON_OPTIMIZED, ALUA_ACTIVE_OPTIMIZED, ALUA_STANDBY,
                   ALUA_TRANSITIONING, ALUA_UNAVAILABLE, LogicalUnit)

STATES: dict[str, int] = {
    "active-optimized": ALUA_ACTIVE_OPTIMIZED,
    "active-non-optimized": ALUA_ACTIVE_NON_OPTIMIZED,
    "standby": ALUA_STANDBY,
    "unavailable": ALUA_UNAVAILABLE,
    "transitioning": ALUA_TRANSITIONING,
}
STATE_NAMES = {v: k for k, v in STATES.items()}
ACTIVE = frozenset((ALUA_ACTIVE_OPTIMIZED, ALUA_ACTIVE_NON_OPTIMIZED))

ASYMMETRIC_ACCESS_STATE_CHANGED: Asc = (0x2A, 0x06)
_NOT_ACCESSIBLE: dict[int, Asc] = {
    ALUA_TRANSITIONING: (0x04, 0x0A),  # ASYMMETRIC ACCESS STATE TRANSITION
    ALUA_STANDBY: (0x04, 0x0B),  # TARGET PORT IN STANDBY STATE
    ALUA_UNAVAILABLE: (0x04, 0x0C),  # TARGET PORT IN UNAVAILABLE STATE
}

# Commands by opcode, or (opcode, service action) for MAINTENANCE IN/OUT.
_RTPG, _STPG, _RSOC = (0xA3, 0x0A), (0xA4, 0x0A), (0xA3, 0x0C)
_ALWAYS = frozenset((0x12, 0xA0, 0x03, _RTPG, _RSOC))  # INQUIRY, REPORT LUNS, REQUEST SENSE
_ALLOWED: dict[int, frozenset[Any]] = {
    ALUA_TRANSITIONING: _ALWAYS,
    ALUA_UNAVAILABLE: _ALWAYS | {_STPG},
    # MODE SENSE/SELECT, LOG SELECT/SENSE, SEND/RECEIVE DIAGNOSTIC, PERSISTENT RESERVE IN/OUT
    ALUA_STANDBY: _ALWAYS | {_STPG, 0x1A, 0x5A, 0x15, 0x55, 0x4C, 0x4D, 0x1C, 0x1D, 0x5E, 0x5F},
}


def check_access(lu: LogicalUnit, cdb: Any) -> None:
    """Raise the CHECK CONDITION a command gets in a non-active state, if it is not allowed."""
    state = lu.alua_state
    if state in ACTIVE:
        return
    op = cdb[0]
    allowed = _ALLOWED[state]
    if op in allowed or (len(cdb) > 1 and (op, cdb[1] & 0x1F) in allowed):
        return
    raise CheckCondition(NOT_READY, _NOT_ACCESSIBLE[state])


def set_state(lu: LogicalUnit, state: int) -> bool:
    """Change the access state; True when it changed (and the unit attention was raised)."""
    if state not in STATE_NAMES:
        raise ValueError(f"ALUA state {state:#x} is not one of {sorted(STATES)}")
    if state == lu.alua_state:
        return False
    lu.alua_state = state
    lu.raise_ua(ASYMMETRIC_ACCESS_STATE_CHANGED)
    return True
