"""The async client library for the jobworker gRPC API."""
