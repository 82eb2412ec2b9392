"""The gRPC server: TLS, the Worker service, error mapping and its lifecycle."""
