"""Test harness for the SCSI emulation: an in-memory backend and the executor's drive loop."""

from __future__ import annotations

import errno
import struct
from dataclasses import dataclass, field
from typing import Any

from vsand.protocol.block import BlockOp, BlockRequest, Extent, ExtentState
from vsand.protocol.scsi import (
    LogicalUnit,
    LunParams,
    ScsiCommand,
    ScsiResult,
    ScsiTarget,
    Status,
    sense_for_errno,
)

NAA = bytes.fromhex("6001405abcdef0123456789abcdef012")
WRITE_OPS = {BlockOp.WRITE, BlockOp.WRITE_SAME, BlockOp.UNMAP, BlockOp.COMPARE_AND_WRITE}


@dataclass
class MemBackend:
    """A bytearray disk that executes every BlockOp, recording what it was asked."""

    block_size: int
    blocks: int
    data: bytearray = field(init=False)
    deallocated: bytearray = field(init=False)  # one flag per block
    log: list[BlockRequest] = field(default_factory=list)
    fail: OSError | None = None

    def __post_init__(self) -> None:
        self.data = bytearray(self.block_size * self.blocks)
        self.deallocated = bytearray(b"\x01" * self.blocks)

    def _span(self, lba: int, n: int) -> slice:
        assert 0 <= lba and lba + n <= self.blocks, (lba, n)
        return slice(lba * self.block_size, (lba + n) * self.block_size)

    def execute(self, req: BlockRequest) -> Any:
        self.log.append(req)
        if self.fail is not None:
            raise self.fail
        bs = self.block_size
        if req.op == BlockOp.READ:
            return memoryview(self.data)[self._span(req.lba, req.blocks)]
        if req.op == BlockOp.WRITE:
            assert req.data is not None and len(req.data) == req.blocks * bs
            self.data[self._span(req.lba, req.blocks)] = req.data
            self.deallocated[req.lba : req.lba + req.blocks] = bytes(req.blocks)
            return None
        if req.op == BlockOp.WRITE_SAME:
            assert req.data is not None and len(req.data) == bs
            self.data[self._span(req.lba, req.blocks)] = bytes(req.data) * req.blocks
            zero = req.unmap and not any(req.data)
            self.deallocated[req.lba : req.lba + req.blocks] = bytes((int(zero),)) * req.blocks
            return None
        if req.op == BlockOp.UNMAP:
            for lba, n in req.ranges:
                self.data[self._span(lba, n)] = bytes(n * bs)
                self.deallocated[lba : lba + n] = b"\x01" * n
            return None
        if req.op == BlockOp.COMPARE_AND_WRITE:
            assert req.data is not None and len(req.data) == 2 * req.blocks * bs
            size = req.blocks * bs
            cur = self.data[self._span(req.lba, req.blocks)]
            verify = bytes(req.data[:size])
            for i in range(size):
                if cur[i] != verify[i]:
                    return i
            self.data[self._span(req.lba, req.blocks)] = req.data[size:]
            self.deallocated[req.lba : req.lba + req.blocks] = bytes(req.blocks)
            return -1
        if req.op == BlockOp.LBA_STATUS:
            out: list[Extent] = []
            lba = req.lba
            end = req.lba + req.blocks
            while lba < end:
                st = self.deallocated[lba]
                start = lba
                while lba < end and self.deallocated[lba] == st:
                    lba += 1
                out.append(Extent(start, lba - start, ExtentState(st)))
            return out
        if req.op in (BlockOp.FLUSH, BlockOp.PREFETCH):
            return None
        raise AssertionError(req.op)


def drive(target: ScsiTarget, cmd: ScsiCommand, backend: MemBackend,
          backends: dict[int, MemBackend] | None = None) -> ScsiResult:
    """The executor's loop, as vsand/lun.py runs it; ``backends`` by LUN, for requests that
    name one (``BlockRequest.lun``)."""
    res = target.execute(cmd)
    if isinstance(res, ScsiResult):
        return res
    is_write = False
    try:
        req = next(res)
        while True:
            is_write = req.op in WRITE_OPS
            try:
                be = backend if req.lun is None else (backends or {}).get(req.lun)
                if be is None:
                    raise OSError(errno.ENODEV, f"no LUN {req.lun}")
                value = be.execute(req)
            except OSError as e:
                req = res.throw(e)
                continue
            req = res.send(value)
    except StopIteration as stop:
        result = stop.value
        assert isinstance(result, ScsiResult)
        return result
    except OSError as e:
        return ScsiResult(Status.CHECK_CONDITION, sense_for_errno(e.errno, is_write).to_bytes())


