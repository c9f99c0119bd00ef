"""Any CDB, any Data-Out: the answer is a result, never an exception (DESIGN invariant 6)."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scsi_harness import Harness

from vsand.protocol.scsi import ScsiResult, Status
from vsand.protocol.scsi.target import TABLE

KNOWN = sorted(TABLE)
# Small LUNs so that random LBAs and lengths sometimes land inside the medium.
HARNESSES = [Harness(blocks=64), Harness(blocks=64, thin=False, read_only=True),
             Harness(blocks=32, block_size=4096, max_write_same_blocks=8)]

cdbs = st.one_of(
    st.binary(min_size=0, max_size=32),
    st.tuples(st.sampled_from(KNOWN), st.binary(min_size=0, max_size=31)).map(
        lambda t: bytes((t[0],)) + t[1]),
    # Known opcode, small LBA/length fields: reach the I/O paths, not just the range checks.
    st.tuples(st.sampled_from(KNOWN), st.integers(0, 255), st.lists(
        st.integers(0, 3), min_size=14, max_size=14)).map(
        lambda t: bytes((t[0], t[1])) + bytes(t[2])),
)


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cdb=cdbs, data=st.one_of(st.none(), st.binary(max_size=9000)), which=st.integers(0, 2),
       lun=st.sampled_from([0, 0, 0, 1]), nexus=st.sampled_from(["I1", "I2"]))
def test_random_cdbs_always_answer(cdb: bytes, data: bytes | None, which: int, lun: int,
                                   nexus: str) -> None:
    h = HARNESSES[which]
    res = h.run(cdb, data, lun=lun, nexus=nexus)
    assert isinstance(res, ScsiResult)
    # A random RESERVE or PERSISTENT RESERVE OUT by one nexus makes the other conflict.
    assert res.status in (Status.GOOD, Status.CHECK_CONDITION, Status.RESERVATION_CONFLICT)
    if res.status == Status.CHECK_CONDITION:
        assert res.sense is not None and len(res.sense) == 18 and res.sense[0] in (0x70, 0xF0)
    # The emulation stays usable afterwards.
    assert h.run(bytes((0x12, 0, 0, 0, 36, 0)), lun=lun, nexus=nexus).status == Status.GOOD


@settings(max_examples=300, deadline=None)
@given(cdb=cdbs, data=st.one_of(st.none(), st.binary(max_size=600)))
def test_backend_failure_never_escapes(cdb: bytes, data: bytes | None) -> None:
    h = Harness(blocks=16)
    h.backend.fail = OSError(5, "EIO")
    res = h.run(cdb, data)
    assert isinstance(res, ScsiResult)
