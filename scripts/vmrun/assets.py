"""Host side preparation: qemu installed, and a cached kernel + initramfs for the guest.

Cache layout (under $XDG_CACHE_HOME/jobworker-vm, else ~/.cache/jobworker-vm):

    lock                 flock()ed while the cache is checked or filled
    debs/*.deb           the downloaded kernel and busybox-static packages
    current              the name of the ready image directory below
    <kernel>-<recipe>/   kernel (vmlinux ELF, or the bzImage), initramfs.cpio, info.json

<recipe> hashes the guest init script and the module list, so a changed runner rebuilds the
initramfs from the cached packages without consulting apt. Delete the cache folder to pick up a
newer kernel package.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import lzma
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from . import initramfs

QEMU = "qemu-system-x86_64"
KERNEL_META_PACKAGE = "linux-image-amd64"
BUSYBOX_PACKAGE = "busybox-static"
INIT_SCRIPT = Path(__file__).with_name("init.sh")
_RECIPE_VERSION = "2"
_XZ_MAGIC = b"\xfd7zXZ\x00"
_STALE_AFTER = 3600.0


class SetupError(Exception):
    """The host could not be prepared (packages, downloads, image build)."""


@dataclass(frozen=True)
class Image:
    """A bootable guest: kernel, initramfs and the kernel release they belong to."""

    kernel: Path
    initramfs: Path
    release: str


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "jobworker-vm"


def log(message: str) -> None:
    print(f"vm-run: {message}", file=sys.stderr, flush=True)


def _run(argv: Sequence[str], cwd: Path | None = None) -> str:
    """Run a host command; its output is shown only when it fails."""
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    result = subprocess.run(
        argv,
        check=False,
        cwd=cwd,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        raise SetupError(
            f"`{' '.join(argv)}` failed with exit code {result.returncode}:\n"
            f"{result.stdout}{result.stderr}"
        )
    return result.stdout


def _retry_after_apt_update(argv: Sequence[str], cwd: Path | None = None) -> str:
    """Run an apt command; on failure refresh the package lists once (as root) and retry."""
    try:
        return _run(argv, cwd)
    except SetupError:
        if os.geteuid() != 0:
            raise
        log("refreshing the apt package lists")
        _run(["apt-get", "update", "-q"])
        return _run(argv, cwd)


def ensure_qemu() -> str:
    """The path of qemu-system-x86_64, installing the Debian package when it is missing."""
    found = shutil.which(QEMU)
    if found:
        return found
    if os.geteuid() != 0:
        raise SetupError(f"{QEMU} not found; install it: apt-get install qemu-system-x86")
    log("installing qemu-system-x86")
    _retry_after_apt_update(
        ["apt-get", "install", "-y", "-q", "--no-install-recommends", "qemu-system-x86"]
    )
    found = shutil.which(QEMU)
    if not found:
        raise SetupError(f"{QEMU} still not found after installing qemu-system-x86")
    return found


def kernel_package() -> str:
    """The versioned generic kernel package (linux-image-X-amd64) the meta package depends on."""
    output = _retry_after_apt_update(["apt-cache", "depends", KERNEL_META_PACKAGE])
    match = re.search(r"^\s*Depends:\s*(linux-image-\S+-amd64)\s*$", output, re.MULTILINE)
    if match is None:
        raise SetupError(f"cannot tell which kernel {KERNEL_META_PACKAGE} depends on:\n{output}")
    return match.group(1)


def _download(package: str, debs: Path) -> Path:
    """The package's .deb in the cache, downloaded with apt-get when not there yet."""
    cached = sorted(debs.glob(f"{package}_*.deb"))
    if cached:
        return cached[-1]
    log(f"downloading {package}")
    with tempfile.TemporaryDirectory(dir=debs) as tmp:
        _retry_after_apt_update(["apt-get", "download", "-q", package], cwd=Path(tmp))
        (deb,) = Path(tmp).glob(f"{package}_*.deb")
        return deb.rename(debs / deb.name)


def _recipe_hash() -> str:
    digest = hashlib.sha256(_RECIPE_VERSION.encode())
    digest.update(INIT_SCRIPT.read_bytes())
    digest.update(" ".join(initramfs.WANTED_MODULES).encode())
    return digest.hexdigest()[:12]


