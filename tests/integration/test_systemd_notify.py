"""The daemon speaks systemd's notify protocol: READY=1, STATUS=..., watchdog pings,
STOPPING=1, measured on a socket that stands in for systemd."""

from __future__ import annotations

import socket
import time

import pytest

from rig.procs import VsandTarget


def test_ready_status_watchdog_and_stopping(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(10)
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    monkeypatch.setenv("WATCHDOG_USEC", "400000")  # pings every 0.2 s
    t = VsandTarget(tmp_path / "d")
    t.start()
    messages: list[str] = []
    try:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and sum("WATCHDOG=1" in m for m in messages) < 5:
            messages.append(sock.recv(4096).decode())
        ready = [m for m in messages if "READY=1" in m]
        assert ready and "STATUS=serving 1 target(s), 2 LUN(s)" in ready[0], messages
        assert sum("WATCHDOG=1" in m for m in messages) >= 5
    finally:
        t.stop()
    rest = []
    sock.settimeout(1)
    try:
        while True:
            rest.append(sock.recv(4096).decode())
    except (socket.timeout, BlockingIOError):
        pass
    assert any("STOPPING=1" in m for m in rest), rest
    sock.close()
