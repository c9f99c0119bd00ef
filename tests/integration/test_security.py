"""Security against a running daemon with real clients: CHAP and mutual CHAP (libiscsi),
access lists and LUN masking (iscsi-inq -i, iscsi-ls -s), and CRC32C digests (libiscsi for
header digests; a raw initiator for data digests, which libiscsi 1.19 does not implement)."""

from __future__ import annotations

import re
import struct
import subprocess

import crcmod.predefined
import pytest

from rawiscsi import (LOGIN_RSP, REJECT, SCSI_RSP, DigestInitiator, RawInitiator)
from rig.procs import HOST, VsandTarget

CHAP_IQN = "iqn.2026-11.org.vsand:chap"
ACL_IQN = "iqn.2026-11.org.vsand:acl"
USER, SECRET = "alice", "alice-secret-1"
TUSER, TSECRET = "vsand-target", "target-secret-2"
ALLOWED = "iqn.2026-11.org.vsand:allowed"      # sees LUN 1 of ACL_IQN only
FULL = "iqn.2026-11.org.vsand:full"            # sees every LUN of ACL_IQN
STRANGER = "iqn.2026-11.org.vsand:stranger"    # not in the access list

# An independent CRC32C (table code, not the library the daemon uses).
crc32c = crcmod.predefined.mkCrcFun("crc-32c")


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory):
    work = tmp_path_factory.mktemp("security")
    data = work / "data"
    secret_file = work / "chap.secret"
    secret_file.write_text(SECRET + "\n")
    secret_file.chmod(0o600)

    def luns(prefix: str) -> list[dict[str, object]]:
        return [{"number": n, "path": str(data / f"{prefix}{n}.img"), "size": "16MiB"}
                for n in (0, 1)]
    t = VsandTarget(work, iqn=CHAP_IQN, extra_config={
        "targets": [
            {"iqn": CHAP_IQN, "alias": "chap", "luns": luns("chap"),
             "auth": {"method": "chap", "user": USER, "secret_file": str(secret_file),
                      "mutual_user": TUSER, "mutual_secret": TSECRET}},
            {"iqn": ACL_IQN, "alias": "acl", "luns": luns("acl"),
             "acl": [{"initiator": ALLOWED, "luns": [1]}, {"initiator": FULL}]},
        ],
        "iscsi": {"header_digest": ["CRC32C", "None"], "data_digest": ["CRC32C", "None"]},
    })
    t.start()
    yield t
    t.stop()


def run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), capture_output=True, text=True, timeout=120)


def cunit_ok(out: subprocess.CompletedProcess[str]) -> None:
    """iscsi-test-cu ran at least one test and none failed (its Run Summary line)."""
    text = out.stdout + out.stderr
    m = re.search(r"tests\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)", out.stdout)
    assert m is not None, text[-3000:]
    total, ran, passed, failed = map(int, m.groups())
    assert ran > 0 and failed == 0 and out.returncode == 0, text[-3000:]
    assert "Login Failed" not in text, text[-3000:]


def url(t: VsandTarget, iqn: str, lun: int, creds: str = "", query: str = "") -> str:
    return f"iscsi://{creds}{HOST}:{t.port}/{iqn}/{lun}{query}"


def portal(t: VsandTarget) -> str:
    return f"iscsi://{HOST}:{t.port}"


# --------------------------------------------------------------------------------------------
# CHAP

def test_chap_login_with_the_right_secret(target: VsandTarget) -> None:
    out = run("iscsi-inq", url(target, CHAP_IQN, 0, f"{USER}%{SECRET}@"))
    assert out.returncode == 0 and "Vendor:VSAND" in out.stdout, out.stdout + out.stderr


@pytest.mark.parametrize("creds", ["", f"{USER}%wrong-secret-99@", f"mallory%{SECRET}@"])
def test_chap_refuses_wrong_or_missing_credentials(target: VsandTarget, creds: str) -> None:
    out = run("iscsi-inq", url(target, CHAP_IQN, 0, creds))
    assert out.returncode != 0
    # Unknown user and wrong secret look the same: authentication failure, 0x0201.
    assert "Authentication failure(513)" in out.stdout + out.stderr, out.stdout + out.stderr


