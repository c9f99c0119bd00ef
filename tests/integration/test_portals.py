"""Several portals per target: SendTargets lists every one with its portal group tag, a login
through each answers with that tag, and VPD 0x83 names the relative target port of the portal
group the command came through; REPORT TARGET PORT GROUPS lists both ports."""

from __future__ import annotations

import struct
import subprocess

from rawiscsi import RawInitiator
from rig.procs import VsandTarget, free_port

IQN = "iqn.2026-11.org.vsand:portals"


def _vpd83_relative_port(c: RawInitiator) -> int:
    c.command(bytes([0x12, 0x01, 0x83, 0x01, 0x00, 0]), edtl=256, read=True)
    _, data = c.response()
    pos = 4
    while pos + 4 <= len(data):
        assoc_type, length = data[pos + 1], data[pos + 3]
        if assoc_type & 0x0F == 0x04:  # relative target port designator
            return struct.unpack_from(">H", data, pos + 6)[0]
        pos += 4 + length
    raise AssertionError("no relative target port designator")


def test_two_portal_groups(tmp_path) -> None:
    p2 = free_port()
    t = VsandTarget(tmp_path, iqn=IQN)
    t.extra_config["portals"] = [{"listen": f"127.0.0.1:{t.port}", "group": 1},
                                 {"listen": f"127.0.0.1:{p2}", "group": 2}]
    t.start()
    try:
        ls = subprocess.run(["iscsi-ls", f"iscsi://127.0.0.1:{t.port}"], capture_output=True,
                            text=True, timeout=30)
        assert f"Portal:127.0.0.1:{t.port},1" in ls.stdout, ls.stdout + ls.stderr
        assert f"Portal:127.0.0.1:{p2},2" in ls.stdout, ls.stdout
        for port, tag in ((t.port, 1), (p2, 2)):
            c = RawInitiator(port)
            reply = c.login(IQN)
            keys = dict(kv.split("=", 1) for kv in reply.data.decode().split("\0") if "=" in kv)
            assert keys.get("TargetPortalGroupTag") == str(tag), keys
            c.command(bytes(6))
            c.response()  # a unit attention from an earlier nexus, if any
            assert _vpd83_relative_port(c) == tag
            c.command(bytes([0xA3, 0x0A, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0]), edtl=256, read=True)
            _, rtpg = c.response()
            count = rtpg[11]
            ports = [struct.unpack_from(">H", rtpg, 14 + 4 * i)[0] for i in range(count)]
            assert ports == [1, 2]
            c.close()
    finally:
        t.stop()
