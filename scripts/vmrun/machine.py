"""Boot the guest under qemu (software emulation) and relay the command's output and exit code.

Channels: the kernel console goes to console.log (first serial port); the command's stdout and
stderr go to virtio-serial ports backed by files in the run directory, which the runner tails to
its own stdout and stderr while the VM runs; a third port carries status lines from the guest's
init ("booted", then "exit N" or "error MESSAGE"). Regular files never block qemu, so nothing
the guest wrote is lost when it powers off.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from .assets import Image

DISK_BYTES = 256 * 1024 * 1024
KERNEL_ARGS = (
    "console=ttyS0",
    "panic=-1",  # a panic reboots, and -no-reboot turns that into qemu exiting
    "quiet",
    "cgroup_no_v1=all",
    "mitigations=off",
    "8250.nr_uarts=1",
)
_POWEROFF_GRACE = 10.0
_PR_SET_PDEATHSIG = 1


class VmError(Exception):
    """The VM could not run the command to completion; `code` is vm-run's exit code."""

    code = 125


class BootTimeout(VmError):
    pass


class CommandTimeout(VmError):
    code = 124


@dataclass(frozen=True)
class Machine:
    qemu: str
    image: Image
    run_dir: Path
    memory: str = "2G"
    cpus: int = 2
    disk: bool = False
    forwards: tuple[tuple[int, int], ...] = ()

    @property
    def console_log(self) -> Path:
        return self.run_dir / "console.log"

    @property
    def qemu_log(self) -> Path:
        return self.run_dir / "qemu.log"

    @property
    def disk_image(self) -> Path:
        return self.run_dir / "disk.img"


def _opt(value: str | Path) -> str:
    """Escape a value for qemu's comma-separated option syntax."""
    return str(value).replace(",", ",,")


def _port(machine: Machine, name: str) -> list[str]:
    path = machine.run_dir / f"{name}.out"
    return [
        "-chardev",
        f"file,id={name},path={_opt(path)}",
        "-device",
        f"virtserialport,bus=vs.0,chardev={name},name=jobworker.{name}",
    ]


def qemu_argv(machine: Machine) -> list[str]:
    append = " ".join([*KERNEL_ARGS, f"jobworker.job={machine.run_dir}"])
    argv = [
        machine.qemu,
        *("-accel", "tcg", "-machine", "q35", "-cpu", "max"),
        *("-smp", str(machine.cpus), "-m", machine.memory),
        *("-nographic", "-no-reboot", "-nodefaults"),
        *("-kernel", str(machine.image.kernel), "-initrd", str(machine.image.initramfs)),
        *("-append", append),
        *("-chardev", f"file,id=console,path={_opt(machine.console_log)}"),
        *("-serial", "chardev:console"),
        "-fsdev",
        "local,id=hostroot,path=/,security_model=none,readonly=on,multidevs=remap",
        *("-device", "virtio-9p-pci,fsdev=hostroot,mount_tag=hostroot"),
        *("-device", "virtio-serial-pci,id=vs"),
        *_port(machine, "status"),
        *_port(machine, "stdout"),
        *_port(machine, "stderr"),
    ]
    if machine.disk:
        argv += [
            *("-drive", f"file={_opt(machine.disk_image)},format=raw,if=none,id=disk,cache=unsafe"),
            *("-device", "virtio-blk-pci,drive=disk"),
        ]
    if machine.forwards:
        rules = "".join(f",hostfwd=tcp:127.0.0.1:{h}-:{g}" for h, g in machine.forwards)
        argv += [
            *("-netdev", f"user,id=net,restrict=on{rules}"),
            *("-device", "virtio-net-pci,netdev=net,romfile="),
        ]
    return argv


class _Tail:
    """Follows a file qemu appends to; copies new bytes to a host fd (None: keep them)."""

    def __init__(self, path: Path, sink: int | None) -> None:
        self.path = path
        self.sink = sink
        self.offset = 0
        self.kept = b""

    def pump(self) -> bool:
        """Copy what was appended since the last call; True when there was something."""
        try:
            with self.path.open("rb") as source:
                source.seek(self.offset)
                data = source.read()
        except FileNotFoundError:
            return False
        self.offset += len(data)
        if self.sink is None:
            self.kept += data
        else:
            self._write(data)
        return bool(data)

    def _write(self, data: bytes) -> None:
        view = memoryview(data)
        while view and self.sink is not None:
            try:
                view = view[os.write(self.sink, view) :]
            except BrokenPipeError:
                self.sink = None  # the reader went away; keep the VM going, drop the output


def _die_with_parent() -> None:
    """In the qemu child before exec: be killed if vm-run dies without cleaning up."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


@dataclass
class Progress:
    started: float
    booted: float | None = None
    exit_code: int | None = None


def _read_status(status: _Tail, progress: Progress) -> None:
    for line in status.kept.decode(errors="replace").splitlines():
        word, _, rest = line.strip().partition(" ")
        if word == "booted" and progress.booted is None:
            progress.booted = time.monotonic()
        elif word == "exit":
            progress.exit_code = int(rest)
        elif word == "error":
            raise VmError(f"the guest's setup failed: {rest}")


def _check_deadlines(progress: Progress, boot_timeout: float, timeout: float) -> None:
    now = time.monotonic()
    if progress.booted is None and now - progress.started > boot_timeout:
        raise BootTimeout(f"VM did not boot within {boot_timeout:g} s")
    if progress.booted is not None and timeout > 0 and now - progress.booted > timeout:
        raise CommandTimeout(f"the command did not finish within {timeout:g} s; VM stopped")


def _supervise(
    process: subprocess.Popen[bytes], machine: Machine, boot_timeout: float, timeout: float
) -> Progress:
    """Relay output until the guest reports the exit code or qemu stops."""
    progress = Progress(started=time.monotonic())
    status = _Tail(machine.run_dir / "status.out", None)
    outputs = [
        _Tail(machine.run_dir / "stdout.out", 1),
        _Tail(machine.run_dir / "stderr.out", 2),
    ]
    pause = 0.005
    while progress.exit_code is None:
        alive = process.poll() is None
        moved = [tail.pump() for tail in outputs]
        if status.pump():
            _read_status(status, progress)
        if not alive:
            break
        _check_deadlines(progress, boot_timeout, timeout)
        pause = 0.005 if any(moved) else min(pause * 2, 0.05)
        time.sleep(pause)
    if progress.exit_code is not None:
        try:
            process.wait(_POWEROFF_GRACE)
        except subprocess.TimeoutExpired:
            process.kill()
    for tail in outputs:
        tail.pump()
    return progress


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.kill()
    process.wait()


def run(machine: Machine, boot_timeout: float, timeout: float) -> Progress:
    """Boot the VM, run the job, return the guest's report. Raises VmError when the VM fails;
    qemu is killed on every way out, including exceptions raised by signal handlers."""
    if machine.disk:
        with machine.disk_image.open("wb") as disk:
            disk.truncate(DISK_BYTES)
    with machine.qemu_log.open("wb") as qemu_log:
        process = subprocess.Popen(
            qemu_argv(machine),
            stdin=subprocess.DEVNULL,
            stdout=qemu_log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_die_with_parent,  # noqa: PLW1509 (no threads run in vm-run)
        )
    try:
        progress = _supervise(process, machine, boot_timeout, timeout)
    finally:
        _stop(process)
    if progress.exit_code is None:
        stage = "running the command" if progress.booted else "booting"
        raise VmError(f"qemu stopped (exit code {process.returncode}) while {stage}")
    return progress
