"""Development sessions: `nox` runs lint, typecheck, the generated-code check and the tests."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import nox

PYTHONS = ["3.11", "3.12", "3.13"]
ROOT = Path(__file__).parent
PROTO_OUT = "jobworker/_proto"

nox.options.default_venv_backend = "uv|virtualenv"
nox.options.reuse_existing_virtualenvs = True
nox.options.sessions = ["lint", "typecheck", "proto", "tests", "vm", "bench"]


def _add_pyenv_pythons() -> None:
    """Let nox find every Python that pyenv installed, not only the global one."""
    pyenv_root = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv"))
    bins = sorted(str(p) for p in pyenv_root.glob("versions/3.*/bin"))
    if bins:
        os.environ["PATH"] = os.pathsep.join([os.environ.get("PATH", ""), *bins])


_add_pyenv_pythons()


@nox.session(python=PYTHONS)
def tests(session: nox.Session) -> None:
    """The host test tier: real processes, real cgroups, real TLS on loopback."""
    session.install("-e", ".[test]")
    session.run("pytest", *session.posargs)


@nox.session(python="3.11")
def lint(session: nox.Session) -> None:
    session.install("ruff>=0.8")
    session.run("ruff", "check", ".", "scripts/vm-run")
    session.run("ruff", "format", "--check", ".", "scripts/vm-run")


@nox.session(python="3.11")
def typecheck(session: nox.Session) -> None:
    session.install("-e", ".[typecheck,test]")
    session.run("mypy", "--strict", "jobworker")
    session.run("mypy", "--strict", "scripts/vm-run", "scripts/vmrun")


# Everything that shapes the generated text, pinned so that `proto` gives the same answer on
# every machine: the compiler pipes its output through whatever `ruff` is installed (`ruff check
# --fix` and `ruff format`, configured by this project's pyproject.toml), and the well-known
# types (google/protobuf/timestamp.proto, comments included) come from grpcio-tools.
CODEGEN_PINS = ["ruff==0.17.6", "grpcio-tools==1.85.1"]


def _generate(session: nox.Session, out: Path) -> None:
    """Generate the code for every proto under protos/ into ``out``, replacing what was there.

    protoc runs from an empty scratch directory: the compiler decides which package folders
    need an ``__init__.py`` by looking at paths relative to the working directory, so from
    the repository root it would see our own ``jobworker/__init__.py`` and leave
    ``_proto/jobworker/`` without one (a namespace package that setuptools does not ship).
    The scratch directory lies inside the repository, so the compiler's ruff still finds
    pyproject.toml.
    """
    out = out.resolve()
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    scratch = Path(session.create_tmp()).resolve() / "protoc-cwd"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    protos = sorted(str(p.relative_to(ROOT / "protos")) for p in (ROOT / "protos").rglob("*.proto"))
    with session.chdir(scratch):
        session.run(
            "python",
            "-m",
            "grpc_tools.protoc",
            "-I",
            str(ROOT / "protos"),
            f"--python_betterproto2_out={out}",
            "--python_betterproto2_opt=client_generation=async,server_generation=async",
            *protos,
        )


@nox.session(python="3.11")
def codegen(session: nox.Session) -> None:
    """Regenerate the protobuf code under jobworker/_proto from protos/."""
    session.install("-e", ".[codegen]", *CODEGEN_PINS)
    _generate(session, ROOT / PROTO_OUT)


HELP_MODULE = "jobworker/cli/_help.py"
HELP_HEADER = '''"""``jobworker --help`` as typer renders it at 80 columns, which
``jobworker.cli.main`` prints without loading typer.

