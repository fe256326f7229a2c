"""Fixtures of the end-to-end suite; the machinery lives in e2e_harness.py."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from e2e_harness import (
    EXAMPLES,
    Cluster,
    GateProject,
    OwnerKey,
    gate_program,
    make_key,
    pack,
    write_project,
)


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    setattr(item, f"rep_{report.when}", report)


@pytest.fixture
def cluster(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Cluster]:
    c = Cluster(tmp_path)
    try:
        yield c
    finally:
        failed = any(
            (rep := getattr(request.node, f"rep_{when}", None)) is not None and rep.failed
            for when in ("setup", "call")
        )
        if failed:
            print(c.report())
        c.sweep()


# ---- keys and bundles ------------------------------------------------------------------------


@pytest.fixture(scope="session")
def keys_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("keys")


@pytest.fixture(scope="session")
def owner_key(keys_dir: Path) -> OwnerKey:
    return make_key(keys_dir / "owner.key")


@pytest.fixture(scope="session")
def other_key(keys_dir: Path) -> OwnerKey:
    """A second owner key: a node that pins it does not trust bundles of ``owner_key``."""
    return make_key(keys_dir / "other.key")


@pytest.fixture(scope="session")
def primes_bundle(keys_dir: Path, owner_key: OwnerKey) -> Path:
    return pack(EXAMPLES / "primes", owner_key, keys_dir / "primes-1.issc")


@pytest.fixture(scope="session")
def mandelbrot_bundle(keys_dir: Path, owner_key: OwnerKey) -> Path:
    return pack(EXAMPLES / "mandelbrot", owner_key, keys_dir / "mandelbrot-1.issc")


@pytest.fixture
def gate_project(
    request: pytest.FixtureRequest, tmp_path: Path, owner_key: OwnerKey
) -> GateProject:
    """The gate project (see ``gate_program``), packed and signed by ``owner_key``.

    Process mode; parametrize it indirectly with "persistent" for the persistent mode.
    """
    mode = getattr(request, "param", "process")
    marks = tmp_path / "marks"
    marks.mkdir()
    directory = write_project(tmp_path / "gate-src", "gate", gate_program(mode), mode=mode)
    return GateProject("gate", pack(directory, owner_key, tmp_path / "gate-1.issc"), marks)
