"""Wiring: from a Config to listening portals, and an orderly shutdown.

Start-up opens (creating sparse files where needed) every LUN's backend before any portal
listens, so an initiator never sees a target whose LUNs are half there.  Shutdown stops the
listeners, lets commands in flight finish (bounded), then closes sessions and backends.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import signal
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from .admin import AdminServer
from .backends.file import FileBackend
from .config import Config, LunConfig, PortalConfig, TargetConfig, dump_config
from .iscsi_conn import Connection
from .lun import Lun
from .prstore import PrStore
from .metrics import start_metrics
from .sdnotify import Notifier
from .protocol.iscsi.chap import ReplayGuard
from .protocol.iscsi.login import TargetOffer
from .protocol.scsi.types import LunParams
from .targets import Portal, TargetNode, TargetRegistry, acl_map, auth_policy

log = logging.getLogger("vsand")

DRAIN_TIMEOUT = 10.0
STATUS_INTERVAL = 2.0


def portal_of(p: PortalConfig) -> Portal:
    return Portal(p.listen_host, p.listen_port, p.advertise_host, p.advertise_port, p.group_tag)


def naa_for_serial(serial: str) -> bytes:
    """A 16-byte NAA IEEE Registered Extended designator derived from the LUN serial.

    Deriving it from the serial, which is cluster-wide, gives every node the same identity
    for the same LUN (multipath merges paths by this designator).
    """
    digest = hashlib.sha256(b"vsand-naa:" + serial.encode()).digest()
    return bytes([0x60 | (digest[0] & 0x0F)]) + digest[1:16]


class Daemon:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.registry: TargetRegistry | None = None
        self.servers: dict[tuple[str, int], asyncio.AbstractServer] = {}
        self.backends: list[FileBackend] = []
        self.executor = ThreadPoolExecutor(max_workers=config.io_threads,
                                           thread_name_prefix="vsand-io")
        self.config_digest = ""
        self.refresh_digest()
        self.admin = AdminServer(self, config.admin_socket)
        # Identifier+challenge pairs initiators used for mutual CHAP, across all logins.
        self.chap_guard = ReplayGuard()
        self.prstore = PrStore(config.data_dir)  # APTPL reservations, per LU
        self.cluster: Any = None  # a vsand.cluster.Cluster when the config has a cluster

    def refresh_digest(self) -> None:
        # Shown by vsanctl status, so drift between nodes' configs is visible.
        self.config_digest = hashlib.sha256(dump_config(self.config).encode()).hexdigest()[:16]

    def build_lun(self, iqn: str, lc: LunConfig) -> Lun:
        """Open (creating or growing a sparse file where the config says so) one LUN."""
        if lc.size and not os.path.exists(lc.path):
            FileBackend.create_sparse(lc.path, lc.size)
            log.info("created sparse file %s (%d bytes)", lc.path, lc.size)
        elif lc.size and os.path.isfile(lc.path) and os.path.getsize(lc.path) < lc.size:
            FileBackend.create_sparse(lc.path, lc.size)
        backend = FileBackend(lc.path, block_size=lc.block_size, size=lc.size or None,
                              read_only=lc.read_only, executor=self.executor)
        backend.open()
        self.backends.append(backend)
        params = LunParams(block_size=lc.block_size, blocks=backend.size // lc.block_size,
                           serial=lc.serial, naa_id=naa_for_serial(lc.serial),
                           read_only=lc.read_only, write_cache=lc.write_cache,
                           thin=lc.thin and not backend.is_block_device, target_name=iqn,
                           relative_ports=tuple(sorted({p.group_tag
                                                        for p in self.config.portals})))
        lun = Lun.from_params(lc.number, params, backend)
        self.prstore.attach(iqn, lc.number, lun.unit)
        log.info("LUN %d of %s: %s, %d blocks of %d bytes%s", lc.number, iqn, lc.path,
                 params.blocks, lc.block_size, " (read-only)" if lc.read_only else "")
        return lun

    def build_target(self, t: TargetConfig) -> TargetNode:
        luns = {lc.number: self.build_lun(t.iqn, lc) for lc in t.luns}
        return TargetNode(t.iqn, t.alias, luns, acl=acl_map(t.acl),
                          auth=auth_policy(t.auth, self.chap_guard))

    def close_lun(self, lun: Lun) -> None:
        if lun.backend in self.backends:
            self.backends.remove(lun.backend)
        lun.backend.close()

    def offer(self, c: Config) -> TargetOffer:
        ic = c.iscsi
        return TargetOffer(max_recv_data_segment_length=ic.max_recv_data_segment_length,
                           first_burst_length=ic.first_burst_length,
                           max_burst_length=ic.max_burst_length,
                           immediate_data=ic.immediate_data, initial_r2t=ic.initial_r2t,
                           max_outstanding_r2t=ic.max_outstanding_r2t,
                           header_digests=ic.header_digest, data_digests=ic.data_digest)

    async def listen(self, portal: Portal) -> None:
        assert self.registry is not None
        registry = self.registry
        server = await asyncio.get_running_loop().create_server(
            lambda: Connection(registry, portal), portal.listen_host, portal.listen_port,
            reuse_address=True)
        self.servers[(portal.listen_host, portal.listen_port)] = server
        log.info("listening on %s:%d (portal group %d)", portal.listen_host,
                 portal.listen_port, portal.group_tag)

    async def start(self) -> None:
        c = self.config
        ic = c.iscsi
        for warning in c.warnings:
            log.warning("%s", warning)
        portals = [portal_of(p) for p in c.portals]
        self.registry = TargetRegistry([self.build_target(t) for t in c.targets], portals,
                                       self.offer(c), window=ic.queue_depth,
                                       nop_interval=ic.nop_interval,
                                       nop_timeout=ic.nop_timeout, login_timeout=ic.login_timeout,
                                       discovery_auth=auth_policy(c.discovery_auth,
                                                                  self.chap_guard))
        if c.cluster is not None:
            from .cluster import Cluster
            loop = asyncio.get_running_loop()
            self.cluster = Cluster(c, lambda fn, *a: loop.run_in_executor(self.executor, fn, *a))
            await self.cluster.start([(lc, self.registry.targets[t.iqn].luns[lc.number])
                                      for t in c.targets for lc in t.luns])
            registry = self.registry
            if self.cluster.views is not None:
                registry.gate = self.cluster.views.check
            elif self.cluster.quorum is not None and self.cluster.quorum.enabled:
                registry.gate = self.cluster.quorum.check
            for m in self.cluster.luns.values():
                m.on_preempt_abort = (lambda victims, lun=m.lun:
                                      registry.abort_tasks(lun, victims))
        for portal in portals:
            await self.listen(portal)
        try:
            await self.admin.start()
        except OSError as e:
            log.warning("admin socket %s unavailable: %s", self.config.admin_socket, e)
        try:
            start_metrics(self, self.config.metrics_listen)
        except OSError as e:
            log.warning("metrics endpoint %s unavailable: %s", self.config.metrics_listen, e)

    async def stop(self) -> None:
        for server in self.servers.values():
            server.close()
        await self.admin.stop()
        registry = self.registry
        if registry is not None:
            conns = list(registry.connections)
            if conns:
                try:
                    await asyncio.wait_for(
                        asyncio.gather(*(c.tasks.drain() for c in conns)), DRAIN_TIMEOUT)
                except asyncio.TimeoutError:
                    log.warning("commands still running after %.0f s; closing anyway",
                                DRAIN_TIMEOUT)
            for c in conns:
                c.close()
            await asyncio.sleep(0)
        for server in self.servers.values():
            await server.wait_closed()
        if self.cluster is not None:
            await self.cluster.close()
        for backend in self.backends:
            try:
                await asyncio.get_running_loop().run_in_executor(self.executor, os.fsync,
                                                                 backend.fileno())
            except OSError as e:
                log.warning("%s: fsync at shutdown failed: %s", backend.path, e)
            backend.close()
        self.executor.shutdown(wait=True)

    async def serve_until_signalled(self) -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        loop.add_signal_handler(signal.SIGHUP, lambda: loop.create_task(self.reload_logged()))
        notifier = Notifier()
        await self.start()
        log.info("vsand ready")
        notifier.notify("READY=1", f"STATUS={self.status_line()}")
        notifier.start_watchdog()
        status_task = loop.create_task(self._report_status(notifier)) if notifier.enabled \
            else None
        await stop.wait()
        log.info("shutting down")
        notifier.notify("STOPPING=1", "STATUS=finishing commands in flight")
        if status_task is not None:
            status_task.cancel()
        await self.stop()
        notifier.close()

    async def reload_logged(self) -> None:
        """SIGHUP: reload the config file; problems are logged, the old config keeps running."""
        from .reload import ReloadRefused, reload
        try:
            await reload(self)
        except ReloadRefused as e:
            for line in e.errors:
                log.error("reload refused: %s", line)
        except Exception:
            log.exception("reload failed")

    def status_line(self) -> str:
        reg = self.registry
        if reg is None:
            return "starting"
        luns = sum(len(t.luns) for t in reg.targets.values())
        return (f"serving {len(reg.targets)} target(s), {luns} LUN(s); "
                f"{len(reg.sessions)} session(s)")

    async def _report_status(self, notifier: Notifier) -> None:
        last = ""
        while True:
            await asyncio.sleep(STATUS_INTERVAL)
            line = self.status_line()
            if line != last:
                notifier.notify(f"STATUS={line}")
                last = line


def run(config: Config) -> int:
    try:
        import uvloop
        runner = uvloop.run
    except ImportError:  # pragma: no cover - uvloop is a dependency; plain asyncio still works
        runner = asyncio.run
    runner(Daemon(config).serve_until_signalled())
    return 0