def test_mutual_chap(target: VsandTarget) -> None:
    good = run("iscsi-inq", url(target, CHAP_IQN, 0, f"{USER}%{SECRET}@",
                                f"?target_user={TUSER}&target_password={TSECRET}"))
    assert good.returncode == 0, good.stdout + good.stderr
    # The initiator checks the target's answer: a target with another secret is refused.
    bad = run("iscsi-inq", url(target, CHAP_IQN, 0, f"{USER}%{SECRET}@",
                               f"?target_user={TUSER}&target_password=not-the-target-1"))
    assert bad.returncode != 0 and "CHAP_R" in bad.stdout + bad.stderr


def test_no_secret_in_the_log(target: VsandTarget) -> None:
    log = target.stderr_tail(2000)
    assert SECRET not in log and TSECRET not in log


@pytest.mark.parametrize("suite", ["iSCSI", "SCSI.Write10"])
def test_iscsi_test_cu_runs_with_chap(target: VsandTarget, suite: str) -> None:
    # "iSCSI" is the whole iSCSI family (CmdSN, DataSN, residuals, TMF): 15 tests.
    cunit_ok(run("iscsi-test-cu", "--dataloss", "-i", "iqn.2026-11.org.vsand:cu-1",
                 "-I", "iqn.2026-11.org.vsand:cu-2", "--test", suite,
                 url(target, CHAP_IQN, 0, f"{USER}%{SECRET}@")))


# --------------------------------------------------------------------------------------------
# Access lists and LUN masking

def test_listed_initiator_logs_in(target: VsandTarget) -> None:
    out = run("iscsi-inq", "-i", ALLOWED, url(target, ACL_IQN, 1))
    assert out.returncode == 0 and "Vendor:VSAND" in out.stdout, out.stdout + out.stderr


def test_unlisted_initiator_gets_authorization_failure(target: VsandTarget) -> None:
    out = run("iscsi-inq", "-i", STRANGER, url(target, ACL_IQN, 0))
    assert out.returncode != 0
    assert "Authorization failure(514)" in out.stdout + out.stderr, out.stdout + out.stderr


def test_discovery_hides_targets_an_initiator_may_not_use(target: VsandTarget) -> None:
    stranger = run("iscsi-ls", "-i", STRANGER, portal(target))
    assert stranger.returncode == 0, stranger.stderr
    assert CHAP_IQN in stranger.stdout and ACL_IQN not in stranger.stdout, stranger.stdout
    allowed = run("iscsi-ls", "-i", ALLOWED, portal(target))
    assert ACL_IQN in allowed.stdout, allowed.stdout


def _luns_of(listing: str, iqn: str) -> list[int]:
    """LUN numbers iscsi-ls -s prints under ``iqn``."""
    luns: list[int] = []
    current = ""
    for line in listing.splitlines():
        if line.startswith("Target:"):
            current = line.split()[0].split(":", 1)[1]
        elif current == iqn and line.strip().startswith("Lun:"):
            luns.append(int(line.split()[0].split(":")[1]))
    return luns


def test_lun_masking_in_report_luns(target: VsandTarget) -> None:
    masked = run("iscsi-ls", "-s", "-i", ALLOWED, portal(target))
    assert _luns_of(masked.stdout, ACL_IQN) == [1], masked.stdout + masked.stderr
    full = run("iscsi-ls", "-s", "-i", FULL, portal(target))
    assert _luns_of(full.stdout, ACL_IQN) == [0, 1], full.stdout + full.stderr


def test_masked_lun_is_not_supported(target: VsandTarget) -> None:
    out = run("iscsi-inq", "-i", ALLOWED, url(target, ACL_IQN, 0))
    assert out.returncode != 0, out.stdout
    full = run("iscsi-inq", "-i", FULL, url(target, ACL_IQN, 0))
    assert full.returncode == 0, full.stdout + full.stderr


def test_masked_lun_raw(target: VsandTarget) -> None:
    """TEST UNIT READY to a masked LUN: CHECK CONDITION, LOGICAL UNIT NOT SUPPORTED (25/00),
    and the same through the fast path's opcode (READ(10))."""
    c = RawInitiator(target.port)
    try:
        r = c.login(ACL_IQN, initiator=ALLOWED)
        assert r.opcode == LOGIN_RSP and r.bhs[36:38] == b"\0\0"
        for cdb, kw in ((bytes(6), {}), (bytes([0x28, 0, 0, 0, 0, 0, 0, 0, 1, 0]),
                                         {"edtl": 512, "read": True})):
            c.command(cdb, lun=0, **kw)
            p, _ = c.response()
            assert p.opcode == SCSI_RSP and p.bhs[3] == 2, p.bhs.hex()
            assert (p.data[2 + 2] & 0x0F, p.data[2 + 12], p.data[2 + 13]) == (5, 0x25, 0)
    finally:
        c.close()


