"""Tests for the ``cluster:`` section and the LUNs' ``mirror`` key (vsand.config_cluster)."""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import itertools
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vsand.config import (
    Config, ConfigError, config_to_dict, derive_serial, dump_config, load_config, parse_config,
)
from vsand.config_cluster import ClusterConfig, ClusterNode, mirror_id
from vsand.mirror.handshake import MIN_SECRET

IQN = "iqn.2026-11.org.example:mirror"
SECRET = "a-cluster-secret-of-32-bytes-abc"


def expected_id(iqn: str, number: int) -> int:
    """The rule every node must apply, written out independently of the code under test."""
    return int.from_bytes(hashlib.sha256(f"{iqn}/{number}".encode()).digest()[:2], "big")


def base(tmp: Path, node: str = "node-a", nodes: int = 2) -> dict[str, Any]:
    """A valid clustered config whose paths live under `tmp`; the secret is inline."""
    return {
        "node": {"name": node},
        "data_dir": str(tmp / "data"),
        "portals": [{"listen": "127.0.0.1:3260"}],
        "targets": [{"iqn": IQN, "luns": [{"number": 0, "path": "disk0.img", "size": "1GiB"}]}],
        "cluster": {
            "id": "lab1",
            "secret": SECRET,
            "nodes": [{"name": f"node-{c}", "address": f"192.0.2.{10 + i}:3270"}
                      for i, c in enumerate("abc"[:nodes])],
        },
    }


def write(tmp: Path, data: Any, name: str = "vsand.yaml") -> Path:
    path = tmp / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


def errors_of(tmp: Path, data: Any) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp, data))
    return info.value.errors


def one_error(tmp: Path, data: Any, key: str, *words: str) -> str:
    """The single error line for `key`; asserts it names the file, key, problem and allowed."""
    errors = errors_of(tmp, data)
    lines = [e for e in errors if e.startswith(f"{tmp / 'vsand.yaml'}: {key}: ")]
    assert len(lines) == 1, errors
    for word in words:
        assert word in lines[0], lines[0]
    assert "allowed" in lines[0] or "required" in lines[0], lines[0]
    return lines[0]


def secret_file(tmp: Path, content: bytes | str, mode: int = 0o600,
                name: str = "cluster.secret") -> Path:
    path = tmp / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    path.chmod(mode)
    return path


def with_secret_file(data: dict[str, Any], name: str = "cluster.secret") -> dict[str, Any]:
    del data["cluster"]["secret"]
    data["cluster"]["secret_file"] = name
    return data


# --- valid clusters --------------------------------------------------------------------------


def test_two_nodes_with_defaults(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, base(tmp_path)))
    c = cfg.cluster
    assert c is not None
    assert (c.cluster_id, c.secret, c.secret_file) == ("lab1", SECRET.encode(), "")
    assert c.nodes == (ClusterNode("node-a", "192.0.2.10", 3270),
                       ClusterNode("node-b", "192.0.2.11", 3270))
    assert (c.listen_host, c.listen_port) == ("0.0.0.0", 3270)
    assert (c.heartbeat_interval, c.peer_timeout, c.resync_rate, c.startup_wait) == (
        0.5, 3.0, 0, 10.0)
    assert c.node("node-b").host == "192.0.2.11"
    assert (c.index_of("node-a"), c.index_of("node-b")) == (0, 1)
    assert c.peers("node-a") == (c.nodes[1],) and c.peers("node-b") == (c.nodes[0],)
    assert SECRET not in repr(cfg)
    (lun,) = cfg.targets[0].luns
    assert lun.mirror and lun.mirror_id == expected_id(IQN, 0) == mirror_id(IQN, 0)
    assert lun.serial == derive_serial(IQN, 0)  # the same on every node
    assert cfg.warnings == ()


