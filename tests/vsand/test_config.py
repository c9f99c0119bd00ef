"""Tests for vsand.config: every validation rule names file, key path, problem and what is allowed."""

from __future__ import annotations

import copy
import dataclasses
import os
import socket
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vsand.config import (
    DEFAULT_SOURCE, Config, ConfigError, IscsiConfig, LunConfig, config_to_dict, default_config,
    derive_serial, dump_config, load_config, parse_config, parse_size,
)
from vsand.config_schema import normalize_iscsi_name, parse_address

EXAMPLE = Path(__file__).resolve().parents[2] / "deploy" / "examples" / "single-node.yaml"
IQN = "iqn.2026-11.org.example:disk1"


def base(tmp: Path) -> dict[str, Any]:
    """A minimal valid config whose paths live under `tmp`."""
    return {
        "data_dir": str(tmp / "data"),
        "portals": [{"listen": "127.0.0.1:3260"}],
        "targets": [{"iqn": IQN, "luns": [{"number": 0, "path": "disk0.img", "size": "1GiB"}]}],
    }


def write(tmp: Path, data: Any, name: str = "vsand.yaml") -> Path:
    path = tmp / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


def errors_of(tmp: Path, data: Any) -> list[str]:
    path = write(tmp, data)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == "\n".join(info.value.errors)
    return info.value.errors


def one_error(tmp: Path, data: Any, key: str, *words: str) -> str:
    """The single error line for `key`; asserts it names the file, key, problem and allowed."""
    lines = [e for e in errors_of(tmp, data) if e.startswith(f"{tmp / 'vsand.yaml'}: {key}: ")]
    assert len(lines) == 1, errors_of(tmp, data)
    for word in words:
        assert word in lines[0], lines[0]
    assert "allowed" in lines[0] or "required" in lines[0], lines[0]
    return lines[0]


def lun(data: dict[str, Any], **changes: Any) -> dict[str, Any]:
    data["targets"][0]["luns"][0].update(changes)
    return data


# --- loading what is valid -------------------------------------------------------------------


def test_example_file_loads_cleanly() -> None:
    cfg = load_config(EXAMPLE)
    assert cfg.node_name == "node-a"
    assert cfg.portals[0].advertise_host == "192.0.2.10"
    assert cfg.targets[0].iqn == "iqn.2026-11.org.example:storage.disk1"
    assert cfg.targets[0].luns[0].size == 100 << 30
    assert cfg.targets[0].luns[1].path == str(EXAMPLE.parent / "scratch.img")
    assert cfg.targets[0].luns[1].write_cache is False
    assert cfg.metrics_listen == "127.0.0.1:9470"
    assert cfg.source == str(EXAMPLE)


def test_minimal_config_gets_documented_defaults(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, base(tmp_path)))
    assert cfg.iscsi == IscsiConfig()
    assert (cfg.iscsi.queue_depth, cfg.iscsi.max_recv_data_segment_length) == (128, 262144)
    assert (cfg.iscsi.first_burst_length, cfg.iscsi.max_burst_length) == (262144, 1048576)
    assert cfg.iscsi.immediate_data and not cfg.iscsi.initial_r2t
    assert (cfg.iscsi.nop_interval, cfg.iscsi.nop_timeout, cfg.iscsi.login_timeout) == (5, 15, 15)
    assert (cfg.io_threads, cfg.log_level, cfg.metrics_listen) == (8, "info", "")
    assert cfg.admin_socket == str(tmp_path / "data" / "vsand.sock")
    portal = cfg.portals[0]
    assert (portal.advertise_host, portal.advertise_port, portal.group_tag) == ("127.0.0.1", 3260, 1)
    assert cfg.targets[0].alias == ""
    assert cfg.targets[0].luns[0] == LunConfig(
        number=0, path=str(tmp_path / "disk0.img"), size=1 << 30, block_size=512,
        read_only=False, serial=derive_serial(IQN, 0), write_cache=True, thin=True)
    assert cfg.node_name  # the host name