# --------------------------------------------------------------------------------------------
# Digests

@pytest.fixture(scope="module")
def digest_target(tmp_path_factory: pytest.TempPathFactory):
    # libiscsi's tools always offer HeaderDigest=None,CRC32C (the URL's header_digest is
    # overridden), so a target that accepts only CRC32C is how a real client gets digests.
    t = VsandTarget(tmp_path_factory.mktemp("digest"), iqn="iqn.2026-11.org.vsand:digest",
                    extra_config={"iscsi": {"header_digest": ["CRC32C"]}})
    t.start()
    yield t
    t.stop()


@pytest.mark.parametrize("suite", ["SCSI.Write10", "SCSI.Read10", "SCSI.CompareAndWrite",
                                   "iSCSI"])
def test_libiscsi_with_header_digests(digest_target: VsandTarget, suite: str) -> None:
    cunit_ok(run("iscsi-test-cu", "--dataloss", "-i", "iqn.2026-11.org.vsand:hd-1",
                 "-I", "iqn.2026-11.org.vsand:hd-2", "--test", suite, digest_target.url(0)))
    assert "header digest CRC32C" in digest_target.stderr_tail(2000)
    assert "digest error" not in digest_target.stderr_tail(2000)


DIGEST_LOGIN = [("HeaderDigest", "CRC32C"), ("DataDigest", "CRC32C"),
                ("MaxRecvDataSegmentLength", "65536"), ("ImmediateData", "Yes"),
                ("InitialR2T", "No"), ("FirstBurstLength", "65536"),
                ("MaxBurstLength", "262144")]


def digest_session(t: VsandTarget) -> DigestInitiator:
    c = DigestInitiator(t.port)
    r = c.login(ACL_IQN, extra=DIGEST_LOGIN, initiator=FULL)
    assert r.opcode == LOGIN_RSP and r.bhs[36:38] == b"\0\0", r.bhs[36:38]
    keys = dict(kv.split("=", 1) for kv in r.data.decode().split("\0") if "=" in kv)
    assert keys["HeaderDigest"] == "CRC32C" and keys["DataDigest"] == "CRC32C", keys
    c.digests = True
    # The nexus may carry a unit attention from an earlier test's dropped connection.
    c.command(bytes(6))
    c.response()
    return c


def test_raw_header_and_data_digests_write_and_read(target: VsandTarget) -> None:
    c = digest_session(target)
    try:
        payload = bytes(range(256)) * 16 + b"\x07" * 3 * 512     # 7 blocks; odd length tail
        blocks = len(payload) // 512
        write10 = struct.pack(">BBIBHB", 0x2A, 0, 100, 0, blocks, 0)
        c.command(write10, edtl=len(payload), write=True, data=payload)
        p, _ = c.response()
        assert p.opcode == SCSI_RSP and p.bhs[3] == 0, p.bhs.hex()
        read10 = struct.pack(">BBIBHB", 0x28, 0, 100, 0, blocks, 0)
        c.command(read10, edtl=len(payload), read=True)
        p, data = c.response()
        assert p.bhs[3] == 0 and data == payload
    finally:
        c.close()


def test_data_digest_error_is_rejected_and_ends_the_connection(target: VsandTarget) -> None:
    """ERL 0 (RFC 7143 §7.8, §7.12): Reject with reason Data-Digest-Error (0x02), then the
    connection goes (session recovery: digest recovery needs ErrorRecoveryLevel 1)."""
    c = digest_session(target)
    try:
        c.corrupt_data = True
        c.command(struct.pack(">BBIBHB", 0x2A, 0, 0, 0, 1, 0), edtl=512, write=True,
                  data=b"x" * 512)
        p = c.recv_or_eof()
        assert p is not None and p.opcode == REJECT and p.bhs[2] == 0x02, p
        assert c.recv_or_eof() is None
    finally:
        c.close()


def test_header_digest_error_closes_the_connection(target: VsandTarget) -> None:
    c = digest_session(target)
    try:
        c.corrupt_header = True
        c.command(bytes(6))
        assert c.recv_or_eof() is None      # nothing in the header can be trusted
    finally:
        c.close()
    # Other sessions are unaffected.
    out = run("iscsi-inq", "-i", FULL, url(target, ACL_IQN, 0))
    assert out.returncode == 0, out.stdout + out.stderr
