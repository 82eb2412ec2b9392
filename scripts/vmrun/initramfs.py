"""Build the guest's initramfs: static busybox, the guest init script and the kernel modules.

The archive is an uncompressed cpio (newc format): the kernel unpacks it without spending
emulated CPU time on decompression.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

# What the guest needs; their dependencies are added from each module's .modinfo.
WANTED_MODULES = (
    "virtio_pci",
    "virtio_console",
    "9pnet_virtio",
    "9p",
    "overlay",
    "virtio_blk",
    "crc32c_generic",
    "ext4",
    "virtio_net",
)

_S_IFDIR = 0o040000
_S_IFREG = 0o100000
_S_IFCHR = 0o020000


@dataclass(frozen=True)
class Entry:
    """One cpio member: a directory, a regular file or a character device."""

    name: str
    mode: int
    data: bytes = b""
    rdev: tuple[int, int] = (0, 0)


def index_modules(modules_dir: Path) -> dict[str, Path]:
    """Map module names (with '-' spelled '_') to their .ko files under lib/modules/VERSION."""
    index: dict[str, Path] = {}
    for path in modules_dir.rglob("*.ko"):
        index[path.name.removesuffix(".ko").replace("-", "_")] = path
    return index


def _elf_section(data: bytes, wanted: str) -> bytes:
    """The contents of the named section of a little-endian ELF64 file (b"" when absent)."""
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise ValueError("not a little-endian ELF64 file")
    (shoff,) = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)

    def header(index: int) -> tuple[int, int, int]:
        name, _type, _flags, _addr, offset, size = struct.unpack_from(
            "<IIQQQQ", data, shoff + index * shentsize
        )
        return name, offset, size

    _, names_offset, _ = header(shstrndx)
    for index in range(shnum):
        name_offset, offset, size = header(index)
        end = data.index(b"\0", names_offset + name_offset)
        if data[names_offset + name_offset : end].decode() == wanted:
            return data[offset : offset + size]
    return b""


def module_depends(path: Path) -> list[str]:
    """The modules that must be loaded before this one (the `depends=` field of .modinfo)."""
    for field in _elf_section(path.read_bytes(), ".modinfo").split(b"\0"):
        if field.startswith(b"depends="):
            names = field.removeprefix(b"depends=").decode()
            return [name.replace("-", "_") for name in names.split(",") if name]
    return []


def load_order(wanted: Iterable[str], index: dict[str, Path]) -> list[str]:
    """The wanted modules and their dependencies, each after everything it depends on."""
    order: list[str] = []
    visiting: set[str] = set()

    def visit(name: str) -> None:
        if name in order:
            return
        if name in visiting:
            raise ValueError(f"module dependency cycle through {name}")
        if name not in index:
            raise FileNotFoundError(f"kernel module {name} is not in the kernel package")
        visiting.add(name)
        for dependency in module_depends(index[name]):
            visit(dependency)
        visiting.discard(name)
        order.append(name)

    for name in wanted:
        visit(name)
    return order


def entries(init_script: bytes, busybox: Path, modules: dict[str, Path]) -> list[Entry]:
    """The initramfs members; `modules` maps names to .ko files in load order."""
    members = [
        Entry("bin", _S_IFDIR | 0o755),
        Entry("dev", _S_IFDIR | 0o755),
        Entry("dev/console", _S_IFCHR | 0o600, rdev=(5, 1)),
        Entry("modules", _S_IFDIR | 0o755),
        Entry("init", _S_IFREG | 0o755, init_script),
        Entry("bin/busybox", _S_IFREG | 0o755, busybox.read_bytes()),
        Entry("modules/order", _S_IFREG | 0o644, "".join(f"{m}\n" for m in modules).encode()),
    ]
    members += [
        Entry(f"modules/{name}.ko", _S_IFREG | 0o644, path.read_bytes())
        for name, path in modules.items()
    ]
    return members


def _pad(length: int) -> bytes:
    return b"\0" * (-length % 4)


def cpio_newc(members: Iterable[Entry]) -> Iterator[bytes]:
    """Serialize members as a newc cpio archive (the format the kernel unpacks)."""
    trailer = Entry("TRAILER!!!", 0)
    for inode, entry in enumerate([*members, trailer], start=1):
        name = entry.name.encode() + b"\0"
        fields = (
            inode,
            entry.mode,
            0,  # uid
            0,  # gid
            2 if entry.mode & _S_IFDIR == _S_IFDIR else 1,
            0,  # mtime: fixed, so the archive is reproducible
            len(entry.data),
            0,  # devmajor
            0,  # devminor
            entry.rdev[0],
            entry.rdev[1],
            len(name),
            0,  # check
        )
        header = b"070701" + b"".join(b"%08X" % value for value in fields)
        yield header + name + _pad(len(header) + len(name))
        yield entry.data + _pad(len(entry.data))


def write(path: Path, members: Iterable[Entry]) -> None:
    with path.open("wb") as out:
        for chunk in cpio_newc(members):
            out.write(chunk)
