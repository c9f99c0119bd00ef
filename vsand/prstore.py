"""Persistent reservations that survive a restart (APTPL, SPC-5 5.14.5).

The SCSI layer serializes a logical unit's reservation state and hands it to
``LogicalUnit.on_pr_change``; this module is that hook's other end.  One file per LU,
``<data_dir>/pr/<target iqn>-lun<N>.pr``, replaced atomically (temporary file, fsync, rename,
fsync of the directory) so a crash leaves either the old state or the new one, never a torn
file.  None means the initiator no longer asks for persistence: the file goes.

The write is synchronous: PERSISTENT RESERVE OUT is rare, and GOOD must not be returned
before the state it reports as persistent is on stable storage.
"""

from __future__ import annotations

import logging
import os

from .protocol.scsi.pr import PrState
from .protocol.scsi.unit import LogicalUnit

log = logging.getLogger("vsand.pr")


class PrStore:
    def __init__(self, data_dir: str) -> None:
        self.dir = os.path.join(data_dir, "pr")

    def path(self, target_iqn: str, lun: int) -> str:
        # iSCSI names never hold "/", but a config typo must not write outside the directory.
        safe = target_iqn.replace("/", "_").replace("\x00", "_")
        return os.path.join(self.dir, f"{safe}-lun{lun}.pr")

    def load(self, target_iqn: str, lun: int) -> bytes | None:
        try:
            with open(self.path(target_iqn, lun), "rb") as f:
                return f.read()
        except FileNotFoundError:
            return None

    def save(self, target_iqn: str, lun: int, data: bytes | None) -> None:
        path = self.path(target_iqn, lun)
        if data is None:
            try:
                os.unlink(path)
            except FileNotFoundError:
                return
            _fsync_dir(self.dir)
            return
        os.makedirs(self.dir, exist_ok=True)
        tmp = f"{path}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        _fsync_dir(self.dir)

    def attach(self, target_iqn: str, lun: int, unit: LogicalUnit) -> None:
        """Restore the LU's saved state (if any) and keep it saved from now on."""
        data = self.load(target_iqn, lun)
        if data is not None:
            try:
                unit.pr = PrState.from_bytes(data)
                log.info("LUN %d of %s: restored %d persistent reservation registration(s)%s",
                         lun, target_iqn, len(unit.pr.regs),
                         " and a reservation" if unit.pr.reservation else "")
            except ValueError as e:
                # Refuse to guess: start without reservations, keep the file for an operator.
                bad = self.path(target_iqn, lun) + ".bad"
                os.replace(self.path(target_iqn, lun), bad)
                log.error("LUN %d of %s: unreadable persistent reservation state (%s); moved "
                          "to %s, starting without reservations", lun, target_iqn, e, bad)

        def on_change(data: bytes | None) -> None:
            self.save(target_iqn, lun, data)

        unit.on_pr_change = on_change


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
