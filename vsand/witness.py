"""``vsand witness``: the third vote of a two-node cluster.  It holds no data.

The nodes dial it like a peer (same authenticated handshake, node id "witness") and ask for
its vote with CONTROL VOTE(epoch); it answers ACK status 0 (granted) or EPERM after the rule of
``mirror.quorum.WitnessRecord``, with the record on stable storage before the answer leaves.
Heartbeats on its links are answered as on any peer link, which is how the nodes see it alive.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import signal
from concurrent.futures import ThreadPoolExecutor

from .metafiles import FileMetaStore
from .mirror.handshake import NodeIdentity
from .mirror.messages import Ack, Control, ControlKind, Message
from .mirror.quorum import WitnessRecord, WitnessRecordCorrupt
from .peer import PeerEndpoint, PeerLink

log = logging.getLogger("vsand.witness")

RECORD = "witness.record"
WITNESS_ID = "witness"


class Witness:
    def __init__(self, cluster_id: str, secret: bytes, nodes: list[str], state_dir: str, *,
                 heartbeat_interval: float = 0.5, peer_timeout: float = 3.0) -> None:
        self.cluster_id = cluster_id
        self.nodes = nodes
        os.makedirs(state_dir, mode=0o700, exist_ok=True)
        self.store = FileMetaStore(state_dir)
        raw = self.store.read(RECORD)
        try:
            self.record = WitnessRecord.from_bytes(raw) if raw else WitnessRecord()
        except WitnessRecordCorrupt as e:
            # Voting again from scratch could give an epoch a second time: refuse to run.
            raise SystemExit(f"{state_dir}/{RECORD}: {e}; refusing to vote (restore it or "
                             "remove it only if no node has run since)") from None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vsand-witness")
        self._lock = asyncio.Lock()
        self.endpoint = PeerEndpoint(
            NodeIdentity(cluster_id, WITNESS_ID, ()), secret, nodes,
            on_message=self._message, heartbeat_interval=heartbeat_interval,
            heartbeat_timeout=peer_timeout)

    async def listen(self, host: str, port: int) -> asyncio.Server:
        server = await self.endpoint.listen(host, port)
        log.info("witness of cluster %s for nodes %s on %s:%d; last vote: epoch %d to %s",
                 self.cluster_id, ", ".join(self.nodes), host, port, self.record.epoch,
                 self.record.node or "nobody")
        return server

    def _message(self, link: PeerLink, msg: Message) -> None:
        if type(msg) is Control and msg.kind is ControlKind.VOTE:
            node = link.peer_id
            assert node is not None
            asyncio.ensure_future(self._vote(link, node, msg))

    async def _vote(self, link: PeerLink, node: str, msg: Control) -> None:
        async with self._lock:  # one decision at a time, each persisted before the next
            granted, record = self.record.grant(node, msg.epoch)
            if record != self.record:
                loop = asyncio.get_running_loop()
                try:
                    await loop.run_in_executor(self._executor, self.store.write, RECORD,
                                               record.to_bytes())
                except OSError as e:
                    log.error("cannot record the vote for epoch %d: %s; refused", msg.epoch, e)
                    granted, record = False, self.record
                self.record = record
        log.log(logging.INFO if granted else logging.WARNING, "vote for epoch %d %s node %s",
                msg.epoch, "granted to" if granted else "refused to", node)
        link.send(Ack(0, msg.epoch, 0, msg.request_id, 0 if granted else errno.EPERM))

    async def close(self) -> None:
        await self.endpoint.close()
        self._executor.shutdown(wait=True)


async def serve(witness: Witness, host: str, port: int) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await witness.listen(host, port)
    from .sdnotify import Notifier
    notifier = Notifier()
    notifier.notify("READY=1", f"STATUS=witness of {witness.cluster_id}")
    notifier.start_watchdog()
    await stop.wait()
    notifier.notify("STOPPING=1")
    await witness.close()
    notifier.close()


def run(witness_args: dict[str, object]) -> int:
    try:
        import uvloop
        runner = uvloop.run
    except ImportError:  # pragma: no cover
        runner = asyncio.run

    async def main() -> None:
        w = Witness(**witness_args["witness"])  # type: ignore[arg-type]
        await serve(w, str(witness_args["host"]), int(witness_args["port"]))  # type: ignore

    runner(main())
    return 0
