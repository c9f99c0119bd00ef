"""``vsand demo``: the generated configs, refusing busy ports, and running the two nodes.

The supervision test runs the demo with a stand-in interpreter that drops the ``cluster``
section before starting ``vsand run``: it checks the demo's process handling (start-up, a node
that dies, stopping by signal) whatever state the mirroring runtime is in.  The end-to-end test
runs the real cluster.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import random
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml

from vsand.demo import (
    IQN, busy_ports, demo_ports, port_open, run_demo, write_demo_files,
)

HOST = "127.0.0.1"
READY_DEADLINE_S = 60.0
EXIT_DEADLINE_S = 30.0

# Stands in for the interpreter: `<this> -m vsand run -c FILE` runs vsand on FILE minus its
# cluster section, in the same process (exec), so the PID the demo reports stays valid.
_SINGLE_NODE_PYTHON = """\
#!{python}
import os, sys, yaml
if "witness" in sys.argv[1:4]:  # the witness holds no config: run it as it is
    os.execv(sys.executable, [sys.executable, *sys.argv[1:]])
path = sys.argv[-1]
with open(path) as f:
    config = yaml.safe_load(f)
config.pop("cluster", None)
single = path[:-len(".yaml")] + ".single.yaml"
with open(single, "w") as f:
    yaml.safe_dump(config, f)
os.execv(sys.executable, [sys.executable, "-m", "vsand", "run", "-c", single])
"""


def _free_base_port() -> int:
    """A base port whose six demo ports are free, all below Linux's ephemeral range."""
    rng = random.Random()
    for _ in range(200):
        base = rng.randrange(10000, 26000)
        if not busy_ports(demo_ports(base)):
            return base
    pytest.fail("no free block of demo ports found")


def _pid_running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


class _Demo:
    """A demo process with its output in a file; everything it started is ended by PID."""

    def __init__(self, argv: list[str], workdir: Path) -> None:
        self.workdir = workdir
        self.out_path = workdir / "demo.out"
        self._out = open(self.out_path, "wb")
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=self._out,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        self.node_pids: dict[str, int] = {}

    def output(self) -> str:
        return self.out_path.read_text(errors="replace")

    def wait_for(self, what: str, ready: Callable[[], bool],
                 deadline_s: float = READY_DEADLINE_S) -> None:
        end = time.monotonic() + deadline_s
        while not ready():
            if self.proc.poll() is not None:
                pytest.fail(f"demo exited with code {self.proc.returncode} while waiting for "
                            f"{what}:\n{self.output()}")
            if time.monotonic() > end:
                pytest.fail(f"no {what} after {deadline_s:.0f} s:\n{self.output()}")
            time.sleep(0.1)

    def wait_ready(self, base: int) -> None:
        self.wait_for("ready nodes", lambda: port_open(base) and port_open(base + 1)
                      and "Ctrl-C stops both nodes" in self.output())
        found = dict(re.findall(r"node (a|b) started, pid (\d+)", self.output()))
        self.node_pids = {name: int(pid) for name, pid in found.items()}
        assert set(self.node_pids) == {"a", "b"}, self.output()

    def stop(self) -> int:
        """SIGTERM by PID; the exit code, required within EXIT_DEADLINE_S."""
        os.kill(self.proc.pid, signal.SIGTERM)
        try:
            return self.proc.wait(timeout=EXIT_DEADLINE_S)
        except subprocess.TimeoutExpired:
            pytest.fail(f"demo still running {EXIT_DEADLINE_S:.0f} s after SIGTERM:\n"
                        f"{self.output()}")

    def cleanup(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=EXIT_DEADLINE_S)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        for pid in self.node_pids.values():
            # Only a process still running one of this test's configs is ours.
            if _pid_running(pid) and str(self.workdir) in _cmdline(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        self._out.close()


@contextlib.contextmanager
def _demo(argv: list[str], workdir: Path) -> Iterator[_Demo]:
    demo = _Demo(argv, workdir)
    try:
        yield demo
    finally:
        demo.cleanup()


def test_configs_describe_two_nodes_of_one_cluster(tmp_path: Path) -> None:
    directory = tmp_path / "demo"
    a, b = write_demo_files(str(directory), 40000, "64MiB")
    ca, cb = (yaml.safe_load(Path(n.config_path).read_text()) for n in (a, b))

    assert (ca["node"], cb["node"]) == ({"name": "a"}, {"name": "b"})
    assert ca["portals"] == [{"listen": "127.0.0.1:40000", "group": 1}]
    assert cb["portals"] == [{"listen": "127.0.0.1:40001", "group": 2}]
    assert (ca["metrics"], cb["metrics"]) == ({"listen": "127.0.0.1:46210"},
                                             {"listen": "127.0.0.1:46211"})
    lun_a, lun_b = (c["targets"][0]["luns"][0] for c in (ca, cb))
    assert lun_a["path"] == str(directory / "a" / "lun0.img")
    assert lun_b["path"] == str(directory / "b" / "lun0.img")
    assert ca["targets"][0]["iqn"] == cb["targets"][0]["iqn"] == IQN
    # One cluster section, but each node listens on its own replication port.
    assert (ca["cluster"].pop("listen"), cb["cluster"].pop("listen")) == (
        "127.0.0.1:40010", "127.0.0.1:40011")
    assert ca["cluster"] == cb["cluster"]
    assert ca["cluster"]["nodes"] == [{"name": "a", "address": "127.0.0.1:40010"},
                                      {"name": "b", "address": "127.0.0.1:40011"}]

    secret = directory / "cluster.secret"
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    text = secret.read_text()
    assert re.fullmatch(r"[0-9a-f]{64}\n", text)
    write_demo_files(str(directory), 40000, "64MiB")
    assert secret.read_text() == text  # a second run keeps the cluster's secret


def test_generated_configs_load(tmp_path: Path) -> None:
    pytest.importorskip("vsand.config_cluster")
    from vsand.config import Config, load_config
    if "cluster" not in {f.name for f in dataclasses.fields(Config)}:
        pytest.skip("Config has no cluster section yet")

    nodes = write_demo_files(str(tmp_path / "demo"), 40000, "64MiB")
    configs = [load_config(n.config_path) for n in nodes]
    for node, config in zip(nodes, configs):
        assert config.node_name == node.name
        assert config.cluster is not None
        assert sorted(n.name for n in config.cluster.nodes) == ["a", "b"]
        assert config.data_dir == node.data_dir
        assert config.targets[0].luns[0].size == 64 << 20
    # Multipath needs the same identity through both nodes.
    assert configs[0].targets[0].luns[0].serial == configs[1].targets[0].luns[0].serial


def test_busy_port_is_refused(tmp_path: Path) -> None:
    base = _free_base_port()
    directory = tmp_path / "demo"
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, base + 10))  # node a's replication port
        s.listen()
        out = subprocess.run([sys.executable, "-m", "vsand", "demo", "--dir", str(directory),
                              "--base-port", str(base)], capture_output=True, text=True,
                             timeout=60, stdin=subprocess.DEVNULL)
    assert out.returncode == 2, out.stderr
    assert f"{base + 10}" in out.stderr and "in use" in out.stderr
    assert "Traceback" not in out.stderr
    assert not directory.exists()  # refused before writing or starting anything


