"""The layering rules of DESIGN.md, checked on the source: ``protocol/`` is sans-IO (no
asyncio, sockets, files, clocks or entropy, nothing from the daemon or the mirror), and
``mirror/`` reaches neither the daemon nor I/O."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Modules that do I/O, read the clock or entropy, or belong to the daemon.
FORBIDDEN = {"asyncio", "socket", "os", "io", "threading", "subprocess", "time", "random",
             "secrets", "select", "selectors", "signal", "uvloop", "yaml", "prometheus_client",
             "pyroute2", "logging", "pathlib", "shutil", "tempfile", "concurrent"}
EXTRA_ALLOWED = {"mirror": {"crc32c", "crcmod"}}


def _imports(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(), str(path))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.append((node.lineno, node.module))
    return out


@pytest.mark.parametrize("package", ["protocol", "mirror"])
def test_layer_imports(package: str) -> None:
    problems = []
    for path in sorted((ROOT / package).rglob("*.py")):
        for line, name in _imports(path):
            top = name.split(".")[0]
            if top in FORBIDDEN:
                problems.append(f"{path.relative_to(ROOT)}:{line}: imports {name}")
            elif top == "vsand":
                allowed = ("vsand.protocol",) if package == "protocol" else (
                    "vsand.protocol", "vsand.mirror")
                if not name.startswith(allowed):
                    problems.append(f"{path.relative_to(ROOT)}:{line}: imports {name}")
            elif top in ("protocol", "mirror"):
                problems.append(f"{path.relative_to(ROOT)}:{line}: imports the top-level "
                                f"{name}; use vsand.{name} or a relative import")
            elif top in EXTRA_ALLOWED.get(package, set()):
                continue
    assert not problems, "\n".join(problems)
