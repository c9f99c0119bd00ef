"""``vsand demo``: a two-node mirrored cluster on 127.0.0.1, started with one command.

Theory of operation:
- Files: ``<dir>/a.yaml`` and ``<dir>/b.yaml`` (rewritten on every run), ``<dir>/cluster.secret``
  (generated once, then reused), each node's data directory ``<dir>/a`` and ``<dir>/b`` with
  its own LUN file, and each node's output in ``<dir>/a.log`` and ``<dir>/b.log``.
- Ports, from the base port P: iSCSI P and P+1, replication P+10 and P+11, the witness
  P+20, metrics P+6210 and P+6211 (P = 3260 gives the usual 9470 and 9471).  All seven are
  tried before anything is written or started, so a busy port is refused up front (exit
  code 2).  The witness (``vsand witness``, state in ``<dir>/witness``) is the third vote.
- Each node runs as ``python -m vsand run -c <file>`` in its own session: a terminal's Ctrl-C
  reaches only the demo, which then stops the nodes itself, by their PIDs.  On Linux a node
  also gets SIGTERM if the demo dies without cleaning up.
- Start-up succeeds when both iSCSI ports accept TCP connections (deadline 30 s).  A node
  that exits first fails the demo (exit code 1) after its log tail is shown.
- While serving, a node that exits is reported and the other keeps serving (that is what the
  mirror is for); the demo ends with 1 when both are gone.  SIGINT, SIGTERM or SIGHUP stop
  both nodes (SIGTERM, then SIGKILL after 15 s) and the demo returns 0.
"""

from __future__ import annotations

import ctypes
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import FrameType
from typing import IO, Any, Final

import yaml

from .config_schema import parse_size

HOST: Final = "127.0.0.1"
IQN: Final = "iqn.2026-11.org.vsand:demo"
CLUSTER_ID: Final = "demo"
NODE_NAMES: Final = ("a", "b")
REPLICATION_OFFSET: Final = 10
METRICS_OFFSET: Final = 6210  # base 3260 -> 9470, the metrics port vsand uses elsewhere
WITNESS_OFFSET: Final = 20  # the witness (third vote) listens on P+20
START_DEADLINE_S: Final = 30.0
STOP_DEADLINE_S: Final = 15.0
POLL_S: Final = 0.2
LOG_TAIL_LINES: Final = 20
_PR_SET_PDEATHSIG: Final = 1


@dataclass(frozen=True, slots=True)
class DemoNode:
    """One node of the demo cluster: its ports and files (all paths absolute)."""

    name: str
    group: int  # target portal group tag
    iscsi_port: int
    replication_port: int
    metrics_port: int
    data_dir: str
    config_path: str
    log_path: str

    @property
    def url(self) -> str:
        return f"iscsi://{HOST}:{self.iscsi_port}/{IQN}/0"

    @property
    def lun_path(self) -> str:
        return os.path.join(self.data_dir, "lun0.img")


def demo_ports(base_port: int) -> list[int]:
    """Every port the demo listens on, node a's before node b's for each kind."""
    return [base_port + offset + i for offset in (0, REPLICATION_OFFSET, METRICS_OFFSET)
            for i in range(len(NODE_NAMES))] + [base_port + WITNESS_OFFSET]


def demo_nodes(directory: str, base_port: int) -> tuple[DemoNode, ...]:
    root = os.path.abspath(directory)
    return tuple(
        DemoNode(name=name, group=i + 1, iscsi_port=base_port + i,
                 replication_port=base_port + REPLICATION_OFFSET + i,
                 metrics_port=base_port + METRICS_OFFSET + i,
                 data_dir=os.path.join(root, name),
                 config_path=os.path.join(root, f"{name}.yaml"),
                 log_path=os.path.join(root, f"{name}.log"))
        for i, name in enumerate(NODE_NAMES))


def _witness_node(root: str, base_port: int) -> DemoNode:
    """The witness as the demo runs it: only its port, state directory and log matter."""
    return DemoNode(name="witness", group=0, iscsi_port=base_port + WITNESS_OFFSET,
                    replication_port=0, metrics_port=0,
                    data_dir=os.path.join(root, "witness"), config_path="",
                    log_path=os.path.join(root, "witness.log"))


