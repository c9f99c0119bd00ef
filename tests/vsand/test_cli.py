"""The ``vsand`` command line: check-config answers, errors name file and key."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _vsand(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "vsand", *args], capture_output=True,
                          text=True, timeout=60, cwd=cwd)


def test_check_config_accepts_every_shipped_example(tmp_path: Path) -> None:
    import yaml
    examples = sorted((ROOT / "deploy").rglob("*.yaml"))
    assert examples
    for path in examples:
        doc = yaml.safe_load(path.read_text())
        cluster = doc.get("cluster") if isinstance(doc, dict) else None
        if cluster and "secret_file" in cluster:
            # The secret is not in the repository (git keeps no 0600): check a copy with one.
            secret = tmp_path / "cluster.secret"
            secret.write_text("a-generated-cluster-secret-for-the-test\n")
            secret.chmod(0o600)
            cluster["secret_file"] = str(secret)
            path = tmp_path / path.name
            path.write_text(yaml.safe_dump(doc))
        out = _vsand("check-config", str(path))
        assert out.returncode == 0, f"{path}: {out.stderr}"
        assert "OK" in out.stdout


def test_check_config_reports_file_key_and_problem(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("data_dir: d\nportals: [{listen: '127.0.0.1:3260'}]\n"
                   "targets: [{iqn: 'iqn.2026-11.org.x:y', luns: [{number: 0, path: l.img,"
                   " size: 1MiB, block_size: 1000}]}]\nbogus: 1\n")
    out = _vsand("check-config", str(bad))
    assert out.returncode == 2
    assert "bad.yaml: targets[0].luns[0].block_size: 1000" in out.stderr
    assert "bogus" in out.stderr


def test_run_with_missing_config_fails_cleanly(tmp_path: Path) -> None:
    out = _vsand("run", "-c", str(tmp_path / "missing.yaml"))
    assert out.returncode == 2 and "missing.yaml" in out.stderr
    assert "Traceback" not in out.stderr