def test_three_nodes_every_key_given(tmp_path: Path) -> None:
    data = base(tmp_path, node="node-c", nodes=3)
    data["cluster"]["nodes"].reverse()  # the file's order does not matter
    data["cluster"].update(listen="10.0.0.3:3300", heartbeat_interval=0.05, peer_timeout=0.2,
                           resync_rate="100MiB", startup_wait=0)
    c = load_config(write(tmp_path, data)).cluster
    assert c is not None
    assert [n.name for n in c.nodes] == ["node-a", "node-b", "node-c"]
    assert (c.listen_host, c.listen_port) == ("10.0.0.3", 3300)
    assert (c.heartbeat_interval, c.peer_timeout, c.resync_rate, c.startup_wait) == (
        0.05, 0.2, 100 << 20, 0.0)
    assert c.index_of("node-c") == 2
    assert [n.name for n in c.peers("node-b")] == ["node-a", "node-c"]
    for name in ("node-d", ""):
        with pytest.raises(KeyError):
            c.node(name)
        with pytest.raises(KeyError):
            c.index_of(name)
        with pytest.raises(KeyError):
            c.peers(name)


def test_every_node_reads_the_same_cluster(tmp_path: Path) -> None:
    configs = [load_config(write(tmp_path, base(tmp_path, node=f"node-{c}", nodes=3),
                                 name=f"{c}.yaml")) for c in "abc"]
    clusters = {cfg.cluster for cfg in configs}
    assert len(clusters) == 1
    (c,) = clusters
    assert c is not None and [c.index_of(n.name) for n in c.nodes] == [0, 1, 2]
    assert len({cfg.targets for cfg in configs}) == 1  # same LUN ids and serials


def test_listen_defaults(tmp_path: Path) -> None:
    data = base(tmp_path)
    data["cluster"]["nodes"][0]["address"] = "192.0.2.10:3301"
    c = load_config(write(tmp_path, data)).cluster
    assert c is not None and (c.listen_host, c.listen_port) == ("0.0.0.0", 3301)
    data["cluster"]["nodes"][0]["address"] = "[2001:db8::10]:3302"
    c = load_config(write(tmp_path, data)).cluster
    assert c is not None and (c.listen_host, c.listen_port) == ("::", 3302)
    assert c.node("node-a") == ClusterNode("node-a", "2001:db8::10", 3302)
    data["cluster"]["listen"] = "127.0.0.1"  # a missing port is 3270
    c = load_config(write(tmp_path, data)).cluster
    assert c is not None and (c.listen_host, c.listen_port) == ("127.0.0.1", 3270)


def test_secret_from_a_file(tmp_path: Path) -> None:
    f = secret_file(tmp_path, "s" * MIN_SECRET + "\r\nsecond line\n", 0o400)
    c = load_config(write(tmp_path, with_secret_file(base(tmp_path)))).cluster
    assert c is not None and (c.secret, c.secret_file) == (b"s" * MIN_SECRET, str(f))


@pytest.mark.parametrize("n", [255, 256, 257, 300, 1024])
def test_long_secret_files_are_read_whole(tmp_path: Path, n: int) -> None:
    secret = bytes(0x21 + i % 90 for i in range(n))
    secret_file(tmp_path, secret + b"\nsecond line\n")
    c = load_config(write(tmp_path, with_secret_file(base(tmp_path)))).cluster
    assert c is not None and c.secret == secret
    secret_file(tmp_path, secret)  # no newline at all
    c = load_config(write(tmp_path, with_secret_file(base(tmp_path)))).cluster
    assert c is not None and c.secret == secret


def test_mirror_defaults_true_in_a_cluster(tmp_path: Path) -> None:
    data = base(tmp_path)
    data["targets"][0]["luns"] += [{"number": 1, "path": "d1.img", "size": "1G", "mirror": False},
                                   {"number": 2, "path": "d2.img", "size": "1G", "mirror": True}]
    luns = load_config(write(tmp_path, data)).targets[0].luns
    assert [(x.mirror, x.mirror_id) for x in luns] == [
        (True, expected_id(IQN, 0)), (False, 0), (True, expected_id(IQN, 2))]