def test_relative_paths_are_relative_to_the_config_file(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    data = base(tmp_path)
    data["data_dir"] = "state"
    data["admin_socket"] = "../run/v.sock"
    monkeypatch.chdir("/")
    cfg = load_config(write(tmp_path, data))
    assert cfg.data_dir == str(tmp_path / "state")
    assert cfg.admin_socket == str(tmp_path.parent / "run" / "v.sock")
    assert cfg.targets[0].luns[0].path == str(tmp_path / "disk0.img")


def test_default_config(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(socket, "gethostname", lambda: "node-x")
    cfg = default_config()
    assert cfg.source == DEFAULT_SOURCE and cfg.node_name == "node-x"
    assert cfg.data_dir == str(tmp_path / "vsand-data")
    p = cfg.portals[0]
    assert (p.listen_host, p.listen_port, p.advertise_host, p.advertise_port, p.group_tag) == (
        "127.0.0.1", 3260, "127.0.0.1", 3260, 1)
    t = cfg.targets[0]
    assert (t.iqn, t.alias) == ("iqn.2026-11.org.vsand:default", "vsand-default")
    (l0,) = t.luns
    assert (l0.number, l0.path, l0.size, l0.block_size) == (
        0, str(tmp_path / "vsand-data" / "lun0.img"), 1 << 30, 512)
    assert l0.write_cache and l0.thin and not l0.read_only
    assert l0.serial.startswith("VSAND") and len(l0.serial) == 17
    assert default_config().targets[0].luns[0].serial == l0.serial  # deterministic
    monkeypatch.setattr(socket, "gethostname", lambda: "node-y")
    assert default_config().targets[0].luns[0].serial != l0.serial  # two hosts never collide


def test_default_config_survives_an_odd_host_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(socket, "gethostname", lambda: "weird host/name!")
    assert default_config("/tmp/vsand-x").node_name == "weird-host-name"


def test_default_config_round_trips(tmp_path: Path) -> None:
    cfg = default_config(str(tmp_path / "d"))
    again = load_config(write(tmp_path, dump_config(cfg)))
    assert dataclasses.replace(again, source=cfg.source) == cfg
    assert yaml.safe_load(dump_config(cfg)) == config_to_dict(cfg)


def test_example_round_trips(tmp_path: Path) -> None:
    cfg = load_config(EXAMPLE)
    again = parse_config(dump_config(cfg), str(tmp_path / "elsewhere.yaml"))
    assert dataclasses.replace(again, source=cfg.source) == cfg


def test_wildcard_listen_without_advertise_is_allowed(tmp_path: Path) -> None:
    data = base(tmp_path)
    data["portals"] = [{"listen": "0.0.0.0"}, {"listen": "::", "advertise": "[2001:db8::1]"}]
    p4, p6 = load_config(write(tmp_path, data)).portals
    assert p4.advertise_wildcard and (p4.listen_host, p4.listen_port) == ("0.0.0.0", 3260)
    assert not p6.advertise_wildcard and (p6.advertise_host, p6.advertise_port) == (
        "2001:db8::1", 3260)


def test_names_and_case_are_normalised(tmp_path: Path) -> None:
    data = base(tmp_path)
    data["targets"][0]["iqn"] = "IQN.2026-11.Org.Example:Disk1"
    data["log_level"] = "DEBUG"
    lun(data, write_cache="WriteThrough")
    cfg = load_config(write(tmp_path, data))
    assert cfg.targets[0].iqn == IQN and cfg.log_level == "debug"
    assert cfg.targets[0].luns[0].write_cache is False


def test_existing_file_needs_no_size(tmp_path: Path) -> None:
    (tmp_path / "disk0.img").write_bytes(b"\0" * 4096)
    data = lun(base(tmp_path), size=None, read_only=True)
    del data["targets"][0]["luns"][0]["size"]
    assert load_config(write(tmp_path, data)).targets[0].luns[0].size == 0


def test_yaml_merge_keys_may_be_overridden(tmp_path: Path) -> None:
    text = yaml.safe_dump(base(tmp_path)) + "iscsi: {<<: {queue_depth: 4}, queue_depth: 8}\n"
    assert load_config(write(tmp_path, text)).iscsi.queue_depth == 8


# --- parse_size, names, addresses ------------------------------------------------------------


@pytest.mark.parametrize(("text", "size"), [
    (4096, 4096), ("4096", 4096), ("1K", 1024), ("1KiB", 1024), ("512MiB", 512 << 20),
    ("1G", 1 << 30), ("1 gib", 1 << 30), ("100GiB", 100 << 30), ("2T", 2 << 40),
    ("1.5GiB", 3 << 29), ("0", 0), ("10B", 10),
])
def test_parse_size(text: object, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize(("value", "problem"), [
    ("1GB", "decimal unit"), ("1XiB", "unknown unit"), ("-1G", "not a size"), (-5, "negative"),
    ("0.5K0", "not a size"), ("1.1B", "whole number"), (True, "boolean"), (1.5, "number"),
    ("", "not a size"), (None, "null"), ([1], "list"),
])
def test_parse_size_rejects(value: object, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        parse_size(value)


@pytest.mark.parametrize("name", [
    "iqn.2026-11.org.example:storage.disk1", "iqn.1992-01.com.example", "iqn.2001-04.com.ex-ample:a:b",
    "eui.02004567a425678d", "naa.52004567ba64678d", "naa.62004567ba64678d0123456789abcdef",
])
def test_valid_iscsi_names(name: str) -> None:
    assert normalize_iscsi_name(name.upper()) == name


@pytest.mark.parametrize("name", [
    "iqn.2026-11", "iqn.26-11.org.example", "iqn.2026-00.org.example", "iqn.2026-11.org.example:",
    "iqn.2026-11.-org.example", "iqn.2026-11.org_example", "iqn.2026-11.org.example:a b",
    "eui.0200", "eui.02004567a425678g", "naa.0123456789abcdef01", "foo.bar", "",
    "iqn.2026-11.org.example:" + "a" * 200,
])
def test_invalid_iscsi_names(name: str) -> None:
    with pytest.raises(ValueError):
        normalize_iscsi_name(name)


@pytest.mark.parametrize(("text", "addr"), [
    ("10.0.0.1:3261", ("10.0.0.1", 3261)), ("10.0.0.1", ("10.0.0.1", 3260)),
    ("[::1]:3261", ("::1", 3261)), ("[::1]", ("::1", 3260)), ("::", ("::", 3260)),
    ("fe80::0:1", ("fe80::1", 3260)), ("Storage.Example.com:99", ("storage.example.com", 99)),
])
def test_parse_address(text: str, addr: tuple[str, int]) -> None:
    assert parse_address(text, 3260) == addr


@pytest.mark.parametrize("text", [
    "10.0.0.1:0", "10.0.0.1:65536", "10.0.0.1:x", ":3260", "[::1", "[::1]x", "[host]:1",
    "bad_host:1", "a:b:c:", "",
])
def test_parse_address_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_address(text, 3260)


# --- every rule: message names file, key path, problem and what is allowed ---------------------


def test_error_format_matches_the_documented_example(tmp_path: Path) -> None:
    data = base(tmp_path)
    data["targets"][0]["luns"].append({"number": 1, "path": "d1.img", "size": "1G",
                                       "block_size": 1000})
    assert errors_of(tmp_path, data) == [
        f"{tmp_path / 'vsand.yaml'}: targets[0].luns[1].block_size: 1000 is not allowed "
        f"(allowed: 512, 4096)"]


def test_all_errors_are_collected(tmp_path: Path) -> None:
    data = lun(base(tmp_path), block_size=1000, serial="x" * 30, number=-1)
    data["iscsi"] = {"queue_depth": 0}
    data["log_level"] = "loud"
    keys = [e.split(": ")[1] for e in errors_of(tmp_path, data)]
    assert sorted(keys) == sorted(["targets[0].luns[0].block_size", "targets[0].luns[0].serial",
                                   "targets[0].luns[0].number", "iscsi.queue_depth", "log_level"])


@pytest.mark.parametrize(("block_size", "size"), [(512, 1000), (4096, "6K"), (4096, 512)])
def test_size_must_be_a_multiple_of_block_size(tmp_path: Path, block_size: int,
                                               size: object) -> None:
    one_error(tmp_path, lun(base(tmp_path), block_size=block_size, size=size),
              "targets[0].luns[0].size", "not a multiple of block_size", str(block_size))


@pytest.mark.parametrize(("size", "problem"), [
    (-512, "negative"), ("1GB", "decimal unit"), ("lots", "not a size"), (1.5, "a number"),
    (True, "a boolean"), (1 << 63, "too large"), ("8388608TiB", "too large"),
])
def test_bad_sizes(tmp_path: Path, size: object, problem: str) -> None:
    one_error(tmp_path, lun(base(tmp_path), size=size), "targets[0].luns[0].size", problem)


@pytest.mark.parametrize("size", [0, None])
def test_size_is_required_for_a_file_that_does_not_exist(tmp_path: Path, size: object) -> None:
    one_error(tmp_path, lun(base(tmp_path), size=size), "targets[0].luns[0].size",
              "does not exist yet", "disk0.img")


def test_read_only_lun_must_exist(tmp_path: Path) -> None:
    one_error(tmp_path, lun(base(tmp_path), read_only=True), "targets[0].luns[0].path",
              "does not exist", "read-only")


def test_lun_path_must_not_be_a_directory(tmp_path: Path) -> None:
    one_error(tmp_path, lun(base(tmp_path), path=str(tmp_path)), "targets[0].luns[0].path",
              "is a directory")


@pytest.mark.parametrize(("path", "problem"), [
    ("", "is empty"), ("~/disk.img", "not expanded"), ("a\0b", "NUL"), (7, "an integer"),
])
def test_bad_lun_paths(tmp_path: Path, path: object, problem: str) -> None:
    one_error(tmp_path, lun(base(tmp_path), path=path), "targets[0].luns[0].path", problem)


def test_lun_path_is_required(tmp_path: Path) -> None:
    data = base(tmp_path)
    del data["targets"][0]["luns"][0]["path"]
    one_error(tmp_path, data, "targets[0].luns[0].path", "missing")


@pytest.mark.parametrize("block_size", [1000, 1024, "512", True, 0])
def test_block_size_must_be_512_or_4096(tmp_path: Path, block_size: object) -> None:
    one_error(tmp_path, lun(base(tmp_path), block_size=block_size),
              "targets[0].luns[0].block_size", "512, 4096")


@pytest.mark.parametrize(("number", "problem"), [
    (256, "out of range"), (-1, "out of range"), (True, "a boolean"), ("0", "a string"),
    (None, "null"),
])
def test_lun_number_range_and_type(tmp_path: Path, number: object, problem: str) -> None:
    one_error(tmp_path, lun(base(tmp_path), number=number), "targets[0].luns[0].number",
              problem, "0..255")


def test_lun_numbers_are_unique_per_target(tmp_path: Path) -> None:
    data = base(tmp_path)
    data["targets"][0]["luns"].append({"number": 0, "path": "other.img", "size": "1G"})
    one_error(tmp_path, data, "targets[0].luns[1].number", "already used by targets[0].luns[0]")
    data["targets"].append({"iqn": IQN + "x", "luns": [{"number": 0, "path": "x.img", "size": 512}]})
    data["targets"][0]["luns"][1]["number"] = 1
    load_config(write(tmp_path, data))  # the same number in another target is fine


def test_lun_paths_are_not_shared(tmp_path: Path) -> None:
    data = base(tmp_path)
    data["targets"].append({"iqn": IQN + "x", "luns": [
        {"number": 0, "path": str(tmp_path / "disk0.img"), "size": "1G"}]})
    one_error(tmp_path, data, "targets[1].luns[0].path", "already used by targets[0].luns[0].path")


def test_lun_paths_are_not_shared_through_a_symlink(tmp_path: Path) -> None:
    (tmp_path / "real.img").write_bytes(b"\0" * 512)
    os.symlink(tmp_path / "real.img", tmp_path / "link.img")
    data = lun(base(tmp_path), path="real.img")
    data["targets"][0]["luns"].append({"number": 1, "path": "link.img"})
    one_error(tmp_path, data, "targets[0].luns[1].path", "already used")


@pytest.mark.parametrize(("serial", "problem"), [
    ("x" * 21, "not a valid serial"), ("has space", "not a valid serial"), ("", "not a valid"),
    ("sérial", "not a valid serial"), (12345, "quote it"),
])
def test_serial_must_be_short_printable_ascii(tmp_path: Path, serial: object,
                                              problem: str) -> None:
    one_error(tmp_path, lun(base(tmp_path), serial=serial), "targets[0].luns[0].serial",
              problem, "printable ASCII")


def test_serials_are_unique_even_when_derived(tmp_path: Path) -> None:
    data = base(tmp_path)
    data["targets"][0]["luns"].append({"number": 1, "path": "d1.img", "size": "1G",
                                       "serial": derive_serial(IQN, 0)})
    one_error(tmp_path, data, "targets[0].luns[1].serial", "already used by targets[0].luns[0]",
              "multipath")


def test_derived_serial_is_the_same_on_every_node(tmp_path: Path) -> None:
    a, b = base(tmp_path), base(tmp_path)
    a["node"], b["node"] = {"name": "node-a"}, {"name": "node-b"}
    serial_a = load_config(write(tmp_path, a, "a.yaml")).targets[0].luns[0].serial
    serial_b = load_config(write(tmp_path, b, "b.yaml")).targets[0].luns[0].serial
    assert serial_a == serial_b == derive_serial(IQN, 0)


@pytest.mark.parametrize(("value", "problem"), [
    ("writearound", "not allowed"), (False, "a boolean"), (1, "an integer"),
])
def test_write_cache_choices(tmp_path: Path, value: object, problem: str) -> None:
    one_error(tmp_path, lun(base(tmp_path), write_cache=value), "targets[0].luns[0].write_cache",
              problem, "'writeback', 'writethrough'")


@pytest.mark.parametrize("key", ["read_only", "thin"])
@pytest.mark.parametrize("value", [1, "yes please", None])
def test_lun_booleans(tmp_path: Path, key: str, value: object) -> None:
    one_error(tmp_path, lun(base(tmp_path), **{key: value}), f"targets[0].luns[0].{key}",
              "not a boolean", "true, false")


@pytest.mark.parametrize(("iqn", "problem"), [
    ("iqn.2026-13.org.example", "month 13"), ("iqn.2026-11.org_example", "contains '_'"),
    ("example.com", "does not start with iqn."), ("eui.123", "16 hex digits"),
    ("naa.123", "16 or 32 hex"), ("iqn.2026-11.org.example:" + "x" * 300, "bytes long"),
    (20261101, "an integer"),
])
def test_target_iqn_must_be_an_iscsi_name(tmp_path: Path, iqn: object, problem: str) -> None:
    data = base(tmp_path)
    data["targets"][0]["iqn"] = iqn
    one_error(tmp_path, data, "targets[0].iqn", problem, "iqn.YYYY-MM")


def test_target_iqns_are_unique_after_case_folding(tmp_path: Path) -> None:
    data = base(tmp_path)
    data["targets"].append({"iqn": IQN.upper(), "luns": [{"number": 0, "path": "b", "size": 512}]})
    one_error(tmp_path, data, "targets[1].iqn", "already used by targets[0].iqn")


def test_target_alias(tmp_path: Path) -> None:
    data = base(tmp_path)
    data["targets"][0]["alias"] = "bad\nalias"
    one_error(tmp_path, data, "targets[0].alias", "not a valid alias", "255 bytes")


@pytest.mark.parametrize(("key", "value", "problem"), [
    ("iqn", None, "null"), ("luns", [], "at least one LUN"), ("luns", {"a": 1}, "not a list"),
])
def test_target_requirements(tmp_path: Path, key: str, value: object, problem: str) -> None:
    data = base(tmp_path)
    data["targets"][0][key] = value
    one_error(tmp_path, data, f"targets[0].{key}", problem)


@pytest.mark.parametrize("key", ["portals", "targets"])
@pytest.mark.parametrize("value", ["absent", [], None])
def test_at_least_one_portal_and_target(tmp_path: Path, key: str, value: object) -> None:
    data = base(tmp_path)
    if value == "absent":
        del data[key]
    else:
        data[key] = value
    one_error(tmp_path, data, key, "at least one")


@pytest.mark.parametrize(("listen", "problem"), [
    ("10.0.0.1:0", "port '0'"), ("10.0.0.1:99999", "port"), ("no_such host", "host"),
    ("[::1", "without ']'"), (3260, "quote it"), ("", "empty host"),
])
def test_bad_listen_addresses(tmp_path: Path, listen: object, problem: str) -> None:
    data = base(tmp_path)
    data["portals"][0]["listen"] = listen
    one_error(tmp_path, data, "portals[0].listen", problem, "host:port")


def test_portals_are_unique(tmp_path: Path) -> None:
    data = base(tmp_path)
    data["portals"].append({"listen": "127.0.0.1", "group": 2})
    one_error(tmp_path, data, "portals[1].listen", "already used by portals[0].listen")


def test_ipv6_portals_compare_normalised(tmp_path: Path) -> None:
    data = base(tmp_path)
    data["portals"] = [{"listen": "[::1]:3260"}, {"listen": "0:0::1"}]
    one_error(tmp_path, data, "portals[1].listen", "[::1]:3260 is already used")


def test_wildcard_portal_overlaps_same_family(tmp_path: Path) -> None:
    data = base(tmp_path)
    data["portals"] = [{"listen": "0.0.0.0"}, {"listen": "10.0.0.1"}, {"listen": "::"},
                       {"listen": "10.0.0.1:3261"}]
    one_error(tmp_path, data, "portals[1].listen", "overlaps 0.0.0.0:3260")
    assert len(errors_of(tmp_path, data)) == 1  # :: and another port do not clash


def test_wildcard_cannot_be_advertised(tmp_path: Path) -> None:
    data = base(tmp_path)
    data["portals"][0]["advertise"] = "0.0.0.0:3260"
    one_error(tmp_path, data, "portals[0].advertise", "wildcard", "omit advertise")


@pytest.mark.parametrize("group", [0, 65536, True, "1"])
def test_portal_group_tag(tmp_path: Path, group: object) -> None:
    data = base(tmp_path)
    data["portals"][0]["group"] = group
    one_error(tmp_path, data, "portals[0].group", "1..65535")


@pytest.mark.parametrize(("key", "lo", "hi"), [
    ("queue_depth", 1, 1024), ("max_recv_data_segment_length", 512, 16777215),
    ("first_burst_length", 512, 16777215), ("max_burst_length", 512, 16777215),
    ("max_outstanding_r2t", 1, 65535),
])
def test_iscsi_integer_ranges_and_types(tmp_path: Path, key: str, lo: int, hi: int) -> None:
    for bad, problem in ((lo - 1, "out of range"), (hi + 1, "out of range"),
                         (True, "is a boolean, not an integer"), (1.0, "a number"),
                         ("64", "a string")):
        data = base(tmp_path)
        data["iscsi"] = {key: bad, "first_burst_length": 512, "max_burst_length": 16777215}
        data["iscsi"][key] = bad
        one_error(tmp_path, data, f"iscsi.{key}", problem, f"{lo}..{hi}")


def test_first_burst_at_most_max_burst(tmp_path: Path) -> None:
    data = base(tmp_path)
    data["iscsi"] = {"first_burst_length": 65536, "max_burst_length": 8192}
    one_error(tmp_path, data, "iscsi.first_burst_length", "greater than max_burst_length 8192")


@pytest.mark.parametrize("key", ["immediate_data", "initial_r2t"])
def test_iscsi_booleans(tmp_path: Path, key: str) -> None:
    data = base(tmp_path)
    data["iscsi"] = {key: 1}
    one_error(tmp_path, data, f"iscsi.{key}", "1 is an integer, not a boolean")


@pytest.mark.parametrize(("key", "value", "problem"), [
    ("nop_interval", -1, "out of range"), ("nop_interval", float("nan"), "out of range"),
    ("nop_interval", float("inf"), "out of range"), ("nop_timeout", 0, "out of range"),
    ("login_timeout", True, "a boolean"), ("login_timeout", "15s", "a string"),
])
def test_iscsi_seconds(tmp_path: Path, key: str, value: object, problem: str) -> None:
    data = base(tmp_path)
    data["iscsi"] = {key: value}
    one_error(tmp_path, data, f"iscsi.{key}", problem, "seconds")


def test_nop_interval_zero_means_off(tmp_path: Path) -> None:
    data = base(tmp_path)
    data["iscsi"] = {"nop_interval": 0, "nop_timeout": 2.5}
    cfg = load_config(write(tmp_path, data))
    assert (cfg.iscsi.nop_interval, cfg.iscsi.nop_timeout) == (0.0, 2.5)


@pytest.mark.parametrize(("key", "value", "problem", "allowed"), [
    ("io_threads", 0, "out of range", "1..1024"), ("io_threads", True, "a boolean", "1..1024"),
    ("log_level", "loud", "'loud' is not allowed", "'debug', 'info', 'warning', 'error'"),
    ("log_level", 3, "an integer", "'debug'"),
    ("data_dir", "~/vsand", "not expanded", "file path"),
    ("admin_socket", "/" + "s" * 120, "bytes long", "107 bytes"),
])
def test_top_level_values(tmp_path: Path, key: str, value: object, problem: str,
                          allowed: str) -> None:
    data = base(tmp_path)
    data[key] = value
    one_error(tmp_path, data, key, problem, allowed)


def test_default_admin_socket_too_long(tmp_path: Path) -> None:
    data = base(tmp_path)
    data["data_dir"] = "/" + "d" * 110
    one_error(tmp_path, data, "admin_socket", "bytes long", "set admin_socket explicitly")


def test_data_dir_is_required(tmp_path: Path) -> None:
    data = base(tmp_path)
    del data["data_dir"]
    one_error(tmp_path, data, "data_dir", "missing")


def test_node_name(tmp_path: Path) -> None:
    data = base(tmp_path)
    data["node"] = {"name": "has space"}
    one_error(tmp_path, data, "node.name", "not a valid node name", "A-Z a-z 0-9")
    data["node"] = "node-a"
    one_error(tmp_path, data, "node", "a string, not a mapping", "keys name")


def test_metrics_listen(tmp_path: Path) -> None:
    data = base(tmp_path)
    data["metrics"] = {"listen": "127.0.0.1"}
    one_error(tmp_path, data, "metrics.listen", "has no port")
    data["metrics"] = {"listen": "[::1]:9470"}
    assert load_config(write(tmp_path, data)).metrics_listen == "[::1]:9470"
    data["metrics"] = {"listen": "127.0.0.1:3260"}
    one_error(tmp_path, data, "metrics.listen", "already used by portals[0].listen")


@pytest.mark.parametrize(("where", "key", "suggestion"), [
    ((), "log_levle", "log_level"), ((), "portal", "portals"), (("iscsi",), "queue_dept", "queue_depth"),
    (("portals", 0), "advertize", "advertise"), (("targets", 0), "lunz", "luns"),
    (("targets", 0, "luns", 0), "blocksize", "block_size"), (("metrics",), "listn", "listen"),
    (("node",), "nmae", "name"),
])
def test_unknown_keys_suggest_the_closest(tmp_path: Path, where: tuple[Any, ...], key: str,
                                          suggestion: str) -> None:
    data = base(tmp_path)
    data.setdefault("iscsi", {})
    data.setdefault("metrics", {})
    data.setdefault("node", {})
    node: Any = data
    for step in where:
        node = node[step]
    node[key] = 1
    path = "".join(f"[{s}]" if isinstance(s, int) else (f".{s}" if i else s)
                   for i, s in enumerate(where))
    one_error(tmp_path, data, f"{path}.{key}" if path else key, "unknown key",
              f"did you mean {suggestion!r}?", "allowed keys")


def test_unknown_key_without_close_match(tmp_path: Path) -> None:
    data = base(tmp_path)
    data["zzzzzz"] = 1
    line = one_error(tmp_path, data, "zzzzzz", "unknown key")
    assert "did you mean" not in line


def test_non_string_key(tmp_path: Path) -> None:
    text = yaml.safe_dump(base(tmp_path)) + "3260: x\n"
    line = errors_of(tmp_path, text)[0]
    assert "(top level): key 3260 is an integer" in line and "allowed keys" in line


# --- the file itself -------------------------------------------------------------------------


def test_yaml_syntax_error_names_line_and_column(tmp_path: Path) -> None:
    (line,) = errors_of(tmp_path, "data_dir: /x\nportals: [\n  - a\n")
    assert line.startswith(f"{tmp_path / 'vsand.yaml'}: line 3, column ") and "YAML" in line


def test_duplicate_keys_are_errors(tmp_path: Path) -> None:
    (line,) = errors_of(tmp_path, "data_dir: /a\nlog_level: info\ndata_dir: /b\n")
    assert "line 3, column 1" in line and "duplicate key 'data_dir'" in line
    assert "first 'data_dir' at line 1" in line


@pytest.mark.parametrize(("text", "problem"), [
    ("", "file is empty"), ("# only a comment\n", "file is empty"),
    ("- a\n- b\n", "(top level): is a list, not a mapping"),
    ("just text", "(top level): 'just text' is a string, not a mapping"),
    ("[" * 5000, "nesting is too deep"),
])
def test_not_a_config(tmp_path: Path, text: str, problem: str) -> None:
    (line,) = errors_of(tmp_path, text)
    assert line.startswith(str(tmp_path / "vsand.yaml")) and problem in line, line


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "nope.yaml")
    assert info.value.errors == [f"{tmp_path / 'nope.yaml'}: cannot read the config file: "
                                 f"No such file or directory"]


def test_directory_and_binary_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=str(tmp_path)):
        load_config(tmp_path)
    (tmp_path / "bin.yaml").write_bytes(b"data_dir: \xff\xfe\n")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(tmp_path / "bin.yaml")


def test_config_is_frozen(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, base(tmp_path)))
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.io_threads = 2  # type: ignore[misc]
    assert isinstance(cfg, Config) and isinstance(cfg.targets, tuple)


# --- fuzzing: anything either parses or raises ConfigError -----------------------------------

_KEYS = ["node", "name", "data_dir", "portals", "listen", "advertise", "group", "targets", "iqn",
         "alias", "luns", "number", "path", "size", "block_size", "read_only", "serial",
         "write_cache", "thin", "iscsi", "queue_depth", "first_burst_length", "max_burst_length",
         "nop_interval", "io_threads", "log_level", "admin_socket", "metrics", "x"]
_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True),
    st.text(max_size=30), st.sampled_from(["0.0.0.0", "[::1]:1", "1GiB", "512", IQN, "/tmp/x",
                                           "writeback", "info", "", "~", "eui.0123456789abcdef"]),
)
_values = st.recursive(_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4),
    st.dictionaries(st.one_of(st.sampled_from(_KEYS), st.integers(), st.text(max_size=5)),
                    inner, max_size=5)), max_leaves=25)
