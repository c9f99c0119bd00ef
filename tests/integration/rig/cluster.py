"""Several vsand nodes of one cluster on this machine, each its own process.

``VsandCluster`` starts one ``VsandTarget`` per node with a generated ``cluster`` section
(replication on 127.0.0.1 unless ``hosts`` says otherwise, a shared secret file, one portal
group per node), and reads each node's replication state over its admin socket.  Nodes are
started, stopped, killed and restarted by name; every process is ended by its own PID.
``target_factory`` builds each node (``VsandTarget``'s arguments; default ``VsandTarget``),
e.g. ``NetnsPair.vsand_target`` to run each node in its own network namespace.  With
``witness=True`` a ``vsand witness`` runs too, on 127.0.0.1, or on ``witness_host`` inside
network namespace ``witness_netns`` (started through ``ip netns exec``, its port probed from
inside that namespace).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import secrets
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Sequence

from .netns import netns_argv, wait_port_in_netns
from .procs import DEFAULT_LUNS, HOST, LunSpec, VsandTarget, free_port, wait_port

IN_SYNC_DEADLINE_S = 60.0


class VsandCluster:
    def __init__(
        self,
        workdir: Path,
        *,
        names: Sequence[str] = ("a", "b"),
        luns: Sequence[LunSpec] = DEFAULT_LUNS[:1],
        iqn: str = "iqn.2026-11.org.vsand:mirror",
        peer_timeout: float = 3.0,
        heartbeat_interval: float = 0.5,
        startup_wait: float = 5.0,
        hosts: dict[str, str] | None = None,
        extra_config: dict[str, object] | None = None,
        target_factory: Callable[..., VsandTarget] = VsandTarget,
        metrics: bool = False,
        witness: bool = False,
        witness_host: str = HOST,
        witness_netns: str | None = None,
        more_hosts: dict[str, str] | None = None,
    ) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.secret_path = self.workdir / "cluster.secret"
        self.secret_path.write_text(secrets.token_hex(24) + "\n")
        os.chmod(self.secret_path, 0o600)
        hosts = hosts or {}
        self.repl_ports = {n: free_port() for n in names}
        # more_hosts: each node's address on a second network (a list of two addresses).
        nodes_cfg = [{"name": n, "address": f"{hosts.get(n, HOST)}:{self.repl_ports[n]}"
                      if not more_hosts else [f"{hosts.get(n, HOST)}:{self.repl_ports[n]}",
                                              f"{more_hosts[n]}:{self.repl_ports[n]}"]}
                     for n in names]
        self.witness = WitnessProcess(self.workdir / "witness", list(names), self.secret_path,
                                      peer_timeout, heartbeat_interval, host=witness_host,
                                      netns=witness_netns) if witness else None
        self.nodes: dict[str, VsandTarget] = {}
        self.metrics_ports = {n: free_port() for n in names} if metrics else {}
        for i, name in enumerate(names):
            host = hosts.get(name, HOST)
            port = free_port()
            workdir_n = self.workdir / name
            cfg: dict[str, object] = {
                "portals": [{"listen": f"{host}:{port}", "group": i + 1}],
                "admin_socket": str(workdir_n / "admin.sock"),
                "cluster": {
                    "id": "test",
                    "secret_file": str(self.secret_path),
                    "listen": f"{'0.0.0.0' if more_hosts else host}:{self.repl_ports[name]}",
                    "nodes": nodes_cfg,
                    "peer_timeout": peer_timeout,
                    "heartbeat_interval": heartbeat_interval,
                    "startup_wait": startup_wait,
                    **({"witness": f"{witness_host}:{self.witness.port}"} if self.witness else {}),
                },
            }
            if metrics:
                cfg["metrics"] = {"listen": f"{HOST}:{self.metrics_ports[name]}"}
            cfg.update(extra_config or {})
            self.nodes[name] = target_factory(workdir_n, iqn=iqn, luns=luns, port=port,
                                              node_name=name, extra_config=cfg)

    # --- processes --------------------------------------------------------------------
    def start(self) -> "VsandCluster":
        if self.witness is not None:
            self.witness.start()
        for node in self.nodes.values():
            node.write_config()
            node._spawn(node.argv())
        for node in self.nodes.values():
            node._await_ready()
        return self

    def stop(self) -> None:
        errors = []
        for node in self.nodes.values():
            try:
                node.stop()
            except Exception as e:  # stop every node, then report
                errors.append(e)
        if self.witness is not None:
            self.witness.stop()
        if errors:
            raise errors[0]

    def __enter__(self) -> "VsandCluster":
        return self.start()

    def __exit__(self, exc_type: object, *rest: object) -> None:
        if exc_type is not None:  # the test failed: no clean-stop check, just end them
            for node in self.nodes.values():
                if node.running():
                    node.kill()
            if self.witness is not None:
                self.witness.stop()
            return
        self.stop()

    # --- addressing -------------------------------------------------------------------
    def url(self, name: str, number: int = 0) -> str:
        return self.nodes[name].url(number)

    def backing_path(self, name: str, number: int = 0) -> Path:
        return self.nodes[name].backing_path(number)

    # --- state ------------------------------------------------------------------------
    def admin(self, name: str, cmd: str, **args: Any) -> Any:
        path = str(self.nodes[name].workdir / "admin.sock")
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(10)
            sock.connect(path)
            sock.sendall(json.dumps({"cmd": cmd, "args": args}).encode() + b"\n")
            buf = b""
            while not buf.endswith(b"\n"):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                buf += chunk
        reply = json.loads(buf)
        if not reply.get("ok"):
            raise RuntimeError(reply.get("error"))
        return reply["result"]

    def vsanctl(self, name: str, *args: str,
                timeout: float = 300) -> subprocess.CompletedProcess[str]:
        """``vsanctl`` on node ``name`` (its admin socket), output captured."""
        return subprocess.run([sys.executable, "-m", "vsand.ctl", "-s",
                               str(self.nodes[name].workdir / "admin.sock"), *args],
                              capture_output=True, text=True, timeout=timeout)

    def lun_states(self, name: str) -> list[dict[str, Any]]:
        return list(self.admin(name, "cluster")["luns"].values())

    def roles(self) -> dict[str, list[str]]:
        out = {}
        for name, node in self.nodes.items():
            if node.running():
                try:
                    out[name] = [m["role"] for m in self.lun_states(name)]
                except OSError:
                    out[name] = ["?"]
        return out

    def wait_roles(self, want: dict[str, str], deadline_s: float = IN_SYNC_DEADLINE_S) -> None:
        """Until every LUN of each named node has the wanted role."""
        end = time.monotonic() + deadline_s
        while True:
            roles = self.roles()
            if all(roles.get(n) and set(roles[n]) == {r} for n, r in want.items()):
                return
            if time.monotonic() > end:
                raise AssertionError(f"roles {roles}, wanted {want} within {deadline_s:g} s; "
                                     + "; ".join(f"{n}: {node.stderr_tail(15)}"
                                                 for n, node in self.nodes.items()))
            time.sleep(0.1)

    def wait_in_sync(self, deadline_s: float = IN_SYNC_DEADLINE_S) -> None:
        """Every running node's LUNs in sync and, with a witness, every node serving (its
        lease renewed: until then its paths are unavailable)."""
        self.wait_roles({n: "in-sync" for n, node in self.nodes.items() if node.running()},
                        deadline_s)
        self.wait_serving(deadline_s)

    def wait_serving(self, deadline_s: float = IN_SYNC_DEADLINE_S) -> None:
        """With a witness or three nodes: until every running node serves (its votes held;
        until then its paths are unavailable)."""
        if self.witness is None and len(self.nodes) < 3:
            return
        end = time.monotonic() + deadline_s
        while not all(self.admin(n, "cluster")["quorum"]["serving"]
                      for n, node in self.nodes.items() if node.running()):
            if time.monotonic() > end:
                raise AssertionError(f"nodes not serving within {deadline_s:g} s")
            time.sleep(0.05)


class WitnessProcess:
    """``python -m vsand witness`` on ``host`` (127.0.0.1) and a free port, inside network
    namespace ``netns`` if given (``ip netns exec`` execs it: the PID held is the witness's
    own); ended by its own PID."""

    def __init__(self, workdir: Path, nodes: list[str], secret: Path, peer_timeout: float,
                 heartbeat_interval: float, *, host: str = HOST,
                 netns: str | None = None) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.host = host
        self.netns = netns
        self.argv = [sys.executable, "-m", "vsand", "witness", "--cluster-id", "test",
                     "--nodes", ",".join(nodes), "--listen", f"{host}:{self.port}",
                     "--secret-file", str(secret), "--state-dir", str(self.workdir / "state"),
                     "--peer-timeout", str(peer_timeout), "--heartbeat-interval",
                     str(heartbeat_interval)]
        if netns is not None:
            self.argv = netns_argv(netns, self.argv)
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = self.workdir / "witness.stderr"

    def start(self) -> None:
        with open(self.log, "ab") as err:
            self.proc = subprocess.Popen(self.argv, stdout=subprocess.DEVNULL, stderr=err)
        if self.netns is None:
            wait_port(self.port, self.proc, deadline_s=20.0)
        else:
            wait_port_in_netns(self.netns, self.host, self.port, self.proc, deadline_s=20.0)

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()
