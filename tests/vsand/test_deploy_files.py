"""The deployment material in deploy/ against the code it describes.

- Prometheus rules and the Grafana dashboard may only query series a running vsand exports:
  the names are collected from ``VsandCollector`` over a fake daemon (plus the process and
  platform collectors the daemon's registry carries), not copied from the code by hand.
- The initiator guides' vendor/product strings (multipath.conf, the ESXi claim rule, the
  Windows MPIO hardware ID) must be what INQUIRY returns.
- Every example config loads without errors or warnings (a cluster's secret file, which is
  not in the repository, is written by the test); the two-node examples describe one cluster.
- With promtool installed, the rules pass ``promtool check rules`` and unit tests of when each
  alert fires.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector

from vsand.config import Config, ConfigError, load_config, parse_config
from vsand.lun import Lun
from vsand.metrics import VsandCollector
from vsand.protocol.scsi import spc
from vsand.protocol.scsi.types import LunParams
from vsand.protocol.scsi.unit import LogicalUnit

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
RULE_FILES = sorted((DEPLOY / "prometheus").glob("*.y*ml"))
DASHBOARDS = sorted((DEPLOY / "grafana").glob("*.json"))
GUIDES = DEPLOY / "guides"
PROMETHEUS_OWN = {"up"}  # series Prometheus itself adds to every scrape target


# ---------------------------------------------------------------------------------------------
# What vsand exports


def _fake_daemon() -> Any:
    """Enough of a Daemon for VsandCollector: real ``Lun`` objects, everything else faked."""
    params = LunParams(block_size=512, blocks=2048, serial="S", naa_id=bytes(16))
    backend: Any = SimpleNamespace(block_size=512)  # the collector never touches it
    lun = Lun(0, LogicalUnit(params), backend)
    target = SimpleNamespace(name="iqn.2026-11.org.example:t", luns={0: lun})
    registry = SimpleNamespace(targets={target.name: target}, connections=[object()],
                               sessions=[SimpleNamespace(target_name=target.name),
                                         SimpleNamespace(target_name="")])
    mirror = SimpleNamespace(
        lun=lun, ops=3, errors=0, ns=3000, hist=[0, 3] + [0] * 62,
        status=lambda: {"role": "in-sync", "in_sync": ["node-a", "node-b"],
                        "dirty_bytes": {"node-b": 0}, "resync_bytes": 0,
                        "resync_remaining_bytes": 0, "epoch": 2, "in_flight": 0,
                        "verify": {"regions_checked": 8, "mismatches": 0,
                                   "finished_unix": 1.0e9,
                                   "repaired_regions": 0}})
    cluster = SimpleNamespace(
        luns={1: mirror},
        status=lambda: {"peers": {"node-b": {"state": "up", "rtt_ms": 0.2, "drift": [],
                                             "links": [{"link": 0, "state": "up",
                                                        "active": True}]}},
                        "quorum": {"serving": True, "epoch": 3, "enabled": True,
                                   "witness": "up"}})
    return SimpleNamespace(config=SimpleNamespace(node_name="node-a"), registry=registry,
                           cluster=cluster)


@pytest.fixture(scope="module")
def exported() -> set[str]:
    """Every sample name a scrape of vsand returns (counters with their _total suffix)."""
    reg = CollectorRegistry()
    reg.register(VsandCollector(_fake_daemon()))
    # start_metrics registers on prometheus_client's default REGISTRY, which carries these.
    ProcessCollector(registry=reg)
    PlatformCollector(registry=reg)
    GCCollector(registry=reg)
    names = {s.name for family in reg.collect() for s in family.samples}
    assert {"vsand_info", "vsand_iscsi_sessions", "vsand_lun_ops_total",
            "vsand_lun_busy_seconds_total", "vsand_lun_errors_total", "vsand_mirror_state",
            "vsand_mirror_dirty_bytes", "vsand_peer_up"} <= names
    return names | PROMETHEUS_OWN


# ---------------------------------------------------------------------------------------------
# Metric names in a PromQL expression

_KEYWORDS = {"and", "or", "unless", "by", "without", "on", "ignoring", "group_left",
             "group_right", "offset", "bool", "inf", "nan", "atan2"}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (Grafana $variables allowed)."""
    s = re.sub(r"\$\{[^}]*\}|\$\w+", " 1 ", expr)                      # Grafana variables
    s = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`', '""', s)  # string literals
    s = re.sub(r"\{[^}]*\}", " ", s)                                    # label matchers
    s = re.sub(r"\[[^\]]*\]", " ", s)                                   # ranges, subqueries
    s = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", s)
    names = set()
    for m in re.finditer(r"(?<![\w.:])([A-Za-z_:][\w:]*)\s*(\()?", s):
        word, call = m.group(1), m.group(2)
        if call or word.lower() in _KEYWORDS:
            continue  # a function or aggregation, or a keyword
        names.add(word)
    return names


def test_metric_name_extraction() -> None:
    expr = ('sum by (instance, lun) (rate(foo_total{op=~"read|write", t="a{b}"}[5m] offset 1h))'
            ' / on(lun) group_left(x) bar:ratio > 0.05 and 1e9 < up{job="$job"}'
            ' unless changes(baz[$__rate_interval]) > 0 or count(qux) without (lun)')
    assert metric_names(expr) == {"foo_total", "bar:ratio", "up", "baz", "qux"}
    assert metric_names("time() - vsand_start_time_seconds") == {"vsand_start_time_seconds"}


# ---------------------------------------------------------------------------------------------
# Prometheus rules


def _rules(path: Path) -> list[dict[str, Any]]:
    doc = yaml.safe_load(path.read_text())
    rules = [r for g in doc["groups"] for r in g["rules"]]
    assert rules, f"{path}: no rules"
    return rules


def test_rule_files_exist() -> None:
    assert RULE_FILES, "deploy/prometheus has no rule file"


@pytest.mark.parametrize("path", RULE_FILES, ids=lambda p: p.name)
def test_rules_use_only_exported_metrics(path: Path, exported: set[str]) -> None:
    for rule in _rules(path):
        name = rule.get("alert") or rule.get("record")
        used = metric_names(rule["expr"])
        assert used, f"{name}: no metric found in {rule['expr']!r}"
        unknown = used - exported
        assert not unknown, f"{path.name}: {name} uses {sorted(unknown)}, not exported"
        if "alert" in rule:
            assert rule.get("labels", {}).get("severity"), f"{name}: no severity label"
            assert rule.get("annotations", {}).get("summary"), f"{name}: no summary"


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed")
@pytest.mark.parametrize("path", RULE_FILES, ids=lambda p: p.name)
def test_promtool_check_rules(path: Path) -> None:
    out = subprocess.run(["promtool", "check", "rules", str(path)], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


# When each alert of vsand-alerts.yml fires, on synthetic series (1 sample a minute).
J, I = 'job="vsand"', 'instance="n1:9470"'
T = 'target="iqn.2026-11.org.example:db"'
L = f'{T}, lun="0"'
M = 'lun="S1"'
PROMTOOL_CASES: list[dict[str, Any]] = [{
    "interval": "1m",
    "input_series": [
        {"series": f"up{{{J}, {I}}}", "values": "1 0x10"},
        {"series": f'up{{{J}, instance="n2:9470"}}', "values": "1x10"},
        {"series": f"vsand_start_time_seconds{{{J}, {I}}}", "values": "100 100 400x10"},
        {"series": f"process_open_fds{{{J}, {I}}}", "values": "900x10"},
        {"series": f"process_max_fds{{{J}, {I}}}", "values": "1000x10"},
        {"series": f"vsand_lun_errors_total{{{J}, {I}, {L}}}", "values": "0 0 0 3x10"},
    ],
    "alert_rule_test": [
        {"eval_time": "1m", "alertname": "VsandDown", "exp_alerts": []},  # pending
        {"eval_time": "3m", "alertname": "VsandDown",
         "exp_alerts": [{"exp_labels": {"job": "vsand", "instance": "n1:9470",
                                        "severity": "critical"}}]},
        {"eval_time": "3m", "alertname": "VsandRestarted",
         "exp_alerts": [{"exp_labels": {"job": "vsand", "instance": "n1:9470",
                                        "severity": "info"}}]},
        {"eval_time": "4m", "alertname": "VsandFileDescriptorsNearLimit", "exp_alerts": []},
        {"eval_time": "6m", "alertname": "VsandFileDescriptorsNearLimit",
         "exp_alerts": [{"exp_labels": {"job": "vsand", "instance": "n1:9470",
                                        "severity": "warning"}}]},
        {"eval_time": "2m", "alertname": "VsandLunErrors", "exp_alerts": []},
        {"eval_time": "4m", "alertname": "VsandLunErrors",
         "exp_alerts": [{"exp_labels": {"job": "vsand", "instance": "n1:9470",
                                        "target": "iqn.2026-11.org.example:db", "lun": "0",
                                        "severity": "critical"}}]},
    ],
}, {
    "interval": "1m",
    "input_series": [
        # had 2 sessions for 20 minutes, then none
        {"series": f"vsand_iscsi_sessions{{{J}, {I}, {T}}}", "values": "2x20 0x40"},
        # never had a session, and the discovery pseudo target: neither may fire
        {"series": f'vsand_iscsi_sessions{{{J}, {I}, target="iqn.2026-11.org.example:new"}}',
         "values": "0x60"},
        {"series": f'vsand_iscsi_sessions{{{J}, {I}, target="(discovery)"}}',
         "values": "1 0x60"},
        # two paths, then one from minute 61
        {"series": f'vsand_iscsi_sessions{{{J}, {I}, target="iqn.2026-11.org.example:mp"}}',
         "values": "2x60 1x100"},
    ],
    "alert_rule_test": [
        {"eval_time": "25m", "alertname": "VsandTargetLostAllSessions", "exp_alerts": []},
        {"eval_time": "35m", "alertname": "VsandTargetLostAllSessions",
         "exp_alerts": [{"exp_labels": {"job": "vsand", "instance": "n1:9470",
                                        "target": "iqn.2026-11.org.example:db",
                                        "severity": "warning"}}]},
        {"eval_time": "70m", "alertname": "VsandTargetSessionsDecreased", "exp_alerts": []},
        {"eval_time": "100m", "alertname": "VsandTargetSessionsDecreased",
         "exp_alerts": [{"exp_labels": {"job": "vsand", "instance": "n1:9470",
                                        "target": "iqn.2026-11.org.example:mp",
                                        "severity": "info"}}]},
        {"eval_time": "150m", "alertname": "VsandTargetSessionsDecreased", "exp_alerts": []},
    ],
}, {
    "interval": "1m",
    "input_series": [
        # LUN 0: 10 reads/s, 1 busy second per second = 100 ms each: slow
        {"series": f'vsand_lun_ops_total{{{J}, {I}, {T}, lun="0", op="read"}}',
         "values": "0+600x30"},
        {"series": f'vsand_lun_busy_seconds_total{{{J}, {I}, {T}, lun="0", op="read"}}',
         "values": "0+60x30"},
        # LUN 1: 500 ms each, but only 1 read/s: too few to judge
        {"series": f'vsand_lun_ops_total{{{J}, {I}, {T}, lun="1", op="read"}}',
         "values": "0+60x30"},
        {"series": f'vsand_lun_busy_seconds_total{{{J}, {I}, {T}, lun="1", op="read"}}',
         "values": "0+30x30"},
        # LUN 2: 100 writes/s at 1 ms: fine
        {"series": f'vsand_lun_ops_total{{{J}, {I}, {T}, lun="2", op="write"}}',
         "values": "0+6000x30"},
        {"series": f'vsand_lun_busy_seconds_total{{{J}, {I}, {T}, lun="2", op="write"}}',
         "values": "0+6x30"},
    ],
    "alert_rule_test": [
        {"eval_time": "8m", "alertname": "VsandLunHighLatency", "exp_alerts": []},  # pending
        {"eval_time": "20m", "alertname": "VsandLunHighLatency",
         "exp_alerts": [{"exp_labels": {"job": "vsand", "instance": "n1:9470",
                                        "target": "iqn.2026-11.org.example:db", "lun": "0",
                                        "op": "read", "severity": "warning"}}]},
    ],
}, {
    "interval": "1m",
    "input_series": [
        {"series": f'vsand_peer_up{{{J}, {I}, peer="n2"}}', "values": "1 0x10"},
        {"series": f'vsand_quorum_serving{{{J}, {I}}}', "values": "1 0x5"},
        {"series": f'vsand_mirror_verify_mismatches{{{J}, {I}, {M}}}', "values": "0 0 2x5 1x5"},
        # a verify with repair from minute 7: one region differed, and it was copied
        {"series": f'vsand_mirror_verify_repaired_regions{{{J}, {I}, {M}}}',
         "values": "0x6 1x5"},
        {"series": f'vsand_peer_drift{{{J}, {I}, peer="n2", what="config"}}',
         "values": "1x20"},
        {"series": f'vsand_peer_drift{{{J}, {I}, peer="n2", what="version"}}',
         "values": "0x20"},
        # in sync, degraded from minute 1, then a resync that stops moving at minute 20
        {"series": f'vsand_mirror_state{{{J}, {I}, {M}, state="degraded"}}',
         "values": "0 1x10 0x40"},
        {"series": f'vsand_mirror_state{{{J}, {I}, {M}, state="split-brain"}}',
         "values": "0x3 1x3"},
        {"series": f'vsand_mirror_state{{{J}, {I}, {M}, state="connecting"}}',
         "values": "1x10"},
        {"series": f'vsand_mirror_resync_remaining_bytes{{{J}, {I}, {M}}}',
         "values": "0x11 1000x40"},
        {"series": f'vsand_mirror_resync_bytes_total{{{J}, {I}, {M}}}',
         "values": "0x11 0+100x9 900x40"},
    ],
    "alert_rule_test": [
        {"eval_time": "1m", "alertname": "VsandPeerDown", "exp_alerts": []},
        {"eval_time": "3m", "alertname": "VsandPeerDown",
         "exp_alerts": [{"exp_labels": {"job": "vsand", "instance": "n1:9470", "peer": "n2",
                                        "severity": "critical"}}]},
        {"eval_time": "2m", "alertname": "VsandMirrorDegraded", "exp_alerts": []},
        {"eval_time": "4m", "alertname": "VsandMirrorDegraded",
         "exp_alerts": [{"exp_labels": {"job": "vsand", "instance": "n1:9470",
                                        "lun": "S1", "state": "degraded",
                                        "severity": "warning"}}]},
        {"eval_time": "4m", "alertname": "VsandMirrorSplitBrain",
         "exp_alerts": [{"exp_labels": {"job": "vsand", "instance": "n1:9470",
                                        "lun": "S1", "state": "split-brain",
                                        "severity": "critical"}}]},
        {"eval_time": "4m", "alertname": "VsandMirrorNotServing", "exp_alerts": []},
        {"eval_time": "7m", "alertname": "VsandMirrorNotServing",
         "exp_alerts": [{"exp_labels": {"job": "vsand", "instance": "n1:9470",
                                        "lun": "S1", "state": "connecting",
                                        "severity": "warning"}}]},
        {"eval_time": "1m", "alertname": "VsandNoQuorum", "exp_alerts": []},
        {"eval_time": "3m", "alertname": "VsandNoQuorum",
         "exp_alerts": [{"exp_labels": {"job": "vsand", "instance": "n1:9470",
                                        "severity": "critical"}}]},
        {"eval_time": "1m", "alertname": "VsandVerifyMismatch", "exp_alerts": []},
        {"eval_time": "3m", "alertname": "VsandVerifyMismatch",
         "exp_alerts": [{"exp_labels": {"job": "vsand", "instance": "n1:9470", "lun": "S1",
                                        "severity": "critical"}}]},
        {"eval_time": "9m", "alertname": "VsandVerifyMismatch", "exp_alerts": []},
        {"eval_time": "5m", "alertname": "VsandPeerDrift", "exp_alerts": []},
        {"eval_time": "15m", "alertname": "VsandPeerDrift",
         "exp_alerts": [{"exp_labels": {"job": "vsand", "instance": "n1:9470", "peer": "n2",
                                        "what": "config", "severity": "warning"}}]},
        {"eval_time": "25m", "alertname": "VsandResyncStuck", "exp_alerts": []},
        {"eval_time": "45m", "alertname": "VsandResyncStuck",
         "exp_alerts": [{"exp_labels": {"job": "vsand", "instance": "n1:9470",
                                        "lun": "S1", "severity": "warning"}}]},
    ],
}, {
    "interval": "1m",
    "input_series": [
        # peer n2 linked over network 0 while network 1 is down from minute 1; peer n3 gone
        # altogether (VsandPeerDown's case, not this one's)
        {"series": f'vsand_peer_up{{{J}, {I}, peer="n2"}}', "values": "1x20"},
        {"series": f'vsand_peer_link_up{{{J}, {I}, peer="n2", link="0"}}', "values": "1x20"},
        {"series": f'vsand_peer_link_up{{{J}, {I}, peer="n2", link="1"}}',
         "values": "1 0x19"},
        {"series": f'vsand_peer_up{{{J}, {I}, peer="n3"}}', "values": "0x20"},
        {"series": f'vsand_peer_link_up{{{J}, {I}, peer="n3", link="0"}}', "values": "0x20"},
    ],
    "alert_rule_test": [
        {"eval_time": "3m", "alertname": "VsandPeerNetworkDown", "exp_alerts": []},
        {"eval_time": "8m", "alertname": "VsandPeerNetworkDown",
         "exp_alerts": [{"exp_labels": {"job": "vsand", "instance": "n1:9470", "peer": "n2",
                                        "link": "1", "severity": "warning"}}]},
    ],
}]


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed")
def test_promtool_alert_unit_tests(tmp_path: Path) -> None:
    path = DEPLOY / "prometheus" / "vsand-alerts.yml"
    doc = yaml.safe_load(path.read_text())
    for group in doc["groups"]:  # annotations are prose; these tests are about when rules fire
        for rule in group["rules"]:
            rule.pop("annotations", None)
    rules = tmp_path / "rules.yml"
    rules.write_text(yaml.safe_dump(doc))
    tests = tmp_path / "tests.yml"
    tests.write_text(yaml.safe_dump({"rule_files": [str(rules)], "evaluation_interval": "1m",
                                     "tests": PROMTOOL_CASES}))
    out = subprocess.run(["promtool", "test", "rules", str(tests)], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    tested = {t["alertname"] for case in PROMTOOL_CASES for t in case["alert_rule_test"]}
    assert tested == {r["alert"] for r in _rules(path)}, "every alert needs a unit test"


# ---------------------------------------------------------------------------------------------
# Grafana


def _targets(dash: dict[str, Any]) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    stack = list(dash.get("panels", []))
    while stack:
        panel = stack.pop()
        stack.extend(panel.get("panels", []))  # collapsed rows hold their panels
        out.extend((panel.get("title", ""), t["expr"]) for t in panel.get("targets", [])
                   if t.get("expr"))
    out.extend(("annotation " + a.get("name", ""), a["expr"])
               for a in dash.get("annotations", {}).get("list", []) if a.get("expr"))
    return out


def test_dashboards_exist() -> None:
    assert DASHBOARDS, "deploy/grafana has no dashboard"


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_dashboard_queries_use_only_exported_metrics(path: Path, exported: set[str]) -> None:
    dash = json.loads(path.read_text())
    assert [i["name"] for i in dash["__inputs"]] == ["DS_PROMETHEUS"]
    assert dash["schemaVersion"] >= 36
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert {"instance", "target"} <= set(variables)
    targets = _targets(dash)
    assert len(targets) >= 6
    for title, expr in targets:
        used = metric_names(expr)
        assert used, f"{title}: no metric in {expr!r}"
        assert not used - exported, f"{title}: {sorted(used - exported)} not exported by vsand"
    for name, var in variables.items():
        query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
        m = re.fullmatch(r"\s*label_values\((.*),\s*(\w+)\s*\)\s*", query)
        assert m, f"variable {name}: expected label_values(selector, label), got {query!r}"
        assert metric_names(m.group(1)) <= exported, f"variable {name}: {query!r}"
    text = path.read_text()
    for ds in re.findall(r'"uid":\s*"([^"]*)"', text):
        if ds != "vsand-overview":  # the dashboard's own uid
            assert ds == "${DS_PROMETHEUS}", f"datasource uid {ds!r} is not the input"


# ---------------------------------------------------------------------------------------------
# INQUIRY strings in the guides


def _inquiry_strings() -> tuple[str, str]:
    defaults = {f.name: f.default for f in dataclasses.fields(LunParams)}
    params = LunParams(block_size=512, blocks=8, serial="S", naa_id=bytes(16))
    data = spc._standard_inquiry(SimpleNamespace(params=params))
    vendor, product = data[8:16].decode().rstrip(), data[16:32].decode().rstrip()
    assert (vendor, product) == (defaults["vendor"], defaults["product"])
    return vendor, product


def test_multipath_conf_matches_inquiry() -> None:
    vendor, product = _inquiry_strings()
    text = (GUIDES / "open-iscsi.md").read_text()
    blocks = re.findall(r"```[^\n]*\n(.*?)```", text, re.S)
    device = [b for b in blocks if re.search(r"^\s*devices\s*\{", b, re.M)]
    assert len(device) == 1, "expected one multipath.conf block with a devices section"
    got_vendor = re.search(r'^\s*vendor\s+"([^"]+)"', device[0], re.M)
    got_product = re.search(r'^\s*product\s+"([^"]+)"', device[0], re.M)
    assert got_vendor and got_product
    assert (got_vendor.group(1), got_product.group(1)) == (vendor, product)
    # multipath matches them as regular expressions against the padded INQUIRY fields
    assert re.search(got_vendor.group(1), vendor.ljust(8))
    assert re.search(got_product.group(1), product.ljust(16))
    for key in ("path_grouping_policy  group_by_prio", 'hardware_handler      "1 alua"',
                "prio                  alua", "path_checker          tur",
                "failback              immediate", "detect_prio           yes"):
        assert key in device[0], key


def test_esxi_claim_rule_matches_inquiry() -> None:
    vendor, product = _inquiry_strings()
    text = (GUIDES / "vmware-esxi.md").read_text().replace("\\\n", " ")
    rules = re.findall(r"esxcli storage nmp satp rule add (.*)", text)
    assert rules
    for rule in rules:
        assert re.search(rf"-V {re.escape(vendor)}\s", rule), rule
        assert re.search(rf"-M {re.escape(product)}\s", rule), rule
        assert "-s VMW_SATP_ALUA" in rule and "-c tpgs_on" in rule and "-P VMW_PSP_RR" in rule


def test_windows_hardware_id_matches_inquiry() -> None:
    vendor, product = _inquiry_strings()
    text = (GUIDES / "windows.md").read_text()
    hwid = f'"{vendor.ljust(8)}{product.ljust(16)}"'
    assert f"New-MSDSMSupportedHW -VendorId {vendor} -ProductId {product}" in text
    quoted = re.findall(r'"VSAND[^"]*"', text)
    assert quoted and all(q == hwid for q in quoted), quoted


# ---------------------------------------------------------------------------------------------
# Example configs


def _load_example(path: Path, tmp: Path) -> Config:
    """`path` loaded as vsand would, its cluster secret file (not in the repository) replaced
    by one written here; relative paths still resolve next to the example."""
    doc = yaml.safe_load(path.read_text())
    cluster = doc.get("cluster") or {}
    if "secret_file" in cluster:
        secret = tmp / "cluster.secret"
        secret.write_text("a-generated-cluster-secret-for-the-test\n")
        secret.chmod(0o600)
        cluster["secret_file"] = str(secret)
        return parse_config(yaml.safe_dump(doc), str(path))
    return load_config(path)


@pytest.mark.parametrize("path", sorted((DEPLOY / "examples").glob("*.yaml")),
                         ids=lambda p: p.name)
def test_example_configs_load(path: Path, tmp_path: Path) -> None:
    cfg = _load_example(path, tmp_path)
    assert cfg.warnings == ()


def test_two_node_examples_form_one_cluster(tmp_path: Path) -> None:
    a, b = (_load_example(DEPLOY / "examples" / f"two-node-{n}.yaml", tmp_path)
            for n in "ab")
    assert a.cluster is not None and b.cluster is not None
    assert a.cluster == b.cluster
    assert [n.name for n in a.cluster.nodes] == [a.node_name, b.node_name] == ["node-a", "node-b"]
    assert a.targets == b.targets  # same IQNs, serials, sizes and mirror ids
    assert all(lun.mirror for t in a.targets for lun in t.luns)
    # One ALUA target port group per node, each advertising the address of that node.
    assert {p.group_tag for p in a.portals}.isdisjoint(p.group_tag for p in b.portals)
    for cfg in (a, b):
        assert cfg.cluster is not None
        assert {p.advertise_host for p in cfg.portals} == {cfg.cluster.node(cfg.node_name).host}
    assert dataclasses.replace(a, node_name="", portals=(), source="", cluster=None) == \
        dataclasses.replace(b, node_name="", portals=(), source="", cluster=None)


def test_three_node_example_makes_a_cluster_of_three_without_a_witness(tmp_path: Path) -> None:
    a = _load_example(DEPLOY / "examples" / "three-node-a.yaml", tmp_path)
    assert a.cluster is not None and a.cluster.witness is None
    assert [n.name for n in a.cluster.nodes] == ["node-a", "node-b", "node-c"]
    # B's and C's files, as its comments say to write them, describe the same cluster.
    for name, host, group in (("node-b", "192.0.2.11", 2), ("node-c", "192.0.2.12", 3)):
        text = (DEPLOY / "examples" / "three-node-a.yaml").read_text()
        text = text.replace("name: node-a                  #", f"name: {name}  #") \
            .replace("advertise: 192.0.2.10:3260", f"advertise: {host}:3260") \
            .replace("group: 1 ", f"group: {group} ")
        other = tmp_path / f"{name}.yaml"
        other.write_text(text)
        cfg = _load_example(other, tmp_path)
        assert cfg.node_name == name and cfg.cluster == a.cluster and cfg.targets == a.targets
        assert {p.advertise_host for p in cfg.portals} == {cfg.cluster.node(name).host}


def test_a_witness_with_three_nodes_is_refused(tmp_path: Path) -> None:
    doc = yaml.safe_load((DEPLOY / "examples" / "three-node-a.yaml").read_text())
    doc["cluster"]["witness"] = "192.0.2.20:3270"
    doc["cluster"]["secret"] = "a-generated-cluster-secret-for-the-test"
    del doc["cluster"]["secret_file"]
    with pytest.raises(ConfigError) as e:
        parse_config(yaml.safe_dump(doc), "three.yaml")
    assert any("cluster.witness" in line and "two nodes only" in line for line in e.value.errors)


def _exec_start(unit: Path) -> list[str]:
    text = unit.read_text().replace("\\\n", " ")
    line = next(ln for ln in text.splitlines() if ln.startswith("ExecStart="))
    return line.split("=", 1)[1].split()


def test_witness_unit_starts_a_witness_that_answers(tmp_path: Path) -> None:
    """The unit's own command line (paths moved to tmp_path), run for real."""
    import os
    import signal
    import socket
    import sys
    import time
    argv = _exec_start(DEPLOY / "systemd" / "vsand-witness.service")
    assert argv[:2] == ["/usr/local/bin/vsand", "witness"]
    secret = tmp_path / "cluster.secret"
    secret.write_text("a-generated-cluster-secret-for-the-test\n")
    secret.chmod(0o600)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    swap = {"/etc/vsand/cluster.secret": str(secret), "0.0.0.0:3270": f"127.0.0.1:{port}",
            "/var/lib/vsand-witness": str(tmp_path / "state")}
    cmd = [sys.executable, "-m", "vsand", *[swap.get(a, a) for a in argv[1:]]]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "NOTIFY_SOCKET": ""})
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), 0.5).close()
                break
            except OSError:
                assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
                assert time.monotonic() < deadline, "the witness did not listen"
                time.sleep(0.1)
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=15)
    assert proc.returncode == 0, err
    assert "witness of cluster lab1 for nodes node-a, node-b" in err
