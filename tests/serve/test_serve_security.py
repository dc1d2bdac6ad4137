"""Server hardening (audit E34, E31): API key, CORS and cross-site requests, the Host header, JSON
bodies only, and the request-head timeout against slowloris connections."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")
from click.testing import CliRunner  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402

from quantkit.errors import QuantkitError  # noqa: E402
from quantkit.serve.app import create_app  # noqa: E402
from quantkit.serve.engine import Engine  # noqa: E402
from quantkit.serve.security import Security  # noqa: E402
from quantkit.serve.timeouts import HeadTimeoutProtocol, with_head_timeout  # noqa: E402

FIXTURE = str(Path(__file__).resolve().parents[1] / "fixtures" / "stories260K")
NAME = "stories260K"
KEY = "sk-test-0123456789"
COMPLETION = {"model": NAME, "prompt": "Once upon", "max_tokens": 2, "temperature": 0}


@pytest.fixture(scope="module")
def serve(model_tok):
    """``serve(security, base_url=...)``: a TestClient on a fresh app behind ``security`` (engine shared)."""
    model, tok = model_tok
    engine = Engine(model, tok, max_batch=2, max_queue=4)
    clients = []

    def make(security: Security | None = None, base_url: str = "http://testserver") -> TestClient:
        app = create_app(engine, NAME) if security is None else create_app(engine, NAME, security)
        c = TestClient(app, base_url=base_url)
        c.__enter__()
        clients.append(c)
        return c

    yield make
    for c in clients:
        c.__exit__(None, None, None)


def _error(r, status: int, code: str) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["code"] == code and err["message"], err
    return err


def test_api_key_guards_every_route_but_health_and_metrics(serve):
    c = serve(Security(api_key=KEY))
    err = _error(c.post("/v1/completions", json=COMPLETION), 401, "invalid_api_key")
    assert err["type"] == "invalid_request_error" and "missing API key" in err["message"]
    r = c.get("/v1/models", headers={"Authorization": "Bearer wrong"})
    assert "invalid API key" in _error(r, 401, "invalid_api_key")["message"]
    assert r.headers["www-authenticate"] == "Bearer"
    _error(c.get("/v1/models", headers={"Authorization": KEY}), 401, "invalid_api_key")  # no scheme
    _error(c.get("/v1/nope"), 401, "invalid_api_key")  # unknown routes too: denied by default
    assert c.get("/v1/models", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
    r = c.post("/v1/completions", json=COMPLETION, headers={"Authorization": f"bearer {KEY}"})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2
    assert c.get("/health").status_code == 200  # open, as in vLLM: load balancers and scrapers
    assert c.get("/metrics?format=json").json()["rejected"]["401"] == 4


def test_without_a_key_any_authorization_passes(serve):
    c = serve()
    assert c.get("/v1/models", headers={"Authorization": "Bearer anything"}).status_code == 200
    assert c.get("/v1/models").status_code == 200


def test_cross_site_requests_are_refused_unless_their_origin_is_allowed(serve):
    """E34: a page on another site could POST text/plain (no preflight) and spend the server's compute."""
    c = serve()
    generated = c.get("/metrics?format=json").json()["generated_tokens"]
    r = c.post("/v1/completions", content=b'{"model": "stories260K", "prompt": "hi", "max_tokens": 4}',
               headers={"Origin": "https://evil.example", "Content-Type": "text/plain"})
    assert "--cors-origin https://evil.example" in _error(r, 403, "origin_not_allowed")["message"]
    assert "access-control-allow-origin" not in r.headers
    preflight = {"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"}
    r = c.options("/v1/completions", headers=preflight)
    _error(r, 403, "origin_not_allowed")
    assert "access-control-allow-origin" not in r.headers
    assert c.get("/metrics?format=json").json()["generated_tokens"] == generated  # nothing ran


