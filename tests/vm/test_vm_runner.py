"""The VM that scripts/vm-run boots gives a real cgroup v2 kernel: these tests prove the runner.

They run only inside the VM (`nox -s vm`, which sets JOBWORKER_VM=1) and skip elsewhere. Inside,
a missing controller or mount is a failure, never a skip.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(
    os.environ.get("JOBWORKER_VM") != "1",
    reason="VM tier: runs only inside scripts/vm-run (nox -s vm)",
)

CGROUP_ROOT = Path("/sys/fs/cgroup")
NEEDED_CONTROLLERS = {"cpu", "io", "memory", "pids"}


def _cgroup2_mounts() -> list[str]:
    with open("/proc/self/mounts") as mounts:
        return [line.split()[1] for line in mounts if line.split()[2] == "cgroup2"]


@pytest.fixture
def child_cgroup() -> Iterator[Path]:
    """A fresh cgroup directly under the root, removed after the test."""
    path = CGROUP_ROOT / f"vm-runner-test-{uuid.uuid4().hex[:8]}"
    path.mkdir()
    yield path
    path.rmdir()


def _run_in_cgroup(cgroup: Path, code: str) -> subprocess.CompletedProcess[bytes]:
    """Run `python -c code` inside cgroup; the shell joins it before exec, so nothing escapes."""
    shim = 'echo $$ > "$0/cgroup.procs" && exec "$1" -c "$2"'
    return subprocess.run(
        ["sh", "-c", shim, str(cgroup), sys.executable, code],
        capture_output=True,
        timeout=60,
        check=False,
    )


def _events(path: Path) -> dict[str, int]:
    pairs = (line.split() for line in path.read_text().splitlines())
    return {key: int(value) for key, value in pairs}


def test_pure_cgroup2_hierarchy_is_mounted() -> None:
    assert _cgroup2_mounts() == [str(CGROUP_ROOT)]
    with open("/proc/self/mounts") as mounts:
        assert not [line for line in mounts if line.split()[2] == "cgroup"], "cgroup v1 mounted"


def test_controllers_are_available_and_enabled_for_children() -> None:
    available = set((CGROUP_ROOT / "cgroup.controllers").read_text().split())
    enabled = set((CGROUP_ROOT / "cgroup.subtree_control").read_text().split())
    assert available >= NEEDED_CONTROLLERS
    assert enabled >= NEEDED_CONTROLLERS


def test_memory_max_kills_an_allocation_past_the_limit(child_cgroup: Path) -> None:
    (child_cgroup / "memory.max").write_text("50M")
    (child_cgroup / "memory.swap.max").write_text("0")

    result = _run_in_cgroup(child_cgroup, "data = b'x' * (200 * 1024 * 1024)")

    assert result.returncode == -signal.SIGKILL, result.stderr.decode(errors="replace")
    assert _events(child_cgroup / "memory.events")["oom_kill"] >= 1


def test_memory_max_lets_an_allocation_under_the_limit_finish(child_cgroup: Path) -> None:
    (child_cgroup / "memory.max").write_text("50M")

    result = _run_in_cgroup(child_cgroup, "data = b'x' * (10 * 1024 * 1024)")

    assert result.returncode == 0, result.stderr.decode(errors="replace")
    assert _events(child_cgroup / "memory.events")["oom_kill"] == 0


def test_loopback_is_up() -> None:
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port), timeout=5) as client:
            peer, _ = server.accept()
            with peer:
                client.sendall(b"ping")
                assert peer.recv(4) == b"ping"


def test_scratch_disk_is_mounted_and_named() -> None:
    mount = os.environ.get("JOBWORKER_VM_DISK")
    device = os.environ.get("JOBWORKER_VM_DISK_DEV")
    if mount is None or device is None:
        pytest.skip("no scratch disk: run scripts/vm-run with --disk")
    assert Path(mount) == Path("/mnt/vmdisk")
    assert os.path.ismount(mount)
    st_dev = os.stat(mount).st_dev
    assert f"{os.major(st_dev)}:{os.minor(st_dev)}" == device
    probe = Path(mount) / "probe"
    probe.write_bytes(b"x" * 4096)
    assert probe.stat().st_size == 4096
    probe.unlink()
