"""mypy --strict on the sans-IO packages (STYLE: protocol/ and mirror/ at least).

The package-dir mapping (``vsand.protocol`` is ``protocol/``) is invisible to mypy through the
editable install, so the test lays the same package tree out with symlinks."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_protocol_and_mirror_type_check_strictly(tmp_path: Path) -> None:
    pkg = tmp_path / "vsand"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "protocol").symlink_to(ROOT / "protocol")
    (pkg / "mirror").symlink_to(ROOT / "mirror")
    out = subprocess.run([sys.executable, "-m", "mypy", "--strict", "--no-incremental",
                          "--cache-dir", str(tmp_path / ".mypy_cache"),
                          "-p", "vsand.protocol", "-p", "vsand.mirror"],
                         capture_output=True, text=True, timeout=300, cwd=tmp_path,
                         env={"MYPYPATH": str(tmp_path), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stdout + out.stderr
