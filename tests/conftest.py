"""Fixtures shared by the host and VM test tiers.

Tests use the real cgroup2 hierarchy of the machine they run on. Each test gets a fresh
cgroup directory of its own under ``<cgroup2 mount>/jobworker-tests-<pid>``, one parent per
test session (so that two sessions at once never remove each other's), which this file
creates and enables controllers in, as a delegating supervisor (systemd, a container runtime)
would.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from jobworker.worker import Worker, WorkerConfig
from jobworker.worker.cgroup import CONTROLLERS, find_cgroup2_mount

IN_VM = os.environ.get("JOBWORKER_VM") == "1"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    vm_dir = Path(__file__).parent / "vm"
    for item in items:
        if vm_dir in item.path.parents:
            item.add_marker(pytest.mark.vm)


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="session")
def tests_cgroup() -> Iterator[Path]:
    """The parent of every test's cgroup, with every controller it is offered enabled."""
    if os.geteuid() != 0:
        pytest.skip("needs root to create cgroups")
    parent = find_cgroup2_mount() / f"jobworker-tests-{os.getpid()}"
    parent.mkdir(exist_ok=True)
    offered = (parent / "cgroup.controllers").read_text().split()
    for name in CONTROLLERS:
        if name in offered:
            (parent / "cgroup.subtree_control").write_text(f"+{name}")
    yield parent
    with contextlib.suppress(OSError):  # a test left a cgroup: that test has failed already
        parent.rmdir()


@pytest.fixture
def cgroup_root(tests_cgroup: Path) -> Iterator[Path]:
    """A cgroup for one test's worker; the test fails if the worker leaves it behind."""
    root = tests_cgroup / f"t-{uuid.uuid4().hex[:12]}"
    yield root
    assert not root.exists(), f"the worker left its cgroup {root} behind"


def available_controllers(tests_cgroup: Path) -> set[str]:
    return set((tests_cgroup / "cgroup.subtree_control").read_text().split())


@pytest.fixture(autouse=True)
def _needs_controller(request: pytest.FixtureRequest) -> None:
    marker = request.node.get_closest_marker("needs_controller")
    if marker is None:
        return
    parent = request.getfixturevalue("tests_cgroup")
    missing = set(marker.args) - available_controllers(parent)
    if missing:
        message = f"cgroup v2 controller(s) {', '.join(sorted(missing))} not available here"
        if IN_VM:
            pytest.fail(message + " (the VM tier must have every controller)")
        pytest.skip(message + "; the VM tier (nox -s vm) runs this test")


@pytest.fixture
def readable_dir() -> Iterator[Path]:
    """A directory on the host that jobs may read: a job's /tmp is its own, and the test's
    tmp_path is root's alone."""
    path = Path(tempfile.mkdtemp(prefix="jobworker-tests-", dir="/var/lib"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path)


@pytest.fixture
def config(tmp_path: Path, cgroup_root: Path) -> WorkerConfig:
    return WorkerConfig(data_dir=tmp_path / "data", cgroup_root=cgroup_root, stop_grace=2.0)


@pytest.fixture
async def worker(config: WorkerConfig) -> AsyncIterator[Worker]:
    async with Worker(config) as running:
        yield running