def test_mirror_defaults_false_without_a_cluster(tmp_path: Path) -> None:
    data = base(tmp_path)
    del data["cluster"]
    cfg = load_config(write(tmp_path, data))
    assert cfg.cluster is None
    assert [(x.mirror, x.mirror_id) for x in cfg.targets[0].luns] == [(False, 0)]
    data["targets"][0]["luns"][0]["mirror"] = False
    assert not load_config(write(tmp_path, data)).targets[0].luns[0].mirror


def test_mirror_id_uses_the_lower_cased_iqn(tmp_path: Path) -> None:
    data = base(tmp_path)
    data["targets"][0]["iqn"] = IQN.upper().replace("IQN.", "iqn.")
    assert load_config(write(tmp_path, data)).targets[0].luns[0].mirror_id == expected_id(IQN, 0)


# --- errors ----------------------------------------------------------------------------------


def test_id_is_required_and_checked(tmp_path: Path) -> None:
    data = base(tmp_path)
    del data["cluster"]["id"]
    one_error(tmp_path, data, "cluster.id", "missing")
    for bad in ("", "has space", "-lead", "x" * 65):
        data["cluster"]["id"] = bad
        one_error(tmp_path, data, "cluster.id", "not a valid cluster id", "1..64")
    data["cluster"]["id"] = 12
    one_error(tmp_path, data, "cluster.id", "not a string")
    data["cluster"]["id"] = "x" * 64
    assert load_config(write(tmp_path, data)).cluster is not None


def test_this_node_must_be_in_nodes(tmp_path: Path) -> None:
    data = base(tmp_path, node="node-z")
    one_error(tmp_path, data, "cluster.nodes", "'node-z'", "node.name")


def test_node_names_are_unique_and_valid(tmp_path: Path) -> None:
    data = base(tmp_path, nodes=3)
    data["cluster"]["nodes"][2]["name"] = "node-a"
    one_error(tmp_path, data, "cluster.nodes[2].name", "'node-a' is already used by "
              "cluster.nodes[0].name")
    data["cluster"]["nodes"][2]["name"] = "bad name"
    one_error(tmp_path, data, "cluster.nodes[2].name", "not a valid node name")
    del data["cluster"]["nodes"][2]["name"]
    one_error(tmp_path, data, "cluster.nodes[2].name", "missing")


@pytest.mark.parametrize("count", [1, 4])
def test_two_or_three_nodes(tmp_path: Path, count: int) -> None:
    data = base(tmp_path, nodes=1)
    data["cluster"]["nodes"] = [{"name": f"node-{c}", "address": f"192.0.2.{10 + i}"}
                                for i, c in enumerate("abcd"[:count])]
    one_error(tmp_path, data, "cluster.nodes", f"has {count} entr", "2..3")


@pytest.mark.parametrize("value, problem", [([], "is empty"), (None, "is empty"),
                                            ("node-a", "not a list")])
def test_nodes_is_a_non_empty_list(tmp_path: Path, value: Any, problem: str) -> None:
    data = base(tmp_path)
    data["cluster"]["nodes"] = value
    one_error(tmp_path, data, "cluster.nodes", problem)
    del data["cluster"]["nodes"]
    one_error(tmp_path, data, "cluster.nodes", "missing")


@pytest.mark.parametrize("address", ["0.0.0.0:3270", "[::]:3270", "::", "0.0.0.0"])
def test_node_address_is_not_a_wildcard(tmp_path: Path, address: str) -> None:
    data = base(tmp_path)
    data["cluster"]["nodes"][1]["address"] = address
    one_error(tmp_path, data, "cluster.nodes[1].address", "wildcard")


@pytest.mark.parametrize("address, problem", [("192.0.2.11:0", "has port"),
                                              ("bad host!", "neither"), (3270, "not a string")])
def test_bad_node_addresses(tmp_path: Path, address: Any, problem: str) -> None:
    data = base(tmp_path)
    data["cluster"]["nodes"][1]["address"] = address
    one_error(tmp_path, data, "cluster.nodes[1].address", problem)
    del data["cluster"]["nodes"][1]["address"]
    one_error(tmp_path, data, "cluster.nodes[1].address", "missing")


