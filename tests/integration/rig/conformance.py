"""Run libiscsi's ``iscsi-test-cu`` suite by suite and classify every test.

Invocation (per suite; the same flags for the whole family in one go reproduce tgt's figures)::

    stdbuf -o0 iscsi-test-cu --dataloss -i IQN1 -I IQN2 -t ALL.<Suite> iscsi://127.0.0.1:P/IQN/LUN

Output is CUnit's verbose text: ``Suite: S``, then per test ``  Test: T ...`` followed by
whatever the test prints (``[SKIPPED] ...``, ``[FAILED] ...``) and the status word ``passed``
or ``FAILED``, then for failures the numbered assertion lines. libiscsi has no CUnit "skip":
a test that cannot run prints ``[SKIPPED]`` and returns, so CUnit calls it passed; we count it
as skipped. (``-x`` XML output has the same blind spot, hence the text parser.)

Each suite runs in its own process with a timeout, so a hang costs one suite. When a suite
times out, the tests it finished keep their results, the test it was in is recorded as failed
("hung"), and the tests after it are run one by one with their own timeout. The whole run has
a deadline; tests it never reaches are failed as "not run", and after three consecutive
iscsi-test-cu runs without any result (target down or mute) the rest is failed unrun.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

PASSED, FAILED, SKIPPED = "passed", "failed", "skipped"

INITIATOR_1 = "iqn.2026-11.org.vsand:conformance-1"
INITIATOR_2 = "iqn.2026-11.org.vsand:conformance-2"

GIVE_UP_AFTER = 3  # consecutive result-less runs before the rest is failed unrun

_HEADER = re.compile(r"(?m)^(Suite: .*|  Test: .*? \.\.\.)")
_STATUS = re.compile(r"(?m)^\s*(passed|FAILED)\b")
_ASSERT = re.compile(r"(?m)^\s+\d+\. \S+:\d+\s+- .*$")
_MESSAGE = re.compile(r"\[(SKIPPED|FAILED|WARNING)\][^\n]*")


@dataclass
class Outcome:
    name: str  # "Suite.Test"
    status: str  # PASSED / FAILED / SKIPPED
    detail: str = ""


@dataclass
class ConformanceRun:
    url: str
    family: str
    outcomes: dict[str, Outcome] = field(default_factory=dict)
    commands: list[str] = field(default_factory=list)
    elapsed_s: float = 0.0
    log: str = ""

    def count(self, status: str) -> int:
        return sum(1 for o in self.outcomes.values() if o.status == status)

    def summary_line(self) -> str:
        return (
            f"conformance: {len(self.outcomes)} tests, {self.count(PASSED)} passed, "
            f"{self.count(FAILED)} failed, {self.count(SKIPPED)} skipped"
        )

    def failures(self) -> list[Outcome]:
        return [o for o in self.outcomes.values() if o.status == FAILED]

    def report(self) -> str:
        lines = [
            self.summary_line(),
            f"url: {self.url}",
            f"elapsed: {self.elapsed_s:.1f} s",
            f"per suite: {self.commands[0] if self.commands else '-'}",
            "",
        ]
        width = max((len(n) for n in self.outcomes), default=10)
        for o in self.outcomes.values():
            detail = " | ".join(o.detail.splitlines()) if o.status != PASSED else ""
            lines.append(f"{o.status.upper():8} {o.name:{width}}  {detail}".rstrip())
        return "\n".join(lines) + "\n"


def list_tests(family: str = "ALL") -> dict[str, list[str]]:
    """Suites and their tests in run order, from ``iscsi-test-cu --list``."""
    out = subprocess.run(
        ["iscsi-test-cu", "--list"], capture_output=True, text=True, timeout=30
    ).stdout
    suites: dict[str, list[str]] = {}
    for line in out.split():
        parts = line.split(".")
        if parts[0] != family or len(parts) < 2:
            continue
        tests = suites.setdefault(parts[1], [])
        if len(parts) == 3:
            tests.append(parts[2])
    return suites


def parse_output(text: str) -> list[Outcome]:
    """Classify every ``Test:`` in CUnit verbose output (tests without a status are omitted)."""
    outcomes: list[Outcome] = []
    parts = _HEADER.split(text)
    suite = "?"
    for head, body in zip(parts[1::2], parts[2::2]):
        if head.startswith("Suite: "):
            suite = head[len("Suite: ") :].strip()
            continue
        name = head.strip()[len("Test: ") : -len("...")].strip()
        body = body.split("\nRun Summary:")[0]
        m = _STATUS.search(body)
        if m is None:
            continue  # cut off mid-test (timeout / crash)
        before = body[: m.start()]
        if m.group(1) == "FAILED":
            msgs = [x.group(0) for x in _MESSAGE.finditer(before)]
            asserts = [a.strip() for a in _ASSERT.findall(body[m.end() :])]
            outcomes.append(Outcome(f"{suite}.{name}", FAILED, "\n".join(msgs + asserts)))
        elif "[SKIPPED]" in before:
            msgs = [x.group(0) for x in _MESSAGE.finditer(before) if "SKIPPED" in x.group(0)]
            outcomes.append(Outcome(f"{suite}.{name}", SKIPPED, msgs[0] if msgs else ""))
        else:
            outcomes.append(Outcome(f"{suite}.{name}", PASSED))
    return outcomes


def load_expected(path: Path) -> dict[str, str]:
    """``Suite.Test  # reason`` lines; blank lines and ``#`` comments ignored."""
    expected: dict[str, str] = {}
    if not path.exists():
        return expected
    for raw in path.read_text().splitlines():
        name, _, reason = raw.partition("#")
        name = name.strip()
        if name:
            expected[name] = reason.strip()
    return expected


