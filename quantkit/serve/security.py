"""Who may use the server: an API key, browser origins (CORS), the ``Host`` header, JSON bodies.

One ASGI middleware (`SecurityMiddleware`, installed by `install`) checks every HTTP request, in
this order, before any route runs:

1. ``Host``: when `Security.allowed_hosts` is set (``quantkit serve`` sets it to the loopback names
   when it binds a loopback address), another host name is refused with 400 ``host_not_allowed``.
   This stops DNS rebinding: a page on ``evil.example`` whose name now resolves to 127.0.0.1 sends
   ``Host: evil.example``.
2. ``Origin``: a request that carries one (browsers send it on every cross-site request and on
   every POST) is refused with 403 ``origin_not_allowed`` unless `Security.cors_origins` lists it
   (``*``: any).  For a listed origin, preflights (``OPTIONS`` with
   ``Access-Control-Request-Method``) are answered 204 here, and every answer gets
   ``Access-Control-Allow-Origin``.  Clients that are not browsers send no ``Origin`` and pass.
3. API key: with `Security.api_key` set, every path but ``/health`` and ``/metrics`` needs
   ``Authorization: Bearer KEY`` (compared in constant time), else 401 ``invalid_api_key``, as
   OpenAI answers (and vLLM's ``--api-key``, which also leaves ``/health`` and ``/metrics`` open).
4. ``Content-Type`` of a POST: JSON (``application/json``, ``application/*+json``) or none, else
   415 ``unsupported_media_type``, as vLLM (FastAPI) refuses it: a ``text/plain`` or form POST is
   what a page can send cross-site without a preflight.

Every refusal is an OpenAI error body, counted in ``/metrics`` like other refused requests.

    >>> install(app, Security(api_key="s3cret", cors_origins=("http://localhost:3000",)))
"""

from __future__ import annotations

import hmac
import ipaddress
import re
from dataclasses import dataclass

from starlette.datastructures import Headers
from starlette.responses import JSONResponse, Response

from quantkit.errors import QuantkitError
from quantkit.serve.protocol import error_body

OPEN_PATHS = frozenset({"/health", "/metrics"})  # answered without the API key (as vLLM does)
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")
ANY = "*"
_ORIGIN = re.compile(r"^[a-z][a-z0-9+.-]*://(\[[0-9a-f:.]+\]|[a-z0-9.-]+)(:\d{1,5})?$")
_TOKEN = re.compile(r"^[\x21-\x7e]+$")  # printable ASCII, no space: what fits a Bearer header
_JSON_TYPE = re.compile(r"^application/([a-z0-9.+-]+\+)?json$")
PREFLIGHT_MAX_AGE = 600


def _origin(value: str) -> str:
    """``scheme://host[:port]`` lowercased (a trailing ``/`` dropped), ``*`` or ``null``; else refused."""
    v = value.strip().rstrip("/").lower()
    if v in (ANY, "null") or _ORIGIN.match(v):
        return v
    raise QuantkitError(f"--cors-origin {value!r} is not an origin: give scheme://host[:port] "
                        f"(e.g. http://localhost:3000) or '*'")


def _host_name(value: str) -> str:
    """The host of a ``Host`` header or ``--allowed-host`` value, lowercased, without port or brackets."""
    v = value.strip().lower()
    if v.startswith("["):  # [::1]:8000
        return v[1:v.find("]")] if "]" in v else v
    return v.rsplit(":", 1)[0] if v.count(":") == 1 else v