def test_node_addresses_are_unique(tmp_path: Path) -> None:
    data = base(tmp_path)
    data["cluster"]["nodes"][1]["address"] = "192.0.2.10"  # the default port makes it equal
    one_error(tmp_path, data, "cluster.nodes[1].address", "already used by "
              "cluster.nodes[0].address")


def two_networks(data: dict[str, Any]) -> dict[str, Any]:
    for i, node in enumerate(data["cluster"]["nodes"]):
        node["address"] = [f"192.0.2.{10 + i}:3270", f"198.51.100.{10 + i}:3270"]
    return data


def test_one_address_per_network(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, two_networks(base(tmp_path))))
    assert cfg.cluster is not None
    a, b = cfg.cluster.nodes
    assert b.addresses == (("192.0.2.11", 3270), ("198.51.100.11", 3270))
    assert (b.host, b.port) == ("192.0.2.11", 3270)  # the first: link 0
    assert cfg.cluster.listen_host == "0.0.0.0"
    assert config_to_dict(cfg)["cluster"]["nodes"][1]["address"] == [
        "192.0.2.11:3270", "198.51.100.11:3270"]
    again = parse_config(dump_config(cfg).replace("(redacted)", SECRET), cfg.source)
    assert again.cluster == cfg.cluster


def test_every_node_has_as_many_addresses(tmp_path: Path) -> None:
    data = two_networks(base(tmp_path))
    data["cluster"]["nodes"][1]["address"] = "192.0.2.11:3270"
    one_error(tmp_path, data, "cluster.nodes[1].address", "lists 1", "cluster.nodes[0].address",
              "2")


@pytest.mark.parametrize("second, key, problem", [
    ("198.51.100.11:3271", "address[1]", "port 3271"),
    ("0.0.0.0:3270", "address[1]", "wildcard"),
    ("192.0.2.10:3270", "address[1]", "already used by cluster.nodes[0].address[0]"),
    (3270, "address[1]", "not a string"),
])
def test_bad_addresses_in_a_list(tmp_path: Path, second: Any, key: str, problem: str) -> None:
    data = two_networks(base(tmp_path))
    data["cluster"]["nodes"][1]["address"][1] = second
    one_error(tmp_path, data, f"cluster.nodes[1].{key}", problem)


def test_address_list_length(tmp_path: Path) -> None:
    data = base(tmp_path)
    data["cluster"]["nodes"][1]["address"] = [f"198.51.{n}.1" for n in range(5)]
    one_error(tmp_path, data, "cluster.nodes[1].address", "lists 5")
    data["cluster"]["nodes"][1]["address"] = []
    one_error(tmp_path, data, "cluster.nodes[1].address", "lists 0")


def test_several_addresses_need_a_wildcard_listener(tmp_path: Path) -> None:
    data = two_networks(base(tmp_path))
    data["cluster"]["listen"] = "192.0.2.10:3270"
    one_error(tmp_path, data, "cluster.listen", "one address", "wildcard")
    data["cluster"]["listen"] = "0.0.0.0:3270"
    assert load_config(write(tmp_path, data)).cluster is not None


@pytest.mark.parametrize("secret", ["", "s" * (MIN_SECRET - 1), "s" * 1025])
def test_inline_secret_length(tmp_path: Path, secret: str) -> None:
    data = base(tmp_path)
    data["cluster"]["secret"] = secret
    line = one_error(tmp_path, data, "cluster.secret", f"{MIN_SECRET}..1024 bytes")
    assert "bytes long" in line or "longer than 1024" in line
    if secret:
        assert secret not in line


@pytest.mark.parametrize("content", [b"s" * (MIN_SECRET - 1) + b"\ns" * 40, b"", b"\n" + b"s" * 40,
                                     b"s" * 1025, b"s" * 1025 + b"\n"])
def test_secret_file_length(tmp_path: Path, content: bytes) -> None:
    secret_file(tmp_path, content)
    line = one_error(tmp_path, with_secret_file(base(tmp_path)), "cluster.secret_file",
                     "the first line of", "cluster.secret", f"{MIN_SECRET}..1024 bytes")
    assert "s" * MIN_SECRET not in line


def test_secret_or_secret_file_exactly_once(tmp_path: Path) -> None:
    secret_file(tmp_path, SECRET)
    data = base(tmp_path)
    data["cluster"]["secret_file"] = "cluster.secret"
    one_error(tmp_path, data, "cluster.secret_file", "together with secret")
    del data["cluster"]["secret"], data["cluster"]["secret_file"]
    one_error(tmp_path, data, "cluster.secret", "missing", "secret_file")


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644, 0o660, 0o620])
def test_secret_file_readable_by_others(tmp_path: Path, mode: int) -> None:
    secret_file(tmp_path, SECRET, mode)
    line = one_error(tmp_path, with_secret_file(base(tmp_path)), "cluster.secret_file",
                     f"{mode:04o}", "0600")
    assert SECRET not in line


def test_secret_file_problems(tmp_path: Path) -> None:
    one_error(tmp_path, with_secret_file(base(tmp_path), "missing.secret"),
              "cluster.secret_file", "missing.secret", "cannot be read")
    (tmp_path / "dir.secret").mkdir()
    one_error(tmp_path, with_secret_file(base(tmp_path), "dir.secret"),
              "cluster.secret_file", "not a regular file")
    one_error(tmp_path, with_secret_file(base(tmp_path), "~/x.secret"),
              "cluster.secret_file", "'~'")


@pytest.mark.parametrize("interval, timeout", [(0.5, 1.0), (1, 2), (0.5, 0.9), (10, 3)])
def test_peer_timeout_more_than_two_heartbeats(tmp_path: Path, interval: float,
                                               timeout: float) -> None:
    data = base(tmp_path)
    data["cluster"].update(heartbeat_interval=interval, peer_timeout=timeout)
    one_error(tmp_path, data, "cluster.peer_timeout", "twice heartbeat_interval",
              f"more than {2 * interval:g}")


def test_default_peer_timeout_checked_against_interval(tmp_path: Path) -> None:
    data = base(tmp_path)
    data["cluster"]["heartbeat_interval"] = 2
    one_error(tmp_path, data, "cluster.peer_timeout", "3 is not more than twice")


@pytest.mark.parametrize("key, value, problem", [
    ("heartbeat_interval", 0.01, "0.05..10"), ("heartbeat_interval", 11, "0.05..10"),
    ("heartbeat_interval", "fast", "not a number"), ("peer_timeout", 0, "> 0"),
    ("peer_timeout", -1, "> 0"), ("startup_wait", 601, "0..600"), ("startup_wait", -1, "0..600"),
    ("startup_wait", True, "not a number"), ("resync_rate", "10MB", "decimal"),
    ("resync_rate", -5, "negative"), ("listen", "0.0.0.0:99999", "has port"),
    ("listen", 3270, "not a string"),
])
def test_value_ranges(tmp_path: Path, key: str, value: Any, problem: str) -> None:
    data = base(tmp_path)
    data["cluster"][key] = value
    one_error(tmp_path, data, f"cluster.{key}", problem)


def test_unknown_keys(tmp_path: Path) -> None:
    data = base(tmp_path)
    data["cluster"]["heartbeat"] = 1
    data["cluster"]["nodes"][0]["adress"] = "x"
    one_error(tmp_path, data, "cluster.heartbeat", "unknown key", "heartbeat_interval")
    one_error(tmp_path, data, "cluster.nodes[0].adress", "did you mean 'address'?")


@pytest.mark.parametrize("value", [None, "lab1", [1]])
def test_cluster_must_be_a_mapping(tmp_path: Path, value: Any) -> None:
    data = base(tmp_path)
    data["cluster"] = value
    errors = errors_of(tmp_path, data)
    assert any(": cluster" in e for e in errors), errors


def test_cluster_listen_joins_the_bind_checks(tmp_path: Path) -> None:
    data = base(tmp_path)
    data["cluster"]["listen"] = "127.0.0.1:3260"
    one_error(tmp_path, data, "cluster.listen", "already used by portals[0].listen")
    data["cluster"]["listen"] = "0.0.0.0:9470"
    data["metrics"] = {"listen": "127.0.0.1:9470"}
    one_error(tmp_path, data, "cluster.listen", "overlaps 127.0.0.1:9470 of metrics.listen")
    del data["cluster"]["listen"]  # the default, 0.0.0.0:3270, is checked too
    data["portals"].append({"listen": "192.0.2.10:3270"})
    one_error(tmp_path, data, "cluster.listen", "0.0.0.0:3270 overlaps",
              "portals[1].listen")


def test_mirror_without_a_cluster(tmp_path: Path) -> None:
    data = base(tmp_path)
    del data["cluster"]
    data["targets"][0]["luns"][0]["mirror"] = True
    one_error(tmp_path, data, "targets[0].luns[0].mirror", "no cluster section")
    data["targets"][0]["luns"][0]["mirror"] = "yes"
    one_error(tmp_path, data, "targets[0].luns[0].mirror", "not a boolean")


def _colliding_luns() -> tuple[str, int, int]:
    """An IQN with two LUN numbers of the same mirror id (most IQNs have one such pair)."""
    for i in itertools.count():
        iqn = f"{IQN}{i}"
        seen: dict[int, int] = {}
        for number in range(256):
            first = seen.setdefault(expected_id(iqn, number), number)
            if first != number:
                return iqn, first, number
    raise AssertionError("unreachable")


def test_mirror_id_collision_names_the_second_lun(tmp_path: Path) -> None:
    iqn, a, b = _colliding_luns()
    data = base(tmp_path)
    data["targets"] = [{"iqn": IQN, "luns": [{"number": 0, "path": "x.img", "size": "1G"}]},
                       {"iqn": iqn, "luns": [
                           {"number": a, "path": "a.img", "size": "1G"},
                           {"number": 7 if 7 not in (a, b) else 8, "path": "n.img",
                            "size": "1G"},
                           {"number": b, "path": "b.img", "size": "1G"}]}]
    one_error(tmp_path, data, "targets[1].luns[2]", "already that of targets[1].luns[0]",
              "mirror: false")
    data["targets"][1]["luns"][0]["mirror"] = False
    cfg = load_config(write(tmp_path, data))
    assert cfg.targets[1].luns[2].mirror_id == expected_id(iqn, b)
    del data["cluster"]  # unmirrored LUNs may share ids
    assert load_config(write(tmp_path, data)).cluster is None


def test_errors_are_all_collected(tmp_path: Path) -> None:
    data = base(tmp_path, node="node-z")
    del data["cluster"]["id"], data["cluster"]["secret"]
    data["cluster"]["nodes"][1]["address"] = "0.0.0.0"
    data["cluster"]["peer_timeout"] = 1
    keys = [e.split(": ")[1] for e in errors_of(tmp_path, data)]
    assert sorted(keys) == sorted(["cluster.id", "cluster.secret", "cluster.nodes",
                                   "cluster.nodes[1].address", "cluster.peer_timeout"])


# --- dumping ---------------------------------------------------------------------------------


def test_dump_round_trips_with_a_secret_file(tmp_path: Path) -> None:
    secret_file(tmp_path, SECRET)
    data = with_secret_file(base(tmp_path, nodes=3))
    data["cluster"].update(resync_rate="100MiB", heartbeat_interval=0.25, peer_timeout=1.5,
                           startup_wait=30, listen="[::]:3271")
    data["targets"][0]["luns"].append({"number": 1, "path": "d1.img", "size": "1G",
                                       "mirror": False})
    cfg = load_config(write(tmp_path, data))
    text = dump_config(cfg)
    assert yaml.safe_load(text) == config_to_dict(cfg)
    assert config_to_dict(cfg)["cluster"] == {
        "id": "lab1", "secret_file": str(tmp_path / "cluster.secret"), "listen": "[::]:3271",
        "nodes": [{"name": "node-a", "address": "192.0.2.10:3270"},
                  {"name": "node-b", "address": "192.0.2.11:3270"},
                  {"name": "node-c", "address": "192.0.2.12:3270"}],
        "heartbeat_interval": 0.25, "peer_timeout": 1.5, "resync_rate": "100MiB",
        "startup_wait": 30.0}
    assert [x["mirror"] for x in config_to_dict(cfg)["targets"][0]["luns"]] == [True, False]
    again = parse_config(text, str(tmp_path / "elsewhere.yaml"))
    assert dataclasses.replace(again, source=cfg.source) == cfg


def test_dump_redacts_an_inline_secret(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, base(tmp_path)))
    text = dump_config(cfg)
    assert SECRET not in text
    assert yaml.safe_load(text)["cluster"]["secret"] == "(redacted)"
    assert "secret_file" not in yaml.safe_load(text)["cluster"]


def test_dump_without_a_cluster(tmp_path: Path) -> None:
    data = base(tmp_path)
    del data["cluster"]
    cfg = load_config(write(tmp_path, data))
    dumped = config_to_dict(cfg)
    assert "cluster" not in dumped and dumped["targets"][0]["luns"][0]["mirror"] is False
    assert dataclasses.replace(parse_config(dump_config(cfg), cfg.source), source=cfg.source) \
        == cfg


def test_cluster_config_is_frozen(tmp_path: Path) -> None:
    c = load_config(write(tmp_path, base(tmp_path))).cluster
    assert isinstance(c, ClusterConfig)
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.peer_timeout = 1.0  # type: ignore[misc]


# --- fuzzing: any value in the section either parses or raises ConfigError -------------------

_FUZZ_BASE: dict[str, Any] = {
    "node": {"name": "node-a"},
    "data_dir": "/nonexistent-vsand-fuzz/data",
    "portals": [{"listen": "127.0.0.1:3260"}],
    "targets": [{"iqn": IQN, "luns": [{"number": 0, "path": "/nonexistent-vsand-fuzz/d0",
                                       "size": "1G", "mirror": True}]}],
    "cluster": {"id": "lab1", "secret": SECRET, "listen": "0.0.0.0:3270",
                "nodes": [{"name": "node-a", "address": "192.0.2.10"},
                          {"name": "node-b", "address": "192.0.2.11:3270"}],
                "heartbeat_interval": 0.5, "peer_timeout": 3, "resync_rate": 0,
                "startup_wait": 10},
}
_FUZZ_PATHS: list[tuple[Any, ...]] = [
    ("cluster",), ("cluster", "nodes", 0), ("cluster", "nodes", 1),
    ("targets", 0, "luns", 0, "mirror")] + [("cluster", k) for k in _FUZZ_BASE["cluster"]] + [
    ("cluster", "nodes", i, k) for i in (0, 1) for k in ("name", "address")]
_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True),
    st.text(max_size=30), st.sampled_from(["0.0.0.0", "[::1]:1", "1GiB", "node-a", "node-b",
                                           "", "~", SECRET, "192.0.2.12"]),
)
_values = st.recursive(_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4),
    st.dictionaries(st.one_of(st.sampled_from(["name", "address", "id", "secret", "x"]),
                              st.text(max_size=5)), inner, max_size=4)), max_leaves=15)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(_FUZZ_PATHS), _values)
def test_fuzz_one_value_of_the_cluster(where: tuple[Any, ...], value: Any) -> None:
    assert parse_config(yaml.safe_dump(_FUZZ_BASE), "fuzz.yaml").cluster is not None
    data: Any = copy.deepcopy(_FUZZ_BASE)
    node = data
    for step in where[:-1]:
        node = node[step]
    node[where[-1]] = value
    try:
        cfg = parse_config(yaml.safe_dump(data), "fuzz.yaml")
    except ConfigError as exc:
        assert exc.errors and all(e.startswith("fuzz.yaml: ") for e in exc.errors)
    else:
        assert isinstance(cfg, Config)
