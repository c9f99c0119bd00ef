"""Start, stop and kill the iSCSI targets under test: vsand and tgt (the reference).

Both are driven the same way: ``start()`` returns once the portal accepts TCP connections
(deadline 20 s; if the process dies first, ``DaemonError`` carries its stderr), ``stop()``
ends the process cleanly or raises ``DaemonError`` (vsand must exit 0 within 10 s of SIGTERM),
``kill()`` is a SIGKILL for crash tests. Every process is ended by its own PID, never by name.

Each target serves the same logical LUNs (``LunSpec``); ``url(number)`` gives the libiscsi /
qemu URL of logical LUN ``number`` (tgt puts its controller on LUN 0, so its disks are shifted
by one on the wire).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import random
import shlex
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Callable, Sequence

HOST = "127.0.0.1"
MiB = 1024 * 1024

START_DEADLINE_S = 20.0
STOP_DEADLINE_S = 10.0


class DaemonError(RuntimeError):
    """A target failed to start or to stop cleanly; the message ends with its stderr tail."""


@dataclass(frozen=True)
class LunSpec:
    number: int
    size: int  # bytes
    block_size: int = 512


DEFAULT_LUNS: tuple[LunSpec, ...] = (
    LunSpec(0, 256 * MiB, 512),
    LunSpec(1, 64 * MiB, 4096),
)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (bind to port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def port_open(port: int, host: str = HOST) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def wait_until(cond: Callable[[], object], what: str, deadline_s: float = 30.0) -> None:
    """Poll ``cond`` every 0.1 s until it is true; AssertionError naming ``what`` after
    ``deadline_s``."""
    end = time.monotonic() + deadline_s
    while not cond():
        if time.monotonic() > end:
            raise AssertionError(f"not within {deadline_s:g} s: {what}")
        time.sleep(0.1)


def wait_port(
    port: int,
    proc: subprocess.Popen[bytes] | None = None,
    deadline_s: float = START_DEADLINE_S,
    host: str = HOST,
) -> None:
    """Poll until ``host:port`` accepts a connection; fail early if ``proc`` exits."""
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if proc is not None and proc.poll() is not None:
            raise DaemonError(f"process exited with code {proc.returncode} before listening")
        if port_open(port, host):
            return
        time.sleep(0.05)
    raise DaemonError(f"port {host}:{port} not accepting connections after {deadline_s:.0f} s")


def _size_text(size: int) -> str:
    for unit, mult in (("GiB", 1024 * MiB), ("MiB", MiB), ("KiB", 1024)):
        if size % mult == 0:
            return f"{size // mult}{unit}"
    return str(size)


def _merge(base: dict[str, object], extra: dict[str, object]) -> None:
    """Deep-merge ``extra`` into ``base`` (nested dicts merge, anything else replaces)."""
    for key, value in extra.items():
        old = base.get(key)
        if isinstance(old, dict) and isinstance(value, dict):
            _merge(old, value)
        else:
            base[key] = value


def tail(path: Path, lines: int = 40) -> str:
    try:
        data = path.read_bytes()[-64 * 1024 :]
    except OSError:
        return "(no output file)"
    return "\n".join(data.decode(errors="replace").splitlines()[-lines:])


class Target:
    """One target process serving ``luns`` on ``127.0.0.1:port`` under ``iqn``."""

    kind = "?"
    lun_offset = 0  # wire LUN = logical LUN + lun_offset

    def __init__(
        self,
        workdir: Path,
        *,
        iqn: str,
        luns: Sequence[LunSpec] = DEFAULT_LUNS,
        port: int | None = None,
    ) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.iqn = iqn
        self.luns = tuple(luns)
        self.port = port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.stdout_path = self.workdir / f"{self.kind}.stdout"
        self.stderr_path = self.workdir / f"{self.kind}.stderr"
        self._out: IO[bytes] | None = None
        self._err: IO[bytes] | None = None
        self.failed_start = False

    # --- addressing -------------------------------------------------------------------
    def lun(self, number: int = 0) -> LunSpec:
        for spec in self.luns:
            if spec.number == number:
                return spec
        raise KeyError(f"no LUN {number} configured")

    def url(self, number: int = 0) -> str:
        self.lun(number)
        return f"iscsi://{HOST}:{self.port}/{self.iqn}/{number + self.lun_offset}"

    def backing_path(self, number: int = 0) -> Path:
        return self.workdir / "data" / f"lun{self.lun(number).number}.img"

    # --- process ----------------------------------------------------------------------
    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stderr_tail(self, lines: int = 40) -> str:
        return tail(self.stderr_path, lines)

    def describe(self) -> str:
        return f"{self.kind} pid={self.pid} port={self.port} workdir={self.workdir}"

    def _error(self, what: str) -> DaemonError:
        return DaemonError(
            f"{self.kind} ({self.describe()}): {what}\n--- {self.kind} stderr tail ---\n"
            f"{self.stderr_tail()}"
        )

    def _spawn(self, argv: Sequence[str]) -> None:
        if self.running():
            raise self._error("already running")
        self._close_logs()
        self.failed_start = False
        # Append so a restart keeps the earlier run's log.
        self._out = open(self.stdout_path, "ab")
        self._err = open(self.stderr_path, "ab")
        self._err.write(f"=== start {time.strftime('%H:%M:%S')}: {shlex.join(argv)}\n".encode())
        self._err.flush()
        self.proc = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=self._out,
            stderr=self._err,
            cwd=self.workdir,
            start_new_session=True,
        )

    def _await_ready(self) -> None:
        assert self.proc is not None
        try:
            wait_port(self.port, self.proc)
        except DaemonError as e:
            self._reap_after_failure()
            raise self._error(str(e)) from None

    def _reap_after_failure(self) -> None:
        if self.running():
            assert self.proc is not None
            self.proc.kill()
        if self.proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=5)
        self.failed_start = True  # reported by start(); stop() has nothing left to do
        self._close_logs()

    def _close_logs(self) -> None:
        for f in (self._out, self._err):
            if f is not None:
                f.close()
        self._out = self._err = None

    def start(self) -> "Target":
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def kill(self) -> None:
        """SIGKILL the daemon (by PID) and reap it."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            # Its own session (start_new_session): the group is the daemon and its children.
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except OSError:
                os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=STOP_DEADLINE_S)

    def _terminate(self, sig: int = signal.SIGTERM) -> int:
        """Send ``sig``, wait STOP_DEADLINE_S; SIGKILL and raise if it does not exit."""
        assert self.proc is not None
        if self.proc.poll() is None:
            os.kill(self.proc.pid, sig)
        try:
            return self.proc.wait(timeout=STOP_DEADLINE_S)
        except subprocess.TimeoutExpired:
            self.kill()
            raise self._error(
                f"did not exit within {STOP_DEADLINE_S:.0f} s of {signal.Signals(sig).name}"
                " (killed)"
            ) from None

    def restart(self) -> "Target":
        """Start again on the same port and backing files (after ``kill()`` or ``stop()``)."""
        return self.start()

    def __enter__(self) -> "Target":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        if exc[0] is None:
            self.stop()
        else:  # do not mask the original failure
            with contextlib.suppress(Exception):
                self.stop()


