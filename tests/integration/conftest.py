"""Fixtures for the real-client integration suite.

The suite runs against vsand by default. ``VSAND_IT_TARGET=tgt`` runs the same tests against
tgt (the reference userspace target) to validate the rig itself.

- ``vsand_factory`` / ``tgt_factory``: start targets in ``tmp_path`` on free ports; teardown
  stops them and fails the test when vsand does not exit 0 within 10 s of SIGTERM.
- ``target``: one started target of the selected kind (function scope); ``session_target``:
  one shared by all tests of the session that only read and write data.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from rig import DaemonError, Target, TgtTarget, VsandTarget

TargetFactory = Callable[..., Target]


def target_kind() -> str:
    kind = os.environ.get("VSAND_IT_TARGET", "vsand")
    if kind not in ("vsand", "tgt"):
        raise pytest.UsageError(f"VSAND_IT_TARGET must be vsand or tgt, not {kind!r}")
    return kind


def _factory(kind: str, base: Path) -> tuple[TargetFactory, list[Target]]:
    started: list[Target] = []

    def make(**kwargs: Any) -> Target:
        workdir = base / f"{kind}{len(started)}"
        cls = VsandTarget if kind == "vsand" else TgtTarget
        t: Target = cls(workdir, **kwargs)
        started.append(t)
        return t.start()

    return make, started


def _stop_all(started: list[Target]) -> None:
    """Stop every target; report all failures (exit code, stderr) at once."""
    errors: list[str] = []
    for t in started:
        try:
            t.stop()
        except DaemonError as e:
            errors.append(str(e))
    if errors:
        pytest.fail("\n\n".join(errors), pytrace=False)


@pytest.fixture
def vsand_factory(tmp_path: Path) -> Iterator[TargetFactory]:
    make, started = _factory("vsand", tmp_path)
    yield make
    _stop_all(started)


@pytest.fixture
def tgt_factory(tmp_path: Path) -> Iterator[TargetFactory]:
    make, started = _factory("tgt", tmp_path)
    yield make
    _stop_all(started)


@pytest.fixture
def target_factory(tmp_path: Path) -> Iterator[TargetFactory]:
    make, started = _factory(target_kind(), tmp_path)
    yield make
    _stop_all(started)


@pytest.fixture
def vsand(vsand_factory: TargetFactory) -> VsandTarget:
    t = vsand_factory()
    assert isinstance(t, VsandTarget)
    return t


@pytest.fixture
def tgt(tgt_factory: TargetFactory) -> TgtTarget:
    t = tgt_factory()
    assert isinstance(t, TgtTarget)
    return t


@pytest.fixture
def target(target_factory: TargetFactory) -> Target:
    return target_factory()


@pytest.fixture(scope="session")
def session_target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    make, started = _factory(target_kind(), tmp_path_factory.mktemp("session-target"))
    yield make()
    _stop_all(started)


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: Any) -> None:
    """Reports a test module left in ``config.vsand_reports`` (title, text): the fault
    scenarios run and their seeds, shown whether the tests passed or not."""
    for title, text in getattr(config, "vsand_reports", []):
        terminalreporter.write_sep("-", title)
        terminalreporter.write_line(text)