_FUZZ_BASE: dict[str, Any] = {
    "data_dir": "/nonexistent-vsand-fuzz/data",
    "portals": [{"listen": "127.0.0.1:3260", "advertise": "127.0.0.1", "group": 1}],
    "targets": [{"iqn": IQN, "alias": "a", "luns": [
        {"number": 0, "path": "/nonexistent-vsand-fuzz/d0", "size": "1G", "block_size": 512,
         "read_only": False, "serial": "S0", "write_cache": "writeback", "thin": True}]}],
    "iscsi": {"queue_depth": 8, "nop_interval": 5}, "metrics": {"listen": "127.0.0.1:9470"},
    "node": {"name": "n"}, "io_threads": 2, "log_level": "info", "admin_socket": "/tmp/s",
}
_FUZZ_PATHS = [(), ("data_dir",), ("portals",), ("portals", 0), ("portals", 0, "listen"),
               ("portals", 0, "advertise"), ("portals", 0, "group"), ("targets",),
               ("targets", 0), ("targets", 0, "iqn"), ("targets", 0, "alias"),
               ("targets", 0, "luns"), ("targets", 0, "luns", 0)] + [
    ("targets", 0, "luns", 0, k) for k in _FUZZ_BASE["targets"][0]["luns"][0]] + [
    ("iscsi",), ("iscsi", "queue_depth"), ("iscsi", "nop_interval"), ("metrics",),
    ("metrics", "listen"), ("node",), ("node", "name"), ("io_threads",), ("log_level",),
    ("admin_socket",)]


