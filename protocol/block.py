"""The protocol-neutral block request: what a frontend (iSCSI, NVMe/TCP) asks of a LUN.

Frontends decode their commands into ``BlockRequest`` values; LUN drivers, backends and the
mirror execute them and know nothing about the transport that produced them.  Addresses and
lengths are in logical blocks of the LUN's block size.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class BlockOp(enum.IntEnum):
    READ = 1
    WRITE = 2
    FLUSH = 3  # make everything written so far stable
    UNMAP = 4  # deallocate ``ranges``; reads of them return zeroes afterwards
    WRITE_SAME = 5  # ``data`` is one block, repeated over [lba, lba+blocks)
    COMPARE_AND_WRITE = 6  # ``data`` = verify blocks then write blocks; atomic
    LBA_STATUS = 7  # report mapped / deallocated extents from ``lba`` on
    PREFETCH = 8  # a hint: bring [lba, lba+blocks) into cache
    # A change of the logical unit's shared state (protocol.scsi.shared): ``data`` is the
    # encoded change; every replica applies it in the LUN's order.
    STATE = 9
    # Mirror-internal, never from a frontend: checksum [lba, lba+blocks) on every replica at
    # this point of the LUN's order (the online verify).
    VERIFY = 10


@dataclass(slots=True)
class BlockRequest:
    op: BlockOp
    lba: int = 0
    blocks: int = 0
    # WRITE: blocks*block_size bytes; WRITE_SAME: one block; COMPARE_AND_WRITE: 2*blocks.
    data: bytes | bytearray | memoryview | None = None
    # Force unit access: the write (or the read's source) is on stable storage before completion.
    fua: bool = False
    # UNMAP: (lba, blocks) pairs.  WRITE_SAME with ``unmap`` may deallocate instead of writing
    # when the pattern is all zeroes.
    ranges: tuple[tuple[int, int], ...] = field(default_factory=tuple)
    unmap: bool = False
    # Another LUN of the same target (EXTENDED COPY); None = the command's LUN.
    lun: int | None = None


class ExtentState(enum.IntEnum):
    MAPPED = 0
    DEALLOCATED = 1


@dataclass(frozen=True, slots=True)
class Extent:
    lba: int
    blocks: int
    state: ExtentState


# Results, by op:
#   READ               -> a buffer of exactly blocks*block_size bytes
#   WRITE, FLUSH, UNMAP, WRITE_SAME, PREFETCH -> None
#   COMPARE_AND_WRITE  -> -1 when the compare matched and the write happened, otherwise the
#                         byte offset of the first mismatch within the verify data
#   LBA_STATUS         -> list[Extent], starting at ``lba``, contiguous, at least one
#   STATE              -> the ScsiResult of applying the change on this replica
#   VERIFY             -> {node: checksum} of every in-sync replica (mirror only)
# Failures are raised by the executor as OSError with an errno; the frontend maps errno to its
# own error (see protocol.scsi.sense.sense_for_errno).  A request whose ``lun`` names no LUN of
# the target fails with ENODEV.
