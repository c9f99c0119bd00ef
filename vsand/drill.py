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
writer on the surviving node saw (detection, quorum, the peer's lease).  These writes do not
go through iSCSI; ``vsanctl drill --portals`` writes through every node's portal as an
initiator instead (vsand/drill_paths.py), and this side then only runs steps 1 and 3
(``own_writer=False``).
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any

from .drill_paths import REGION, WRITE, longest_stall, lost_writes, stamped
from .mirror.messages import Control, ControlKind
from .protocol.block import BlockOp, BlockRequest
from .replication import Role

if TYPE_CHECKING:
    from .cluster import Cluster
    from .replication import MirroredLun

REJOIN_DEADLINE = 120.0
LEAD_S = 0.5  # writes acknowledged before the failure: the stall is measured from them


def _epoch(cluster: Cluster) -> int | None:
    if cluster.views is not None:
        return cluster.views.heartbeat_epoch()
    return cluster.quorum.epoch if cluster.quorum is not None else None


async def run_drill(cluster: Cluster, m: MirroredLun, seconds: float,
                    own_writer: bool = True) -> dict[str, Any]:
    if m.role is not Role.IN_SYNC:
        raise ValueError(f"{m.label} is {m.role.value}: a drill needs both replicas in sync")
    # With three nodes: the highest other one, so that the source (the lowest) goes on.
    peer = max(m.peers)
    if cluster.endpoint is None or peer not in cluster.endpoint.links:
        raise ValueError(f"no link to node {peer}")
    report: dict[str, Any] = {"lun": m.label, "peer": peer, "freeze_s": seconds}
    if not own_writer:
        report["verify_before"] = await _verify(m)
        await asyncio.sleep(LEAD_S)
        failed_at, rejoined_at = await _fail_peer(cluster, m, peer, seconds)
        report.update(failed_at=failed_at, rejoin_s=round(rejoined_at - failed_at, 2),
                      quorum_epoch=_epoch(cluster))
        return report
    bs = m.lun.block_size
    blocks = REGION // bs
    per_write = WRITE // bs
    lba0 = m.lun.unit.params.blocks - blocks
    saved = bytes(await m.lun.apply_block(BlockRequest(BlockOp.READ, lba0, blocks)))
    report["verify_before"] = await _verify(m)
    acks: list[tuple[float, int, int]] = []  # (when, slot, version)
    errors = 0
    stop = asyncio.Event()

    async def writer() -> None:
        nonlocal errors
        version = 0
        while not stop.is_set():
            slot, data = stamped(version)
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
        await asyncio.sleep(LEAD_S)
        failed_at, rejoined_at = await _fail_peer(cluster, m, peer, seconds)
    finally:
        stop.set()
        await task

    now = bytes(await m.lun.apply_block(BlockRequest(BlockOp.READ, lba0, blocks)))
    lost = lost_writes(acks, now)
    report.update(
        writes_acknowledged=len(acks), write_errors=errors,
        stall_s=longest_stall(acks, failed_at),
        rejoin_s=round(rejoined_at - failed_at, 2),
        lost_writes=lost,
        quorum_epoch=_epoch(cluster))
    report["verify_after"] = await _verify(m)
    await m.submit(BlockRequest(BlockOp.WRITE, lba0, blocks, saved))
    return report


async def _fail_peer(cluster: Cluster, m: MirroredLun, peer: str,
                     seconds: float) -> tuple[float, float]:
    """The peer hangs for ``seconds``; (when it was told, when it was in sync again)."""
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
    return failed_at, rejoined_at


async def _verify(m: MirroredLun) -> dict[str, int]:
    m.start_verify()
    assert m.verify_task is not None
    await asyncio.shield(m.verify_task)
    st = m.verify_status() or {}
    return {"regions": st.get("regions_checked", 0), "differ": st.get("mismatches", 0)}