def node_config(node: DemoNode, nodes: Sequence[DemoNode], secret_file: str,
                size: str) -> dict[str, Any]:
    """The config of ``node`` as the YAML document vsand reads."""
    return {
        "node": {"name": node.name},
        "data_dir": node.data_dir,
        "portals": [{"listen": f"{HOST}:{node.iscsi_port}", "group": node.group}],
        "targets": [{
            "iqn": IQN,
            "alias": "demo",
            "luns": [{"number": 0, "path": node.lun_path, "size": size, "block_size": 512}],
        }],
        "cluster": {
            "id": CLUSTER_ID,
            "secret_file": secret_file,
            "listen": f"{HOST}:{node.replication_port}",
            "nodes": [{"name": n.name, "address": f"{HOST}:{n.replication_port}"}
                      for n in nodes],
            "peer_timeout": 3,
            "heartbeat_interval": 0.5,
            "startup_wait": 10,
            "witness": f"{HOST}:{nodes[0].iscsi_port + WITNESS_OFFSET}",
        },
        "metrics": {"listen": f"{HOST}:{node.metrics_port}"},
        "log_level": "info",
    }


def ensure_secret(path: str) -> None:
    """Write 32 random bytes, hex-encoded, to ``path`` (mode 0600) unless it exists."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32) + "\n")


def write_demo_files(directory: str, base_port: int, size: str) -> tuple[DemoNode, ...]:
    """Create the directory tree, the shared secret and both nodes' configs."""
    root = os.path.abspath(directory)
    nodes = demo_nodes(root, base_port)
    secret_file = os.path.join(root, "cluster.secret")
    os.makedirs(root, exist_ok=True)
    ensure_secret(secret_file)
    for node in nodes:
        os.makedirs(node.data_dir, exist_ok=True)
        text = yaml.safe_dump(node_config(node, nodes, secret_file, size), sort_keys=False)
        with open(node.config_path, "w") as f:
            f.write(text)
    return nodes


def busy_ports(ports: Sequence[int], host: str = HOST) -> list[int]:
    """The ports of ``ports`` that cannot be bound on ``host`` right now."""
    busy = []
    for port in ports:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            # As the daemon does: a connection in TIME_WAIT from an earlier run is no obstacle.
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((host, port))
            except OSError:
                busy.append(port)
    return busy


def port_open(port: int, host: str = HOST) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def log_tail(path: str, lines: int = LOG_TAIL_LINES) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(max(0, os.fstat(f.fileno()).st_size - 64 * 1024))
            data = f.read()
    except OSError as e:
        return f"    ({path}: {e.strerror})"
    text = data.decode(errors="replace").splitlines()[-lines:]
    return "\n".join("    " + line for line in text) if text else "    (empty)"


def _die_with_parent() -> Callable[[], None] | None:
    """For ``preexec_fn``: the child gets SIGTERM when the demo process dies (Linux only).

    ``preexec_fn`` is unsafe with threads; the demo runs none.
    """
    if sys.platform != "linux":
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up before the fork

    def arm() -> None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    return arm


