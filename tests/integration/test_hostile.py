"""Hostile and malformed input against a running daemon: every case is answered as RFC 7143 /
SPC say, the other sessions keep working, and the daemon never dies.

Each test ends by checking the daemon with a client we did not write (libiscsi's iscsi-inq)."""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import time

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from rawiscsi import (DATA_IN, DATA_OUT, LOGIN_REQ, LOGIN_RSP, LOGOUT_REQ, LOGOUT_RSP, NOP_IN,
                      NOP_OUT, R2T, REJECT, SCSI_RSP, TMF_REQ, TMF_RSP, RawInitiator,
                      kv_text, parse_keys)
from rig.procs import VsandTarget

IQN = "iqn.2026-11.org.vsand:hostile"
TUR = bytes(6)


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory):
    t = VsandTarget(tmp_path_factory.mktemp("hostile"), iqn=IQN,
                    extra_config={"iscsi": {"queue_depth": 16, "login_timeout": 2,
                                            "nop_interval": 1, "nop_timeout": 2}})
    t.start()
    yield t
    t.stop()


def healthy(t: VsandTarget) -> None:
    """The daemon is alive and a real client still gets answers."""
    assert t.running(), t.stderr_tail()
    out = subprocess.run(["iscsi-inq", t.url(0)], capture_output=True, text=True, timeout=20)
    assert out.returncode == 0 and "Vendor:VSAND" in out.stdout, out.stdout + out.stderr
    assert "Traceback" not in t.stderr_tail(200), t.stderr_tail(200)


def session(t: VsandTarget) -> RawInitiator:
    c = RawInitiator(t.port)
    reply = c.login(IQN)
    assert reply.opcode == LOGIN_RSP and reply.bhs[36:38] == b"\0\0", reply.bhs[36:38]
    # The same I_T nexus dropped earlier without a logout: one I_T NEXUS LOSS unit attention.
    c.command(TUR)
    p, _ = c.response()
    assert p.bhs[3] == 0 or (p.bhs[3] == 2 and p.data[2 + 2] & 0x0F == 6
                             and p.data[2 + 12] == 0x29), p.data.hex()
    return c


def status_of(c: RawInitiator) -> int:
    p, _ = c.response()
    assert p.opcode == SCSI_RSP or p.opcode == DATA_IN, hex(p.opcode)
    return p.bhs[3]


def test_garbage_before_login_closes_only_that_connection(target: VsandTarget) -> None:
    c = RawInitiator(target.port)
    c.send_raw(os.urandom(48 * 3))
    c.sock.settimeout(5)
    # The target rejects or answers, then closes: reading must end in EOF, not hang.
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and c.recv_or_eof() is not None:
        pass
    c.close()
    healthy(target)


def test_truncated_login_and_silent_client_time_out(target: VsandTarget) -> None:
    c = RawInitiator(target.port)
    c.send_raw(bytes([0x43, 0x87]) + bytes(20))  # half a BHS, then nothing
    c.sock.settimeout(6)
    t0 = time.monotonic()
    assert c.recv_or_eof() is None  # login_timeout (2 s) closes it
    assert time.monotonic() - t0 < 5.5
    c.close()
    healthy(target)


def test_announced_huge_login_segment_is_refused_without_allocating(target: VsandTarget) -> None:
    c = RawInitiator(target.port)
    hdr = struct.pack(">BBBBIQI7I", 0x43, 0x87, 0, 0, 0xFFFFFF, c.isid << 16, 1, 0, 1, 0,
                      0, 0, 0, 0)
    c.send_raw(hdr)
    c.sock.settimeout(5)
    p = c.recv_or_eof()
    assert p is None or p.opcode in (REJECT, LOGIN_RSP)
    c.close()
    healthy(target)