def is_loopback(host: str) -> bool:
    """Whether a bind address only accepts connections from this machine."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(_host_name(host)).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class Security:
    """The checks of `SecurityMiddleware`.  The defaults: no key, no browser origin, any ``Host``.

    ``api_key``: the Bearer token every request but ``/health`` and ``/metrics`` must carry (None: none).
    ``cors_origins``: browser origins allowed (``scheme://host[:port]``, or ``*`` for any).
    ``allowed_hosts``: host names the ``Host`` header may give (any port); None: any.
    """

    api_key: str | None = None
    cors_origins: tuple[str, ...] = ()
    allowed_hosts: tuple[str, ...] | None = None

    def __post_init__(self):
        if self.api_key is not None and not _TOKEN.match(self.api_key):
            raise QuantkitError("the API key (--api-key) must be non-empty printable ASCII without spaces")
        object.__setattr__(self, "cors_origins", tuple(dict.fromkeys(_origin(o) for o in self.cors_origins)))
        if self.allowed_hosts is not None:
            hosts = tuple(dict.fromkeys(_host_name(h) for h in self.allowed_hosts))
            if not all(hosts):
                raise QuantkitError("--allowed-host must not be empty")
            object.__setattr__(self, "allowed_hosts", None if ANY in hosts else hosts)

    @classmethod
    def for_bind(cls, host: str, api_key: str | None = None, cors_origins=(), allowed_hosts=()) -> Security:
        """The server's checks when it binds ``host``: bound to a loopback address, the ``Host``
        header must name this machine (``localhost``, ``127.0.0.1``, ``[::1]``) or one of
        ``allowed_hosts``; bound elsewhere, only ``allowed_hosts`` are checked (none given: any)."""
        hosts = tuple(allowed_hosts)
        if is_loopback(host):
            hosts = LOOPBACK_HOSTS + hosts
        return cls(api_key, tuple(cors_origins), hosts or None)

    def allows_origin(self, origin: str) -> bool:
        return ANY in self.cors_origins or origin.lower() in self.cors_origins

    def allows_host(self, host: str | None) -> bool:
        return self.allowed_hosts is None or host is None or _host_name(host) in self.allowed_hosts

    def authorized(self, authorization: str | None) -> bool:
        if self.api_key is None:
            return True
        scheme, _, token = (authorization or "").strip().partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), self.api_key.encode())


@dataclass(frozen=True)
class Refusal:
    status: int
    message: str
    code: str
    type: str = "invalid_request_error"
    headers: tuple[tuple[str, str], ...] = ()


def refusal(security: Security, method: str, path: str, headers: Headers) -> Refusal | None:
    """Why a request may not reach the app, or None (the checks of the module docstring, in order)."""
    if not security.allows_host(headers.get("host")):
        return Refusal(400, f"Host {_short(headers['host'])!r} is not allowed here (DNS rebinding?); "
                            f"start the server with --allowed-host to allow it", "host_not_allowed")
    origin = headers.get("origin")
    if origin is not None and not security.allows_origin(origin):
        return Refusal(403, f"cross-origin request from {_short(origin)!r} refused; start the server with "
                            f"--cors-origin {_short(origin)} to allow that origin", "origin_not_allowed")
    if origin is not None and _is_preflight(method, headers):
        return None  # answered by the middleware; a preflight carries no credentials
    if path not in OPEN_PATHS and not security.authorized(headers.get("authorization")):
        what = "invalid API key" if headers.get("authorization") else "missing API key"
        return Refusal(401, f"{what}: send the header 'Authorization: Bearer <key>' with the key the server "
                            "was started with (--api-key)", "invalid_api_key",
                       headers=(("WWW-Authenticate", "Bearer"),))
    content_type = headers.get("content-type", "").split(";")[0].strip().lower()
    if method == "POST" and content_type and not _JSON_TYPE.match(content_type):
        return Refusal(415, f"Content-Type must be application/json, got {_short(content_type)!r}; "
                            "send the header 'Content-Type: application/json'", "unsupported_media_type")
    return None


def _short(value: str, limit: int = 100) -> str:
    """A client's header value as quoted in a message: at most ``limit`` characters."""
    return value if len(value) <= limit else value[:limit] + "..."


def _is_preflight(method: str, headers: Headers) -> bool:
    return method == "OPTIONS" and "access-control-request-method" in headers


def _cors_headers(security: Security, origin: str | None) -> list[tuple[str, str]]:
    if origin is None or not security.allows_origin(origin):
        return []
    return [("Access-Control-Allow-Origin", ANY if ANY in security.cors_origins else origin), ("Vary", "Origin")]


class SecurityMiddleware:
    """ASGI middleware applying `refusal` to every HTTP request, answering CORS preflights and
    adding ``Access-Control-Allow-Origin`` for allowed origins; refusals are counted by status in
    ``rejected`` (the app's ``/metrics`` counts)."""

    def __init__(self, app, security: Security, rejected: dict[int, int] | None = None):
        self.app, self.security = app, security
        self.rejected = {} if rejected is None else rejected

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = Headers(scope=scope)
        origin = headers.get("origin")
        cors = _cors_headers(self.security, origin)
        refused = refusal(self.security, scope["method"], scope["path"], headers)
        if refused is not None:
            self.rejected[refused.status] = self.rejected.get(refused.status, 0) + 1
            body = error_body(refused.message, refused.type, code=refused.code)
            response = JSONResponse(body, status_code=refused.status, headers=dict(cors + list(refused.headers)))
            return await response(scope, receive, send)
        if origin is not None and _is_preflight(scope["method"], headers):
            allow = [("Access-Control-Allow-Methods", "GET, POST, OPTIONS"),
                     ("Access-Control-Max-Age", str(PREFLIGHT_MAX_AGE))]
            if "access-control-request-headers" in headers:  # the origin is trusted: allow what it asks
                allow.append(("Access-Control-Allow-Headers", headers["access-control-request-headers"]))
            return await Response(status_code=204, headers=dict(cors + allow))(scope, receive, send)
        if not cors:
            return await self.app(scope, receive, send)

        async def send_with_cors(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": list(message.get("headers", []))
                           + [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in cors]}
            await send(message)

        return await self.app(scope, receive, send_with_cors)


def install(app, security: Security, rejected: dict[int, int] | None = None) -> None:
    """Put `SecurityMiddleware` in front of every route of the Starlette/FastAPI ``app``; refusals
    are counted in ``rejected`` (HTTP status -> count)."""
    app.add_middleware(SecurityMiddleware, security=security, rejected=rejected)