class VsandTarget(Target):
    """``python -m vsand run -c CONFIG`` with a generated config (see DESIGN contract).

    ``VSAND_IT_CMD`` overrides the command; ``{config}`` in it is replaced by the config path
    (e.g. ``VSAND_IT_CMD="coverage run -p -m vsand run -c {config}"``).
    """

    kind = "vsand"

    def __init__(
        self,
        workdir: Path,
        *,
        iqn: str = "iqn.2026-11.org.vsand:test",
        luns: Sequence[LunSpec] = DEFAULT_LUNS,
        port: int | None = None,
        node_name: str = "test-a",
        queue_depth: int = 128,
        log_level: str = "info",
        extra_config: dict[str, object] | None = None,
    ) -> None:
        super().__init__(workdir, iqn=iqn, luns=luns, port=port)
        self.node_name = node_name
        self.queue_depth = queue_depth
        self.log_level = log_level
        self.extra_config = dict(extra_config or {})
        self.config_path = self.workdir / "vsand.yaml"
        self.last_exit: int | None = None

    def config(self) -> dict[str, object]:
        cfg: dict[str, object] = {
            "node": {"name": self.node_name},
            "data_dir": str(self.workdir / "data"),
            "portals": [{"listen": f"{HOST}:{self.port}"}],
            "targets": [
                {
                    "iqn": self.iqn,
                    "alias": "test",
                    "luns": [
                        {
                            "number": spec.number,
                            "path": str(self.backing_path(spec.number)),
                            "size": _size_text(spec.size),
                            "block_size": spec.block_size,
                        }
                        for spec in self.luns
                    ],
                }
            ],
            "iscsi": {"queue_depth": self.queue_depth},
            "log_level": self.log_level,
        }
        _merge(cfg, self.extra_config)
        return cfg

    def write_config(self) -> Path:
        import yaml  # a vsand dependency; imported late so the rig loads without it

        (self.workdir / "data").mkdir(exist_ok=True)
        self.config_path.write_text(yaml.safe_dump(self.config(), sort_keys=False))
        return self.config_path

    def argv(self) -> list[str]:
        override = os.environ.get("VSAND_IT_CMD")
        if override:
            return [a.replace("{config}", str(self.config_path)) for a in shlex.split(override)]
        return [sys.executable, "-m", "vsand", "run", "-c", str(self.config_path)]

    def start(self) -> "VsandTarget":
        self.write_config()
        self._spawn(self.argv())
        self._await_ready()
        return self

    def stop(self) -> None:
        """SIGTERM; require exit code 0 within 10 s (raises ``DaemonError`` otherwise)."""
        if self.proc is None or self.failed_start:
            return
        if self.last_exit is not None and not self.running():
            return  # killed on purpose (crash test) and not restarted
        if self.proc.poll() is not None:
            rc = self.proc.returncode
            self.last_exit = rc
            self._close_logs()
            raise self._error(f"had already exited with code {rc} before stop()")
        rc = self._terminate(signal.SIGTERM)
        self.last_exit = rc
        self._close_logs()
        if rc != 0:
            raise self._error(f"exit code {rc} after SIGTERM (expected 0)")

    def kill(self) -> None:
        super().kill()
        if self.proc is not None:
            self.last_exit = self.proc.returncode

    def restart(self) -> "VsandTarget":
        """Start again on the same port, config and backing files."""
        self.last_exit = None
        return self.start()