Written by ``nox -s help`` from ``jobworker.cli.app.top_level_help``; a test in
tests/test_cli_commands.py fails while the two differ. Do not edit.
"""

'''


@nox.session(name="help", python="3.11")
def help_text(session: nox.Session) -> None:
    """Write jobworker/cli/_help.py again from the typer app."""
    session.install("-e", ".", "ruff")
    text = session.run(
        "python",
        "-c",
        "from jobworker.cli.app import top_level_help; print(top_level_help(), end='')",
        env={"TYPER_USE_RICH": "0"},
        silent=True,
    )
    assert isinstance(text, str)
    lines = "".join(f"    {line!r}\n" for line in text.splitlines(keepends=True))
    (ROOT / HELP_MODULE).write_text(f"{HELP_HEADER}TEXT = (\n{lines})\n")
    session.run("ruff", "format", HELP_MODULE)


@nox.session(python="3.11")
def proto(session: nox.Session) -> None:
    """Fail if the committed generated code differs from what protos/ generates."""
    session.install("-e", ".[codegen]", *CODEGEN_PINS)
    tmp = Path(session.create_tmp()) / "generated"
    _generate(session, tmp)
    session.run("diff", "-r", "-x", "__pycache__", str(tmp), PROTO_OUT, external=True)


def _vm_pytest_args(posargs: list[str]) -> list[str]:
    """The VM tier (tests/vm, every test that needs a cgroup controller, and the isolation
    tests), unless the arguments name test paths themselves (`nox -s vm -- tests/x.py::t`)."""
    names_paths = any(Path(arg.split("::")[0]).exists() for arg in posargs)
    marks = "vm or needs_controller or isolation"
    return posargs if names_paths else ["tests", "-m", marks, *posargs]


@nox.session(python="3.11")
def vm(session: nox.Session) -> None:
    """The VM test tier: pytest inside a qemu VM with a pure cgroup v2 kernel (scripts/vm-run)."""
    session.install("-e", ".[test]")
    python = str(Path(session.bin) / "python")
    # Byte-compile on the host: the guest's writes are thrown away, so without this every run
    # compiles all imported modules again under emulation (about 20 s).
    venv = str(Path(session.bin).parent)
    session.run(python, "-m", "compileall", "-q", "-j0", venv, "jobworker", "tests", silent=True)
    session.run(
        python,
        str(ROOT / "scripts" / "vm-run"),
        "--disk",
        "--timeout=900",
        "--env=PYTEST_ADDOPTS",
        "--",
        python,
        "-m",
        "pytest",
        *_vm_pytest_args(session.posargs),
    )


@nox.session(python="3.11")
def bench(session: nox.Session) -> None:
    """Benchmarks beside their baselines (as root): quick; `nox -s bench -- --full` for all.

    Writes a table to stdout and bench-results/{results.json,results.md,bench.png}; exits
    non-zero only when something breaks, never on a timing. See docs/performance.md.
    """
    # Installed as users install it (not editable): the CLI rows time whole processes, and an
    # editable install's import hook would add its own start-up cost to each. The bench extra
    # is grpcio, for the grpcio peer that the throughput and latency rows are compared with.
    session.install(".[bench]", "matplotlib")
    args = list(session.posargs)
    if "--full" in args and "--scale-python" not in args:
        args += _scale_pythons(session)
    session.run("python", "-m", "bench", *args)


def _scale_pythons(session: nox.Session) -> list[str]:
    """``--scale-python`` for each other Python the project supports that is installed here,
    each in a fresh venv with jobworker installed as users install it."""
    args = []
    for version in PYTHONS[1:]:
        python = shutil.which(f"python{version}")
        if python is None:
            session.warn(f"python{version} not found: no scale measurement on {version}")
            continue
        # Not session.create_tmp(): it points TMPDIR into the project, where the bench's
        # jobs (each its own uid) could not enter their directories.
        venv = Path(session.virtualenv.location) / f"server-{version}"
        session.run(python, "-m", "venv", "--clear", str(venv), external=True)
        session.run(str(venv / "bin" / "pip"), "install", "--quiet", ".", external=True)
        args += ["--scale-python", str(venv / "bin" / "python")]
    return args
