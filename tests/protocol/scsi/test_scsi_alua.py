"""ALUA access states: the exact status and sense a read and a write get in each state, the
commands each state still allows, the unit attention on every change, and what REPORT TARGET
PORT GROUPS says."""

from __future__ import annotations

import struct

import pytest
from scsi_harness import Harness, rw10, sense

from vsand.protocol.scsi import alua
from vsand.protocol.scsi.sbc import plain_read_write

GOOD = (0, 0, 0)
NOT_READY = 0x2
UA = (0x6, 0x2A, 0x06)
READ10 = rw10(0x28, 0, 1)
WRITE10 = rw10(0x2A, 0, 1)


def _fresh(state: str) -> Harness:
    h = Harness()
    h.run(bytes(6), nexus="I1")  # make the nexus known, so it hears the state change
    if alua.set_state(h.lu, alua.STATES[state]):
        assert sense(h.run([0xA0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0], nexus="I1")) == GOOD
        assert sense(h.run(READ10, nexus="I1")) == UA  # reported once, before anything else
    return h


@pytest.mark.parametrize("state,expect", [
    ("active-optimized", GOOD),
    ("active-non-optimized", GOOD),
    ("standby", (NOT_READY, 0x04, 0x0B)),
    ("unavailable", (NOT_READY, 0x04, 0x0C)),
    ("transitioning", (NOT_READY, 0x04, 0x0A)),
])
def test_read_and_write_in_each_state(state: str, expect: tuple[int, int, int]) -> None:
    h = _fresh(state)
    assert sense(h.run(READ10, nexus="I1")) == expect  # ... then the state's answer
    assert sense(h.run(WRITE10, b"w" * h.bs, nexus="I1")) == expect
    if expect != GOOD:
        assert h.backend.data[:h.bs] == bytes(h.bs)  # nothing was written
        # The transport's fast path must not bypass the state either.
        assert plain_read_write(h.lu, READ10, "I1") is None
        assert plain_read_write(h.lu, WRITE10, "I1") is None


@pytest.mark.parametrize("state", ["standby", "unavailable", "transitioning"])
def test_discovery_commands_still_answer(state: str) -> None:
    h = _fresh(state)
    assert sense(h.run([0x12, 0, 0, 0, 36, 0], nexus="I1")) == GOOD  # INQUIRY
    assert sense(h.run([0xA0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0], nexus="I1")) == GOOD
    assert sense(h.run([0x03, 0, 0, 0, 18, 0], nexus="I1")) == GOOD  # REQUEST SENSE
    rtpg = h.run([0xA3, 0x0A, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0], nexus="I1")
    assert sense(rtpg) == GOOD
    data = bytes(rtpg.data)
    assert data[4] == alua.STATES[state]  # PREF clear, the state
    assert data[5] == 0x8F  # T_SUP U_SUP S_SUP AN_SUP AO_SUP


def test_standby_allows_mode_sense_but_not_test_unit_ready() -> None:
    h = _fresh("standby")
    assert sense(h.run([0x1A, 0x08, 0x08, 0, 255, 0], nexus="I1")) == GOOD
    assert sense(h.run(bytes(6), nexus="I1")) == (NOT_READY, 0x04, 0x0B)


def test_every_change_raises_the_unit_attention_for_every_nexus() -> None:
    h = Harness()
    for nexus in ("I1", "I2"):
        h.run(bytes(6), nexus=nexus)
    assert alua.set_state(h.lu, alua.STATES["unavailable"])
    assert not alua.set_state(h.lu, alua.STATES["unavailable"])  # no change, no UA
    assert alua.set_state(h.lu, alua.STATES["active-optimized"])
    for nexus in ("I1", "I2"):
        assert sense(h.run(bytes(6), nexus=nexus)) == UA
        assert sense(h.run(READ10, nexus=nexus)) == GOOD
    with pytest.raises(ValueError):
        alua.set_state(h.lu, 7)


def test_rtpg_extended_header_format() -> None:
    h = Harness()
    res = h.run([0xA3, 0x2A, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0])
    data = bytes(res.data)
    assert struct.unpack_from(">I", data, 0)[0] == len(data) - 4
    assert data[4] == 0x10  # format 1
