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

from .metafiles import read_file, remove_durably, write_atomic
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
        return read_file(self.path(target_iqn, lun))

    def save(self, target_iqn: str, lun: int, data: bytes | None) -> None:
        path = self.path(target_iqn, lun)
        if data is None:
            remove_durably(path)
        else:
            write_atomic(path, data)

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