def _run_bounded(argv: list[str], timeout: float) -> tuple[str, int | None]:
    """Run ``argv`` (own session) with output unbuffered; (output, rc or None on timeout)."""
    with tempfile.TemporaryFile() as out:
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            rc: int | None = proc.wait(timeout=max(timeout, 1.0))
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
            rc = None
        out.seek(0)
        return out.read().decode(errors="replace"), rc


def run_conformance(
    url: str,
    *,
    family: str = "ALL",
    initiator: str = INITIATOR_1,
    initiator2: str = INITIATOR_2,
    dataloss: bool = True,
    suite_timeout_s: float = 180.0,
    test_timeout_s: float = 60.0,
    deadline_s: float = 1200.0,
    suites: list[str] | None = None,
) -> ConformanceRun:
    start = time.monotonic()
    end = start + deadline_s
    run = ConformanceRun(url=url, family=family)
    plan = list_tests(family)
    if suites is not None:
        plan = {s: plan[s] for s in suites}
    base = ["iscsi-test-cu"]
    if shutil.which("stdbuf"):
        base = ["stdbuf", "-o0", "-e0", *base]  # keep output up to a hang
    base += ["--initiator-name", initiator, "--initiator-name-2", initiator2]
    if dataloss:
        base.append("--dataloss")
    log: list[str] = []
    barren = 0  # consecutive invocations that produced no result at all

    def invoke(selector: str, timeout: float) -> tuple[dict[str, Outcome], int | None, str]:
        argv = [*base, "--test", selector, url]
        run.commands.append(" ".join(argv))
        text, rc = _run_bounded(argv, min(timeout, end - time.monotonic()))
        log.append(f"$ {' '.join(argv)}  # rc={rc}\n{text}")
        return {o.name: o for o in parse_output(text)}, rc, text

    for suite, tests in plan.items():
        names = [f"{suite}.{t}" for t in tests]
        if time.monotonic() >= end or barren >= GIVE_UP_AFTER:
            why = (f"not run: {deadline_s:.0f} s deadline hit" if barren < GIVE_UP_AFTER else
                   f"not run: the last {barren} iscsi-test-cu runs gave no result")
            for n in names:
                run.outcomes[n] = Outcome(n, FAILED, why)
            continue
        got, rc, text = invoke(f"{family}.{suite}", suite_timeout_s)
        barren = 0 if got else barren + 1
        pending = [n for n in names if n not in got]
        for n in names:
            if n in got:
                run.outcomes[n] = got[n]
        if not pending:
            continue
        why = (
            f"hung: suite timed out after {suite_timeout_s:.0f} s"
            if rc is None
            else f"no result: iscsi-test-cu exit {rc}: {_last_lines(text)}"
        )
        # The first missing test is where it stopped; retry the rest one by one.
        run.outcomes[pending[0]] = Outcome(pending[0], FAILED, why)
        for n in pending[1:]:
            if time.monotonic() >= end or barren >= GIVE_UP_AFTER:
                run.outcomes[n] = Outcome(n, FAILED, "not run: deadline hit or target unresponsive")
                continue
            one, rc1, text1 = invoke(f"{family}.{n}", test_timeout_s)
            barren = 0 if one else barren + 1
            if n in one:
                run.outcomes[n] = one[n]
            elif rc1 is None:
                run.outcomes[n] = Outcome(
                    n, FAILED, f"hung: timed out after {test_timeout_s:.0f} s"
                )
            else:
                run.outcomes[n] = Outcome(
                    n, FAILED, f"no result: iscsi-test-cu exit {rc1}: {_last_lines(text1)}"
                )
    # Keep the run order of --list.
    run.outcomes = {k: run.outcomes[k] for k in sorted(run.outcomes, key=_order(plan, family))}
    run.elapsed_s = time.monotonic() - start
    run.log = "\n".join(log)
    return run


def _order(plan: dict[str, list[str]], family: str):  # type: ignore[no-untyped-def]
    index = {f"{s}.{t}": i for i, (s, t) in enumerate((s, t) for s in plan for t in plan[s])}
    return lambda name: index.get(name, len(index))


def _last_lines(text: str, n: int = 3) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return " / ".join(lines[-n:]) if lines else "(no output)"
