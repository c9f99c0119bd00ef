"""qemu-io / qemu-img against an ``iscsi://`` URL, with bounded run times and checked output.

qemu-io prints one line per completed request (``wrote N/N bytes at offset X`` /
``read N/N bytes at offset X``), ``Pattern verification failed at offset X, N bytes`` when a
``-P`` read differs, ``<cmd> failed: <error>`` when a request fails, and exits non-zero when
a command failed. ``stdbuf -oL`` makes those lines reach us as they happen (the crash test
relies on it).
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

MiB = 1024 * 1024

_DONE = re.compile(r"^(wrote|read) (\d+)/(\d+) bytes at offset (\d+)$", re.M)
_BAD = re.compile(r"Pattern verification failed.*|^\S+ failed: .*$", re.M)


def line_buffered(argv: Sequence[str]) -> list[str]:
    return ["stdbuf", "-oL", *argv] if shutil.which("stdbuf") else list(argv)


def qemu_io_argv(url: str, commands: Sequence[str], *, fmt: str = "raw") -> list[str]:
    argv = ["qemu-io", "-f", fmt]
    for c in commands:
        argv += ["-c", c]
    argv.append(url)
    return line_buffered(argv)


@dataclass
class QemuIoResult:
    argv: list[str]
    returncode: int
    stdout: str
    stderr: str

    def completed(self) -> list[tuple[str, int, int]]:
        """(``wrote``/``read``, offset, length) for every request qemu-io reported done."""
        return [(m[1], int(m[4]), int(m[2])) for m in _DONE.finditer(self.stdout)]

    def problems(self) -> list[str]:
        return _BAD.findall(self.stdout) + _BAD.findall(self.stderr)

    def explain(self) -> str:
        cmd = shlex.join(self.argv)
        if len(cmd) > 600:
            cmd = cmd[:600] + " ..."
        return (
            f"qemu-io exit {self.returncode}\n$ {cmd}\n--- stdout (tail) ---\n"
            f"{_tail(self.stdout)}\n--- stderr (tail) ---\n{_tail(self.stderr)}"
        )


def qemu_io(url: str, commands: Sequence[str], *, timeout: float = 120.0) -> QemuIoResult:
    argv = qemu_io_argv(url, commands)
    cp = _run(argv, timeout)
    return QemuIoResult(argv, cp.returncode, cp.stdout, cp.stderr)


def check_qemu_io(url: str, commands: Sequence[str], *, timeout: float = 120.0) -> QemuIoResult:
    """Run qemu-io; assert exit 0, no pattern mismatch or failed request, and that every
    read/write command reported completion."""
    r = qemu_io(url, commands, timeout=timeout)
    wanted = sum(1 for c in commands if c.split()[0] in {"read", "write", "aio_read", "aio_write"})
    assert r.returncode == 0 and not r.problems() and len(r.completed()) == wanted, (
        f"{len(r.completed())}/{wanted} requests completed; problems: {r.problems()[:5]}\n"
        + r.explain()
    )
    return r


def qemu_img(*args: str, timeout: float = 300.0) -> subprocess.CompletedProcess[str]:
    argv = ["qemu-img", *args]
    cp = _run(argv, timeout)
    assert cp.returncode == 0, (
        f"$ {shlex.join(argv)}\nexit {cp.returncode}\n--- stdout ---\n{_tail(cp.stdout)}\n"
        f"--- stderr ---\n{_tail(cp.stderr)}"
    )
    return cp


def write_random_file(path: Path, size: int, chunk: int = 4 * MiB) -> None:
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(chunk, left)
            f.write(os.urandom(n))
            left -= n


def _run(argv: Sequence[str], timeout: float) -> subprocess.CompletedProcess[str]:
    """subprocess.run in its own session; on timeout SIGKILL it (by PID) and fail."""
    proc = subprocess.Popen(
        list(argv), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.kill(proc.pid, signal.SIGKILL)
        out, err = proc.communicate(timeout=10)
        raise AssertionError(
            f"timed out after {timeout:.0f} s: {shlex.join(argv)[:400]}\n"
            f"--- stdout ---\n{_tail(out)}\n--- stderr ---\n{_tail(err)}"
        ) from None
    return subprocess.CompletedProcess(list(argv), proc.returncode, out, err)


def _tail(text: str, lines: int = 25) -> str:
    return "\n".join(text.splitlines()[-lines:])
