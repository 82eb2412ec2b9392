"""Command line of scripts/vm-run."""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

from . import assets, job, machine

DESCRIPTION = """\
Run COMMAND as root inside a small qemu VM whose kernel has a pure cgroup v2 hierarchy at
/sys/fs/cgroup with the cpu, io, memory and pids controllers enabled for child cgroups.

The guest sees the host's root filesystem read-only. /tmp, /var, /root, $HOME and the current
working directory are writable there through tmpfs overlays: writes inside the VM never reach
the host. COMMAND runs in the current working directory with stdin from /dev/null; its stdout
and stderr come through to vm-run's, and vm-run exits with COMMAND's exit code.

Environment inside: PATH (the caller's, followed by the standard directories), HOME, LANG,
LC_ALL, LC_CTYPE, TERM, TZ, PYENV_ROOT, PYENV_VERSION and CI when set, the --env variables, and
JOBWORKER_VM=1. With --disk also JOBWORKER_VM_DISK=/mnt/vmdisk (an empty ext2 file system on a
fresh 256 MiB virtio disk) and JOBWORKER_VM_DISK_DEV=MAJ:MIN (its block device, for io.max).

Network: loopback is always up. With --forward the guest also has eth0 (10.0.2.15) and
reaches nothing outside; only the forwarded ports connect in. The kernel console goes to a log
file in a temporary run directory; on failure vm-run prints its path and keeps it.
"""

EPILOG = """\
exit codes:
  N    COMMAND's exit code (128+S when it was killed by signal S inside the VM)
  124  COMMAND did not finish within --timeout
  125  vm-run or the VM failed (setup, qemu, boot timeout); the message names the console log
  128+S  vm-run itself was stopped by signal S (the VM is killed first)

first run:
  Installs qemu-system-x86 with apt when missing (as root), downloads the Debian generic
  kernel package (the linux-image-*-amd64 that linux-image-amd64 depends on) and
  busybox-static with `apt-get download`, and builds a kernel + initramfs under
  $XDG_CACHE_HOME/jobworker-vm (default ~/.cache/jobworker-vm). Nothing is installed into the
  host's /boot. Later runs reuse the cache; delete it to pick up a newer kernel.

examples:
  scripts/vm-run -- cat /sys/fs/cgroup/cgroup.controllers
  scripts/vm-run --disk -- sh -c 'echo "$JOBWORKER_VM_DISK_DEV"'
  scripts/vm-run --forward 50051:50051 -- python3 -m http.server 50051
  scripts/vm-run --env PYTEST_ADDOPTS -- .nox/vm/bin/python -m pytest tests/vm -x
"""


