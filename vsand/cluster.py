"""This node's part of a cluster: its peer links and its mirrored LUNs.

The ``Cluster`` owns one ``PeerEndpoint`` (authenticated links to every peer node, with
heartbeats and reconnects) and one ``MirroredLun`` per mirrored LUN.  It routes what arrives
on a link to the LUN the frame names, tells every LUN when a peer comes or goes, and gives the
LUNs a way to send.  At start-up a LUN serves nothing until its peer answered and both agreed
on their data (``MirroredLun``), or until ``startup_wait`` passed with no peer reachable: then
it serves alone and tracks what the peer will need.

With three or more nodes the votes are the data nodes' own: a ``ViewKeeper`` decides the views
(heartbeats carry its epoch and their answers its grants) and the LUNs are ``ViewedLun``s that
follow them; a witness is not used.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
from collections.abc import Callable
from typing import Any

from .config import Config, LunConfig
from .lun import Lun
from .metafiles import FileMetaStore
from .mirror.handshake import LunInfo, NodeIdentity
from . import __version__
from .config import config_to_dict
from .config_schema import format_address
from .mirror.messages import (
    Ack, Control, ControlKind, Heartbeat, HeartbeatAck, Message, PeerProtocolError,
)
from .peer import LinkState, PeerEndpoint, PeerLink
from .quorum import QuorumKeeper
from .mirror.membership import View
from .replication import MirroredLun, Role
from .viewlun import ViewedLun
from .views import ViewKeeper

log = logging.getLogger("vsand.cluster")

MAX_DRILL_S = 600


def shared_digest(config: Config) -> str:
    """A digest of what every node of the cluster must configure alike: the cluster section
    (less this node's listen address), targets and LUNs (less backing paths), ACLs, CHAP
    users, login defaults.  Paths, portals and the node's own settings may differ."""
    d = config_to_dict(config)
    d["cluster"].pop("listen", None)
    d["cluster"].pop("secret_file", None)
    for t in d["targets"]:
        for lun in t["luns"]:
            lun.pop("path", None)
        for key in ("secret_file", "mutual_secret_file"):
            t["auth"].pop(key, None)
    shared = {k: d[k] for k in ("cluster", "targets", "iscsi")}
    return hashlib.sha256(json.dumps(shared, sort_keys=True).encode()).hexdigest()[:16]


class Cluster:
    def __init__(self, config: Config, run_blocking: Callable[..., Any]) -> None:
        cc = config.cluster
        assert cc is not None
        self.config = cc
        self.digest = shared_digest(config)
        self.peer_info: dict[str, dict[str, Any]] = {}  # what each peer said of itself
        self.node = config.node_name
        # Where initiators reach this node: the advertised portals, a wildcard one by this
        # node's cluster address (what a drill or an admin on another node can dial).
        own = cc.node(self.node).host
        self.portals = [format_address(own if p.advertise_wildcard else p.advertise_host,
                                       p.advertise_port) for p in config.portals]
        self.meta_dir = os.path.join(config.data_dir, "mirror")
        self.run_blocking = run_blocking
        self.luns: dict[int, MirroredLun] = {}
        self.endpoint: PeerEndpoint | None = None
        self.quorum: QuorumKeeper | None = None
        self.views: ViewKeeper | None = None
        self._startup: asyncio.TimerHandle | None = None

    async def start(self, luns: list[tuple[LunConfig, Lun]]) -> None:
        cc = self.config
        os.makedirs(self.meta_dir, mode=0o700, exist_ok=True)
        store = FileMetaStore(self.meta_dir)
        quorum = self.quorum = QuorumKeeper(cc, self.node, store, self.send, self.run_blocking,
                                            self._quorum_changed)
        names = [n.name for n in cc.nodes]
        views = None
        if len(names) > 2:
            views = self.views = ViewKeeper(cc, self.node, store, self.send, self.run_blocking,
                                            self._views_serving, self._view_decided,
                                            self._promised)
        for lc, lun in luns:
            if not lc.mirror:
                continue
            kind = MirroredLun if views is None else ViewedLun
            m = kind(lun, lc.mirror_id, self.node, names, store, self.send,
                     cluster_id=cc.cluster_id, run_blocking=self.run_blocking,
                     resync_rate=cc.resync_rate, join_timeout=2 * cc.peer_timeout)
            m.drop_link = self._drop_link
            if isinstance(m, ViewedLun):
                m.on_followers = self._update_in_sync
                m.request_round = views.request_round if views is not None else None
                await m.attach()
                m.set_quorum(False, True)
            else:
                m.may_go_alone = quorum.may_go_alone
                m.on_in_sync = self._lun_in_sync
                m.on_storage_failure = quorum.step_aside
                await m.attach()
                m.set_quorum(quorum.serving_now, quorum.fenced)
            self.luns[lc.mirror_id] = m
        identity = NodeIdentity(cc.cluster_id, self.node, tuple(
            LunInfo(m.lun_id, m.lun.unit.params.serial, m.lun.block_size,
                    m.lun.unit.params.blocks) for m in self.luns.values()))
        peers = cc.peers(self.node)
        dial = list(peers) + ([cc.witness] if cc.witness is not None else [])
        endpoint = self.endpoint = PeerEndpoint(
            identity, cc.secret, [p.name for p in dial], on_up=self._up,
            on_message=self._message, on_lost=self._lost,
            heartbeat_interval=cc.heartbeat_interval, heartbeat_timeout=cc.peer_timeout)
        if views is not None:
            endpoint.beat_epoch = views.heartbeat_epoch
            endpoint.grant = views.answer_heartbeat
        endpoint.local_addresses = cc.node(self.node).addresses
        if len(endpoint.local_addresses) > 1:  # every node has as many (config rule)
            endpoint.multipath = {p.name for p in peers}
            quorum.multipath = True
        await endpoint.listen(cc.listen_host, cc.listen_port)
        log.info("cluster %s: node %s, replication on %s:%d, %d mirrored LUN(s), peers %s",
                 cc.cluster_id, self.node, cc.listen_host, cc.listen_port, len(self.luns),
                 ", ".join(f"{p.name} ({', '.join(format_address(*a) for a in p.addresses)})"
                           for p in peers))
        for p in dial:
            for path, (host, port) in enumerate(p.addresses):
                endpoint.connect(p.name, host, port, path)
        if views is not None:
            self._update_in_sync()
            views.start()
        else:
            quorum.on_epoch = self._epoch_moved
            quorum.start()
        self._startup = asyncio.get_running_loop().call_later(cc.startup_wait,
                                                              self._startup_over)

    def _startup_over(self) -> None:
        endpoint = self.endpoint
        if endpoint is None or self.views is not None:  # three nodes: only a view serves
            return
        for m in self.luns.values():
            if not any(p in endpoint.links for p in m.peers):
                if m.role.value == "connecting":
                    log.warning("%s: no peer answered within %g s; serving alone",
                                m.label, self.config.startup_wait)
                m.go_alone()

    def send(self, peer: str, msg: Message) -> bool:
        endpoint = self.endpoint
        link = endpoint.links.get(peer) if endpoint is not None else None
        if link is None or link.state is not LinkState.UP:
            return False
        link.send(msg)
        return True

    def _up(self, link: PeerLink) -> None:
        peer = link.peer_id
        assert peer is not None
        assert self.quorum is not None
        if self.views is not None:
            self.views.link_up(peer)
        else:
            self.quorum.link_up(peer)
        if peer == "witness":
            return
        self._send_info(peer)
        if not self.luns and self.views is None:
            self.quorum.peer_joined()  # nothing to be in sync for
        for lun_id in link.common_luns:
            m = self.luns.get(lun_id)
            if m is not None:
                m.link_up(peer)

    def _send_info(self, peer: str) -> None:
        """This node's version, shared-config digest and epoch, at link up and whenever the
        epoch moves while linked (the peer adopts it once every LUN is in sync)."""
        assert self.quorum is not None
        epoch = self.quorum.epoch if self.views is None else self.views.heartbeat_epoch()
        info = json.dumps({"version": __version__, "config_digest": self.digest,
                           "epoch": epoch, "portals": self.portals}).encode()
        self.send(peer, Control(0, ControlKind.INFO, 0, body=info))

    def _epoch_moved(self, epoch: int) -> None:
        for p in self.config.peers(self.node):
            self._send_info(p.name)

    def _message(self, link: PeerLink, msg: Message) -> None:
        peer = link.peer_id
        assert peer is not None and self.quorum is not None
        if type(msg) is HeartbeatAck:
            if self.views is not None:
                self.views.heartbeat_answered(peer, msg.epoch,  # type: ignore[union-attr]
                                              msg.echo_ns)  # type: ignore[union-attr]
            elif peer != "witness":
                self.quorum.heartbeat_answered(msg.echo_ns)  # type: ignore[union-attr]
            return
        if type(msg) is Heartbeat:
            return
        if peer == "witness":
            if type(msg) is Ack:
                self.quorum.reply(msg.request_id, msg.status)  # type: ignore[union-attr]
            return
        if type(msg) is Control and msg.kind is ControlKind.INFO:
            self._peer_info(peer, msg.body)
            return
        if type(msg) is Control and msg.kind is ControlKind.VIEW:
            if self.views is None:
                raise PeerProtocolError("CONTROL VIEW in a cluster of two")
            self.views.receive(peer, msg)
            return
        if type(msg) is Control and msg.kind is ControlKind.DRILL:
            seconds = msg.value / 1000  # type: ignore[union-attr]
            if not 0 < seconds <= MAX_DRILL_S:
                raise PeerProtocolError(f"DRILL of {seconds:g} s")
            log.warning("failover drill from node %s: playing a hung node for %g s", peer,
                        seconds)
            # Every network, every data node: a hung node is silent to all of them.
            hung = [each for p in self.config.peers(self.node)
                    for each in (self.endpoint.links_of(p.name) if self.endpoint else [])]
            for each in hung or [link]:
                each.freeze(seconds)
            return
        m = self.luns.get(getattr(msg, "lun", -1))
        if m is None or m.lun_id not in link.common_luns:
            log.debug("node %s: %s for a LUN not mirrored on this link", peer, msg.TYPE.name)
            return
        m.receive(peer, msg)  # a PeerProtocolError drops the link

    def _peer_info(self, peer: str, body: bytes) -> None:
        try:
            info = json.loads(body)
            version, digest = str(info["version"]), str(info["config_digest"])
        except (ValueError, KeyError, TypeError):
            log.warning("node %s sent unreadable node information; ignored", peer)
            return
        portals = info.get("portals")
        self.peer_info[peer] = {"version": version, "config_digest": digest,
                                "portals": [str(p) for p in portals]
                                if isinstance(portals, list) else []}
        if self.quorum is not None and self.views is None and isinstance(info.get("epoch"),
                                                                           int):
            self.quorum.peer_epoch(info["epoch"])
        if version != __version__:
            log.warning("node %s runs vsand %s, this node %s", peer, version, __version__)
        if digest != self.digest:
            log.warning("node %s has a different shared configuration (digest %s, here %s): "
                        "targets, LUNs, ACLs, CHAP users and the cluster section should be "
                        "the same on every node", peer, digest, self.digest)

    def _lost(self, link: PeerLink, reason: str) -> None:
        peer = link.peer_id
        if peer is None:
            return
        if self.views is not None:
            self.views.link_lost(peer)
        elif self.quorum is not None:
            self.quorum.link_lost(peer, link.last_rx)
        if peer == "witness":
            return
        for m in self.luns.values():
            m.peer_lost(peer)

    def _drop_link(self, peer: str, reason: str) -> None:
        link = self.endpoint.links.get(peer) if self.endpoint is not None else None
        if link is not None:
            log.error("closing the link to node %s: %s", peer, reason)
            link.close(reason)

    def _quorum_changed(self, ok: bool, fenced: bool) -> None:
        for m in self.luns.values():
            m.set_quorum(ok, fenced)

    # ------------------------------------------------------------------ three or more nodes
    def _views_serving(self, ok: bool) -> None:
        views = self.views
        assert views is not None
        view = views.m.view
        fenced = not ok and (view is None or self.node not in view.members)
        for m in self.luns.values():
            m.set_quorum(ok, fenced)

    def _view_decided(self, view: View) -> None:
        for m in self.luns.values():
            if isinstance(m, ViewedLun):
                m.view_decided(view)
        self._update_in_sync()

    def _promised(self, epoch: int) -> None:
        for m in self.luns.values():
            if isinstance(m, ViewedLun):
                m.promise(epoch)

    def _update_in_sync(self) -> None:
        """Tell the membership who is in sync with this node: the members of the view it
        knows (decided, else the one it accepted last) and the nodes every LUN feeds as a
        follower."""
        views = self.views
        if views is None:
            return
        view = views.m.view or views.m.record.accepted
        followers: frozenset[str] | None = None
        for m in self.luns.values():
            if isinstance(m, ViewedLun):
                mine = m.in_sync_peers()
                followers = mine if followers is None else followers & mine
        if followers is None:  # no mirrored LUN: nothing to be in sync for
            followers = frozenset(views.voters)
        views.set_in_sync(set(view.members) | followers)

    def _lun_in_sync(self, peer: str) -> None:
        if self.quorum is not None and all(m.role is Role.IN_SYNC for m in self.luns.values()):
            self.quorum.peer_joined()

    def _find(self, lun: str) -> MirroredLun:
        for m in self.luns.values():
            if lun in (m.lun.unit.params.serial, m.label):
                return m
        raise KeyError(f"no mirrored LUN with serial {lun!r}")

    def verify(self, lun: str, wait: bool = False, repair: bool = False) -> dict[str, Any]:
        """``vsanctl verify``: start an online verify (or, with ``wait``, report it);
        ``repair``: copy this node's data over the peers' where they differ."""
        m = self._find(lun)
        if not wait:
            m.start_verify(repair)
        return {"lun": m.label, **(m.verify_status() or {})}

    async def drill(self, lun: str, seconds: float, own_writer: bool = True) -> dict[str, Any]:
        """``vsanctl drill``: see vsand/drill.py."""
        from .drill import run_drill
        if not 0 < seconds <= MAX_DRILL_S:
            raise ValueError(f"seconds {seconds:g} (allowed: 0 < seconds <= {MAX_DRILL_S})")
        return await run_drill(self, self._find(lun), seconds, own_writer)

    def resolve(self, lun: str) -> dict[str, Any]:
        """``vsanctl resolve``: this node's data of LUN ``lun`` (its serial) survives."""
        m = self._find(lun)
        endpoint = self.endpoint
        linked = [p for p in m.peers if endpoint is not None and p in endpoint.links]
        m.choose_survivor(linked)
        return {"lun": m.label, "full_resync_to": linked}

    def status(self) -> dict[str, Any]:
        endpoint = self.endpoint
        links = {}
        if endpoint is not None:
            for p in self.config.peers(self.node):
                link = endpoint.links.get(p.name)
                info = self.peer_info.get(p.name, {})
                links[p.name] = {
                    "address": f"{p.host}:{p.port}",
                    "state": "up" if link is not None else "down",
                    "links": [{"link": i, "address": format_address(*a),
                               "state": "up" if (p.name, i) in endpoint.paths else "down",
                               "active": link is not None and link.path == i}
                              for i, a in enumerate(p.addresses)],
                    "rtt_ms": round(link.rtt_avg * 1e3, 3) if link and link.rtt_avg else None,
                    "version": info.get("version"),
                    "config_digest": info.get("config_digest"),
                    "portals": info.get("portals", []),
                    "drift": [what for what, here, there in (
                        ("version", __version__, info.get("version")),
                        ("config", self.digest, info.get("config_digest")))
                        if there is not None and there != here],
                }
        return {"cluster": self.config.cluster_id, "node": self.node, "version": __version__,
                "config_digest": self.digest, "portals": self.portals, "peers": links,
                "quorum": self.views.status() if self.views is not None
                else self.quorum.status() if self.quorum is not None else None,
                "luns": {m.label: m.status() for m in self.luns.values()}}

    async def close(self) -> None:
        if self._startup is not None:
            self._startup.cancel()
        if self.quorum is not None:
            self.quorum.closing = True
        # Links first: the LUNs record that their peers are away before they close.
        if self.endpoint is not None:
            await self.endpoint.close()
        if self.quorum is not None:
            await self.quorum.close()
        if self.views is not None:
            await self.views.close()
        for m in self.luns.values():
            await m.close()