def _parse_or_config_error(text: str) -> None:
    try:
        cfg = parse_config(text, "fuzz.yaml")
    except ConfigError as exc:
        assert exc.errors and all(e.startswith("fuzz.yaml: ") for e in exc.errors)
    else:
        assert isinstance(cfg, Config)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(_values)
def test_fuzz_random_documents(doc: Any) -> None:
    _parse_or_config_error(yaml.safe_dump(doc))


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(_FUZZ_PATHS), _values)
def test_fuzz_one_value_of_a_valid_config(where: tuple[Any, ...], value: Any) -> None:
    assert parse_config(yaml.safe_dump(_FUZZ_BASE), "fuzz.yaml")
    data: Any = copy.deepcopy(_FUZZ_BASE)
    if not where:
        data = value
    else:
        node = data
        for step in where[:-1]:
            node = node[step]
        node[where[-1]] = value
    _parse_or_config_error(yaml.safe_dump(data))


@settings(max_examples=300)
@given(st.text(alphabet=st.sampled_from(list("abc:-[]{}&*!|>'\"%@`#,?\n\t 0123.")), max_size=80))
def test_fuzz_raw_text(text: str) -> None:
    _parse_or_config_error(text)


# --- security: CHAP, secret files, access lists, digests -------------------------------------


