"""What a job cannot do: each test has a job try it, on this host's kernel (and the VM's).

A job runs as an unprivileged uid of its own, in its own PID, mount, IPC and cgroup
namespaces (and network namespace when asked), with a private /tmp and the worker's data
directory out of sight. See docs/security.md for the threat model these tests prove.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import stat
import tempfile
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import anyio
import pytest
from helpers import (
    JOB_PYTHON,
    job_cgroups,
    job_processes,
    log_files,
    pid_exists,
    read_all,
    work_dirs,
)

from jobworker.errors import InvalidCommand, PermissionDenied, Unavailable
from jobworker.worker import JobSpec, JobState, JobStatus, Network, Worker, WorkerConfig
from jobworker.worker.config import DEFAULT_JOB_UIDS

pytestmark = [pytest.mark.anyio, pytest.mark.isolation]

SECRET = "-----BEGIN PRIVATE KEY----- not for jobs"


async def finish(worker: Worker, script: str, **fields: object) -> tuple[JobStatus, str]:
    """Run ``sh -c script`` to its end; its final status and its output."""
    status = await worker.start(JobSpec("sh", ("-c", script), owner="mallory", **fields))  # type: ignore[arg-type]
    output = await read_all(worker, status.id)
    return worker.status(status.id), output.decode(errors="replace")


async def wait_for_line(worker: Worker, job_id: str) -> str:
    buf = b""
    async with worker.output(job_id) as stream:
        async for chunk in stream:
            buf += chunk.data
            if b"\n" in buf:
                break
    return buf.decode().splitlines()[0]


def proc_status(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {key: value.strip() for key, _, value in (line.partition(":") for line in lines)}


@pytest.fixture
def secret_data(config: WorkerConfig) -> Path:
    """The worker's data directory holding a private key, as a server's PKI would."""
    pki = config.data_dir / "pki"
    pki.mkdir(parents=True, mode=0o700)
    key = pki / "client-ca-key.pem"
    key.write_text(SECRET)
    key.chmod(0o600)
    return config.data_dir


# Identity.


async def test_a_job_runs_as_an_unprivileged_uid_with_nothing_extra(worker: Worker) -> None:
    status = await worker.start(JobSpec("sleep", ("60",)))
    (program,) = job_processes(worker, status.id).values()
    seen = proc_status(program)
    first, last = DEFAULT_JOB_UIDS
    assert first <= status.uid <= last and status.user == ""
    assert seen["Uid"].split() == [str(status.uid)] * 4, "real, effective, saved, fs uid"
    assert seen["Gid"].split() == [str(status.uid)] * 4
    assert seen["Groups"] == "", "no supplementary groups"
    assert int(seen["CapEff"], 16) == int(seen["CapPrm"], 16) == int(seen["CapAmb"], 16) == 0
    assert seen["NoNewPrivs"] == "1"
    assert seen["Umask"] == "0077"
    await worker.stop(status.id)


async def test_two_running_jobs_never_share_a_uid(worker: Worker) -> None:
    jobs = [await worker.start(JobSpec("sleep", ("60",))) for _ in range(5)]
    assert len({job.uid for job in jobs}) == 5
    for job in jobs:
        await worker.stop(job.id)


async def test_when_every_uid_is_taken_start_is_refused_and_changes_nothing(
    config: WorkerConfig,
) -> None:
    async with Worker(replace(config, job_uids=(70001, 70002))) as worker:
        first = await worker.start(JobSpec("sleep", ("60",)))
        second = await worker.start(JobSpec("sleep", ("60",)))
        with pytest.raises(Unavailable, match="job uids is in use"):
            await worker.start(JobSpec("true"))
        assert len(job_cgroups(worker)) == 2, "no cgroup for the refused job"
        assert len(log_files(worker)) == 2, "no log for the refused job"
        await worker.stop(first.id)
        third = await worker.start(JobSpec("sleep", ("60",)))
        assert third.uid == first.uid, "an ended job's uid serves the next job"
        for job in (second, third):
            await worker.stop(job.id)


async def test_an_ended_jobs_directory_is_handed_back_to_root(worker: Worker) -> None:
    status, output = await finish(worker, 'echo secret > notes; pwd; echo "$HOME"')
    work_dir = Path(output.split()[0])
    assert output.split() == [str(work_dir)] * 2, "the default cwd is the job's own HOME"
    assert work_dir == worker.config.data_dir / "work" / status.id
    info = work_dir.stat()
    assert (info.st_uid, info.st_gid, stat.S_IMODE(info.st_mode)) == (0, 0, 0o700)
    assert (work_dir / "notes").read_text() == "secret\n"


async def test_a_job_cannot_name_an_account_the_server_does_not_allow(worker: Worker) -> None:
    with pytest.raises(PermissionDenied, match="does not run jobs as 'root'"):
        await worker.start(JobSpec("id", user="root"))
    assert job_cgroups(worker) == [] and log_files(worker) == []


async def test_an_allowed_account_runs_the_job(config: WorkerConfig) -> None:
    async with Worker(replace(config, allowed_users=frozenset({"root"}))) as worker:
        status, output = await finish(worker, "id -u", user="root")
    assert (status.user, status.uid, output) == ("root", 0, "0\n")


async def test_run_as_gives_every_job_that_account(config: WorkerConfig) -> None:
    async with Worker(replace(config, run_as="nobody")) as worker:
        status, output = await finish(worker, "id -un")
    assert (status.user, status.uid, output) == ("nobody", 65534, "nobody\n")


# The data directory, other jobs' files, /tmp.


async def test_a_job_cannot_read_the_data_directory(worker: Worker, secret_data: Path) -> None:
    other = await worker.start(JobSpec("sh", ("-c", "echo other job's output; sleep 60")))
    script = (
        f"cat {secret_data}/pki/client-ca-key.pem; ls -a {secret_data}; "
        f"ls {secret_data}/logs; cat {secret_data}/logs/{other.id}.log; "
        f"ls {secret_data}/work; echo > {secret_data}/planted; echo done"
    )
    status, output = await finish(worker, script)
    assert SECRET not in output and "other job's output" not in output
    assert "No such file or directory" in output, "the data directory is out of sight"
    # It sees its own directory there, and nothing else of the data directory.
    listing = output.split("\n")[1:4]
    assert listing == [".", "..", "work"], output
    assert not (secret_data / "planted").exists()
    assert status.exit_code == 0 and output.endswith("done\n")
    await worker.stop(other.id)


async def test_a_job_cannot_reach_another_jobs_directory_or_tmp(worker: Worker) -> None:
    first = await worker.start(
        JobSpec("sh", ("-c", "echo first-job > /tmp/left; echo first-job > notes; pwd; sleep 60"))
    )
    first_dir = await wait_for_line(worker, first.id)
    script = f"cat /tmp/left; cat {first_dir}/notes; ls -a /tmp; echo done"
    _, output = await finish(worker, script)
    assert "first-job" not in output
    assert "left" not in output.splitlines()[2:], "its /tmp is its own"
    assert output.endswith("done\n")
    await worker.stop(first.id)


async def test_a_job_does_not_see_the_hosts_tmp(worker: Worker) -> None:
    probe = Path("/tmp") / f"jobworker-host-{os.getpid()}"
    probe.write_text("host")
    written = Path(f"{probe}-from-job")
    try:
        _, output = await finish(worker, f"cat {probe} 2>&1; echo > {written} && echo wrote")
    finally:
        probe.unlink()
    assert "No such file" in output and "wrote" in output
    assert not written.exists(), "what it wrote to its /tmp stayed there"


# Cgroups.


async def test_a_job_cannot_write_any_cgroup_file_or_move_processes(worker: Worker) -> None:
    script = (
        "grep ^0:: /proc/self/cgroup; "
        "for f in cgroup.procs cgroup.kill cgroup.subtree_control memory.max pids.max; do "
        "  (echo 1 > /sys/fs/cgroup/$f) 2>/dev/null && echo wrote $f; done; "
        "mkdir /sys/fs/cgroup/escape 2>/dev/null && echo made a cgroup; "
        "mount -t cgroup2 none /tmp 2>/dev/null && echo mounted; "
        "ls /sys/fs/cgroup | grep -c -e '^[0-9a-f]\\{8\\}-' ; echo done"
    )
    status = await worker.start(JobSpec("sh", ("-c", script)))
    job_cgroup = worker.cgroup_root / "jobs" / status.id
    output = (await read_all(worker, status.id)).decode()
    lines = output.splitlines()
    assert lines[0] == "0::/", "its own cgroup is the root of what it sees"
    assert lines[1:] == ["0", "done"], f"no write succeeded and no job id was seen: {output}"
    assert not job_cgroup.exists()
    assert worker.status(status.id).state is JobState.COMPLETED


async def test_a_job_stays_in_its_cgroup(worker: Worker) -> None:
    status = await worker.start(JobSpec("sh", ("-c", "sleep 60 & echo $!; wait")))
    ns_pid = int(await wait_for_line(worker, status.id))
    host_pid = job_processes(worker, status.id)[ns_pid]
    cgroup = Path(f"/proc/{host_pid}/cgroup").read_text()
    assert cgroup.rstrip().endswith(f"/jobs/{status.id}")
    await worker.stop(status.id)
    assert not pid_exists(host_pid)


# Processes.


async def test_a_job_sees_only_its_own_processes(worker: Worker) -> None:
    other = await worker.start(JobSpec("sleep", ("60",)))
    _, output = await finish(worker, "for p in /proc/[0-9]*; do cat $p/comm; done")
    # The pids were listed before the first cat started: its init and the shell.
    assert sorted(output.split()) == ["jobworker-init", "sh"], output
    await worker.stop(other.id)


async def test_a_job_cannot_signal_or_trace_the_server_or_another_job(worker: Worker) -> None:
    other = await worker.start(JobSpec("sleep", ("60",)))
    (victim,) = job_processes(worker, other.id).values()
    targets = [os.getpid(), victim, 1]
    script = "\n".join(
        [
            "import ctypes, os, sys",
            "libc = ctypes.CDLL(None, use_errno=True)",
            f"for pid in {targets}:",
            "    try:",
            "        os.kill(pid, 9); print(pid, 'killed')",
            "    except OSError as e:",
            "        print(pid, 'kill', e.errno)",
            "    r = libc.ptrace(16, pid, 0, 0)",  # PTRACE_ATTACH
            "    print(pid, 'ptrace', 'attached' if r == 0 else ctypes.get_errno())",
        ]
    )
    status = await worker.start(JobSpec(JOB_PYTHON, ("-c", script)))
    output = (await read_all(worker, status.id)).decode()
    assert "killed" not in output and "attached" not in output, output
    assert worker.status(other.id).state is JobState.RUNNING
    assert pid_exists(victim)
    await worker.stop(other.id)


async def test_stop_ends_every_process_with_the_programs_own_status(worker: Worker) -> None:
    status = await worker.start(JobSpec("sh", ("-c", "sleep 60 & sleep 60 & echo up; wait")))
    await wait_for_line(worker, status.id)
    processes = job_processes(worker, status.id).values()
    assert len(processes) == 3
    with anyio.fail_after(5):  # SIGTERM works: the grace (2 s) is not waited out
        final = await worker.stop(status.id)
    assert (final.state, final.signal, final.exit_code) == (JobState.STOPPED, signal.SIGTERM, None)
    assert not any(pid_exists(pid) for pid in processes)


@pytest.mark.parametrize(
    ("script", "exit_code", "signum"),
    [
        ("exit 143", 143, None),
        ("exit 0", 0, None),
        ("kill -SEGV $$", None, signal.SIGSEGV),
        ("kill -TERM $$", None, signal.SIGTERM),
    ],
)
async def test_the_exit_status_is_the_programs_own(
    worker: Worker, script: str, exit_code: int | None, signum: int | None
) -> None:
    status, _ = await finish(worker, script)
    assert (status.exit_code, status.signal) == (exit_code, signum)


# The program's first instruction.


async def test_the_program_starts_already_contained(worker: Worker) -> None:
    """The program itself (no shell first) reads its own state: nothing before it ran."""
    status = await worker.start(JobSpec("cat", ("/proc/self/status", "/proc/self/cgroup")))
    # (On a host with cgroup v1 hierarchies too, /proc/self/cgroup lists them first.)
    output = (await read_all(worker, status.id)).decode()
    seen = dict(line.partition(":")[::2] for line in output.splitlines() if ":" in line)
    assert seen["Uid"].split() == [str(status.uid)] * 4
    assert seen["NoNewPrivs"].strip() == "1"
    assert seen["NSpid"].split() == ["2"], "PID 2 of a namespace of its own"
    assert "0::/" in output.splitlines()


async def test_namespaces_are_the_jobs_own(worker: Worker) -> None:
    names = ("pid", "mnt", "ipc", "cgroup", "net")
    script = "; ".join(f"readlink /proc/self/ns/{name}" for name in names)
    _, host_net = await finish(worker, script)
    _, no_net = await finish(worker, script, network=Network.NONE)
    ours = {name: os.readlink(f"/proc/self/ns/{name}") for name in names}
    for output, own_net in ((host_net, False), (no_net, True)):
        theirs = dict(zip(names, output.split(), strict=True))
        for name in ("pid", "mnt", "ipc", "cgroup"):
            assert theirs[name] != ours[name], name
        assert (theirs["net"] != ours["net"]) is own_net


# Network.


async def test_a_job_without_network_has_only_loopback(worker: Worker) -> None:
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        script = "\n".join(
            [
                "import os, socket",
                "print(sorted(os.listdir('/sys/class/net')))",
                "s = socket.create_server(('127.0.0.1', 0))",
                "socket.create_connection(s.getsockname(), 2).close(); print('loopback up')",
                "try:",
                f"    socket.create_connection(('127.0.0.1', {port}), 2); print('reached host')",
                "except OSError as e:",
                "    print('host unreachable', e.errno)",
            ]
        )
        status = await worker.start(JobSpec(JOB_PYTHON, ("-c", script), network=Network.NONE))
        output = (await read_all(worker, status.id)).decode()
        assert output.splitlines()[:2] == ["['lo']", "loopback up"], output
        assert "host unreachable" in output and "reached host" not in output
        assert worker.status(status.id).network is Network.NONE


async def test_the_server_default_network_applies(config: WorkerConfig) -> None:
    ours = os.readlink("/proc/self/ns/net")
    async with Worker(replace(config, default_network=Network.NONE)) as worker:
        status, output = await finish(worker, "readlink /proc/self/ns/net")
        assert status.network is Network.NONE and output.strip() != ours
        status, output = await finish(worker, "readlink /proc/self/ns/net", network=Network.HOST)
        assert status.network is Network.HOST and output.strip() == ours


# Environment and working directory.


async def test_env_and_cwd_reach_the_program_and_its_status(
    worker: Worker, readable_dir: Path
) -> None:
    env = {"GREETING": "hello world", "PATH": "/usr/bin:/bin", "JOBWORKER_JOB_ID": "forged"}
    status, output = await finish(
        worker, 'echo "$GREETING|$PATH|$JOBWORKER_JOB_ID"; pwd', env=env, cwd=str(readable_dir)
    )
    assert output.splitlines() == [f"hello world|/usr/bin:/bin|{status.id}", str(readable_dir)]
    assert (dict(status.env), status.cwd) == (env, str(readable_dir))


async def test_the_environment_is_in_no_command_line_on_the_host(worker: Worker) -> None:
    """/proc/PID/cmdline is every host user's to read; a job's environment (secrets) is not."""
    secret = "hunter2-" + os.urandom(8).hex()
    status = await worker.start(
        JobSpec("sh", ("-c", 'echo "$TOKEN"; exec sleep 60'), env={"TOKEN": secret})
    )
    assert (await wait_for_line(worker, status.id)) == secret, "the job has it"
    cgroup = worker.cgroup_root / "jobs" / status.id
    processes = [status.pid, *map(int, (cgroup / "cgroup.procs").read_text().split())]
    assert len(processes) == 3, "the monitor, the init and the program"
    for pid in processes:
        assert secret.encode() not in Path(f"/proc/{pid}/cmdline").read_bytes(), pid
    await worker.stop(status.id)


@pytest.fixture
def root_only_dir() -> Iterator[Path]:
    """A directory only root may enter, holding a program anyone could run."""
    path = Path(tempfile.mkdtemp(prefix="jobworker-tests-", dir="/var/lib"))
    program = path / "program"
    program.write_text("#!/bin/sh\necho ran\n")
    program.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path)


@pytest.mark.parametrize("missing", [True, False])
async def test_a_cwd_the_job_cannot_enter_is_refused_and_changes_nothing(
    worker: Worker, root_only_dir: Path, missing: bool
) -> None:
    cwd = "/no/such/dir" if missing else str(root_only_dir)
    why = "No such file" if missing else "Permission denied"
    with pytest.raises(InvalidCommand, match=f"cannot be entered by the job's user: {why}"):
        await worker.start(JobSpec("true", cwd=cwd))
    assert job_cgroups(worker) == [], "no cgroup left"
    assert log_files(worker) == [], "no log left"
    assert work_dirs(worker) == [], "no directory left"
    assert worker.list() == [], "no job recorded"


async def test_start_tells_nothing_of_files_only_root_may_see(
    worker: Worker, root_only_dir: Path
) -> None:
    """A program named in a directory the job's user cannot enter is "not found" whether
    or not it exists: StartJob is no way to probe root's files."""
    messages = []
    for name in ("program", "no-such-program"):
        with pytest.raises(InvalidCommand) as refused:
            await worker.start(JobSpec(str(root_only_dir / name)))
        messages.append(str(refused.value).replace(str(root_only_dir / name), "PATH"))
    assert messages[0] == messages[1], "the same answer, whether it exists or not"
    assert "cannot be run by the job's user: Permission denied" in messages[0]
    assert job_cgroups(worker) == [] and log_files(worker) == []


