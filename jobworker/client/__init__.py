"""The async client library for the jobworker gRPC API."""

from jobworker.client.client import Client, OutputReader

__all__ = ["Client", "OutputReader"]