def chap(data: dict[str, Any], **auth: Any) -> dict[str, Any]:
    data["targets"][0]["auth"] = {"method": "chap", **auth}
    return data


def secret_file(tmp: Path, text: str, mode: int = 0o600, name: str = "s.secret") -> Path:
    path = tmp / name
    path.write_text(text)
    path.chmod(mode)
    return path


def test_auth_defaults_to_none_and_no_acl(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, base(tmp_path)))
    assert cfg.targets[0].auth.method == "none" and cfg.targets[0].acl is None
    assert cfg.discovery_auth.method == "none"
    assert cfg.iscsi.header_digest == ("CRC32C", "None") == cfg.iscsi.data_digest


def test_chap_inline_and_from_a_file(tmp_path: Path) -> None:
    f = secret_file(tmp_path, "file-secret-123\nignored second line\n")
    data = chap(base(tmp_path), user="alice", secret_file="s.secret", mutual_user="disk1",
                mutual_secret="mutual-secret-1")
    cfg = load_config(write(tmp_path, data))
    auth = cfg.targets[0].auth
    assert (auth.user, auth.secret, auth.secret_file) == ("alice", b"file-secret-123", str(f))
    assert (auth.mutual_user, auth.mutual_secret) == ("disk1", b"mutual-secret-1")
    assert "file-secret" not in repr(cfg) and "mutual-secret" not in repr(cfg)