def test_allowed_origins_get_preflights_and_cors_headers(serve):
    c = serve(Security(api_key=KEY, cors_origins=("http://localhost:3000/",)))
    headers = {"Origin": "http://localhost:3000", "Access-Control-Request-Method": "POST",
               "Access-Control-Request-Headers": "authorization, content-type"}
    r = c.options("/v1/completions", headers=headers)  # a preflight carries no key
    assert r.status_code == 204 and r.headers["access-control-allow-origin"] == "http://localhost:3000"
    assert "POST" in r.headers["access-control-allow-methods"]
    assert r.headers["access-control-allow-headers"] == "authorization, content-type"
    r = c.post("/v1/completions", json=COMPLETION,
               headers={"Origin": "http://localhost:3000", "Authorization": f"Bearer {KEY}"})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "http://localhost:3000"
    r = c.post("/v1/completions", json=COMPLETION, headers={"Origin": "http://localhost:3000"})
    assert r.status_code == 401 and r.headers["access-control-allow-origin"] == "http://localhost:3000"
    _error(c.get("/health", headers={"Origin": "http://localhost:3001"}), 403, "origin_not_allowed")
    c = serve(Security(cors_origins=("*",)))
    r = c.post("/v1/completions", json=COMPLETION, headers={"Origin": "https://anywhere.example"})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "*"


def test_post_bodies_must_be_json(serve):
    c = serve()
    r = c.post("/v1/completions", content=b'{"model": "stories260K", "prompt": "hi", "max_tokens": 1}',
               headers={"Content-Type": "text/plain"})
    assert "'text/plain'" in _error(r, 415, "unsupported_media_type")["message"]
    _error(c.post("/v1/chat/completions", data={"model": NAME}), 415, "unsupported_media_type")  # a form
    for content_type in ("application/json; charset=utf-8", "application/vnd.api+json", None):
        headers = {"Content-Type": content_type} if content_type else {}
        r = c.post("/v1/completions", content=b'{"model": "stories260K", "prompt": "hi", "max_tokens": 1}',
                   headers=headers)
        assert r.status_code == 200, (content_type, r.text)


def test_host_header_must_name_this_machine_when_bound_to_loopback(serve):
    """DNS rebinding: evil.example resolved to 127.0.0.1 sends Host: evil.example."""
    c = serve(Security.for_bind("127.0.0.1"), base_url="http://127.0.0.1:8000")
    r = c.get("/v1/models", headers={"Host": "evil.example:8000"})
    assert "--allowed-host" in _error(r, 400, "host_not_allowed")["message"]
    for host in ("localhost:8000", "127.0.0.1", "[::1]:8000", "LOCALHOST"):
        assert c.get("/v1/models", headers={"Host": host}).status_code == 200, host
    c = serve(Security.for_bind("localhost", allowed_hosts=("models.lan",)))
    assert c.get("/health", headers={"Host": "models.lan:8000"}).status_code == 200
    _error(c.get("/health", headers={"Host": "evil.example"}), 400, "host_not_allowed")
    c = serve(Security.for_bind("127.0.0.1", allowed_hosts=("*",)))
    assert c.get("/health", headers={"Host": "evil.example"}).status_code == 200
    c = serve(Security.for_bind("0.0.0.0"))  # bound to the network: any name may reach it
    assert c.get("/health", headers={"Host": "10.1.2.3:8000"}).status_code == 200


@pytest.mark.parametrize("kwargs, match", [
    ({"api_key": ""}, "--api-key"), ({"api_key": "two words"}, "--api-key"), ({"api_key": "clé"}, "--api-key"),
    ({"cors_origins": ("evil.example",)}, "not an origin"), ({"cors_origins": ("http://a.example/path",)}, "not an origin"),
    ({"allowed_hosts": ("",)}, "--allowed-host"),
])
def test_bad_security_settings_are_refused(kwargs, match):
    with pytest.raises(QuantkitError, match=match):
        Security(**kwargs)


def test_serve_cli_refuses_bad_security_options_before_loading(monkeypatch):
    from quantkit.cli import cli
    from quantkit.checkpoint import formats

    monkeypatch.setattr(formats, "load_model", lambda *a, **k: pytest.fail("loaded the model"))
    for args, match in ((["--api-key", ""], "--api-key"), (["--cors-origin", "localhost:3000"], "not an origin")):
        r = CliRunner().invoke(cli, ["serve", FIXTURE, *args])
        assert r.exit_code == 1 and r.output.startswith("Error: ") and match in r.output, r.output
        assert len(r.output.strip().splitlines()) == 1


