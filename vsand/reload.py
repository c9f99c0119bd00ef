"""Applying a new config to a running daemon (SIGHUP, ``vsanctl reload``).

The new file is loaded and validated first: an invalid config is refused with its errors and
the running one stays.  Then only what changed is touched, so sessions that nothing concerns
keep running undisturbed:

- targets and LUNs added are opened and announced (REPORTED LUNS DATA HAS CHANGED); LUNs
  removed have their commands aborted, then their backends closed;
- a LUN whose size grew is grown (sparse) and reports CAPACITY DATA HAS CHANGED; WCE changes
  report MODE PARAMETERS CHANGED.  What cannot change under a live initiator (path, block
  size, serial, shrinking) is refused: remove the LUN, reload, add it back;
- CHAP settings apply to the next login; an ACL change ends only the sessions whose initiator
  lost access or whose set of LUNs changed (they log in again and see the new set);
- portals added start listening; portals removed stop, closing their connections;
- login parameters and NOP timers apply to new sessions; node name, data directory, I/O
  threads, admin socket and metrics address need a restart and are reported as such.
"""

from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .config import Config, ConfigError, LunConfig, TargetConfig, load_config
from .lun import Lun
from .targets import TargetNode, acl_map, auth_policy

if TYPE_CHECKING:
    from .daemon import Daemon

log = logging.getLogger("vsand.reload")


class ReloadRefused(Exception):
    def __init__(self, errors: list[str]) -> None:
        super().__init__("\n".join(errors))
        self.errors = errors


@dataclass
class ReloadReport:
    changes: list[str] = field(default_factory=list)
    restart_needed: list[str] = field(default_factory=list)


def _lun_refusals(iqn: str, old: LunConfig, new: LunConfig) -> list[str]:
    where = f"targets[{iqn}].luns[{new.number}]"
    out = []
    for name in ("path", "block_size", "serial", "read_only"):
        if getattr(old, name) != getattr(new, name):
            out.append(f"{where}.{name}: cannot change on a live LUN "
                       f"({getattr(old, name)!r} -> {getattr(new, name)!r}); remove the LUN, "
                       "reload, then add it back")
    if new.size and old.size and new.size < old.size:
        out.append(f"{where}.size: shrinking a LUN ({old.size} -> {new.size} bytes) would "
                   "destroy data; not done")
    return out


def _check(old: Config, new: Config) -> list[str]:
    errors: list[str] = []
    old_targets = {t.iqn: t for t in old.targets}
    for t in new.targets:
        prev = old_targets.get(t.iqn)
        if prev is None:
            continue
        prev_luns = {lc.number: lc for lc in prev.luns}
        for lc in t.luns:
            if lc.number in prev_luns:
                errors += _lun_refusals(t.iqn, prev_luns[lc.number], lc)
    return errors


async def reload(daemon: Daemon, path: str | None = None) -> ReloadReport:
    """Load ``path`` (default: the running config's file) and apply it; raises ReloadRefused."""
    old = daemon.config
    source = path or old.source
    if not os.path.isfile(source):
        raise ReloadRefused([f"{source}: the running config did not come from a file; "
                             "nothing to reload"])
    try:
        new = load_config(source)
    except ConfigError as e:
        raise ReloadRefused(e.errors) from None
    errors = _check(old, new)
    if errors:
        raise ReloadRefused(errors)
    report = ReloadReport()
    for name in ("node_name", "data_dir", "io_threads", "admin_socket", "metrics_listen"):
        if getattr(old, name) != getattr(new, name):
            report.restart_needed.append(f"{name}: {getattr(old, name)!r} -> "
                                         f"{getattr(new, name)!r}")
    await _apply(daemon, old, new, report)
    daemon.config = new
    daemon.refresh_digest()
    for line in report.changes:
        log.info("reload: %s", line)
    for line in report.restart_needed:
        log.warning("reload: needs a restart to take effect: %s", line)
    return report


async def _apply(daemon: Daemon, old: Config, new: Config, report: ReloadReport) -> None:
    reg = daemon.registry
    assert reg is not None
    if new.log_level != old.log_level:
        logging.getLogger().setLevel(new.log_level.upper())
        report.changes.append(f"log level {new.log_level}")
    ic = new.iscsi
    reg.offer = daemon.offer(new)
    reg.window, reg.nop_interval = ic.queue_depth, ic.nop_interval
    reg.nop_timeout, reg.login_timeout = ic.nop_timeout, ic.login_timeout
    reg.discovery_auth = auth_policy(new.discovery_auth, daemon.chap_guard)

    old_targets = {t.iqn: t for t in old.targets}
    new_targets = {t.iqn: t for t in new.targets}
    for iqn in old_targets.keys() - new_targets.keys():
        node = reg.targets.pop(iqn)
        for conn in list(reg.connections):
            if conn.target is node:
                conn.close()
        for lun in node.luns.values():
            await _retire_lun(daemon, node, lun)
        report.changes.append(f"target {iqn} removed")
    for iqn in new_targets.keys() - old_targets.keys():
        reg.targets[iqn] = daemon.build_target(new_targets[iqn])
        report.changes.append(f"target {iqn} added")
    for iqn in new_targets.keys() & old_targets.keys():
        await _update_target(daemon, reg.targets[iqn], old_targets[iqn], new_targets[iqn],
                             report)
    await _update_portals(daemon, old, new, report)