class TgtTarget(Target):
    """``tgtd -f`` on its own control port and portal, configured with ``tgtadm``.

    tgt reserves LUN 0 for its controller, so logical LUN n is wire LUN n+1.
    """

    kind = "tgt"
    lun_offset = 1
    SOCKET_DIR = Path("/var/run/tgtd")

    def __init__(
        self,
        workdir: Path,
        *,
        iqn: str = "iqn.2026-11.org.tgt:test",
        luns: Sequence[LunSpec] = DEFAULT_LUNS,
        port: int | None = None,
        thin_provisioning: bool = False,
        nr_iothreads: int | None = None,
    ) -> None:
        super().__init__(workdir, iqn=iqn, luns=luns, port=port)
        self.thin_provisioning = thin_provisioning
        self.nr_iothreads = nr_iothreads
        self.control_port = self._free_control_port()

    @classmethod
    def _free_control_port(cls) -> int:
        """A control port whose lock file nobody holds (tgtd flocks socket.N.lock)."""
        cls.SOCKET_DIR.mkdir(parents=True, exist_ok=True)
        rng = random.Random()
        for _ in range(200):
            n = rng.randrange(1000, 32767)  # tgtd accepts -C up to 32767
            lock = cls.SOCKET_DIR / f"socket.{n}.lock"
            if not lock.exists():
                return n
            with open(lock, "a") as f:
                try:
                    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError:
                    continue
                fcntl.flock(f, fcntl.LOCK_UN)
                return n
        raise DaemonError("no free tgtd control port found")

    def tgtadm(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        argv = ["tgtadm", "-C", str(self.control_port), "--lld", "iscsi", *args]
        cp = subprocess.run(argv, capture_output=True, text=True, timeout=20)
        if check and cp.returncode != 0:
            raise self._error(f"{shlex.join(argv)} -> {cp.returncode}: {cp.stderr.strip()}")
        return cp

    def start(self) -> "TgtTarget":
        data = self.workdir / "data"
        data.mkdir(exist_ok=True)
        for spec in self.luns:
            path = self.backing_path(spec.number)
            if not path.exists() or path.stat().st_size != spec.size:
                with open(path, "ab") as f:
                    f.truncate(spec.size)
        argv = ["tgtd", "-f", "-C", str(self.control_port)]
        if self.nr_iothreads:
            argv += ["-t", str(self.nr_iothreads)]
        argv += ["--iscsi", f"portal={HOST}:{self.port}"]
        self._spawn(argv)
        self._await_ready()
        sock = self.SOCKET_DIR / f"socket.{self.control_port}"
        end = time.monotonic() + START_DEADLINE_S
        while not sock.exists():
            if time.monotonic() > end or not self.running():
                self._reap_after_failure()
                raise self._error(f"control socket {sock} did not appear")
            time.sleep(0.05)
        try:
            self.tgtadm("--op", "new", "--mode", "target", "--tid", "1", "-T", self.iqn)
            for spec in self.luns:
                wire = str(spec.number + self.lun_offset)
                args = ["--op", "new", "--mode", "logicalunit", "--tid", "1", "--lun", wire]
                args += ["-b", str(self.backing_path(spec.number))]
                if spec.block_size != 512:
                    args += ["--blocksize", str(spec.block_size)]
                self.tgtadm(*args)
                if self.thin_provisioning:
                    self.tgtadm("--op", "update", "--mode", "logicalunit", "--tid", "1",
                                "--lun", wire, "--params", "thin_provisioning=1")
            self.tgtadm("--op", "bind", "--mode", "target", "--tid", "1", "-I", "ALL")
        except BaseException:
            self._reap_after_failure()
            raise
        return self

    def stop(self) -> None:
        """Offline, delete the target (forcing out sessions), delete the system: tgtd exits."""
        if self.proc is None or self.failed_start:
            return
        if self.proc.poll() is None:
            self.tgtadm("--op", "update", "--mode", "sys", "--name", "State", "-v", "offline",
                        check=False)
            self.tgtadm("--op", "delete", "--mode", "target", "--tid", "1", "--force",
                        check=False)
            self.tgtadm("--op", "delete", "--mode", "system", check=False)
            try:
                self.proc.wait(timeout=STOP_DEADLINE_S)
            except subprocess.TimeoutExpired:
                self.kill()  # tgtd ignores SIGTERM
        self._close_logs()
        for leftover in ("", ".lock"):  # tgtd leaves its control socket behind
            with contextlib.suppress(OSError):
                (self.SOCKET_DIR / f"socket.{self.control_port}{leftover}").unlink()
        self.proc = None