@pytest.mark.parametrize("pairs,status", [
    ([("SessionType", "Normal"), ("TargetName", IQN)], 0x0207),  # no InitiatorName
    ([("InitiatorName", "iqn.2026-11.org.x:y")], 0x0207),  # Normal session without TargetName
    ([("InitiatorName", "iqn.2026-11.org.x:y"), ("TargetName", "iqn.2026-11.org.x:none")],
     0x0203),
    ([("InitiatorName", "iqn.2026-11.org.x:y"), ("TargetName", IQN), ("AuthMethod", "CHAP")],
     0x0201),
    ([("InitiatorName", "iqn.2026-11.org.x:y"), ("TargetName", IQN),
      ("TargetName", IQN + "x")], 0x0200),
])
def test_bad_logins_get_the_rfc_status(target: VsandTarget, pairs, status: int) -> None:
    c = RawInitiator(target.port)
    csg = 0 if any(k == "AuthMethod" for k, _ in pairs) else 1
    c.send(LOGIN_REQ, 0x80 | (csg << 2) | (1 if csg == 0 else 3), lunf=c.isid << 16, itt=1,
           words=(0, 1, 0), data=kv_text(pairs), immediate=True)
    p = c.recv()
    assert p.opcode == LOGIN_RSP
    assert struct.unpack_from(">H", p.bhs, 36)[0] == status
    assert c.recv_or_eof() is None  # a failed login ends the connection
    c.close()


def test_version_min_too_high_is_refused(target: VsandTarget) -> None:
    c = RawInitiator(target.port)
    c.send(LOGIN_REQ, 0x87, lunf=c.isid << 16, itt=1, words=(0, 1, 0), b2=5, b3=5,
           data=kv_text([("InitiatorName", "iqn.2026-11.org.x:y"), ("TargetName", IQN)]),
           immediate=True)
    p = c.recv()
    assert p.opcode == LOGIN_RSP and struct.unpack_from(">H", p.bhs, 36)[0] == 0x0205
    c.close()


def test_scsi_command_before_login_is_a_protocol_error(target: VsandTarget) -> None:
    c = RawInitiator(target.port)
    c.command(TUR)
    c.sock.settimeout(5)
    p = c.recv_or_eof()
    assert p is None or p.opcode == REJECT
    assert c.recv_or_eof() is None
    c.close()
    healthy(target)


def test_discovery_send_targets(target: VsandTarget) -> None:
    c = RawInitiator(target.port)
    assert c.login(None).bhs[36:38] == b"\0\0"
    c.send(0x04, 0x80, itt=c.next_itt(), words=(0xFFFFFFFF, c.cmdsn, c.statsn),
           data=kv_text([("SendTargets", "All")]))
    p = c.recv()
    assert p.opcode == 0x24
    text = p.data.decode()
    assert f"TargetName={IQN}" in text and f"TargetAddress=127.0.0.1:{target.port},1" in text
    # SCSI commands have no place in a discovery session.
    c.cmdsn += 1
    c.command(TUR)
    assert c.recv().opcode == REJECT
    c.close()


def test_unknown_opcode_and_stray_data_out_keep_the_session(target: VsandTarget) -> None:
    c = session(target)
    c.send(0x1C, 0x80, itt=c.next_itt(), words=(0, c.cmdsn, c.statsn))  # vendor opcode
    p = c.recv()
    assert p.opcode == REJECT and p.bhs[2] in (0x04, 0x05)
    assert p.data[:1] == bytes([0x1C])  # the rejected header comes back
    c.send(DATA_OUT, 0x80, itt=0xDEAD, words=(0xFFFFFFFF, 0, c.statsn), data=b"x" * 512)
    c.command(TUR)
    assert status_of(c) == 0
    c.close()
    healthy(target)


def test_nop_out_ping_is_echoed(target: VsandTarget) -> None:
    c = session(target)
    itt = c.next_itt()
    c.send(NOP_OUT, 0x80, itt=itt, words=(0xFFFFFFFF, c.cmdsn, c.statsn), data=b"ping-data",
           immediate=True)
    p = c.recv()
    while p.opcode == NOP_IN and p.itt != itt:
        p = c.recv()
    assert p.opcode == NOP_IN and p.itt == itt and p.data == b"ping-data"
    c.close()


