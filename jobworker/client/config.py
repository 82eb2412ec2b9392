"""Where the client connects and with which files: one set of defaults for the library and
the CLI.

A target is ``HOST:PORT``, ``HOST`` (port :data:`DEFAULT_PORT`), or ``[IPv6]:PORT``. Files that
are not given come from the environment (``JOBWORKER_CERT``, ``JOBWORKER_KEY``,
``JOBWORKER_CA``), else from the PKI that ``jobworker serve`` creates on this host
(:func:`local_pki_dir`), whose ``admin`` certificate lets the host's root drive its server.
This module imports nothing of the server or the PKI builder.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from jobworker.errors import ConfigError

__all__ = [
    "DEFAULT_PORT",
    "DEFAULT_RECONNECT_FOR",
    "DEFAULT_SERVER",
    "DEFAULT_STOP_GRACE",
    "DEFAULT_TIMEOUT",
    "ClientFiles",
    "default_data_dir",
    "local_pki_dir",
    "parse_target",
    "parse_timeout",
]

DEFAULT_PORT: Final = 50051
DEFAULT_SERVER: Final = f"127.0.0.1:{DEFAULT_PORT}"
#: Seconds a call may take to answer (a stream: to connect and send its request).
DEFAULT_TIMEOUT: Final = 10.0
#: Seconds a stop may take beyond the call's timeout: the longest grace period (SIGTERM to
#: SIGKILL) of the servers this client waits out; a server's default is 10.
DEFAULT_STOP_GRACE: Final = 60.0
#: Seconds an output stream keeps trying to reconnect after its server went away.
DEFAULT_RECONNECT_FOR: Final = 30.0

# The names `jobworker certs init` gives these files (jobworker.certs.PkiPaths).
_ADMIN_CERT: Final = "admin.pem"
_ADMIN_KEY: Final = "admin-key.pem"
_SERVER_CA: Final = "server-ca.pem"


def default_data_dir() -> Path:
    """The server's data directory: /var/lib/jobworker for root, else the XDG state directory."""
    if os.geteuid() == 0:
        return Path("/var/lib/jobworker")
    state = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(state) / "jobworker"


def local_pki_dir() -> Path:
    """The PKI directory of a server on this host started with the default data directory."""
    return default_data_dir() / "pki"


def parse_target(text: str) -> tuple[str, int]:
    """``HOST:PORT``, ``HOST`` or ``[IPv6]:PORT`` as a (host, port) pair."""
    text = text.strip()
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        port_text = rest[1:] if rest.startswith(":") else None
        if not sep or not host or (rest and port_text is None):
            raise ConfigError(f"server address {text!r} is not HOST, HOST:PORT or [IPv6]:PORT")
    elif text.count(":") == 1:
        host, _, port_text = text.partition(":")
    else:
        host, port_text = text, None  # a bare host, or a bare IPv6 address
    if not host:
        raise ConfigError(f"server address {text!r} has no host; e.g. 127.0.0.1:{DEFAULT_PORT}")
    if port_text is None:
        return host, DEFAULT_PORT
    if not port_text.isdigit() or not 0 < int(port_text) <= 65535:
        raise ConfigError(f"server address {text!r}: the port must be a number from 1 to 65535")
    return host, int(port_text)


def parse_timeout(text: str) -> float | None:
    """Seconds from ``10`` or ``2.5``; ``0`` or ``none`` means no timeout."""
    if text.strip().lower() in ("0", "none", "inf"):
        return None
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if math.isnan(value) or value < 0:
        raise ConfigError(f"timeout {text!r} must be a number of seconds (0 for none)")
    return None if value == 0 or math.isinf(value) else value


@dataclass(frozen=True)
class ClientFiles:
    """The client certificate, its key and the server CA to trust."""

    cert: Path
    key: Path
    ca: Path

    @classmethod
    def resolve(
        cls,
        cert: str | os.PathLike[str] | None = None,
        key: str | os.PathLike[str] | None = None,
        ca: str | os.PathLike[str] | None = None,
        env: Mapping[str, str] | None = None,
    ) -> ClientFiles:
        """The files given, else those the environment names, else the local PKI's."""
        env = os.environ if env is None else env
        pki = local_pki_dir()

        def pick(given: str | os.PathLike[str] | None, var: str, name: str) -> Path:
            if given is not None:
                return Path(given)
            return Path(env[var]) if env.get(var) else pki / name

        return cls(
            cert=pick(cert, "JOBWORKER_CERT", _ADMIN_CERT),
            key=pick(key, "JOBWORKER_KEY", _ADMIN_KEY),
            ca=pick(ca, "JOBWORKER_CA", _SERVER_CA),
        )