def params(**kw: Any) -> LunParams:
    base: dict[str, Any] = dict(block_size=512, blocks=2048, serial="SN0001", naa_id=NAA,
                                target_name="iqn.2026-01.io.vsand:disk1")
    base.update(kw)
    return LunParams(**base)


class Harness:
    """One target with LUN 0 on an in-memory backend, and helpers to send CDBs."""

    def __init__(self, **kw: Any) -> None:
        self.params = params(**kw)
        self.lu = LogicalUnit(self.params)
        self.target = ScsiTarget({0: self.lu})
        # Huge LUNs (capacity tests) get a backend covering only their first blocks.
        self.backend = MemBackend(self.params.block_size, min(self.params.blocks, 1 << 17))
        self.bs = self.params.block_size
        self.luns = {0: self.lu}
        self.backends = {0: self.backend}

    def add_lun(self, n: int, **kw: Any) -> MemBackend:
        """Another LUN of the same target, with its own identity and backend."""
        kw.setdefault("naa_id", NAA[:-1] + bytes((n,)))
        kw.setdefault("serial", f"SN{n:04d}")
        p = params(**kw)
        lu = LogicalUnit(p)
        self.luns[n] = lu
        self.target.luns[n] = lu
        self.backends[n] = MemBackend(p.block_size, min(p.blocks, 1 << 17))
        return self.backends[n]

    def run(self, cdb: bytes | list[int], data: Any = None, lun: int = 0,
            nexus: str = "I1", edtl: int | None = None) -> ScsiResult:
        cdb = bytes(cdb)
        if edtl is None:
            edtl = len(data) if data is not None else 0
        return drive(self.target, ScsiCommand(cdb, lun, nexus, data, edtl),
                     self.backends.get(lun, self.backend), self.backends)


def sense(res: ScsiResult) -> tuple[int, int, int]:
    """(key, asc, ascq) of a CHECK CONDITION; (0, 0, 0) for GOOD."""
    if res.status == Status.GOOD:
        return (0, 0, 0)
    assert res.status == Status.CHECK_CONDITION and res.sense is not None
    s = res.sense
    return (s[2] & 0x0F, s[12], s[13])


def info(res: ScsiResult) -> int | None:
    s = res.sense
    assert s is not None
    return struct.unpack_from(">I", s, 3)[0] if s[0] & 0x80 else None


def field_pointer(res: ScsiResult) -> tuple[int, int | None]:
    s = res.sense
    assert s is not None and s[15] & 0x80
    return struct.unpack_from(">H", s, 16)[0], (s[15] & 7) if s[15] & 0x08 else None


# CDB builders
def rw10(op: int, lba: int, n: int, flags: int = 0) -> bytes:
    return struct.pack(">BBIBHB", op, flags, lba & 0xFFFFFFFF, 0, n, 0)


def rw12(op: int, lba: int, n: int, flags: int = 0) -> bytes:
    return struct.pack(">BBIIBB", op, flags, lba & 0xFFFFFFFF, n, 0, 0)


def rw16(op: int, lba: int, n: int, flags: int = 0) -> bytes:
    return struct.pack(">BBQIBB", op, flags, lba & (2**64 - 1), n, 0, 0)


def rw6(op: int, lba: int, n: int) -> bytes:
    return bytes((op, (lba >> 16) & 0x1F, (lba >> 8) & 0xFF, lba & 0xFF, n, 0))


GOOD = (0, 0, 0)
ILLEGAL = 0x5
INVALID_CDB = (0x5, 0x24, 0x00)
INVALID_PARAM = (0x5, 0x26, 0x00)
LBA_OOB = (0x5, 0x21, 0x00)
INVALID_OPCODE = (0x5, 0x20, 0x00)
INVALID_IU = (0x5, 0x0E, 0x03)
WRITE_PROTECT = (0x7, 0x27, 0x00)
MISCOMPARE = (0xE, 0x1D, 0x00)
LU_NOT_SUPPORTED = (0x5, 0x25, 0x00)