def test_secrets_are_redacted_in_the_dump(tmp_path: Path) -> None:
    data = chap(base(tmp_path), user="alice", secret="inline-secret-1")
    data["discovery_auth"] = {"method": "chap", "user": "d", "secret": "discovery-secret"}
    text = dump_config(load_config(write(tmp_path, data)))
    assert "inline-secret-1" not in text and "discovery-secret" not in text
    assert "(redacted)" in text


def test_secret_file_round_trips(tmp_path: Path) -> None:
    secret_file(tmp_path, "file-secret-123")
    cfg = load_config(write(tmp_path, chap(base(tmp_path), user="a", secret_file="s.secret")))
    again = parse_config(dump_config(cfg), str(tmp_path / "other.yaml"))
    assert again.targets[0].auth == cfg.targets[0].auth


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o660, 0o644, 0o620])
def test_secret_file_readable_by_others_is_an_error(tmp_path: Path, mode: int) -> None:
    secret_file(tmp_path, "file-secret-123", mode)
    line = one_error(tmp_path, chap(base(tmp_path), user="a", secret_file="s.secret"),
                     "targets[0].auth.secret_file", "s.secret", f"{mode:04o}", "0600")
    assert "file-secret" not in line


def test_secret_file_problems(tmp_path: Path) -> None:
    one_error(tmp_path, chap(base(tmp_path), user="a", secret_file="missing.secret"),
              "targets[0].auth.secret_file", "missing.secret", "cannot be read")
    (tmp_path / "dir.secret").mkdir()
    one_error(tmp_path, chap(base(tmp_path), user="a", secret_file="dir.secret"),
              "targets[0].auth.secret_file", "not a regular file")
    secret_file(tmp_path, "short\n", name="short.secret")
    line = one_error(tmp_path, chap(base(tmp_path), user="a", secret_file="short.secret"),
                     "targets[0].auth.secret_file", "5 bytes", "RFC 7143")
    assert "short\n" not in line