class _Node:
    """A running node process, started and ended by its own PID."""

    def __init__(self, node: DemoNode, python: str, argv: list[str] | None = None) -> None:
        self.node = node
        self.reported = False  # its exit has been announced
        self._log: IO[bytes] = open(node.log_path, "wb")
        argv = argv or [python, "-m", "vsand", "run", "-c", node.config_path]
        try:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=self._log,
                                         stderr=subprocess.STDOUT, start_new_session=True,
                                         preexec_fn=_die_with_parent())
        except BaseException:
            self._log.close()
            raise

    @property
    def pid(self) -> int:
        return self.proc.pid

    def exited(self) -> int | None:
        return self.proc.poll()

    def terminate(self) -> None:
        if self.proc.poll() is None:
            try:
                os.kill(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass

    def wait_or_kill(self, deadline_s: float) -> tuple[int, bool]:
        """Wait for the exit code; SIGKILL after ``deadline_s``.  Returns (code, killed)."""
        killed = False
        try:
            rc = self.proc.wait(timeout=deadline_s)
        except subprocess.TimeoutExpired:
            killed = True
            self.proc.kill()
            rc = self.proc.wait()
        self._log.close()
        return rc, killed


class _Signals:
    """SIGINT, SIGTERM and SIGHUP set a flag instead of ending the demo abruptly."""

    HANDLED: Final = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

    def __init__(self) -> None:
        self.received: int | None = None
        self._old: dict[int, Any] = {}

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.received = signum

    def __enter__(self) -> _Signals:
        for sig in self.HANDLED:
            self._old[sig] = signal.signal(sig, self._on_signal)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


def _say(text: str) -> None:
    print(text, flush=True)


def _complain(text: str) -> None:
    print(f"vsand demo: {text}", file=sys.stderr, flush=True)


def _exit_text(rc: int) -> str:
    if rc < 0:
        try:
            return f"killed by {signal.Signals(-rc).name}"
        except ValueError:
            return f"killed by signal {-rc}"
    return f"exit code {rc}"


def how_to_connect(nodes: Sequence[DemoNode], size: str, directory: str) -> str:
    a, b = nodes
    portals = [f"{HOST}:{n.iscsi_port}" for n in nodes]
    lines = [
        "",
        f"vsand demo: two nodes serve one mirrored {size} LUN on {HOST}.",
        "",
        *(f"  node {n.name}: {n.url}" for n in nodes),
        "",
        "Connect with open-iscsi (as root), one session through each node:",
        *(f"  iscsiadm -m discovery -t sendtargets -p {p}" for p in portals),
        *(f"  iscsiadm -m node -T {IQN} -p {p} --login" for p in portals),
        "  multipath -ll   # dm-multipath merges the two paths into one device: both nodes",
        "                  # report the same serial (VPD 0x80) and NAA id (VPD 0x83)",
        f"  iscsiadm -m node -T {IQN} --logout   # when done",
        "",
        "Quick check without logging in (libiscsi and qemu tools):",
        f"  iscsi-inq -e 1 -c 128 {a.url}   # VPD 0x80: the same serial via {b.iscsi_port}",
        f"  qemu-img info {a.url}",
        f"  qemu-io -f raw -c 'write -P 0x5a 0 1M' {a.url}",
        f"  qemu-io -f raw -c 'read -P 0x5a 0 1M' {b.url}   # written via a, read via b",
        "",
        f"Files in {os.path.abspath(directory)}:",
        f"  configs: {a.config_path}, {b.config_path}",
        f"  logs:    {a.log_path}, {b.log_path}",
        f"  LUNs:    {a.lun_path}, {b.lun_path}",
        "  metrics: " + ", ".join(f"http://{HOST}:{n.metrics_port}/metrics" for n in nodes),
        "  admin:   " + ", ".join(f"vsanctl -s {os.path.join(n.data_dir, 'vsand.sock')} status"
                                  for n in nodes),
        "",
        f"The witness (third vote) listens on {HOST}:{nodes[0].iscsi_port + WITNESS_OFFSET}: "
        "a node that loses its peer serves on only with its vote.",
        "Ctrl-C stops both nodes and the witness.",
    ]
    return "\n".join(lines)


def _wait_ready(running: list[_Node], signals: _Signals) -> int | None:
    """None once every node's portal accepts connections, else the demo's exit code."""
    end = time.monotonic() + START_DEADLINE_S
    ready: set[str] = set()
    while True:
        if signals.received is not None:
            _say(f"vsand demo: {signal.Signals(signals.received).name} during start-up: "
                 f"stopping both nodes")
            return 0
        for n in running:
            rc = n.exited()
            if rc is not None:
                n.reported = True
                _complain(f"node {n.node.name} stopped during start-up ({_exit_text(rc)}); "
                          f"last lines of {n.node.log_path}:\n{log_tail(n.node.log_path)}")
                return 1
            if n.node.name not in ready and port_open(n.node.iscsi_port):
                ready.add(n.node.name)
        if len(ready) == len(running) and _mirror_serving(running):
            return None
        if time.monotonic() > end:
            for n in running:
                if n.node.name not in ready:
                    _complain(f"node {n.node.name} does not accept connections on "
                              f"{HOST}:{n.node.iscsi_port} after {START_DEADLINE_S:.0f} s; "
                              f"last lines of {n.node.log_path}:\n{log_tail(n.node.log_path)}")
            return 1
        time.sleep(POLL_S)


def _mirror_serving(running: list[_Node]) -> bool:
    """Both nodes in sync and holding quorum: until then the LUN's paths are not usable."""
    from .admin import request
    for n in running:
        if n.node.name not in NODE_NAMES:
            continue
        try:
            st = request(os.path.join(n.node.data_dir, "vsand.sock"), "cluster", timeout=2)
        except (OSError, RuntimeError, ValueError):
            return False
        if not st:
            continue  # not clustered (the demo's own tests run it so)
        if not (st.get("quorum") or {}).get("serving") or any(
                m["role"] != "in-sync" for m in st["luns"].values()):
            return False
    return True


def _serve(running: list[_Node], signals: _Signals) -> int:
    """Report nodes that exit; 0 on a stop signal, 1 once every node is gone."""
    while signals.received is None:
        for n in running:
            rc = n.exited()
            if rc is None or n.reported:
                continue
            n.reported = True
            survivors = [m.node for m in running
                         if m.exited() is None and m.node.name in NODE_NAMES]
            _complain(f"node {n.node.name} stopped ({_exit_text(rc)}); last lines of "
                      f"{n.node.log_path}:\n{log_tail(n.node.log_path)}")
            if survivors:
                _say("vsand demo: still serving through " +
                     ", ".join(f"node {m.name} ({m.url})" for m in survivors))
        if all(n.reported for n in running if n.node.name in NODE_NAMES):
            _complain("both nodes are gone; the demo ends")
            return 1
        time.sleep(POLL_S)
    _say(f"\nvsand demo: {signal.Signals(signals.received).name}: stopping both nodes")
    return 0


def _stop_all(running: list[_Node]) -> None:
    was_running = [not n.reported and n.exited() is None for n in running]
    for n in running:
        n.terminate()
    for n, announce in zip(running, was_running):
        rc, killed = n.wait_or_kill(STOP_DEADLINE_S)
        if killed:
            _complain(f"node {n.node.name} (pid {n.pid}) did not stop within "
                      f"{STOP_DEADLINE_S:.0f} s of SIGTERM; killed it")
        elif announce:
            _say(f"vsand demo: node {n.node.name} stopped ({_exit_text(rc)})")


def run_demo(directory: str, *, base_port: int = 3260, size: str = "1GiB",
             python: str = sys.executable, keep: bool = True) -> int:
    """Run the demo cluster in ``directory`` until a signal; the process exit code.

    0: stopped by SIGINT, SIGTERM or SIGHUP.  1: a node failed to start, or both nodes
    stopped.  2: bad arguments or a port already in use; nothing was started.
    ``keep=False`` removes ``directory`` at the end if this call created it.
    """
    ports = demo_ports(base_port)
    if base_port < 1 or max(ports) > 65535:
        highest = 65535 - (max(ports) - base_port)
        _complain(f"base port {base_port} is out of range (allowed: 1..{highest}; the demo "
                  f"also uses +1, +{REPLICATION_OFFSET}, +{REPLICATION_OFFSET + 1}, "
                  f"+{METRICS_OFFSET} and +{METRICS_OFFSET + 1})")
        return 2
    try:
        if parse_size(size) <= 0:
            raise ValueError(f"{size!r} is not more than 0 bytes")
    except ValueError as e:
        _complain(f"LUN size: {e}")
        return 2
    busy = busy_ports(ports)
    if busy:
        _complain(f"port(s) {', '.join(map(str, busy))} on {HOST} already in use (the demo "
                  f"needs {', '.join(map(str, ports))}); stop what uses them or choose "
                  f"another --base-port")
        return 2

    root = os.path.abspath(directory)
    created = not os.path.exists(root)
    try:
        nodes = write_demo_files(root, base_port, size)
    except OSError as e:
        _complain(f"cannot write the demo files in {root}: {e}")
        return 2

    running: list[_Node] = []
    try:
        with _Signals() as signals:
            try:
                witness = _witness_node(root, base_port)
                running.append(_Node(witness, python, [
                    python, "-m", "vsand", "witness", "--cluster-id", CLUSTER_ID,
                    "--nodes", ",".join(NODE_NAMES), "--listen", f"{HOST}:{witness.iscsi_port}",
                    "--secret-file", os.path.join(root, "cluster.secret"),
                    "--state-dir", witness.data_dir]))
                _say(f"vsand demo: witness started, pid {running[-1].pid}, "
                     f"log {witness.log_path}")
                for node in nodes:
                    running.append(_Node(node, python))
                    _say(f"vsand demo: node {node.name} started, pid {running[-1].pid}, "
                         f"log {node.log_path}")
                rc = _wait_ready(running, signals)
                if rc is None:
                    _say(how_to_connect(nodes, size, root))
                    rc = _serve(running, signals)
                return rc
            except OSError as e:
                _complain(f"cannot start a node with {python}: {e}")
                return 1
            finally:
                _stop_all(running)
    finally:
        if not keep and created:
            shutil.rmtree(root, ignore_errors=True)
