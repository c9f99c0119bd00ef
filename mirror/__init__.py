"""Synchronous replication between vsand nodes: the sans-IO building blocks.

Nothing here does I/O; the daemon (``vsand/``) will own the sockets, files and timers and drive
these state machines.  How they fit, for one mirrored LUN on each node:

- ``ordering.OrderingEngine`` orders writes cluster-wide: one sequencer per LUN and epoch
  numbers every write, each replica applies overlapping writes in number order, the node a
  write arrived at answers the initiator once every in-sync replica has applied it.
- ``messages`` frames what crosses a peer link (CRC32C header and payload, zero-copy payload
  views, strict decoding); ``handshake`` authenticates a link (HMAC-SHA256 over both nonces)
  and agrees on cluster, nodes, version and LUN geometry.
- ``bitmap.DirtyBitmap`` and ``activity_log.ActivityLog`` record, on stable storage through a
  ``metastore.MetaStore``, which regions a replica that left the in-sync set is missing, before
  the write that dirtied them is acknowledged, with one store write per newly active region.
- ``generations`` keeps per-replica data generation identifiers and decides the sync direction
  on reconnect (or reports a split brain / unrelated data for an operator).
- ``resync`` and ``verify`` plan the copy of dirty regions (rate-limited by ``ratelimit``,
  yielding to foreground I/O) and the online comparison of region checksums.
- ``quorum`` holds the rules of two data nodes and a witness: leases renewed by answered
  heartbeats, the witness's one vote per epoch, and the timing argument that keeps two sides
  from ever serving at once.
- ``membership`` decides the in-sync set of three or more data nodes by majority (one round
  of Paxos per epoch, leases waited out before a new view serves).  The daemon does not run it
  yet: three-node clusters are refused at start until the replication follows its views.

On the daemon side, ``vsand/peer.py`` carries these messages over authenticated TCP links
(heartbeats on every network, loss detection, reconnect), ``vsand/replication.py`` feeds a
LUN's writes through the ordering engine and drives exchange, resync and verify,
``vsand/quorum.py`` runs the quorum rules and ``vsand/cluster.py`` wires them per node.  A
write's origin node travels in the top bits of its request id (request ids are unique per
origin), and a COMPARE AND WRITE is replicated as its own operation so every replica compares
in sequence order and reaches the same outcome.
"""
