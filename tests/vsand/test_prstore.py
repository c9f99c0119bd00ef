"""PrStore: APTPL reservation state written atomically, reloaded at start-up, removed when
the initiator stops asking for persistence."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import pytest

from vsand.protocol.scsi import LogicalUnit, LunParams, ScsiCommand, ScsiTarget, Status
from vsand.protocol.scsi.pr import EX_AC
from vsand.prstore import PrStore

IQN = "iqn.2026-11.org.vsand:disk"
NEXUS = f"iqn.a:1,i,0x400000000001,{IQN},t,0x0001"
OTHER = f"iqn.a:2,i,0x400000000001,{IQN},t,0x0001"


def make_unit() -> tuple[ScsiTarget, LogicalUnit]:
    lu = LogicalUnit(LunParams(block_size=512, blocks=64, serial="s", naa_id=bytes(16)))
    return ScsiTarget({0: lu}), lu


def prout(t: ScsiTarget, nexus: str, sa: int, key: int = 0, sark: int = 0, rtype: int = 0,
          flags: int = 0) -> int:
    data = struct.pack(">QQIBBH", key, sark, 0, flags, 0, 0)
    cdb = struct.pack(">BBBHIB", 0x5F, sa, rtype, 0, len(data), 0)
    res = t.execute(ScsiCommand(cdb, 0, nexus, data, len(data)))
    assert not isinstance(res, type(None)) and hasattr(res, "status")
    return int(res.status)  # type: ignore[union-attr]


def read_reservation(t: ScsiTarget, nexus: str) -> bytes:
    cdb = struct.pack(">BB5sHB", 0x5E, 1, bytes(5), 64, 0)
    res = t.execute(ScsiCommand(cdb, 0, nexus, None, 64))
    assert res.status == Status.GOOD  # type: ignore[union-attr]
    return bytes(res.data)  # type: ignore[union-attr]


def test_save_is_atomic_and_reloads(tmp_path: Path) -> None:
    store = PrStore(str(tmp_path))
    t, lu = make_unit()
    store.attach(IQN, 3, lu)
    assert lu.on_pr_change is not None
    assert not os.path.exists(store.path(IQN, 3))  # nothing saved until APTPL is asked for
    assert prout(t, NEXUS, 6, sark=0x1234, flags=0x01) == Status.GOOD  # REGISTER+IGNORE, APTPL
    assert prout(t, NEXUS, 1, key=0x1234, rtype=EX_AC) == Status.GOOD
    path = store.path(IQN, 3)
    assert path == str(tmp_path / "pr" / f"{IQN}-lun3.pr")
    assert os.path.exists(path) and not os.path.exists(path + ".tmp")
    assert os.listdir(tmp_path / "pr") == [os.path.basename(path)]

    # "Restart": a fresh unit, the same store.
    t2, lu2 = make_unit()
    PrStore(str(tmp_path)).attach(IQN, 3, lu2)
    assert lu2.pr.active and lu2.pr.aptpl
    d = read_reservation(t2, OTHER)
    assert struct.unpack_from(">Q", d, 8)[0] == 0x1234 and d[21] == EX_AC
    # The restored reservation is enforced: another initiator cannot write.
    write = struct.pack(">BBIBHB", 0x2A, 0, 0, 0, 1, 0)
    res = t2.execute(ScsiCommand(write, 0, OTHER, bytes(512), 512))
    assert res.status == Status.RESERVATION_CONFLICT  # type: ignore[union-attr]


def test_file_goes_when_aptpl_is_cleared(tmp_path: Path) -> None:
    store = PrStore(str(tmp_path))
    t, lu = make_unit()
    store.attach(IQN, 0, lu)
    assert prout(t, NEXUS, 6, sark=7, flags=0x01) == Status.GOOD
    assert os.path.exists(store.path(IQN, 0))
    assert prout(t, NEXUS, 0, key=7, sark=8, flags=0x00) == Status.GOOD  # APTPL=0
    assert not os.path.exists(store.path(IQN, 0))
    t2, lu2 = make_unit()
    store.attach(IQN, 0, lu2)
    assert not lu2.pr.regs and not lu2.pr.active


def test_unregister_with_aptpl_keeps_an_empty_state(tmp_path: Path) -> None:
    store = PrStore(str(tmp_path))
    t, lu = make_unit()
    store.attach(IQN, 0, lu)
    assert prout(t, NEXUS, 6, sark=7, flags=0x01) == Status.GOOD
    assert prout(t, NEXUS, 0, key=7, sark=0, flags=0x01) == Status.GOOD  # unregister
    t2, lu2 = make_unit()
    store.attach(IQN, 0, lu2)
    assert not lu2.pr.regs and lu2.pr.generation == 2


def test_corrupt_file_is_set_aside(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    store = PrStore(str(tmp_path))
    os.makedirs(store.dir)
    with open(store.path(IQN, 0), "wb") as f:
        f.write(b"{not json")
    _, lu = make_unit()
    store.attach(IQN, 0, lu)
    assert not lu.pr.active and not lu.pr.regs
    assert os.path.exists(store.path(IQN, 0) + ".bad")
    assert not os.path.exists(store.path(IQN, 0))
    assert "unreadable" in caplog.text


def test_write_failure_fails_the_command(tmp_path: Path) -> None:
    store = PrStore(str(tmp_path))
    t, lu = make_unit()
    store.attach(IQN, 0, lu)
    (tmp_path / "pr").write_bytes(b"")  # a file where the directory should be
    assert prout(t, NEXUS, 6, sark=7, flags=0x01) == Status.CHECK_CONDITION