@pytest.mark.parametrize("secret, problem", [("", "0 bytes"), ("elevenbytes", "11 bytes"),
                                             ("x" * 256, "longer than 255"),
                                             (123456789012, "not a string")])
def test_secret_length(tmp_path: Path, secret: Any, problem: str) -> None:
    line = one_error(tmp_path, chap(base(tmp_path), user="a", secret=secret),
                     "targets[0].auth.secret", problem)
    if isinstance(secret, str) and secret:
        assert secret not in line.split(": ", 2)[2]  # the test id is in the path


def test_long_secret_is_a_warning(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, chap(base(tmp_path), user="a", secret="s" * 17)))
    assert len(cfg.warnings) == 1 and "targets[0].auth.secret" in cfg.warnings[0]
    assert "16" in cfg.warnings[0] and "s" * 17 not in cfg.warnings[0]
    assert load_config(write(tmp_path, chap(base(tmp_path), user="a",
                                            secret="s" * 16))).warnings == ()


@pytest.mark.parametrize("auth, key, words", [
    ({"user": "a"}, "secret", ("missing", "secret_file")),
    ({"secret": "twelve-bytes!"}, "user", ("missing",)),
    ({"user": "a", "secret": "twelve-bytes!", "secret_file": "x"}, "secret_file",
     ("together",)),
    ({"user": "a", "secret": "twelve-bytes!", "mutual_secret": "other-secret!"},
     "mutual_user", ("missing",)),
    ({"user": "a", "secret": "twelve-bytes!", "mutual_user": "t"}, "mutual_secret",
     ("missing",)),
    ({"user": "a", "secret": "twelve-bytes!", "mutual_user": "t",
      "mutual_secret": "twelve-bytes!"}, "mutual_secret", ("equals secret", "12.1.3")),
    ({"user": "a\nb", "secret": "twelve-bytes!"}, "user", ("not a valid CHAP user",)),
])
def test_chap_section_rules(tmp_path: Path, auth: dict[str, Any], key: str,
                            words: tuple[str, ...]) -> None:
    one_error(tmp_path, chap(base(tmp_path), **auth), f"targets[0].auth.{key}", *words)