def _uncompressed_kernel(vmlinuz: Path, config: Path, target: Path) -> None:
    """Write the kernel for qemu's -kernel: the plain ELF vmlinux when the kernel supports PVH
    boot (it then starts in about half the time: no XZ decompression under emulation), else a
    copy of the bzImage."""
    data = vmlinuz.read_bytes()
    start = data.find(_XZ_MAGIC)
    if "CONFIG_PVH=y" in config.read_text().splitlines() and start >= 0:
        elf = lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(data[start:])
        if elf.startswith(b"\x7fELF"):
            target.write_bytes(elf)
            return
    shutil.copyfile(vmlinuz, target)


def _build(kernel_deb: Path, busybox_deb: Path, target: Path) -> None:
    """Extract the packages into a scratch folder and assemble kernel + initramfs in target."""
    log(f"building the guest image from {kernel_deb.name}")
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        root = Path(tmp)
        _run(["dpkg-deb", "-x", str(kernel_deb), str(root / "kernel")])
        _run(["dpkg-deb", "-x", str(busybox_deb), str(root / "busybox")])
        (modules_dir,) = (root / "kernel/lib/modules").iterdir()
        (vmlinuz,) = (root / "kernel/boot").glob("vmlinuz-*")
        (config,) = (root / "kernel/boot").glob("config-*")
        index = initramfs.index_modules(modules_dir)
        order = initramfs.load_order(initramfs.WANTED_MODULES, index)
        members = initramfs.entries(
            INIT_SCRIPT.read_bytes(),
            root / "busybox/bin/busybox",
            {name: index[name] for name in order},
        )
        staging = root / "image"
        staging.mkdir()
        _uncompressed_kernel(vmlinuz, config, staging / "kernel")
        initramfs.write(staging / "initramfs.cpio", members)
        info = {"release": modules_dir.name, "package": kernel_deb.name, "modules": order}
        (staging / "info.json").write_text(json.dumps(info, indent=2) + "\n")
        staging.rename(target)


def _image(directory: Path) -> Image:
    info = json.loads((directory / "info.json").read_text())
    return Image(directory / "kernel", directory / "initramfs.cpio", str(info["release"]))


@contextmanager
def _locked(root: Path) -> Iterator[None]:
    root.mkdir(parents=True, exist_ok=True)
    with (root / "lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _current(root: Path, recipe: str) -> Path | None:
    """The ready image directory, if the cache has one built with this recipe."""
    try:
        name = (root / "current").read_text().strip()
    except FileNotFoundError:
        return None
    directory = root / name
    if name.endswith(f"-{recipe}") and (directory / "info.json").is_file():
        return directory
    return None


def _prune(root: Path, keep: Path) -> None:
    """Remove image directories that other versions of the runner built (after an hour)."""
    for info in root.glob("*/info.json"):
        directory = info.parent
        if directory != keep and time.time() - info.stat().st_mtime > _STALE_AFTER:
            shutil.rmtree(directory, ignore_errors=True)


def ensure_image() -> Image:
    """A kernel + initramfs ready to boot: from the cache, else downloaded and built."""
    root = cache_root()
    recipe = _recipe_hash()
    with _locked(root):
        ready = _current(root, recipe)
        if ready is not None:
            return _image(ready)
        debs = root / "debs"
        debs.mkdir(exist_ok=True)
        cached_kernels = sorted(debs.glob("linux-image-*-amd64_*.deb"))
        package = cached_kernels[-1].name.split("_")[0] if cached_kernels else kernel_package()
        kernel_deb = _download(package, debs)
        busybox_deb = _download(BUSYBOX_PACKAGE, debs)
        name = f"{package.removeprefix('linux-image-')}-{recipe}"
        target = root / name
        if not (target / "info.json").is_file():
            shutil.rmtree(target, ignore_errors=True)
            _build(kernel_deb, busybox_deb, target)
        (root / "current.tmp").write_text(name + "\n")
        (root / "current.tmp").rename(root / "current")
        _prune(root, keep=target)
        return _image(target)
