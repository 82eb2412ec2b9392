"""``jobworker certs``: create a PKI and issue client certificates.

Both commands print each file they wrote, one per line, and report any error as one line
on stderr with exit code 1.
"""

from __future__ import annotations

import enum
from pathlib import Path
from typing import Annotated, Final

import typer

from jobworker.errors import JobworkerError

__all__ = ["app"]

# jobworker.certs.CLIENT_DAYS and MAX_DAYS, written out so that `jobworker --help` need not
# import the PKI builder (tests/test_cli_fast.py checks that they agree).
CLIENT_DAYS: Final = 90
MAX_DAYS: Final = 3650


class _Role(enum.Enum):
    """jobworker.auth.roles.Role, by value."""

    ADMIN = "admin"
    USER = "user"


app = typer.Typer(
    name="certs",
    help="Create the PKI (two CAs, server and admin certificates) and issue client certificates.",
    no_args_is_help=True,
    add_completion=False,
)

_DirArgument = Annotated[
    Path,
    typer.Argument(metavar="DIR", help="The PKI directory.", file_okay=False, show_default=False),
]


def _fail(message: str) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code=1)


def _describe(error: OSError) -> str:
    reason = error.strerror or str(error)
    return f"{error.filename}: {reason}" if error.filename else reason


@app.command("init")
def init_command(
    directory: _DirArgument,
    host: Annotated[
        list[str] | None,
        typer.Option(
            "--host",
            metavar="NAME",
            help="A DNS name or IP address for the server certificate (repeatable); "
            "localhost, 127.0.0.1 and ::1 are always included.",
        ),
    ] = None,
    force: Annotated[
        bool,
        typer.Option("--force", help="Replace an existing PKI (invalidates every old cert)."),
    ] = False,
) -> None:
    """Write server-ca, client-ca, server and admin certificates and keys into DIR."""
    from jobworker.certs import init_pki  # noqa: PLC0415 - the PKI builder, only here

    try:
        paths = init_pki(directory, host or (), force=force)
    except JobworkerError as exc:
        raise _fail(exc.message) from None
    except OSError as exc:
        raise _fail(_describe(exc)) from None
    for path in paths.files():
        typer.echo(f"wrote {path}")


@app.command("issue")
def issue_command(
    directory: _DirArgument,
    name: Annotated[
        str,
        typer.Option("--name", help="The client's name: its certificate's common name."),
    ],
    role: Annotated[_Role, typer.Option("--role", help="What the client may do.")],
    days: Annotated[
        int,
        typer.Option("--days", min=1, max=MAX_DAYS, help="How long the certificate is valid."),
    ] = CLIENT_DAYS,
    force: Annotated[
        bool,
        typer.Option("--force", help="Replace an existing certificate of the same name."),
    ] = False,
) -> None:
    """Write NAME.pem and NAME-key.pem into DIR, signed by its client CA."""
    from jobworker.auth.roles import Role  # noqa: PLC0415 - the PKI builder, only here
    from jobworker.certs import issue_client  # noqa: PLC0415

    try:
        paths = issue_client(directory, name, Role(role.value), days, force=force)
    except JobworkerError as exc:
        raise _fail(exc.message) from None
    except OSError as exc:
        raise _fail(_describe(exc)) from None
    typer.echo(f"wrote {paths.cert}")
    typer.echo(f"wrote {paths.key}")
