"""Values that cross the boundary between a transport and the SCSI emulation."""

from __future__ import annotations

import enum
from collections.abc import Generator
from dataclasses import dataclass
from typing import Any

from ..block import BlockRequest


class Status(enum.IntEnum):
    GOOD = 0x00
    CHECK_CONDITION = 0x02
    CONDITION_MET = 0x04
    BUSY = 0x08
    RESERVATION_CONFLICT = 0x18
    TASK_SET_FULL = 0x28
    ACA_ACTIVE = 0x30
    TASK_ABORTED = 0x40


@dataclass(slots=True)
class ScsiCommand:
    cdb: bytes | bytearray | memoryview
    lun: int
    # Identifies the I_T nexus (initiator port + target port); keys unit attentions and,
    # later, reservations.  Any stable string, e.g. "iqn.x,i,0x23d000000001,t,1".
    nexus: str
    # Data received from the initiator for this command (at most ``edtl`` bytes).
    data_out: bytes | bytearray | memoryview | None
    # Expected data transfer length the transport announced for this command.
    edtl: int
    task_attr: int = 0


@dataclass(slots=True)
class ScsiResult:
    status: int
    sense: bytes | None = None
    # Data-In payload, already cut to the CDB's allocation length; the transport cuts it
    # further to the expected data transfer length and reports the residual.
    data: bytes | bytearray | memoryview | None = None


# A command that needs storage I/O runs as a generator: it yields BlockRequests, is sent each
# request's result (see protocol.block), and returns its ScsiResult.  An executor that fails a
# request throws the OSError into the generator; commands let it propagate and the executor
# answers with sense_for_errno().  Commands that need no I/O return a ScsiResult directly.
ScsiTask = Generator[BlockRequest, Any, ScsiResult]


@dataclass(slots=True)
class LunParams:
    block_size: int  # 512 or 4096
    blocks: int
    serial: str
    naa_id: bytes  # 16-byte NAA IEEE Registered Extended designator, cluster-wide identity
    read_only: bool = False
    write_cache: bool = True  # WCE as reported (and changeable) in the caching mode page
    thin: bool = True  # LBPME: UNMAP deallocates and reads of deallocated blocks give zeroes
    vendor: str = "VSAND"
    product: str = "VIRTUAL-DISK"
    revision: str = "0001"
    target_name: str = ""  # the iSCSI target name, for the SCSI name string designator
    relative_port: int = 1  # relative target port of a nexus whose port is not known
    # Every target port of this node (one per portal group, numbered by its tag), as
    # REPORT TARGET PORT GROUPS lists them.
    relative_ports: tuple[int, ...] = ()
    port_group: int = 1  # target port group (one per node)
    max_transfer_blocks: int = 0  # 0: derive from 8 MiB
    max_unmap_blocks: int = 0x100000
    max_unmap_descriptors: int = 256
    max_write_same_blocks: int = 0x100000