def test_serve_cli_wires_key_from_env_host_check_and_timeouts(monkeypatch):
    """The key comes from $QUANTKIT_API_KEY when --api-key is not given; uvicorn gets the head timeout
    protocol, the keep-alive timeout and the connection limit."""
    from quantkit.cli import cli

    seen = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: seen.update(app=app, **kw))
    r = CliRunner().invoke(cli, ["serve", FIXTURE, "--timeout-header", "2.5"], env={"QUANTKIT_API_KEY": KEY})
    assert r.exit_code == 0, r.output
    assert issubclass(seen["http"], HeadTimeoutProtocol) and seen["http"].head_timeout == 2.5
    assert seen["timeout_keep_alive"] == 5 and seen["limit_concurrency"] == 512
    with TestClient(seen["app"], base_url="http://127.0.0.1:8000") as c:
        assert c.get("/v1/models").status_code == 401
        assert c.get("/v1/models", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
        assert c.get("/health", headers={"Host": "evil.example"}).status_code == 400


# ---------------------------------------------------------------- uvicorn with the head timeout


async def _ok_app(scope, receive, send):
    assert scope["type"] in ("http", "lifespan")
    if scope["type"] == "lifespan":
        return
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
    await send({"type": "http.response.body", "body": b"ok"})


@pytest.fixture
def slow_server():
    """uvicorn on 127.0.0.1 (a free port) with a 0.6 s head timeout and a 30 s keep-alive."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    config = uvicorn.Config(_ok_app, http=with_head_timeout(0.6), timeout_keep_alive=30, log_level="warning",
                            lifespan="off")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    yield sock.getsockname()
    server.should_exit = True
    thread.join(10)
    sock.close()


def _closed_within(conn: socket.socket, seconds: float, trickle: bytes = b"") -> bool:
    """Send ``trickle`` one byte every 0.1 s; whether the server closes the connection within ``seconds``."""
    conn.settimeout(0.1)
    deadline = time.monotonic() + seconds
    data = iter(trickle)
    while time.monotonic() < deadline:
        try:
            closed = conn.recv(4096) == b""
        except socket.timeout:  # nothing from the server yet: keep trickling
            closed = False
        except ConnectionError:
            closed = True
        if closed:
            return True
        byte = next(data, None)
        if byte is not None:
            conn.sendall(bytes([byte]))
    return False


def _response(conn: socket.socket) -> bytes:
    """One whole response of `_ok_app` (its body is ``ok``)."""
    data = b""
    while not data.endswith(b"\r\n\r\nok"):
        chunk = conn.recv(4096)
        assert chunk, data
        data += chunk
    return data


def _get(addr) -> bytes:
    with socket.create_connection(addr, timeout=5) as c:
        c.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        return _response(c)


def test_slowloris_connections_are_closed_after_the_head_timeout(slow_server):
    """E31: a client trickling an unfinished head was never timed out."""
    slow = socket.create_connection(slow_server)
    idle = socket.create_connection(slow_server)
    start = time.monotonic()
    assert _get(slow_server).startswith(b"HTTP/1.1 200")  # others are served meanwhile
    assert _closed_within(slow, 5, trickle=b"GET / HTTP/1.1\r\nHost: x\r\nX-a: " + b"a" * 100)
    assert 0.5 < time.monotonic() - start < 3
    assert _closed_within(idle, 1)  # a connection that never sends a byte, too
    slow.close()
    idle.close()


def test_head_timeout_rearms_after_each_response_and_spares_normal_clients(slow_server):
    with socket.create_connection(slow_server, timeout=5) as c:
        for _ in range(3):  # keep-alive requests, each sent whole: never cut, even past the timeout
            c.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            assert _response(c).startswith(b"HTTP/1.1 200")
            time.sleep(0.3)
        assert _closed_within(c, 5, trickle=b"GET / HTTP/1.1\r\nHost: x\r\n" + b"X" * 100)
