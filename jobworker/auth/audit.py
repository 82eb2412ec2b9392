"""Audit lines: one structured log record per RPC, on logger ``jobworker.audit``.

Each record is a single line of ``key=value`` pairs, always in this order::

    audit who=alice role=user rpc=StopJob job=- outcome=permission_denied detail="..."

``who`` and ``role`` are ``-`` when unknown (a certificate that named nobody); ``job`` is
``-`` for calls that concern no single job. Values made only of safe characters are written
bare; any other value is written as a JSON string, so a certificate name with spaces,
quotes or newlines can never forge a second line or field. The same fields are attached to
the record as ``record.audit`` (a dict) for handlers that emit structured logs.

Refused calls are logged by the authorization hook (:mod:`jobworker.auth.hook`); the
service logs the outcome of every call that reached a handler.
"""

from __future__ import annotations

import json
import logging
import re
from typing import Final

from grpclib.const import Status

from jobworker.auth.identity import Identity

__all__ = ["AUDIT_LOGGER", "audit", "format_value"]

AUDIT_LOGGER: Final = "jobworker.audit"

_log = logging.getLogger(AUDIT_LOGGER)
_SAFE: Final = re.compile(r"[A-Za-z0-9._:/@+-]+")


def format_value(value: str | None) -> str:
    """Render one audit field: ``-`` for None, bare when safe, else a JSON string."""
    if value is None:
        return "-"
    if _SAFE.fullmatch(value) and value != "-":
        return value
    return json.dumps(value, ensure_ascii=True)


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
        "who": who,
        "role": role,
        "rpc": rpc,
        "job": job_id,
        "outcome": result,
    }
    if detail is not None:
        fields["detail"] = detail
    line = " ".join(f"{key}={format_value(value)}" for key, value in fields.items())
    _log.info("audit %s", line, extra={"audit": fields})
