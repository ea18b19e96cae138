"""Every gRPC server and channel of the project is built here, so one place decides how it is protected.

A process has one ``Security`` (``configure`` sets it from ``--tls-cert/--tls-key/--tls-ca/--token-file``;
the default is plaintext with no token, as before). Servers and channels take it explicitly or use the
process's. The same credentials serve both directions: the vcpu service presents its certificate and token
to device services with the very files it uses to check its own clients.

- TLS: a server with ``--tls-cert/--tls-key`` serves TLS; with ``--tls-ca`` too it requires client
  certificates signed by that CA (mutual TLS). A client uses TLS when given ``--tls-ca`` (it then checks the
  server against that CA; without it, against the system's roots) or ``--tls-cert``, and presents
  ``--tls-cert/--tls-key`` as its client certificate when given. Over a UNIX socket the server's certificate
  is checked for the name ``localhost``.
- Token: a server with a token requires ``authorization: Bearer <token>`` on every RPC except grpc.health.v1
  (probes must work without secrets); reflection needs the token like everything else (it is an operator's
  tool, and operators have it). Clients send it on every call through a client interceptor, which works on
  plaintext UNIX sockets too (``grpc.access_token_call_credentials`` needs a TLS channel). A refusal is
  UNAUTHENTICATED with a message saying what was missing, logged with the peer's address; the token itself
  is never echoed, in the message or the log. Tokens are compared in constant time.
- Listening: a server refuses to listen on anything but a UNIX socket or a loopback address unless TLS or a
  token protects it, or it is given ``--insecure``.

TLS handshake refusals (a certificate from another CA, no client certificate, plaintext to a TLS port) never
reach Python: gRPC's core refuses the connection and logs it itself ("Handshake failed ..."), without the
peer's address.
"""

from __future__ import annotations

import argparse
import hmac
import ipaddress
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import grpc
import grpc.aio

from mmiosplit.address import ServiceAddress, parse_address
from mmiosplit.malformed import AsyncMalformedCheck, SyncMalformedCheck, same_shape
from mmiosplit.wire import GRPC_OPTIONS

log = logging.getLogger("mmiosplit.security")

#: RPCs a server with a token answers without one: health, so that probes need no secret.
OPEN_SERVICES = ("/grpc.health.v1.Health/",)
#: The metadata key of the token (gRPC metadata keys are lower case).
AUTHORIZATION = "authorization"
#: The name a server's certificate is checked against when the client reaches it over a UNIX socket.
UNIX_TLS_NAME = "localhost"


class SecurityError(ValueError):
    """Credentials that cannot be used (a missing or empty file, half a key pair) or a listen address that
    needs protection it does not have; the message names the file or the address."""


@dataclass(frozen=True)
class Security:
    """The credentials of one process: TLS material (PEM bytes), a token, and the files they came from (which
    the launcher hands to the services it starts)."""

    cert: bytes | None = None
    key: bytes | None = field(default=None, repr=False)  # secrets stay out of reprs (tracebacks, logs)
    ca: bytes | None = None
    token: str | None = field(default=None, repr=False)
    insecure: bool = False
    #: flag -> file, for ``service_flags``.
    files: dict[str, str] = field(default_factory=dict, compare=False)

    @property
    def serves_tls(self) -> bool:
        return self.cert is not None

    @property
    def requires_client_certificates(self) -> bool:
        return self.cert is not None and self.ca is not None

    @property
    def connects_tls(self) -> bool:
        return self.ca is not None or self.cert is not None

    def service_flags(self) -> list[str]:
        """The command-line flags that give a started service these credentials (never the token itself)."""
        flags: list[str] = []
        for flag in ("--tls-cert", "--tls-key", "--tls-ca", "--token-file"):
            if flag in self.files:
                flags += [flag, self.files[flag]]
        return flags

    def describe(self) -> str:
        """A few words for the start-up line: what protects this process's connections."""
        parts = []
        if self.requires_client_certificates:
            parts.append("mutual TLS")
        elif self.serves_tls:
            parts.append("TLS")
        if self.token is not None:
            parts.append("token")
        return " + ".join(parts) or ("plaintext (--insecure)" if self.insecure else "plaintext")


