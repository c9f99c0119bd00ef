"""A LUN: the SCSI logical unit's state, its backend, and the driver that runs SCSI tasks.

Theory of operation
-------------------
``ScsiTarget.execute(cmd)`` answers commands that need no storage directly and returns a
generator (``ScsiTask``) for the rest.  ``run_scsi`` drives that generator: each yielded
``BlockRequest`` is executed by ``Lun.execute_block`` (LBAs become byte offsets for the
backend) and its result is sent back in; an ``OSError`` is thrown in so the command can react,
and one that escapes the command becomes CHECK CONDITION through ``sense_for_errno``.  Nothing
but a ``ScsiResult`` ever leaves ``run_scsi``: a bug in a handler answers HARDWARE ERROR /
INTERNAL TARGET FAILURE and is logged, the session goes on.  A request whose ``lun`` is set
(EXTENDED COPY) runs on that LUN of the target (ENODEV if it is gone), on the async path.

Read buffers: the READ result is a pooled ``memoryview`` (see ``vsand.backends.base``) and ends
up, possibly sliced, as ``ScsiResult.data``.  Once the transport no longer needs the bytes (the
Data-In PDUs are written out and their slices dropped), it calls ``release_result(result)`` (or
``lun.release(result.data)``).  Forgetting to do so only costs an allocation; releasing while a
slice is still queued in the transport is detected and the buffer is not recycled.

Write cache: when the logical unit reports WCE=0, every write is executed as FUA, so GOOD always
means "stable" (DESIGN invariant 7).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import time
from collections.abc import Coroutine, Generator
from typing import Any, Protocol

from .backends.base import Backend, release_buffer
from .protocol.block import BlockOp, BlockRequest, Extent, ExtentState
from .protocol.scsi.sense import (
    HARDWARE_ERROR,
    INTERNAL_TARGET_FAILURE,
    CheckCondition,
    sense_for_errno,
)
from .protocol.scsi.types import LunParams, ScsiCommand, ScsiResult, Status
from .protocol.scsi.unit import LogicalUnit

log = logging.getLogger(__name__)

_now_ns = time.perf_counter_ns
_READ = BlockOp.READ
_WRITE = BlockOp.WRITE
# Ops whose failure is a write error (MEDIUM ERROR 0C/00 rather than 11/00 for EIO).
_WRITE_OPS = frozenset(
    (BlockOp.WRITE, BlockOp.WRITE_SAME, BlockOp.COMPARE_AND_WRITE, BlockOp.UNMAP, BlockOp.FLUSH,
     BlockOp.STATE)
)
_CHECK_CONDITION = int(Status.CHECK_CONDITION)
NOT_DONE: Any = object()  # try_block: "needs the async path"
# Bucket i counts requests under 2**i * 1024 ns.  64 buckets cannot overflow (2**64 µs is
# longer than any run), so the I/O path indexes without a bounds check; the exporter folds the
# ones past HIST_BUCKETS into +Inf.
HIST_BUCKETS = 24
_HIST_SLOTS = 64


class ScsiTarget(Protocol):
    def execute(self, cmd: ScsiCommand) -> ScsiResult | Generator[BlockRequest, Any, ScsiResult]:
        ...


class Lun:
    """One logical unit: SCSI state (``unit``), storage (``backend``) and cheap counters."""

    __slots__ = (
        "number",
        "unit",
        "backend",
        "block_size",
        "read_ops",
        "read_bytes",
        "read_ns",
        "write_ops",
        "write_bytes",
        "write_ns",
        "other_ops",
        "other_ns",
        "errors",
        "read_hist",
        "write_hist",
        "mirror",
        "_device",
    )

    def __init__(self, number: int, unit: LogicalUnit, backend: Backend) -> None:
        if unit.params.block_size != backend.block_size:
            raise ValueError(
                f"LUN {number}: block size {unit.params.block_size} differs from the "
                f"backend's {backend.block_size}"
            )
        self.number = number
        self.unit = unit
        self.backend = backend
        self.block_size = backend.block_size
        # Plain ints, read by a metrics collector at scrape time (no lock on the hot path).
        # *_ns are cumulative latencies of successful and failed requests alike.
        self.read_ops = 0
        self.read_bytes = 0
        self.read_ns = 0
        self.write_ops = 0
        self.write_bytes = 0
        self.write_ns = 0
        self.other_ops = 0
        self.other_ns = 0
        self.errors = 0
        # Latency histograms: bucket i counts requests that took under 2**i µs (the last one
        # everything slower).  A list index and an int add per I/O; exported at scrape time.
        self.read_hist = [0] * _HIST_SLOTS
        self.write_hist = [0] * _HIST_SLOTS
        # A MirroredLun (vsand.replication) when the LUN is mirrored: data-changing requests
        # go through it to every replica; it applies them here with ``apply_block``.
        self.mirror: Any = None
        self._device: Any = None  # a ScsiTarget of this LU alone, to apply shared state

    @classmethod
    def from_params(cls, number: int, params: LunParams, backend: Backend) -> Lun:
        return cls(number, LogicalUnit(params), backend)

    def try_block(self, req: BlockRequest) -> Any:
        """The request done synchronously from the page cache, or NOT_DONE; raises OSError."""
        op = req.op
        bs = self.block_size
        if op is _READ:
            n = req.blocks * bs
            t0 = _now_ns()
            buf = self.backend.try_read(req.lba * bs, n)
            if buf is None:
                return NOT_DONE
            dt = _now_ns() - t0
            self.read_ops += 1
            self.read_bytes += n
            self.read_ns += dt
            self.read_hist[(dt >> 10).bit_length()] += 1
            return buf
        if op is _WRITE and self.mirror is None:
            return self.try_apply_write(req)
        return NOT_DONE

    def try_apply_write(self, req: BlockRequest) -> Any:
        """A WRITE done here from the page cache (None), or NOT_DONE; raises OSError.  The
        mirror calls it to apply an ordered write without a task when the cache takes it."""
        if req.op is _WRITE:
            data = req.data
            if data is None or req.fua or not self.unit.write_cache:
                return NOT_DONE
            bs = self.block_size
            t0 = _now_ns()
            if not self.backend.try_write(req.lba * bs, data):
                return NOT_DONE
            dt = _now_ns() - t0
            self.write_ops += 1
            self.write_bytes += len(data)
            self.write_ns += dt
            self.write_hist[(dt >> 10).bit_length()] += 1
            return None
        return NOT_DONE

    async def execute_block(self, req: BlockRequest) -> Any:
        """Run one block request; results as listed in ``protocol.block``; raises OSError."""
        mirror = self.mirror
        if mirror is not None and req.op in _WRITE_OPS:
            return await mirror.submit(req)
        return await self.apply_block(req)

    async def apply_block(self, req: BlockRequest) -> Any:
        """``execute_block`` on this node's storage only."""
        op = req.op
        bs = self.block_size
        t0 = _now_ns()
        try:
            if op is _READ:
                n = req.blocks * bs
                buf = await self.backend.read(req.lba * bs, n)
                dt = _now_ns() - t0
                self.read_ops += 1
                self.read_bytes += n
                self.read_ns += dt
                self.read_hist[(dt >> 10).bit_length()] += 1
                return buf
            if op is _WRITE:
                data = req.data
                if data is None:
                    raise OSError(errno.EINVAL, "WRITE without data")
                fua = req.fua or not self.unit.write_cache
                await self.backend.write(req.lba * bs, data, fua)
                dt = _now_ns() - t0
                self.write_ops += 1
                self.write_bytes += len(data)
                self.write_ns += dt
                self.write_hist[(dt >> 10).bit_length()] += 1
                return None
            result = await self._execute_other(req, bs)
            self.other_ops += 1
            self.other_ns += _now_ns() - t0
            return result
        except Exception:  # cancellation is not an error of the LUN
            self.errors += 1
            raise

    async def _execute_other(self, req: BlockRequest, bs: int) -> Any:
        op = req.op
        be = self.backend
        if op is BlockOp.FLUSH:
            await be.flush()
            return None
        if op is BlockOp.UNMAP:
            await be.unmap([(lba * bs, blocks * bs) for lba, blocks in req.ranges])
            return None
        if op is BlockOp.WRITE_SAME:
            if req.data is None or len(req.data) != bs:
                raise OSError(errno.EINVAL, "WRITE SAME needs exactly one block of data")
            fua = req.fua or not self.unit.write_cache
            await be.write_same(req.lba * bs, req.data, req.blocks, req.unmap, fua)
            self.write_bytes += req.blocks * bs
            return None
        if op is BlockOp.COMPARE_AND_WRITE:
            n = req.blocks * bs
            data = req.data
            if data is None or len(data) != 2 * n:
                raise OSError(errno.EINVAL, "COMPARE AND WRITE needs verify and write blocks")
            view = memoryview(data)
            fua = req.fua or not self.unit.write_cache
            return await be.compare_and_write(req.lba * bs, view[:n], view[n:], fua)
        if op is BlockOp.LBA_STATUS:
            return await self._lba_status(req.lba, req.blocks)
        if op is BlockOp.STATE:
            if self._device is None:
                from .protocol.scsi.target import ScsiTarget as Device
                self._device = Device({self.number: self.unit})
            try:
                return self._device.apply_shared(self.number, req.data)
            except ValueError as e:
                raise OSError(errno.EINVAL, f"shared state change: {e}") from None
        if op is BlockOp.PREFETCH:
            await be.prefetch(req.lba * bs, req.blocks * bs)
            return None
        raise OSError(errno.EOPNOTSUPP, f"block op {op!r} not supported")

    async def _lba_status(self, lba: int, blocks: int) -> list[Extent]:
        """Backend byte extents → block extents, contiguous from ``lba``.

        Hole boundaries come in file-system blocks; a LUN block that is partly mapped counts as
        mapped (rounding mapped extents outward, holes inward), so a deallocated report is
        never a lie.
        """
        bs = self.block_size
        total = self.backend.size // bs
        if blocks <= 0 or lba + blocks > total:
            blocks = total - lba
        raw = await self.backend.lba_status(lba * bs, blocks * bs)
        out: list[Extent] = []
        pos = lba
        for off, length, mapped in raw:
            end = off + length
            stop = -(-end // bs) if mapped else end // bs
            if stop <= pos:
                continue
            state = ExtentState.MAPPED if mapped else ExtentState.DEALLOCATED
            if out and out[-1].state == state:
                prev = out.pop()
                out.append(Extent(prev.lba, stop - prev.lba, state))
            else:
                out.append(Extent(pos, stop - pos, state))
            pos = stop
        if not out:
            out.append(Extent(lba, max(blocks, 0), ExtentState.MAPPED))
        return out

    def release(self, buf: object) -> None:
        """Give back a READ buffer once it is sent; anything else is ignored."""
        release_buffer(buf)

    def counters(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in self.__slots__[4:-2]}


def release_result(result: ScsiResult) -> None:
    """Recycle ``result.data`` if it is a pooled read buffer (call after it is transmitted)."""
    release_buffer(result.data)


def _internal_failure() -> ScsiResult:
    return ScsiResult(
        _CHECK_CONDITION, CheckCondition(HARDWARE_ERROR, INTERNAL_TARGET_FAILURE).to_bytes()
    )


def start_scsi(target: ScsiTarget, cmd: ScsiCommand,
               luns: dict[int, Lun]) -> ScsiResult | Coroutine[Any, Any, ScsiResult]:
    """Execute ``cmd`` as far as it can go without blocking.

    Returns the ScsiResult when the command completed synchronously (the common case: a READ
    or WRITE served by the page cache, with no coroutine or task at all), otherwise a
    coroutine that finishes it.  Never raises.
    """
    req: BlockRequest | None = None
    try:
        task = target.execute(cmd)
        if type(task) is ScsiResult:
            return task
        lun = luns.get(cmd.lun)
        if lun is None:
            raise RuntimeError(f"command for LUN {cmd.lun} yielded I/O but no such LUN")
        req = next(task)  # type: ignore[arg-type]
        while True:
            if req.lun is not None:
                # I/O on a LUN named by the request (EXTENDED COPY): the async path routes it.
                return _finish(task, req, lun, cmd, luns)  # type: ignore[arg-type]
            try:
                result = lun.try_block(req)
            except OSError as e:
                req = task.throw(e)  # type: ignore[union-attr]
                continue
            if result is NOT_DONE:
                return _finish(task, req, lun, cmd, luns)  # type: ignore[arg-type]
            req = task.send(result)  # type: ignore[union-attr]
    except BaseException as e:  # noqa: B036 - StopIteration carries the result
        return _outcome(e, req, cmd)


async def _finish(task: Generator[BlockRequest, Any, ScsiResult], req: BlockRequest, lun: Lun,
                  cmd: ScsiCommand, luns: dict[int, Lun]) -> ScsiResult:
    try:
        while True:
            try:
                if req.lun is None:
                    result = await lun.execute_block(req)
                else:
                    result = await _execute_on(luns, req)
            except OSError as e:
                req = task.throw(e)
            else:
                req = task.send(result)
    except (asyncio.CancelledError, KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:  # noqa: B036
        return _outcome(e, req, cmd)


async def _execute_on(luns: dict[int, Lun], req: BlockRequest) -> Any:
    """A request addressed to a LUN by number (EXTENDED COPY's copy targets)."""
    other = luns.get(req.lun)  # type: ignore[arg-type]
    if other is None:
        raise OSError(errno.ENODEV, f"no LUN {req.lun}")
    # A copy runs as many chunked requests that the page cache may serve without suspending;
    # giving the loop a turn per chunk keeps a long copy from starving other sessions.
    await asyncio.sleep(0)
    return await other.execute_block(req)


def _outcome(e: BaseException, req: BlockRequest | None, cmd: ScsiCommand) -> ScsiResult:
    """The ScsiResult for however a SCSI task ended."""
    if isinstance(e, StopIteration):
        value = e.value
        if isinstance(value, ScsiResult):
            return value
        log.error("SCSI task for %r returned %r, not a ScsiResult", cmd.cdb[:1], value)
        return _internal_failure()
    if isinstance(e, OSError):
        # The request that failed decides read vs write error; an OSError without errno (a
        # library's, not the kernel's) maps to internal failure.
        is_write = req is not None and req.op in _WRITE_OPS
        return ScsiResult(_CHECK_CONDITION, sense_for_errno(e.errno, is_write).to_bytes())
    if isinstance(e, CheckCondition):
        # Handlers should have turned it into a result already; answer it anyway.
        return ScsiResult(_CHECK_CONDITION, e.to_bytes())
    if not isinstance(e, Exception):
        raise e
    log.error("internal failure executing CDB %s on LUN %d", bytes(cmd.cdb).hex(), cmd.lun,
              exc_info=e)
    return _internal_failure()


async def run_scsi(target: ScsiTarget, cmd: ScsiCommand, luns: dict[int, Lun]) -> ScsiResult:
    """Execute ``cmd`` to completion; never raises (except cancellation of the caller)."""
    outcome = start_scsi(target, cmd, luns)
    if type(outcome) is ScsiResult:
        return outcome
    return await outcome  # type: ignore[misc]