async def test_a_program_the_job_may_not_run_is_refused(worker: Worker, readable_dir: Path) -> None:
    program = readable_dir / "not-executable"
    program.write_text("#!/bin/sh\necho ran\n")
    program.chmod(0o644)
    with pytest.raises(InvalidCommand, match="cannot be run by the job's user: Permission"):
        await worker.start(JobSpec(str(program)))
    assert job_cgroups(worker) == [] and log_files(worker) == []


def test_in_a_chroot_the_helper_says_why_it_cannot_isolate(tmp_path: Path) -> None:
    """A server run in a chroot whose root is no mount point: the helper cannot make the jobs'
    mounts private, and the server's start-up error names that cause, not a missing privilege."""
    import subprocess

    from jobworker.worker.process import HELPER, _root_mounted, check_isolation

    root = tmp_path / "chroot"
    root.mkdir()
    shutil.copy(HELPER, root / "jobworker-init")  # static: it needs nothing else in there
    in_chroot = ["unshare", "--mount", "--propagation", "private", "chroot", str(root)]
    ran = subprocess.run(
        [*in_chroot, "/jobworker-init", "check", "-"],
        capture_output=True,
        check=False,
    )
    assert ran.returncode != 0
    assert b"mount-private: Invalid argument" in ran.stderr
    assert _root_mounted(), "outside the chroot, / is a mount point"
    anyio.run(check_isolation, Network.HOST)  # and there the same check passes