PLAINTEXT = Security()


def _read(flag: str, path: str, what: str) -> bytes:
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise SecurityError(f"{flag} {path}: no such file") from None
    except OSError as exc:
        raise SecurityError(f"{flag} {path}: cannot read it ({exc.strerror or exc})") from None
    if not data.strip():
        raise SecurityError(f"{flag} {path}: the file is empty")
    if what and b"-----BEGIN" not in data:
        raise SecurityError(f"{flag} {path}: not a PEM file (expected a {what})")
    return data


def load(tls_cert: str | None = None, tls_key: str | None = None, tls_ca: str | None = None,
         token_file: str | None = None, insecure: bool = False) -> Security:
    """Read the files the flags name, once, at start-up; a missing, empty or unreadable one is a SecurityError
    naming it."""
    if (tls_cert is None) != (tls_key is None):
        raise SecurityError("--tls-cert and --tls-key go together: give both (the certificate and its private key)")
    files = {flag: str(Path(path).resolve()) for flag, path in
             (("--tls-cert", tls_cert), ("--tls-key", tls_key), ("--tls-ca", tls_ca), ("--token-file", token_file))
             if path}
    token = None
    if token_file:
        raw = _read("--token-file", token_file, "")
        try:
            token = raw.decode("ascii").strip()
        except UnicodeDecodeError:
            raise SecurityError(f"--token-file {token_file}: the token must be printable ASCII") from None
        if not token.isprintable() or any(c.isspace() for c in token):
            raise SecurityError(f"--token-file {token_file}: the token must be one line of printable ASCII "
                                "without spaces")
    return Security(
        cert=_read("--tls-cert", tls_cert, "certificate") if tls_cert else None,
        key=_read("--tls-key", tls_key, "private key") if tls_key else None,
        ca=_read("--tls-ca", tls_ca, "CA certificate") if tls_ca else None,
        token=token, insecure=insecure, files=files)


_process = PLAINTEXT


def configure(security: Security) -> None:
    """Set this process's credentials: every server and channel built without explicit ones uses them."""
    global _process
    _process = security


def current() -> Security:
    """This process's credentials (plaintext, no token, until ``configure``)."""
    return _process


# ----- listening ---------------------------------------------------------------------------------------------
def is_local(address: ServiceAddress) -> bool:
    """A UNIX socket, ``localhost`` or a loopback IP (127.0.0.0/8, ::1): reachable only from this machine."""
    if address.is_unix:
        return True
    host = (address.host or "").strip("[]")
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_listen(address: ServiceAddress, security: Security) -> None:
    """Refuse to serve a non-local address in the clear: TLS or a token must protect it, or --insecure say so."""
    if is_local(address) or security.serves_tls or security.token is not None or security.insecure:
        return
    raise SecurityError(
        f"refusing to listen on {address.text}: it is not a UNIX socket or a loopback address, and neither TLS "
        "(--tls-cert/--tls-key) nor a token (--token-file) protects it; give one, or --insecure to serve it "
        "in the clear on purpose (e.g. on a private container network)")


def bind(server: grpc.Server | grpc.aio.Server, address: ServiceAddress, security: Security) -> int:
    """Add the listening port with these credentials (after ``check_listen``); the port bound, 0 on failure."""
    check_listen(address, security)
    if security.serves_tls:
        assert security.cert is not None and security.key is not None
        creds = grpc.ssl_server_credentials([(security.key, security.cert)], root_certificates=security.ca,
                                            require_client_auth=security.ca is not None)
        return server.add_secure_port(address.target, creds)
    return server.add_insecure_port(address.target)


