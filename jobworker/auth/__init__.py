"""Authentication and authorization of callers, from their TLS client certificate.

* :mod:`~jobworker.auth.roles`: the :class:`Role` enum and the certificate extension
  that carries it;
* :mod:`~jobworker.auth.identity`: :class:`Identity` read from a verified certificate;
* :mod:`~jobworker.auth.policy`: the pure policy, :func:`authorize` and :func:`can_see`;
* :mod:`~jobworker.auth.hook`: :func:`install_auth`, the grpclib hook that applies them
  before any handler runs, and :func:`current_identity` for handlers;
* :mod:`~jobworker.auth.audit`: :func:`audit`, one structured line per call.
"""

from __future__ import annotations

from jobworker.auth.audit import audit
from jobworker.auth.hook import current_identity, install_auth, peer_certificate_der, use_identity
from jobworker.auth.identity import Identity, identity_from_der
from jobworker.auth.policy import (
    Rpc,
    authorize,
    authorize_path,
    can_see,
    check_path,
    may_run_as_account,
)
from jobworker.auth.roles import ROLE_OID, Role

__all__ = [
    "ROLE_OID",
    "Identity",
    "Role",
    "Rpc",
    "audit",
    "authorize",
    "authorize_path",
    "can_see",
    "check_path",
    "current_identity",
    "identity_from_der",
    "install_auth",
    "may_run_as_account",
    "peer_certificate_der",
    "use_identity",
]
