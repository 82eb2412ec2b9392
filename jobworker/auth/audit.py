"""Audit lines: one structured log record per RPC, on logger ``jobworker.audit``.

Each record is a single line of ``key=value`` pairs, always in this order::

    audit who=alice role=user rpc=StopJob job=- outcome=permission_denied detail="..."

``who`` and ``role`` are ``-`` when unknown (a certificate that named nobody); ``job`` is
``-`` for calls that concern no single job. Values made only of safe characters are written
bare; any other value is written as a JSON string, so a certificate name with spaces,
quotes or newlines can never forge a second line or field. The same fields are attached to
the record as ``record.audit`` (a dict) for handlers that emit structured logs.

Every field is cut to :data:`MAX_FIELD_CHARS` characters, and a cut value ends with
``...[N chars]`` giving its full length, so no request can make a line long. When the call
arrived over a connection the hook has seen (:func:`set_connection`), the line ends with
``peer=`` (the client's address and port) and ``serial=`` (the client certificate's serial
number, in hex).

Refused calls are logged by the authorization hook (:mod:`jobworker.auth.hook`); requests
that cannot be read are logged where they are read (:mod:`jobworker.server.receive`); the
service logs the outcome of every call that reached a handler.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Final

from grpclib.const import Status

from jobworker.auth.identity import Identity

__all__ = [
    "AUDIT_LOGGER",
    "MAX_FIELD_CHARS",
    "audit",
    "bounded",
    "format_value",
    "set_connection",
    "using_connection",
]

AUDIT_LOGGER: Final = "jobworker.audit"
MAX_FIELD_CHARS: Final = 200

#: (peer address, certificate serial) of the connection the current call arrived on.
_connection: ContextVar[tuple[str | None, str | None] | None] = ContextVar(
    "jobworker_audit_connection", default=None
)

_log = logging.getLogger(AUDIT_LOGGER)
_SAFE: Final = re.compile(r"[A-Za-z0-9._:/@+-]+")


def format_value(value: str | None) -> str:
    """Render one audit field: ``-`` for None, bare when safe, else a JSON string."""
    if value is None:
        return "-"
    if _SAFE.fullmatch(value) and value != "-":
        return value
    return json.dumps(value, ensure_ascii=True)


def bounded(value: str | None, limit: int = MAX_FIELD_CHARS) -> str | None:
    """``value`` cut to ``limit`` characters, noting its full length when it was cut."""
    if value is None or len(value) <= limit:
        return value
    return f"{value[:limit]}...[{len(value)} chars]"


def set_connection(peer: str | None, serial: str | None) -> None:
    """Name the client's address and certificate serial in this context's audit lines."""
    _connection.set((peer, serial))


@contextmanager
def using_connection(peer: str | None, serial: str | None) -> Iterator[None]:
    """:func:`set_connection` for the ``with`` block only."""
    token = _connection.set((peer, serial))
    try:
        yield
    finally:
        _connection.reset(token)


def audit(
    identity: Identity | str | None,
    rpc: str,
    job_id: str | None = None,
    outcome: str | Status = "ok",
    *,
    detail: str | None = None,
) -> None:
    """Log one audit line for a call.

    ``identity`` is the caller (or just a name when no valid identity could be built);
    ``rpc`` the method name or path; ``outcome`` a word such as ``ok`` or a gRPC
    :class:`~grpclib.const.Status` (written as its lower-case name, e.g. ``not_found``);
    ``detail`` an optional short reason.
    """
    if isinstance(identity, Identity):
        who: str | None = identity.name
        role: str | None = identity.role.value
    else:
        who, role = identity, None
    result = outcome.name.lower() if isinstance(outcome, Status) else outcome
    fields: dict[str, str | None] = {
        "who": bounded(who),
        "role": bounded(role),
        "rpc": bounded(rpc),
        "job": bounded(job_id),
        "outcome": result,
    }
    if detail is not None:
        fields["detail"] = bounded(detail, 2 * MAX_FIELD_CHARS)
    if (connection := _connection.get()) is not None:
        fields["peer"], fields["serial"] = (bounded(v) for v in connection)
    line = " ".join(f"{key}={format_value(value)}" for key, value in fields.items())
    _log.info("audit %s", line, extra={"audit": fields})
