"""Fixtures of the abuse suite: a real server over real TLS on 127.0.0.1, hostile clients.

Quick mode (the default) keeps the whole suite well under a minute on two cores;
``JOBWORKER_ABUSE_FULL=1`` runs the bigger rounds.
"""

from __future__ import annotations

import logging
import os
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from helpers import open_fds

from jobworker.auth.audit import AUDIT_LOGGER
from jobworker.certs import PkiPaths, init_pki, issue_client
from jobworker.client import Client
from jobworker.client.tls import client_ssl_context
from jobworker.server.app import JobworkerServer, ServerConfig
from jobworker.server.limits import ServerLimits
from jobworker.worker import WorkerConfig

FULL = os.environ.get("JOBWORKER_ABUSE_FULL") == "1"

#: Generous margins for "back near the baseline" (the test process holds the clients too).
RSS_MARGIN = 40 << 20
FD_MARGIN = 4


@dataclass(frozen=True)
class AbusePki:
    paths: PkiPaths

    def cert(self, name: str) -> tuple[Path, Path]:
        if name == "admin":
            return self.paths.admin_cert, self.paths.admin_key
        return self.paths.directory / f"{name}.pem", self.paths.directory / f"{name}-key.pem"

    def context(self, name: str = "admin") -> ssl.SSLContext:
        cert, key = self.cert(name)
        return client_ssl_context(cert, key, self.paths.server_ca)

    def client(self, port: int, name: str = "admin") -> Client:
        cert, key = self.cert(name)
        return Client("127.0.0.1", port, cert=cert, key=key, ca=self.paths.server_ca)


@pytest.fixture(scope="session")
def abuse_pki(tmp_path_factory: pytest.TempPathFactory) -> AbusePki:
    directory = tmp_path_factory.mktemp("abuse-pki")
    paths = init_pki(directory)
    issue_client(directory, "alice", "user")
    return AbusePki(paths)


@pytest.fixture
def limits() -> ServerLimits:
    """The server's limits in a test; tests override this fixture to lower some."""
    return ServerLimits()


@pytest.fixture
async def server(
    config: WorkerConfig, abuse_pki: AbusePki, limits: ServerLimits
) -> AsyncIterator[JobworkerServer]:
    server_config = ServerConfig(
        worker=config,
        tls_cert=abuse_pki.paths.server_cert,
        tls_key=abuse_pki.paths.server_key,
        client_ca=abuse_pki.paths.client_ca,
        port=0,
        limits=limits,
    )
    async with JobworkerServer(server_config) as running:
        yield running


@pytest.fixture
def audit_log(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.INFO, logger=AUDIT_LOGGER)
    return caplog


def audit_lines(log: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in log.records if r.name == AUDIT_LOGGER]


def rss() -> int:
    """This process's resident set size in bytes (the server runs in it)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


@dataclass(frozen=True)
class Usage:
    rss: int
    fds: int


def usage() -> Usage:
    return Usage(rss(), len(open_fds()))


async def served(pki: AbusePki, port: int) -> None:
    """A normal client is served: it lists jobs over a fresh connection."""
    async with pki.client(port) as client:
        assert isinstance(await client.list(), list)