def test_target_pings_idle_initiators_and_drops_dead_ones(target: VsandTarget) -> None:
    c = session(target)
    c.sock.settimeout(8)
    p = c.recv(answer_pings=False)  # nop_interval is 1 s
    assert p.opcode == NOP_IN and p.itt == 0xFFFFFFFF and p.word(20) != 0xFFFFFFFF
    # Answering keeps the connection; not answering (nop_timeout 2 s) ends it.
    c.send(NOP_OUT, 0x80, itt=0xFFFFFFFF, words=(p.word(20), c.cmdsn, c.statsn), immediate=True)
    t0 = time.monotonic()
    while (q := c.recv_or_eof(answer_pings=False)) is not None:
        assert q.opcode == NOP_IN
    assert 2 <= time.monotonic() - t0 < 8
    c.close()


def test_write_with_huge_edtl_is_refused_without_allocating(target: VsandTarget) -> None:
    c = session(target)
    rss_before = _rss_kib(target.pid)
    cdb = struct.pack(">BBQIBB", 0x8A, 0, 0, 0x200000, 0, 0)  # WRITE(16) of 1 GiB
    c.command(cdb, edtl=1 << 30, write=True)
    p, _ = c.response()
    assert p.opcode == SCSI_RSP and p.bhs[3] == 0x02  # CHECK CONDITION, no R2T solicited
    assert _rss_kib(target.pid) - rss_before < 64 * 1024
    c.close()
    healthy(target)


