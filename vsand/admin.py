"""The local admin API: one JSON request per line on a Unix socket, one JSON reply per line.

The socket is created mode 0600 in a directory only root can enter by default, so only root
(or the daemon's own user) can manage the daemon.  Requests: {"cmd": "status" | "sessions" |
"luns" | "alua", "args": {...}}.  Replies: {"ok": true, "result": ...} or {"ok": false, "error": "..."}.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from typing import TYPE_CHECKING, Any

from . import __version__

if TYPE_CHECKING:
    from .daemon import Daemon

log = logging.getLogger("vsand.admin")
MAX_REQUEST = 64 * 1024


class AdminServer:
    def __init__(self, daemon: Daemon, path: str) -> None:
        self.daemon = daemon
        self.path = path
        self.server: asyncio.AbstractServer | None = None
        self.started = time.time()

    async def start(self) -> None:
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        if os.path.exists(self.path):
            os.unlink(self.path)
        old = os.umask(0o177)
        try:
            self.server = await asyncio.start_unix_server(self._client, self.path,
                                                          limit=MAX_REQUEST)
        finally:
            os.umask(old)

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                try:
                    line = await reader.readline()
                except (ValueError, asyncio.LimitOverrunError):
                    writer.write(b'{"ok": false, "error": "request too long"}\n')
                    break
                if not line:
                    break
                reply = self.handle(line)
                if reply is None:
                    reply = await self._long(line)
                writer.write(json.dumps(reply).encode() + b"\n")
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    async def reload(self) -> dict[str, Any]:
        from .reload import ReloadRefused, reload
        try:
            report = await reload(self.daemon)
        except ReloadRefused as e:
            return {"ok": False, "error": "config refused, the running one stays:\n"
                    + "\n".join(e.errors)}
        return {"ok": True, "result": {"changes": report.changes,
                                       "restart_needed": report.restart_needed}}

    def handle(self, line: bytes) -> dict[str, Any] | None:
        try:
            req = json.loads(line)
            cmd = req["cmd"] if isinstance(req, dict) else None
        except (ValueError, KeyError):
            return {"ok": False, "error": "a request is one JSON object with a \"cmd\" key"}
        if cmd in ("reload", "drill"):
            return None  # asynchronous: see _client
        handler = {"status": self.status, "sessions": self.sessions, "luns": self.luns,
                   "alua": self.alua, "cluster": self.cluster,
                   "resolve": self.resolve, "verify": self.verify}.get(cmd)
        if handler is None:
            return {"ok": False, "error": f"unknown command {cmd!r} "
                                          "(known: status, sessions, luns, alua, cluster, "
                                          "resolve, verify, reload)"}
        try:
            return {"ok": True, "result": handler(**req.get("args", {}))}
        except (TypeError, ValueError, KeyError) as e:
            return {"ok": False, "error": f"{cmd}: {e}"}

    def alua(self, target: str = "", lun: int | None = None,
             state: str = "") -> list[dict[str, Any]]:
        """Show, or with ``state`` set, the ALUA access state of matching LUNs."""
        from .protocol.scsi import alua
        if state and state not in alua.STATES:
            raise ValueError(f"state {state!r} is not one of {', '.join(alua.STATES)}")
        reg = self.daemon.registry
        out = []
        for t in (reg.targets.values() if reg else []):
            if target and t.name != target:
                continue
            for n, l in sorted(t.luns.items()):
                if lun is not None and n != lun:
                    continue
                if state and alua.set_state(l.unit, alua.STATES[state]):
                    log.info("ALUA state of %s LUN %d set to %s", t.name, n, state)
                out.append({"target": t.name, "lun": n,
                            "state": alua.STATE_NAMES[l.unit.alua_state],
                            "port_group": l.unit.params.port_group})
        if not out:
            raise KeyError(f"no LUN matches target={target or '*'} lun={lun}")
        return out

    def status(self) -> dict[str, Any]:
        d = self.daemon
        reg = d.registry
        return {
            "node": d.config.node_name,
            "version": __version__,
            "config": d.config.source,
            "config_digest": d.config_digest,
            "uptime_s": round(time.time() - self.started, 1),
            "portals": [f"{p.listen_host}:{p.listen_port}/{p.group_tag}"
                        for p in (reg.portals if reg else [])],
            "targets": len(reg.targets) if reg else 0,
            "sessions": len(reg.sessions) if reg else 0,
            "connections": len(reg.connections) if reg else 0,
            "mirrored_luns": {label: m["role"] for label, m in
                              d.cluster.status()["luns"].items()} if d.cluster else {},
        }

    async def _long(self, line: bytes) -> dict[str, Any]:
        req = json.loads(line)
        if req["cmd"] == "reload":
            return await self.reload()
        c = self.daemon.cluster
        if c is None:
            return {"ok": False, "error": "this node is not part of a cluster"}
        args = req.get("args", {})
        if not args.get("consent"):
            return {"ok": False, "error": "a drill overwrites the LUN's last 256 KiB while it "
                                          "runs (saved first, restored after): consent needed"}
        try:
            result = await c.drill(str(args.get("lun", "")), float(args.get("seconds", 5)),
                                   own_writer=not args.get("external_writer"))
        except (ValueError, KeyError, TimeoutError, OSError) as e:
            return {"ok": False, "error": f"drill: {e}"}
        return {"ok": True, "result": result}

    def cluster(self) -> dict[str, Any]:
        """Peers and the replication state of every mirrored LUN ({} when not clustered)."""
        c = self.daemon.cluster
        return c.status() if c is not None else {}

    def resolve(self, lun: str = "") -> dict[str, Any]:
        """Keep this node's data of a mirrored LUN whose replicas diverged."""
        c = self.daemon.cluster
        if c is None:
            raise ValueError("this node is not part of a cluster")
        return c.resolve(lun)  # type: ignore[no-any-return]

    def verify(self, lun: str = "", progress: bool = False,
               repair: bool = False) -> dict[str, Any]:
        """Start an online verify of a mirrored LUN; ``progress``: only report on it;
        ``repair``: this node's data is right, copy it where the peers' differs."""
        c = self.daemon.cluster
        if c is None:
            raise ValueError("this node is not part of a cluster")
        return c.verify(lun, wait=progress, repair=repair)  # type: ignore[no-any-return]

    def sessions(self) -> list[dict[str, Any]]:
        reg = self.daemon.registry
        out = []
        for s in (reg.sessions if reg else []):
            c = s.connection
            out.append({"tsih": s.tsih, "initiator": s.initiator_name,
                        "isid": f"0x{s.isid:012x}", "target": s.target_name or "(discovery)",
                        "peer": c.peer if c else "", "tasks": len(c.tasks) if c else 0,
                        "exp_cmdsn": s.exp_cmdsn})
        return out

    def luns(self) -> list[dict[str, Any]]:
        reg = self.daemon.registry
        out = []
        for t in (reg.targets.values() if reg else []):
            for n, lun in sorted(t.luns.items()):
                p = lun.unit.params
                out.append({"target": t.name, "lun": n, "path": lun.backend.path,
                            "blocks": p.blocks, "block_size": p.block_size,
                            "read_only": p.read_only, "serial": p.serial,
                            **lun.counters()})
        return out


def request(path: str, cmd: str, timeout: float = 10.0, **args: Any) -> Any:
    """Client side, for vsanctl: send one request and return the result (or raise)."""
    import socket
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
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
        raise RuntimeError(reply.get("error", "request failed"))
    return reply["result"]