async def _update_target(daemon: Daemon, node: TargetNode, old: TargetConfig,
                         new: TargetConfig, report: ReloadReport) -> None:
    old_luns = {lc.number: lc for lc in old.luns}
    new_luns = {lc.number: lc for lc in new.luns}
    for n in old_luns.keys() - new_luns.keys():
        lun = node.luns.pop(n)
        node.scsi.remove_lun(n)
        for view in node.views():
            if view.luns.pop(n, None) is not None:
                view.scsi.remove_lun(n)
        await _retire_lun(daemon, node, lun)
        report.changes.append(f"{node.name} LUN {n} removed")
    for n in sorted(new_luns.keys() - old_luns.keys()):
        lun = daemon.build_lun(node.name, new_luns[n])
        node.luns[n] = lun  # the full view shares this dict
        node.scsi.add_lun(n, lun.unit)
        report.changes.append(f"{node.name} LUN {n} added ({new_luns[n].path})")
    for n in new_luns.keys() & old_luns.keys():
        before, after = old_luns[n], new_luns[n]
        lun = node.luns[n]
        if after.size and after.size > before.size:
            lun.backend.grow(after.size)
            lun.unit.resize(after.size // after.block_size)
            report.changes.append(f"{node.name} LUN {n} grown to {after.size} bytes")
        if after.write_cache != before.write_cache:
            lun.unit.set_write_cache(after.write_cache)
            report.changes.append(f"{node.name} LUN {n} write cache "
                                  f"{'on' if after.write_cache else 'off'}")
    if new.auth != old.auth:
        node.auth = auth_policy(new.auth, daemon.chap_guard)
        report.changes.append(f"{node.name} authentication settings (next logins)")
    if new.acl != old.acl or new_luns.keys() != old_luns.keys():
        node.set_acl(acl_map(new.acl))
        dropped = _enforce_acl(daemon, node)
        if new.acl != old.acl:
            report.changes.append(f"{node.name} access list"
                                  + (f"; {dropped} session(s) ended" if dropped else ""))
    if new.alias != old.alias:
        node.alias = new.alias
        report.changes.append(f"{node.name} alias {new.alias!r}")


def _enforce_acl(daemon: Daemon, node: TargetNode) -> int:
    """End the sessions whose initiator lost access or whose LUN set changed."""
    reg = daemon.registry
    assert reg is not None
    dropped = 0
    for conn in list(reg.connections):
        if conn.target is not node or conn.session is None:
            continue
        name = conn.session.initiator_name
        if not node.allows(name) or (conn.view is not None
                                     and node.view(name).luns.keys() != conn.view.luns.keys()):
            log.info("reload: ending the session of %s on %s (access changed)", name, node.name)
            conn.close()
            dropped += 1
    return dropped


async def _retire_lun(daemon: Daemon, node: TargetNode, lun: Lun) -> None:
    """Abort the LUN's commands everywhere, wait for them, then close its backend."""
    reg = daemon.registry
    assert reg is not None
    waits = []
    for conn in list(reg.connections):
        if conn.target is not node:
            continue
        for task in list(conn.tasks):
            if task.lun == lun.number:
                runner = conn.tasks.abort(task)
                if runner is not None:
                    waits.append(runner)
    if waits:
        await asyncio.gather(*waits, return_exceptions=True)
    daemon.close_lun(lun)


async def _update_portals(daemon: Daemon, old: Config, new: Config,
                          report: ReloadReport) -> None:
    from .daemon import portal_of
    reg = daemon.registry
    assert reg is not None
    old_p = {(p.listen_host, p.listen_port): p for p in old.portals}
    new_p = {(p.listen_host, p.listen_port): p for p in new.portals}
    reg.portals = [portal_of(p) for p in new.portals]
    for key in old_p.keys() - new_p.keys():
        server = daemon.servers.pop(key, None)
        if server is not None:
            server.close()
        for conn in list(reg.connections):
            if (conn.portal.listen_host, conn.portal.listen_port) == key:
                conn.close()
        report.changes.append(f"portal {key[0]}:{key[1]} removed")
    for key in new_p.keys() - old_p.keys():
        await daemon.listen(portal_of(new_p[key]))
        report.changes.append(f"portal {key[0]}:{key[1]} added")
    for key in new_p.keys() & old_p.keys():
        if new_p[key] != old_p[key]:
            report.changes.append(f"portal {key[0]}:{key[1]}: advertised address or group "
                                  "changed (new sessions)")
