"""Starting a job's program inside its cgroup, with no window for escape.

Python cannot ``clone3(CLONE_INTO_CGROUP)``, and writing a PID into ``cgroup.procs`` after
the program started is a race: anything it forks before the write escapes the cgroup. So the
worker starts a tiny ``/bin/sh`` shim instead. The shim moves *itself* into the job's cgroup
(writing ``0`` to ``cgroup.procs`` means "the writing process") and only then ``exec``s the
program, which replaces the shim in the same process. The program's first instruction, and
everything it ever forks, run inside the cgroup.

``exec`` failures inside the shim cannot be told apart from the program's own exit codes, so
the program is resolved and checked here first: a missing or non-executable program is an
error from start, before anything is created.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import stat
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Final

from jobworker.errors import InvalidCommand

__all__ = ["DEFAULT_PATH", "job_environment", "resolve_program", "spawn_in_cgroup"]

DEFAULT_PATH: Final = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
SHIM_EXIT_CGROUP: Final = 125  # exit code of a shim that could not join the cgroup

# $0 is the cgroup.procs file; "$@" is the program (an absolute path) and its arguments.
_SHIM: Final = f'echo 0 >"$0" || exit {SHIM_EXIT_CGROUP}; exec "$@"'
_SH: Final = "/bin/sh"


def resolve_program(program: str, search_path: str) -> str:
    """The absolute path of ``program``, which must exist and be executable.

    A bare name is looked up on ``search_path``; a path must be absolute.
    """
    if "/" not in program:
        found = shutil.which(program, path=search_path)
        if found is None:
            raise InvalidCommand(f"program {program!r} was not found on the worker's PATH")
        program = found
    elif not program.startswith("/"):
        raise InvalidCommand(
            f"program {program!r} must be an absolute path or a bare name found on PATH"
        )
    try:
        mode = os.stat(program).st_mode
    except FileNotFoundError:
        raise InvalidCommand(f"program {program!r} does not exist") from None
    except OSError as exc:
        raise InvalidCommand(f"program {program!r} cannot be used: {exc.strerror}") from None
    if not stat.S_ISREG(mode):
        raise InvalidCommand(f"program {program!r} is not a regular file")
    if not os.access(program, os.X_OK):
        raise InvalidCommand(f"program {program!r} is not executable")
    return program


def job_environment(job_id: str, base: Mapping[str, str]) -> dict[str, str]:
    """The small, predictable environment a job starts with."""
    env = {"PATH": base.get("PATH") or DEFAULT_PATH, "HOME": "/", "JOBWORKER_JOB_ID": job_id}
    for name in ("LANG", "LC_ALL", "TZ"):
        if name in base:
            env[name] = base[name]
    return env


async def spawn_in_cgroup(
    program: str,
    args: Sequence[str],
    *,
    cgroup_procs: Path,
    output_fd: int,
    env: Mapping[str, str],
) -> asyncio.subprocess.Process:
    """Start ``program`` (absolute, already resolved) so that it runs only inside the cgroup.

    stdin is /dev/null; stdout and stderr both go to ``output_fd``, so the log keeps the
    order in which they were written. The job gets a new session, so terminal signals meant
    for the worker do not reach it.
    """
    return await asyncio.create_subprocess_exec(
        _SH,
        "-c",
        _SHIM,
        str(cgroup_procs),
        program,
        *args,
        stdin=subprocess.DEVNULL,
        stdout=output_fd,
        stderr=output_fd,
        env=dict(env),
        cwd="/",
        start_new_session=True,
    )
