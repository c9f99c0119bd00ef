"""``vsanctl drill``: a failover drill on a running two-node cluster, measured.

Run on one node (here), for one mirrored LUN in sync:

1. verify: every region's checksum on both replicas (are the standby's data current?);
2. a writer on this node writes versioned 4 KiB blocks through the mirror, one after another,
   into the LUN's last 256 KiB (saved first, restored at the end: hence the operator's
   consent), recording when each write was acknowledged;
3. the peer is told to play a hung node for ``seconds`` (``PeerLink.freeze``): it falls
   silent, its lease runs out and it fences itself (ALUA unavailable: initiators would move
   to this node's paths), while this node detects the loss, wins the witness's vote and goes
   on alone; then the link drops, the nodes reconnect and the peer resyncs;
4. once both are in sync again: every acknowledged version must read back (the RPO, as lost
   writes), and verify runs again (the replicas must be identical).

The stall is the longest gap between two acknowledged writes around the failure: the RTO a
writer on the surviving node saw (detection, quorum, the peer's lease).  The writes do not go
through iSCSI, so an initiator's own path switching comes on top of it.
"""

from __future__ import annotations

import asyncio
import struct
import time
from typing import TYPE_CHECKING, Any

from .mirror.messages import Control, ControlKind
from .protocol.block import BlockOp, BlockRequest
from .replication import Role

if TYPE_CHECKING:
    from .cluster import Cluster
    from .replication import MirroredLun

REGION = 256 * 1024
WRITE = 4096
_STAMP = struct.Struct(">QQ")
REJOIN_DEADLINE = 120.0


async def run_drill(cluster: Cluster, m: MirroredLun, seconds: float) -> dict[str, Any]:
    if m.role is not Role.IN_SYNC:
        raise ValueError(f"{m.label} is {m.role.value}: a drill needs both replicas in sync")
    (peer,) = m.peers
    if cluster.endpoint is None or peer not in cluster.endpoint.links:
        raise ValueError(f"no link to node {peer}")
    bs = m.lun.block_size
    blocks = REGION // bs
    per_write = WRITE // bs
    lba0 = m.lun.unit.params.blocks - blocks
    saved = bytes(await m.lun.apply_block(BlockRequest(BlockOp.READ, lba0, blocks)))
    report: dict[str, Any] = {"lun": m.label, "peer": peer, "freeze_s": seconds}

    report["verify_before"] = await _verify(m)
    acks: list[tuple[float, int, int]] = []  # (when, slot, version)
    errors = 0
    stop = asyncio.Event()

    async def writer() -> None:
        nonlocal errors
        version = 0
        slots = REGION // WRITE
        while not stop.is_set():
            slot = version % slots
            data = _STAMP.pack(slot, version) * (WRITE // _STAMP.size)
            try:
                await m.submit(BlockRequest(BlockOp.WRITE, lba0 + slot * per_write, per_write,
                                            data))
            except OSError:
                errors += 1
                await asyncio.sleep(0.05)  # as a multipath initiator retries
            else:
                acks.append((time.monotonic(), slot, version))
            version += 1
            # A write served alone can complete without suspending: let the loop run (and
            # pace the writer like an initiator issuing one write per millisecond or so).
            await asyncio.sleep(0.001)

    task = asyncio.ensure_future(writer())
    try:
        await asyncio.sleep(0.5)
        failed_at = time.monotonic()
        cluster.send(peer, Control(0, ControlKind.DRILL, 0, value=int(seconds * 1000)))
        await asyncio.sleep(seconds + 0.5)
        deadline = time.monotonic() + REJOIN_DEADLINE
        while m.role is not Role.IN_SYNC:
            if time.monotonic() > deadline:
                raise TimeoutError(f"node {peer} did not rejoin within {REJOIN_DEADLINE:g} s")
            await asyncio.sleep(0.1)
        rejoined_at = time.monotonic()
        await asyncio.sleep(0.5)
    finally:
        stop.set()
        await task

    times = [t for t, _, _ in acks if t >= failed_at - 0.5]
    gaps = [b - a for a, b in zip(times, times[1:])]
    latest: dict[int, int] = {}
    for _, slot, version in acks:
        latest[slot] = version
    now = bytes(await m.lun.apply_block(BlockRequest(BlockOp.READ, lba0, blocks)))
    lost = sum(1 for slot, version in latest.items()
               if now[slot * WRITE:slot * WRITE + _STAMP.size] != _STAMP.pack(slot, version))
    report.update(
        writes_acknowledged=len(acks), write_errors=errors,
        stall_s=round(max(gaps, default=0.0), 3),
        rejoin_s=round(rejoined_at - failed_at, 2),
        lost_writes=lost,
        quorum_epoch=cluster.quorum.epoch if cluster.quorum is not None else None)
    report["verify_after"] = await _verify(m)
    await m.submit(BlockRequest(BlockOp.WRITE, lba0, blocks, saved))
    return report


async def _verify(m: MirroredLun) -> dict[str, int]:
    m.start_verify()
    assert m.verify_task is not None
    await asyncio.shield(m.verify_task)
    st = m.verify_status() or {}
    return {"regions": st.get("regions_checked", 0), "differ": st.get("mismatches", 0)}