def test_auth_keys_need_method_chap(tmp_path: Path) -> None:
    data = base(tmp_path)
    data["targets"][0]["auth"] = {"method": "none", "user": "a"}
    one_error(tmp_path, data, "targets[0].auth.user", "method: chap")
    data["targets"][0]["auth"] = {"method": "kerberos"}
    one_error(tmp_path, data, "targets[0].auth.method", "'kerberos'", "chap")
    data["targets"][0]["auth"] = {"method": "chap", "user": "a", "secret": "twelve-bytes!",
                                  "secert": 1}
    one_error(tmp_path, data, "targets[0].auth.secert", "did you mean 'secret'")


def test_one_secret_never_serves_both_directions_across_sections(tmp_path: Path) -> None:
    data = chap(base(tmp_path), user="a", secret="target-one-sec", mutual_user="t",
                mutual_secret="shared-secret-1")
    data["discovery_auth"] = {"method": "chap", "user": "d", "secret": "shared-secret-1"}
    one_error(tmp_path, data, "targets[0].auth.mutual_secret", "discovery_auth",
              "one direction")


def test_discovery_auth(tmp_path: Path) -> None:
    data = base(tmp_path)
    data["discovery_auth"] = {"method": "chap", "user": "d", "secret": "discovery-secret"}
    cfg = load_config(write(tmp_path, data))
    assert (cfg.discovery_auth.method, cfg.discovery_auth.user) == ("chap", "d")
    data["discovery_auth"] = {"method": "chap", "user": "d"}
    one_error(tmp_path, data, "discovery_auth.secret", "missing")


def acl_data(tmp: Path, acl: Any) -> dict[str, Any]:
    data = base(tmp)
    data["targets"][0]["luns"].append({"number": 3, "path": "disk3.img", "size": "1GiB"})
    data["targets"][0]["acl"] = acl
    return data


def test_acl_entries(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, acl_data(tmp_path, [
        {"initiator": "IQN.1994-05.com.redhat:Host1", "luns": [3, 0]},
        {"initiator": "iqn.1994-05.com.redhat:host2"}])))
    acl = cfg.targets[0].acl
    assert acl is not None
    assert [(e.initiator, e.luns) for e in acl] == [
        ("iqn.1994-05.com.redhat:host1", (0, 3)), ("iqn.1994-05.com.redhat:host2", None)]
    again = parse_config(dump_config(cfg), str(tmp_path / "x.yaml"))
    assert again.targets[0].acl == acl


@pytest.mark.parametrize("acl, key, words", [
    ([], "targets[0].acl", ("is empty", "omit acl")),
    (None, "targets[0].acl", ("is empty",)),
    ("iqn.1994-05.com.redhat:h", "targets[0].acl", ("not a list",)),
    ([{"luns": [0]}], "targets[0].acl[0].initiator", ("missing",)),
    ([{"initiator": "host1"}], "targets[0].acl[0].initiator", ("not a valid iSCSI name",)),
    ([{"initiator": "iqn.1994-05.com.redhat:h", "luns": [7]}], "targets[0].acl[0].luns[0]",
     ("not a LUN of this target", "[0, 3]")),
    ([{"initiator": "iqn.1994-05.com.redhat:h", "luns": [0, 0]}],
     "targets[0].acl[0].luns[1]", ("twice",)),
    ([{"initiator": "iqn.1994-05.com.redhat:h", "luns": ["0"]}],
     "targets[0].acl[0].luns[0]", ("not a LUN number",)),
    ([{"initiator": "iqn.1994-05.com.redhat:h", "luns": []}], "targets[0].acl[0].luns",
     ("is empty",)),
    ([{"initiator": "iqn.1994-05.com.redhat:h"}, {"initiator": "IQN.1994-05.com.redhat:H"}],
     "targets[0].acl[1].initiator", ("already listed",)),
    ([{"initiator": "iqn.1994-05.com.redhat:h", "lun": [0]}], "targets[0].acl[0].lun",
     ("did you mean 'luns'",)),
])
def test_acl_rules(tmp_path: Path, acl: Any, key: str, words: tuple[str, ...]) -> None:
    one_error(tmp_path, acl_data(tmp_path, acl), key, *words)


@pytest.mark.parametrize("value, result", [(["crc32c"], ("CRC32C",)), (["None"], ("None",)),
                                           (["None", "CRC32C"], ("None", "CRC32C"))])
def test_digest_choices(tmp_path: Path, value: Any, result: tuple[str, ...]) -> None:
    data = base(tmp_path)
    data["iscsi"] = {"header_digest": value, "data_digest": value}
    cfg = load_config(write(tmp_path, data))
    assert cfg.iscsi.header_digest == result == cfg.iscsi.data_digest


@pytest.mark.parametrize("value, key, problem", [
    ([], "iscsi.header_digest", "is empty"), ("CRC32C", "iscsi.header_digest", "not a list"),
    (["md5"], "iscsi.header_digest[0]", "not a digest"),
    (["None", "none"], "iscsi.header_digest[1]", "twice")])
def test_digest_rules(tmp_path: Path, value: Any, key: str, problem: str) -> None:
    data = base(tmp_path)
    data["iscsi"] = {"header_digest": value}
    one_error(tmp_path, data, key, problem, "CRC32C")
