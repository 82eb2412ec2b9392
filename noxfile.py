"""Development sessions: `nox` runs lint, typecheck, the generated-code check and the tests."""

from __future__ import annotations

import os
from pathlib import Path

import nox

PYTHONS = ["3.11", "3.12", "3.13"]
ROOT = Path(__file__).parent
PROTO_OUT = "jobworker/_proto"

nox.options.default_venv_backend = "uv|virtualenv"
nox.options.reuse_existing_virtualenvs = True
nox.options.sessions = ["lint", "typecheck", "proto", "tests"]


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
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session(python="3.11")
def typecheck(session: nox.Session) -> None:
    session.install("-e", ".[typecheck,test]")
    session.run("mypy", "--strict", "jobworker")


def _generate(session: nox.Session, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    protos = sorted(str(p.relative_to(ROOT / "protos")) for p in (ROOT / "protos").rglob("*.proto"))
    session.run(
        "python",
        "-m",
        "grpc_tools.protoc",
        "-I",
        "protos",
        f"--python_betterproto2_out={out}",
        "--python_betterproto2_opt=client_generation=async,server_generation=async",
        *protos,
    )


@nox.session(python="3.11")
def codegen(session: nox.Session) -> None:
    """Regenerate the protobuf code under jobworker/_proto from protos/."""
    session.install("-e", ".[codegen]")
    _generate(session, ROOT / PROTO_OUT)


@nox.session(python="3.11")
def proto(session: nox.Session) -> None:
    """Fail if the committed generated code differs from what protos/ generates."""
    session.install("-e", ".[codegen]")
    tmp = Path(session.create_tmp()) / "generated"
    session.run("rm", "-rf", str(tmp), external=True)
    _generate(session, tmp)
    session.run("diff", "-r", "-x", "__pycache__", str(tmp), PROTO_OUT, external=True)