def test_bad_arguments_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_demo(str(tmp_path / "d"), base_port=60000) == 2
    assert "59324" in capsys.readouterr().err
    assert run_demo(str(tmp_path / "d"), base_port=_free_base_port(), size="lots") == 2
    assert "LUN size" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()


def test_demo_supervises_its_nodes(tmp_path: Path) -> None:
    python = tmp_path / "python"
    python.write_text(_SINGLE_NODE_PYTHON.format(python=sys.executable))
    python.chmod(0o755)
    base = _free_base_port()
    script = ("import sys; from vsand.demo import run_demo; "
              "sys.exit(run_demo(sys.argv[1], base_port=int(sys.argv[2]), python=sys.argv[3]))")
    argv = [sys.executable, "-c", script, str(tmp_path / "demo"), str(base), str(python)]
    with _demo(argv, tmp_path) as demo:
        demo.wait_ready(base)
        os.kill(demo.node_pids["a"], signal.SIGKILL)
        demo.wait_for("report of node a's end", lambda: "still serving through node b"
                      in demo.output())
        assert "node a stopped (killed by SIGKILL)" in demo.output()
        assert port_open(base + 1)  # the survivor keeps serving
        assert demo.stop() == 0, demo.output()
        assert not _pid_running(demo.node_pids["b"])
        assert "node b stopped (exit code 0)" in demo.output()


def _serial(url: str) -> str:
    # This libiscsi reads -c as a decimal number: 128 is VPD page 0x80, the unit serial.
    out = subprocess.run(["iscsi-inq", "-e", "1", "-c", "128", url], capture_output=True,
                         text=True, timeout=30)
    assert out.returncode == 0, f"{url}: {out.stdout}{out.stderr}"
    m = re.search(r"Unit Serial Number:\[(.*?)\]", out.stdout)
    assert m and m.group(1), f"{url}: no serial in\n{out.stdout}"
    return m.group(1)


def test_demo_end_to_end(tmp_path: Path) -> None:
    pytest.importorskip("vsand.config_cluster")
    base = _free_base_port()
    argv = [sys.executable, "-m", "vsand", "demo", "--dir", str(tmp_path / "demo"),
            "--base-port", str(base), "--size", "64MiB"]
    with _demo(argv, tmp_path) as demo:
        demo.wait_ready(base)
        urls = [f"iscsi://{HOST}:{port}/{IQN}/0" for port in (base, base + 1)]
        assert all(url in demo.output() for url in urls)
        if shutil.which("iscsi-inq"):
            serial_a, serial_b = (_serial(url) for url in urls)
            assert serial_a == serial_b
        assert demo.stop() == 0, demo.output()
        assert not any(_pid_running(pid) for pid in demo.node_pids.values()), demo.output()
