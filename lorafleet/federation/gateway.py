"""The device gateway: the only door devices have to the federation server.

Flower's SuperLink serves its Fleet API (what SuperNodes call: register, heartbeat, pull and push messages and
objects), its Control API (``flwr run`` / ``flwr ls`` / ``flwr stop`` / node registration) and its Runtime API
(what the ServerApp process calls) from one HTTP application on one port, told apart by path prefix
(``/v1/fleet/``, ``/v1/control/``, ``/v1/runtime/``). The open-source Control API has no authentication of its
own, so whoever reaches that port can submit an app — and its ServerApp runs on the server, its ClientApp on
every connected device.

``lorafleet serve`` therefore binds the SuperLink to 127.0.0.1 and puts this gateway on the public address.
The gateway terminates the devices' TLS and forwards exactly the Fleet API — ``POST /v1/fleet/<call>`` with a
bounded body — to the SuperLink; everything else is answered ``403`` without reaching it. The Control and
Runtime APIs stay reachable from the server machine only. Headers pass through unchanged, so SuperNode
authentication (signed timestamps, checked by the SuperLink) works through it.

Run on its own in front of a SuperLink started with Flower's commands (``lorafleet gateway``)::

    flower-superlink --host 127.0.0.1 --port 9093 ...
    lorafleet gateway --listen 0.0.0.0:9092 --superlink 127.0.0.1:9093 --ssl-certfile ... --ssl-keyfile ...
"""

from __future__ import annotations

import re
import ssl
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from lorafleet.export.formats.errors import ConfigError

if TYPE_CHECKING:
    from starlette.requests import Request
    from starlette.responses import Response

FLEET_PATH = re.compile(r"^/v1/fleet/[a-z][a-z-]{0,63}$")  # Flower's Fleet routes: /v1/fleet/pull-messages ...
MAX_BODY_BYTES = 64 << 20  # Flower moves arrays in 5 MiB objects; nothing a device sends needs more
UPSTREAM_TIMEOUT = 120.0
# Hop-by-hop headers (RFC 9110 §7.6.1) and those the HTTP client recomputes are not forwarded.
_HOP = frozenset({"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
                  "transfer-encoding", "upgrade", "host", "content-length"})


@dataclass(frozen=True)
class GatewayConfig:
    """Where the gateway listens, the SuperLink it forwards to, and the TLS files of both sides."""

    listen_host: str
    listen_port: int
    upstream: str  # HOST:PORT of the SuperLink (127.0.0.1 in lorafleet's deployment)
    certfile: str = ""  # the devices' side: the server certificate and key (no TLS without them)
    keyfile: str = ""
    upstream_ca: str = ""  # the SuperLink's side: the CA its certificate is checked against ("": plain HTTP)
    max_body_bytes: int = MAX_BODY_BYTES

    def __post_init__(self) -> None:
        if bool(self.certfile) != bool(self.keyfile):
            raise ConfigError("the gateway's TLS needs both a certificate and its key")
        if self.max_body_bytes < 1:
            raise ConfigError(f"max_body_bytes must be positive, got {self.max_body_bytes}")

    @property
    def upstream_url(self) -> str:
        return f"{'https' if self.upstream_ca else 'http'}://{self.upstream}"


def allowed(method: str, path: str) -> bool:
    """Whether a device may make this request: a POST to one of the Fleet API's calls, nothing else."""
    return method == "POST" and FLEET_PATH.match(path) is not None


def create_app(config: GatewayConfig) -> Any:
    """The gateway as an ASGI application (Starlette), forwarding with one pooled HTTP client."""
    import contextlib

    import httpx
    from starlette.applications import Starlette
    from starlette.responses import Response
    from starlette.routing import Route

    verify: ssl.SSLContext | bool = ssl.create_default_context(cafile=config.upstream_ca) if config.upstream_ca \
        else False
    client = httpx.AsyncClient(base_url=config.upstream_url, verify=verify, timeout=UPSTREAM_TIMEOUT)

    async def forward(request: Request) -> Response:
        if not allowed(request.method, request.url.path) or request.url.query:
            return Response("lorafleet gateway: only the Flower Fleet API is served here\n", status_code=403,
                            media_type="text/plain")
        body = await _bounded_body(request, config.max_body_bytes)
        if body is None:
            return Response("lorafleet gateway: request body too large\n", status_code=413, media_type="text/plain")
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP}
        try:
            upstream = await client.post(request.url.path, content=body, headers=headers)
        except httpx.HTTPError:
            return Response("lorafleet gateway: the SuperLink is unavailable\n", status_code=503,
                            media_type="text/plain")
        out_headers = {k: v for k, v in upstream.headers.items() if k.lower() not in _HOP | {"content-encoding"}}
        return Response(upstream.content, status_code=upstream.status_code, headers=out_headers)

    @contextlib.asynccontextmanager
    async def lifespan(app: Any) -> Any:
        yield
        await client.aclose()

    methods = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]
    return Starlette(routes=[Route("/{path:path}", forward, methods=methods)], lifespan=lifespan)


async def _bounded_body(request: Request, limit: int) -> bytes | None:
    """The request body, or ``None`` once it exceeds ``limit`` bytes (read no further than that)."""
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > limit):
        return None
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


def run_gateway(config: GatewayConfig) -> None:
    """Serve until stopped (SIGTERM / SIGINT)."""
    import uvicorn

    uvicorn.run(create_app(config), host=config.listen_host, port=config.listen_port,
                ssl_certfile=config.certfile or None, ssl_keyfile=config.keyfile or None,
                log_level="warning", access_log=False, server_header=False, date_header=False)