# ----- servers: the token check ------------------------------------------------------------------------------
def _refusal(metadata: Iterable[tuple[str, str | bytes]] | None, expected: bytes) -> str | None:
    """Why a call's metadata does not carry the token (None when it does). Never contains the token."""
    values = [v for k, v in (metadata or ()) if k == AUTHORIZATION]
    if not values:
        return "missing token: this service requires 'authorization: Bearer <token>' metadata (--token-file)"
    value = values[0].encode() if isinstance(values[0], str) else values[0]
    if not value.startswith(b"Bearer "):
        return "malformed authorization metadata: expected 'Bearer <token>'"
    if not hmac.compare_digest(value[len(b"Bearer "):].strip(), expected):
        return "wrong token"
    return None


def _is_open(method: str) -> bool:
    return method.startswith(OPEN_SERVICES)


def _log_refusal(peer: str, method: str, why: str) -> None:
    log.warning("refused %s from %s: UNAUTHENTICATED: %s", method, peer or "an unknown peer", why)


class _SyncTokenCheck(grpc.ServerInterceptor):
    """The token check of a thread-pool server: a refused call gets a handler of the same kind that aborts."""

    def __init__(self, token: str) -> None:
        self._expected = token.encode()

    def intercept_service(self, continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
                          details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        handler = continuation(details)
        method = str(details.method)
        if handler is None or _is_open(method):
            return handler
        why = _refusal(details.invocation_metadata, self._expected)
        if why is None:
            return handler

        def deny(_request: object, context: grpc.ServicerContext) -> Any:
            _log_refusal(context.peer(), method, why)
            context.abort(grpc.StatusCode.UNAUTHENTICATED, why)

        return same_shape(handler, deny)


class _AsyncTokenCheck(grpc.aio.ServerInterceptor):
    """The token check of a grpc.aio server."""

    def __init__(self, token: str) -> None:
        self._expected = token.encode()

    async def intercept_service(
            self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
            details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        method = str(details.method)
        if handler is None or _is_open(method):
            return handler
        why = _refusal(details.invocation_metadata, self._expected)
        if why is None:
            return handler

        async def deny(_request: object, context: grpc.aio.ServicerContext) -> Any:
            _log_refusal(context.peer(), method, why)
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, why)

        return same_shape(handler, deny)


def server(executor: futures.ThreadPoolExecutor, security: Security | None = None,
           options: Sequence[tuple[str, Any]] = GRPC_OPTIONS) -> grpc.Server:
    """A thread-pool server (the vcpu service's) that checks the token when there is one; ``bind`` it."""
    sec = current() if security is None else security
    interceptors: list[grpc.ServerInterceptor[Any, Any]] = [_SyncTokenCheck(sec.token)] if sec.token else []
    interceptors.append(SyncMalformedCheck())
    return grpc.server(executor, interceptors=interceptors, options=options)


def aio_server(security: Security | None = None, options: Sequence[tuple[str, Any]] = GRPC_OPTIONS) -> grpc.aio.Server:
    """A grpc.aio server (the device service's) that checks the token when there is one; ``bind`` it."""
    sec = current() if security is None else security
    interceptors: list[grpc.aio.ServerInterceptor] = [_AsyncTokenCheck(sec.token)] if sec.token else []
    interceptors.append(AsyncMalformedCheck())
    return grpc.aio.server(interceptors=interceptors, options=options)


# ----- channels ----------------------------------------------------------------------------------------------
class _CallDetails(NamedTuple):
    method: str
    timeout: float | None
    metadata: Sequence[tuple[str, str | bytes]] | None
    credentials: grpc.CallCredentials | None
    wait_for_ready: bool | None
    compression: grpc.Compression | None


class _BearerToken(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                   grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    """Adds ``authorization: Bearer <token>`` to every call (once per stream, not per message)."""

    def __init__(self, token: str) -> None:
        self._header = (AUTHORIZATION, f"Bearer {token}")

    def _with_token(self, details: grpc.ClientCallDetails) -> grpc.ClientCallDetails:
        d: Any = details
        metadata = [*(d.metadata or ()), self._header]
        return _CallDetails(d.method, d.timeout, metadata, d.credentials,  # type: ignore[return-value]
                            getattr(d, "wait_for_ready", None), getattr(d, "compression", None))

    def intercept_unary_unary(self, continuation: Callable[..., Any], details: grpc.ClientCallDetails,
                              request: Any) -> Any:
        return continuation(self._with_token(details), request)

    def intercept_unary_stream(self, continuation: Callable[..., Any], details: grpc.ClientCallDetails,
                               request: Any) -> Any:
        return continuation(self._with_token(details), request)

    def intercept_stream_unary(self, continuation: Callable[..., Any], details: grpc.ClientCallDetails,
                               request_iterator: Any) -> Any:
        return continuation(self._with_token(details), request_iterator)

    def intercept_stream_stream(self, continuation: Callable[..., Any], details: grpc.ClientCallDetails,
                                request_iterator: Any) -> Any:
        return continuation(self._with_token(details), request_iterator)


def channel(address: str | ServiceAddress, security: Security | None = None,
            options: Sequence[tuple[str, Any]] = GRPC_OPTIONS) -> grpc.Channel:
    """A channel to ``unix:PATH`` or ``HOST:PORT`` with these credentials (the process's by default): TLS when
    they say so, and the token on every call when there is one."""
    sec = current() if security is None else security
    where = parse_address(address) if isinstance(address, str) else address
    opts = list(options)
    if sec.connects_tls:
        if where.is_unix:
            opts.append(("grpc.ssl_target_name_override", UNIX_TLS_NAME))
        creds = grpc.ssl_channel_credentials(root_certificates=sec.ca, private_key=sec.key,
                                             certificate_chain=sec.cert)
        ch = grpc.secure_channel(where.target, creds, options=opts)
    else:
        ch = grpc.insecure_channel(where.target, options=opts)
    if sec.token is not None:
        return grpc.intercept_channel(ch, _BearerToken(sec.token))
    return ch


# ----- flags -------------------------------------------------------------------------------------------------
#: The flags' variables, read by every command that connects (the services get theirs through envconfig).
ENVIRONMENT = {"tls_cert": "MMIOSPLIT_TLS_CERT", "tls_key": "MMIOSPLIT_TLS_KEY", "tls_ca": "MMIOSPLIT_TLS_CA",
               "token_file": "MMIOSPLIT_TOKEN_FILE"}


def add_arguments(parser: argparse.ArgumentParser, serving: bool) -> None:
    """The credential flags, on every command that serves (``serving``: also --insecure) or connects."""
    group = parser.add_argument_group(
        "security", "TLS and a bearer token (see README, Security); one set of credentials per process, for the "
        "servers it runs and the connections it makes; each also from MMIOSPLIT_<FLAG>")
    group.add_argument("--tls-cert", metavar="FILE",
                       help="PEM certificate this process presents: a server serves TLS with it (with --tls-key), a "
                       "client presents it as its client certificate")
    group.add_argument("--tls-key", metavar="FILE", help="PEM private key of --tls-cert")
    group.add_argument("--tls-ca", metavar="FILE",
                       help="PEM CA certificate: a server then requires client certificates it signed (mutual TLS); "
                       "a client checks servers against it")
    group.add_argument("--token-file", metavar="FILE",
                       help="file holding a bearer token: a server requires 'authorization: Bearer <token>' on every "
                       "RPC but health, a client sends it on every call")
    if serving:
        group.add_argument("--insecure", action="store_true",
                           help="listen on an address other than a UNIX socket or loopback with neither TLS nor a "
                           "token (e.g. on a private container network)")


def from_arguments(args: argparse.Namespace, environ: Mapping[str, str]) -> Security:
    """The credentials the flags (or, for a flag not given, its MMIOSPLIT_ variable) name, read now."""
    files = {dest: getattr(args, dest, None) or environ.get(name) or None for dest, name in ENVIRONMENT.items()}
    return load(**files, insecure=bool(getattr(args, "insecure", False)))