class Interrupted(BaseException):
    """vm-run received a terminating signal."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _forward(spec: str) -> tuple[int, int]:
    host, sep, guest = spec.partition(":")
    try:
        ports = (int(host), int(guest))
    except ValueError:
        ports = (0, 0)
    if not sep or not all(0 < port < 65536 for port in ports):
        raise argparse.ArgumentTypeError(f"expected HOSTPORT:GUESTPORT, got {spec!r}")
    return ports


def _positive(text: str) -> float:
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError("must not be negative")
    return value


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vm-run",
        usage="%(prog)s [options] -- COMMAND [ARGS]...",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--disk", action="store_true", help="attach a fresh 256 MiB disk at /mnt/vmdisk")
    p.add_argument(
        "--forward",
        metavar="HOSTPORT:GUESTPORT",
        type=_forward,
        action="append",
        default=[],
        help="forward 127.0.0.1:HOSTPORT on the host to GUESTPORT in the guest (repeatable)",
    )
    p.add_argument(
        "--env",
        metavar="NAME[=VALUE]",
        action="append",
        default=[],
        help="pass the caller's NAME (or set NAME=VALUE) inside the guest (repeatable)",
    )
    p.add_argument(
        "--writable",
        metavar="DIR",
        action="append",
        default=[],
        help="also overlay DIR with a writable layer inside the guest (repeatable)",
    )
    p.add_argument(
        "--timeout",
        metavar="SECONDS",
        type=_positive,
        default=1800.0,
        help="stop the VM when COMMAND runs longer than this (default 1800; 0: no limit)",
    )
    p.add_argument(
        "--boot-timeout",
        metavar="SECONDS",
        type=_positive,
        default=90.0,
        help="give up when the command has not started after this long (default 90)",
    )
    p.add_argument("--memory", default="2G", help="guest RAM, qemu syntax (default 2G)")
    p.add_argument("--cpus", type=int, default=2, help="guest CPUs (default 2)")
    p.add_argument(
        "--kernel",
        metavar="PATH",
        type=Path,
        help="boot this kernel image instead of the cached one (debugging; the initramfs "
        "modules are those of the cached kernel)",
    )
    p.add_argument(
        "-v", "--verbose", action="store_true", help="report boot and run times on stderr"
    )
    p.add_argument("command", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    return p


def _parse(argv: Sequence[str]) -> argparse.Namespace:
    p = parser()
    if "--" in argv:
        split = list(argv).index("--")
        args = p.parse_args(argv[:split])
        args.command = list(argv[split + 1 :])
    else:
        args = p.parse_args(argv)
    if not args.command:
        p.error("no COMMAND given (put it after --)")
    return args


def _raise_interrupted(signum: int, _frame: FrameType | None) -> None:
    raise Interrupted(signum)


def _make_job(args: argparse.Namespace) -> job.Job:
    cwd = os.getcwd()
    env = job.environment(args.env, os.environ)
    return job.Job(
        argv=tuple(args.command),
        cwd=cwd,
        env=tuple(sorted(env.items())),
        overlays=job.overlays([env["HOME"], cwd, *args.writable], args.disk),
        disk=args.disk,
        network=bool(args.forward),
        report_after=job.report_after(args.timeout),
    )


def _run(args: argparse.Namespace, run_dir: Path) -> int:
    qemu = assets.ensure_qemu()
    image = assets.ensure_image()
    if args.kernel is not None:
        image = assets.Image(args.kernel, image.initramfs, image.release)
    job.write(_make_job(args), run_dir)
    vm = machine.Machine(
        qemu=qemu,
        image=image,
        run_dir=run_dir,
        memory=args.memory,
        cpus=args.cpus,
        disk=args.disk,
        forwards=tuple(args.forward),
    )
    progress = machine.run(vm, args.boot_timeout, args.timeout)
    if args.verbose and progress.booted is not None:
        ended = time.monotonic()
        assets.log(
            f"kernel {image.release}: command started {progress.booted - progress.started:.1f} s"
            f" after qemu, VM ran {ended - progress.started:.1f} s in all"
        )
    assert progress.exit_code is not None
    return progress.exit_code


def _report_failure(error: machine.VmError, run_dir: Path) -> None:
    (run_dir / "disk.img").unlink(missing_ok=True)
    assets.log(f"{error}; console log: {run_dir / 'console.log'}")
    qemu_output = (run_dir / "qemu.log").read_text(errors="replace").strip()
    if qemu_output:
        assets.log(f"qemu said: {qemu_output[-2000:]}")


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(sys.argv[1:] if argv is None else argv)
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _raise_interrupted)
    run_dir = Path(tempfile.mkdtemp(prefix="vm-run-"))
    keep = False
    try:
        return _run(args, run_dir)
    except machine.VmError as error:
        keep = True
        _report_failure(error, run_dir)
        return error.code
    except (assets.SetupError, job.JobError) as error:
        assets.log(str(error))
        return 125
    except Interrupted as stop:
        assets.log(f"stopped by signal {stop.signum}; VM killed")
        return 128 + stop.signum
    finally:
        if not keep:
            shutil.rmtree(run_dir, ignore_errors=True)
