"""Integration test rig: real targets (vsand, tgt) and real initiators (libiscsi, qemu).

Shared by ``tests/integration`` and ``bench/``. Nothing here talks to anything but 127.0.0.1
or the addresses of network namespaces it made itself (``netns``), and every wait is bounded
by a deadline.
"""

from .cluster import VsandCluster
from .procs import (
    DaemonError,
    LunSpec,
    Target,
    TgtTarget,
    VsandTarget,
    free_port,
    wait_port,
    wait_until,
)

__all__ = [
    "DaemonError",
    "LunSpec",
    "Target",
    "TgtTarget",
    "VsandCluster",
    "VsandTarget",
    "free_port",
    "wait_port",
    "wait_until",
]
