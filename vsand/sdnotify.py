"""systemd's notify protocol (sd_notify(3)) without libsystemd: one datagram per state."""

from __future__ import annotations

import asyncio
import logging
import os
import socket

log = logging.getLogger("vsand.systemd")


class Notifier:
    """Sends READY=1 / STOPPING=1 / STATUS=... / WATCHDOG=1 when NOTIFY_SOCKET is set."""

    def __init__(self, environ: dict[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        addr = env.get("NOTIFY_SOCKET", "")
        if addr.startswith("@"):
            addr = "\0" + addr[1:]  # abstract namespace
        self.addr = addr
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        self.watchdog_s = (int(usec) / 1e6 if usec.isdigit() and (not pid or pid == str(os.getpid()))
                           else 0.0)
        self._sock: socket.socket | None = None
        if addr:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self._task: asyncio.Task[None] | None = None

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    def notify(self, *fields: str) -> None:
        if self._sock is None:
            return
        try:
            self._sock.sendto("\n".join(fields).encode(), self.addr)
        except OSError as e:  # systemd gone or the socket full: never a reason to stop serving
            log.debug("sd_notify failed: %s", e)

    def start_watchdog(self) -> None:
        """Ping at half the watchdog interval, from the event loop: a stuck loop stops the
        pings, which is exactly what the watchdog is for."""
        if self._sock is not None and self.watchdog_s > 0:
            self._task = asyncio.get_running_loop().create_task(self._ping())

    async def _ping(self) -> None:
        while True:
            self.notify("WATCHDOG=1")
            await asyncio.sleep(self.watchdog_s / 2)

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        if self._sock is not None:
            self._sock.close()
            self._sock = None
