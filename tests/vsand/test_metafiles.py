"""Atomic metadata files, and the mirror's MetaStore on them: the mirror's records survive a
reopen, and a crash between writing the temporary file and renaming it leaves the old record."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from vsand.metafiles import FileMetaStore, remove_durably, write_atomic
from vsand.mirror.bitmap import DirtyBitmap


def test_write_atomic_replaces_whole_and_is_private(tmp_path: Path) -> None:
    p = tmp_path / "sub" / "rec"
    write_atomic(str(p), b"one")
    write_atomic(str(p), b"two" * 1000)
    assert p.read_bytes() == b"two" * 1000
    assert os.stat(p).st_mode & 0o777 == 0o600
    assert not (tmp_path / "sub" / "rec.tmp").exists()
    remove_durably(str(p))
    remove_durably(str(p))  # already gone: fine
    assert not p.exists()


def test_a_torn_temporary_file_never_replaces_the_record(tmp_path: Path) -> None:
    store = FileMetaStore(str(tmp_path))
    store.write("lun0.bitmap", b"good")
    (tmp_path / "lun0.bitmap.tmp").write_bytes(b"half")  # a crash before the rename
    assert FileMetaStore(str(tmp_path)).read("lun0.bitmap") == b"good"


def test_mirror_bitmap_round_trips_through_the_file_store(tmp_path: Path) -> None:
    store = FileMetaStore(str(tmp_path / "meta"))
    bm = DirtyBitmap(1 << 30, 1 << 20)
    bm.mark(5 << 20, 3 << 20)
    assert bm.flush(store, "lun0.bitmap")
    again = DirtyBitmap.load(store, "lun0.bitmap", 1 << 30, 1 << 20)
    assert list(again.dirty_regions()) == [5, 6, 7]
    assert store.read("missing") is None


@pytest.mark.parametrize("name", ["", "../x", "a/b", ".", ".."])
def test_record_names_cannot_leave_the_directory(tmp_path: Path, name: str) -> None:
    with pytest.raises(ValueError):
        FileMetaStore(str(tmp_path)).write(name, b"x")
