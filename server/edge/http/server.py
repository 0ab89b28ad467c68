"""The HTTP front door's server: a Starlette app served by uvicorn inside the edge's event loop, next to
grpc.aio (serve --http-port). Routes:

  POST /v1/images/generations, /v1/images/edits   OpenAI's Images API (openai.py)
  POST /v1/generate, GET /v1/info, /v1/models      lcmserve's own (native.py)
  GET /health, /ready                              open, as gRPC's health service
  GET /                                            the playground page (static/index.html), open

Every route but /health, /ready and the page needs `Authorization: Bearer <token>` when the server has
tokens (auth.TokenCheck, as gRPC's). TLS is the gRPC port's certificate (--tls-cert; mTLS with
--tls-client-ca). uvicorn's own signal handling is not used: the edge's (app.py) drains, then `stop()`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import ssl
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from ...config import TlsConfig
from ..auth import HEADER, TokenCheck, unauthenticated
from ..core import EdgeCore
from ..status import Status
from . import native, openai
from .common import TRANSPORT, HttpContext
from .errors import ApiError, not_found, refusal_error

log = logging.getLogger("lcmserve.http")

STATIC = Path(__file__).parent / "static"
OPEN_PATHS = frozenset({"/health", "/ready", "/", "/index.html", "/favicon.ico"})  # no token needed
GENERATE_PATHS = frozenset({"/v1/images/generations", "/v1/images/edits", "/v1/generate"})
Handler = Callable[[HttpContext, Request], Awaitable[Response]]


def make_app(core: EdgeCore, tokens: tuple[str, ...] = ()) -> ASGIApp:
    """The ASGI app over `core`; with `tokens`, bearer authentication on every route but the open ones."""
    ctx = HttpContext(core, TokenCheck(tokens) if tokens else None)

    def route(path: str, handler: Handler, method: str) -> Route:
        async def endpoint(request: Request) -> Response:
            return await handler(ctx, request)
        return Route(path, endpoint, methods=[method])

    async def page(request: Request) -> Response:
        index = STATIC / "index.html"
        if not index.is_file():
            return not_found(request.url.path).response()
        return FileResponse(index, media_type="text/html; charset=utf-8",
                            headers={"content-security-policy": "default-src 'self' 'unsafe-inline' data: blob:",
                                     "x-content-type-options": "nosniff"})

    async def missing(request: Request, exc: Exception) -> Response:
        if getattr(exc, "status_code", 404) == 405:
            return ApiError(405, f"{request.method} is not a method of {request.url.path}",
                            code="method_not_allowed").response()
        return not_found(request.url.path).response()

    async def failed(request: Request, exc: Exception) -> Response:
        log.exception("HTTP %s %s failed", request.method, request.url.path, exc_info=exc)
        return ApiError(500, "internal error; the server log has the details", code="internal",
                        status=Status.INTERNAL).response()

    routes = [
        route("/v1/images/generations", openai.generations, "POST"),
        route("/v1/images/edits", openai.edits, "POST"),
        route("/v1/generate", native.generate, "POST"),
        route("/v1/models", native.models, "GET"),
        route("/v1/info", native.info, "GET"),
        route("/health", native.health, "GET"),
        route("/ready", native.ready, "GET"),
        Route("/", page, methods=["GET"]),
        Route("/index.html", page, methods=["GET"]),
    ]
    app = Starlette(routes=routes, exception_handlers={404: missing, 405: missing, Exception: failed})
    return _Auth(app, ctx) if ctx.tokens is not None else app


class _Auth:
    """Bearer tokens (auth.TokenCheck) on every route but OPEN_PATHS; a refused call is counted as
    gRPC's are (lcmserve_unauthenticated_request by route, and a generate route's in the request counter)."""

    def __init__(self, app: ASGIApp, ctx: HttpContext) -> None:
        self.app = app
        self.ctx = ctx

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or path in OPEN_PATHS or self.ctx.tokens is None:
            await self.app(scope, receive, send)
            return
        given = next((v for k, v in scope.get("headers", ()) if k == HEADER.encode()), None)
        if self.ctx.tokens.allows(given):
            await self.app(scope, receive, send)
            return
        metrics = self.ctx.core.metrics
        if metrics is not None:
            known = path if path in GENERATE_PATHS or path.startswith("/v1/") and len(path) < 40 else "other"
            metrics.unauthenticated.labels(method=f"http {known}").inc()
            if path in GENERATE_PATHS:
                metrics.request_done(Status.UNAUTHENTICATED, TRANSPORT)
        response = refusal_error(unauthenticated("header")).response()
        response.headers["www-authenticate"] = "Bearer"
        await response(scope, receive, send)


class HttpServer:
    """uvicorn on an already bound socket, in the running event loop (no signal handlers of its own)."""

    def __init__(self, core: EdgeCore, host: str, port: int, tokens: tuple[str, ...] = (),
                 tls: TlsConfig | None = None) -> None:
        self.core = core
        self.host = host
        self.requested_port = port
        self.tokens = tokens
        self.tls = tls
        self.port = 0
        self._server: uvicorn.Server | None = None
        self._ticks: asyncio.Task[None] | None = None

    async def start(self) -> int:
        """Bind and serve; returns the bound port. OSError when the address cannot be bound."""
        sock = _bind(self.host, self.requested_port)
        self.port = sock.getsockname()[1]
        # log_config=None: uvicorn's loggers keep no handlers of their own and reach the root's, so they
        # log in the server's format (--log-format json included: server/logs.py); the access log is ours.
        config = uvicorn.Config(make_app(self.core, self.tokens), lifespan="off", log_level="warning",
                                access_log=False, timeout_graceful_shutdown=5, server_header=False,
                                ws="none", log_config=None)
        config.load()
        if self.tls is not None:
            config.ssl = ssl_context(self.tls)
        server = uvicorn.Server(config)
        server.lifespan = config.lifespan_class(config)
        await server.startup(sockets=[sock])
        self._server = server
        self._ticks = asyncio.create_task(server.main_loop())  # the Date header, once a second
        return self.port

    async def stop(self) -> None:
        """Stop listening; connections still open get uvicorn's graceful shutdown (5 s), then close."""
        server = self._server
        if server is None:
            return
        self._server = None
        server.should_exit = True
        if self._ticks is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._ticks
        await server.shutdown()


def ssl_context(tls: TlsConfig) -> ssl.SSLContext:
    """The gRPC port's certificate and key (PEM bytes) as a server context; client certificates
    required when the server has a client CA (mTLS). ssl loads a chain only from files: they are
    written to a private temporary folder and removed at once."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    with tempfile.TemporaryDirectory(prefix="lcmserve-tls-") as folder:
        cert, key = Path(folder, "cert.pem"), Path(folder, "key.pem")
        for path, data in ((cert, tls.cert_chain), (key, tls.private_key)):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as out:
                out.write(data)
        context.load_cert_chain(cert, key)
    if tls.client_ca is not None:
        context.load_verify_locations(cadata=tls.client_ca.decode("ascii"))
        context.verify_mode = ssl.CERT_REQUIRED
    context.set_alpn_protocols(["http/1.1"])
    return context


def _bind(host: str, port: int) -> socket.socket:
    bare = host.strip("[]")
    family = socket.AF_INET6 if ":" in bare else socket.AF_INET
    # IPPROTO_TCP named, not 0: asyncio sets TCP_NODELAY only on sockets that say TCP, and without it
    # every small SSE event waits for the client's delayed ACK (40 ms) behind Nagle's algorithm.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind((bare, port))
        sock.listen(2048)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock
