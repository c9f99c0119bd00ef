"""Two initiators race COMPARE AND WRITE on the same block, round after round: exactly one
wins each round (GOOD), the other gets MISCOMPARE, and the block holds the winner's data."""

from __future__ import annotations

import struct
import threading

from rawiscsi import SCSI_RSP, RawInitiator
from rig.procs import VsandTarget

ROUNDS = 200
LBA = 77


def _caw(c: RawInitiator, verify: bytes, write: bytes) -> int:
    cdb = struct.pack(">BBQ3xBBB", 0x89, 0, LBA, 1, 0, 0)
    c.command(cdb, edtl=1024, write=True, data=verify + write)
    p, _ = c.response()
    assert p.opcode == SCSI_RSP
    if p.bhs[3] == 2:
        sense = p.data[2:]
        assert (sense[2] & 0x0F, sense[12], sense[13]) == (0x0E, 0x1D, 0x00), sense.hex()
    return p.bhs[3]


def _read(c: RawInitiator) -> bytes:
    c.command(struct.pack(">BBIBHB", 0x28, 0, LBA, 0, 1, 0), edtl=512, read=True)
    _, data = c.response()
    return data


def test_exactly_one_compare_and_write_wins_each_round(tmp_path) -> None:
    t = VsandTarget(tmp_path)
    t.start()
    try:
        a = RawInitiator(t.port)
        b = RawInitiator(t.port)
        b.isid += 1
        for c, name in ((a, "iqn.2026-11.org.vsand:racer-a"), (b, "iqn.2026-11.org.vsand:racer-b")):
            assert c.login(t.iqn, initiator=name).bhs[36:38] == b"\0\0"
        current = _read(a)
        wins = {"a": 0, "b": 0}
        for r in range(ROUNDS):
            mine = {"a": bytes([r % 256]) * 256 + b"A" * 256,
                    "b": bytes([r % 256]) * 256 + b"B" * 256}
            results: dict[str, int] = {}
            barrier = threading.Barrier(2)

            def go(c: RawInitiator, who: str) -> None:
                barrier.wait()
                results[who] = _caw(c, current, mine[who])

            threads = [threading.Thread(target=go, args=(a, "a")),
                       threading.Thread(target=go, args=(b, "b"))]
            for th in threads:
                th.start()
            for th in threads:
                th.join(30)
            assert sorted(results.values()) == [0, 2], (r, results)
            winner = "a" if results["a"] == 0 else "b"
            wins[winner] += 1
            current = _read(a)
            assert current == mine[winner], r
        assert sum(wins.values()) == ROUNDS
        a.close()
        b.close()
    finally:
        t.stop()
