"""The real services over gRPC (UNIX socket and TCP loopback), shared with the integration tests."""

from tests.integration.conftest import services, unix_services

__all__ = ["services", "unix_services"]