def test_r2t_flow_for_a_solicited_write(target: VsandTarget) -> None:
    c = session(target)
    n = 256  # 128 KiB: 64 KiB unsolicited (FirstBurstLength), the rest solicited
    cdb = struct.pack(">BBIBHB", 0x2A, 0, 2048, 0, n, 0)
    payload = bytes(range(256)) * (n * 2)
    itt = c.command(cdb, edtl=n * 512, write=True, final=False)
    for off in range(0, 65536, 16384):
        last = off + 16384 == 65536
        c.send(DATA_OUT, 0x80 if last else 0, itt=itt, words=(0xFFFFFFFF, 0, c.statsn, 0,
                                                            off // 16384, off),
               data=payload[off:off + 16384])
    p = c.recv()
    assert p.opcode == R2T
    ttt, r2tsn, off, length = p.word(20), p.word(36), p.word(40), p.word(44)
    assert (r2tsn, off, length) == (0, 65536, 65536)
    c.send(DATA_OUT, 0x80, itt=itt, words=(ttt, 0, c.statsn, 0, 0, off),
           data=payload[off:off + length])
    assert status_of(c) == 0
    rd = struct.pack(">BBIBHB", 0x28, 0, 2048, 0, n, 0)
    c.command(rd, edtl=n * 512, read=True)
    _, data = c.response()
    assert data == payload
    c.close()


def test_abort_task_for_unknown_task_and_lun_reset(target: VsandTarget) -> None:
    c = session(target)
    itt = c.next_itt()
    c.send(TMF_REQ, 0x80 | 1, itt=itt, words=(0x4242, c.cmdsn, c.statsn, (c.cmdsn - 5) & 0xFFFFFFFF),
           immediate=True)
    p = c.recv()
    assert p.opcode == TMF_RSP and p.bhs[2] in (0, 1)
    c.send(TMF_REQ, 0x80 | 5, lunf=7 << 48, itt=c.next_itt(), words=(0xFFFFFFFF, c.cmdsn,
                                                                    c.statsn), immediate=True)
    assert c.recv().bhs[2] == 2  # LUN does not exist
    c.send(TMF_REQ, 0x80 | 8, itt=c.next_itt(), words=(0xFFFFFFFF, c.cmdsn, c.statsn),
           immediate=True)
    assert c.recv().bhs[2] == 4  # task reassign needs ERL 2
    c.command(TUR)
    assert status_of(c) == 0
    c.close()


def test_session_reinstatement_closes_the_old_connection(target: VsandTarget) -> None:
    a = session(target)
    b = session(target)  # same ISID and initiator name: reinstates
    a.sock.settimeout(5)
    assert a.recv_or_eof() is None
    b.command(TUR)
    assert status_of(b) == 0
    a.close()
    b.close()


def test_logout(target: VsandTarget) -> None:
    c = session(target)
    c.send(LOGOUT_REQ, 0x80, itt=c.next_itt(), words=(0, c.cmdsn, c.statsn), immediate=True)
    p = c.recv()
    assert p.opcode == LOGOUT_RSP and p.bhs[2] == 0
    assert c.recv_or_eof() is None
    c.close()


def test_slow_reader_does_not_stall_other_sessions(target: VsandTarget) -> None:
    slow = session(target)
    slow.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    cdb = struct.pack(">BBIBHB", 0x28, 0, 0, 0, 8192, 0)  # 4 MiB reads it never drains
    for _ in range(8):
        slow.command(cdb, edtl=8192 * 512, read=True)
    fast = RawInitiator(target.port)
    fast.isid += 1
    assert fast.login(IQN).bhs[36:38] == b"\0\0"
    t0 = time.monotonic()
    for _ in range(50):
        fast.command(TUR)
        assert status_of(fast) == 0
    assert time.monotonic() - t0 < 5
    slow.close()
    fast.close()
    healthy(target)


CDB_OPS = st.sampled_from([0x00, 0x03, 0x08, 0x0A, 0x12, 0x15, 0x1A, 0x1B, 0x25, 0x28, 0x2A,
                           0x2F, 0x35, 0x41, 0x42, 0x55, 0x5A, 0x88, 0x89, 0x8A, 0x8B, 0x8E,
                           0x8F, 0x91, 0x93, 0x9E, 0xA0, 0xA3, 0xA8, 0xAA, 0xAF, 0xFF])


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(op=CDB_OPS, rest=st.binary(min_size=15, max_size=15),
       data=st.binary(max_size=2048), read=st.booleans())
def test_fuzzed_cdbs_always_get_a_status(target: VsandTarget, op: int, rest: bytes,
                                         data: bytes, read: bool) -> None:
    c = _fuzz_session(target)
    cdb = bytes([op]) + rest
    edtl = len(data) if data and not read else (4096 if read else 0)
    c.command(cdb, edtl=edtl, read=read, write=bool(data) and not read, data=data[:2048])
    while True:
        p = c.recv()
        if p.opcode == R2T:  # the CDB asked for more data than immediate: send zeros
            c.send(DATA_OUT, 0x80, itt=p.itt, words=(p.word(20), 0, c.statsn, 0, 0, p.word(40)),
                   data=bytes(p.word(44)))
            continue
        if p.opcode == DATA_IN and not p.bhs[1] & 0x01:
            continue
        if p.opcode == NOP_IN:
            continue
        assert p.opcode in (SCSI_RSP, DATA_IN, REJECT)
        if p.opcode != REJECT:
            assert p.bhs[3] in (0x00, 0x02, 0x04, 0x18)
        break


_FUZZ: dict[int, RawInitiator] = {}


def _fuzz_session(target: VsandTarget) -> RawInitiator:
    c = _FUZZ.get(target.port)
    if c is None:
        c = RawInitiator(target.port, timeout=10)
        c.isid += 7
        assert c.login(IQN).bhs[36:38] == b"\0\0"
        _FUZZ[target.port] = c
    return c


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(header=st.binary(min_size=48, max_size=48), data=st.binary(max_size=64))
def test_fuzzed_pdus_after_login_never_kill_the_daemon(target: VsandTarget, header: bytes,
                                                       data: bytes) -> None:
    c = session_for_fuzz(target)
    hdr = bytearray(header)
    hdr[4] = 0  # no AHS: keeps framing consistent so the stream can be followed
    hdr[5:8] = len(data).to_bytes(3, "big")
    try:
        c.send_raw(bytes(hdr) + data + bytes((-len(data)) % 4))
        c.sock.settimeout(0.2)
        while c.recv_or_eof() is not None:
            pass
    except (socket.timeout, OSError):
        pass
    assert target.running(), target.stderr_tail()


def session_for_fuzz(target: VsandTarget) -> RawInitiator:
    c = RawInitiator(target.port)
    c.isid += 99
    assert c.login(IQN).bhs[36:38] == b"\0\0"
    return c


def test_daemon_still_healthy_after_fuzzing(target: VsandTarget) -> None:
    for c in _FUZZ.values():
        c.close()
    healthy(target)


def _rss_kib(pid: int | None) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def test_keys_reply_parsing_helper() -> None:
    assert parse_keys(b"a=b\0c=d\0") == {"a": "b", "c": "d"}
