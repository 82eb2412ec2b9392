"""Builds the one native part of jobworker: the ``jobworker-init`` helper.

Everything else is declared in pyproject.toml. The helper is a small C program
(``jobworker/worker/init.c``) that starts each job inside its cgroup, namespaces and
identity; it is compiled with the system's C compiler (``$CC``, else ``cc``) into the
package, next to its source, for both regular and editable installs. It is linked
statically where the C library allows it, so that a root process never loads a shared
library chosen at run time.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.dist import Distribution

SOURCE = Path("jobworker/worker/init.c")
BINARY = "jobworker-init"
FLAGS = ["-O2", "-s", "-Wall", "-Wextra", "-Werror", "-D_FORTIFY_SOURCE=2"]


def compile_helper(out_dir: Path) -> None:
    compiler = shlex.split(os.environ.get("CC", "cc"))
    if shutil.which(compiler[0]) is None:
        raise SystemExit(
            f"jobworker needs a C compiler to build {BINARY} ({compiler[0]!r} was not found): "
            "install gcc and the C library headers (Debian: apt-get install gcc libc6-dev)"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / BINARY
    base = [*compiler, *FLAGS, "-o", str(target), str(SOURCE)]
    static = subprocess.run([*base, "-static"], check=False, capture_output=True)
    if static.returncode != 0:
        subprocess.run(base, check=True)
    target.chmod(0o755)


class BuildPyWithHelper(build_py):
    """build_py, plus the helper: into the build tree, or beside its source when editable."""

    def run(self) -> None:
        super().run()
        if self.editable_mode:
            compile_helper(SOURCE.parent)
        else:
            compile_helper(Path(self.build_lib) / SOURCE.parent)


class BinaryDistribution(Distribution):
    """The wheel holds a compiled program, so it is tied to a platform."""

    def has_ext_modules(self) -> bool:
        return True


setup(cmdclass={"build_py": BuildPyWithHelper}, distclass=BinaryDistribution)
