"""The API checks before it reads: over real HTTP (uvicorn on a free port, a real Redis), a
request without the token is 401 and a body over ``[api] max_request_bytes`` is 413 before the
server reads the body, and ``/healthz`` stays fast while 30 MB requests arrive."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import uvicorn
from net_helpers import free_port
from query_helpers import SPEC, make_rows, seed_store, write_config

from streamlme.api import create_app
from streamlme.client import Client
from streamlme.config import load_config
from streamlme.store import RedisStore

TOKEN = "guard-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
LIMIT = 1 << 20  # the default [api] max_request_bytes
BIG = 30 << 20
#: Bytes a client gets into the socket buffers of localhost before the server reads any.
EARLY = 8 << 20


@pytest.fixture(scope="module")
def served(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """(base URL, namespace) of a real uvicorn server over a seeded namespace, auth on."""
    from fixtures_redis import delete_namespace

    namespace = f"t-guard-{time.monotonic_ns() % 10**8}"
    seed_store(RedisStore(redis_url, namespace, columns=SPEC.columns), *make_rows(41))
    port = free_port()
    path = write_config(tmp_path_factory.mktemp("guard") / "c.toml", redis_url, namespace,
                        token=TOKEN, port=port)
    app = create_app(load_config(path, env={}))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start in 10 s"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}", namespace
    finally:
        server.should_exit = True
        thread.join(10)
        delete_namespace(redis_url, namespace)


def _port(base: str) -> int:
    return int(base.rsplit(":", 1)[1])


def send_big(base: str, headers: dict[str, str], total: int = BIG, chunked: bool = False
             ) -> tuple[int, int, float]:
    """POST /v1/predict with a ``total``-byte JSON body over a raw socket, 64 KiB at a time,
    looking for the answer after every piece. Returns (status, bytes sent before the answer
    came, seconds). A server that reads the whole body first answers only after all of it."""
    head = ["POST /v1/predict HTTP/1.1", f"Host: 127.0.0.1:{_port(base)}",
            "Content-Type: application/json", *(f"{k}: {v}" for k, v in headers.items())]
    head.append("Transfer-Encoding: chunked" if chunked else f"Content-Length: {total}")
    piece = b"[" + b"1," * (32 << 10) + b"1]"
    start = time.monotonic()
    sent = queued = 0
    pending = memoryview(b"")
    with socket.create_connection(("127.0.0.1", _port(base)), timeout=10) as sock:
        sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode())
        sock.setblocking(False)
        reply = b""
        while not reply and (queued < total or pending):
            if not pending:
                data = piece[: total - queued]
                queued += len(data)
                pending = memoryview(b"%x\r\n%s\r\n" % (len(data), data) if chunked else data)
                if chunked and queued >= total:
                    pending = memoryview(bytes(pending) + b"0\r\n\r\n")
            try:
                n = sock.send(pending)
                sent, pending = sent + n, pending[n:]
            except BlockingIOError:
                time.sleep(0.005)  # the server is not reading: see whether it answered
            except (BrokenPipeError, ConnectionResetError):
                pending = memoryview(b"")
                queued = total
            with contextlib.suppress(BlockingIOError):
                reply = sock.recv(65536)
            assert time.monotonic() - start < 20, "no answer in 20 s"
        sock.setblocking(True)
        while b"\r\n" not in reply:
            reply += sock.recv(65536)
    return int(reply.split(b" ", 2)[1]), sent, time.monotonic() - start


def test_without_the_token_a_30mb_post_is_401_before_its_body_is_read(served):
    base, _ = served
    status, sent, seconds = send_big(base, {})
    assert status == 401
    assert sent < EARLY, f"the server read {sent} bytes before it answered"
    assert seconds < 2
    status, sent, _ = send_big(base, {"Authorization": "Bearer wrong"}, chunked=True)
    assert status == 401 and sent < EARLY


def test_an_authorised_body_over_the_limit_is_413_before_it_is_read(served):
    base, _ = served
    status, sent, seconds = send_big(base, AUTH)  # Content-Length says 30 MB
    assert status == 413 and sent < EARLY and seconds < 2
    status, sent, _ = send_big(base, AUTH, chunked=True)  # no length given
    assert status == 413 and LIMIT <= sent < EARLY
    r = httpx.post(base + "/v1/groups/effects", headers=AUTH, timeout=10,
                   content=b'{"groups": ["g1"], "pad": "' + b"x" * LIMIT + b'"}')
    assert r.status_code == 413 and r.json()["error"] == "too_large"
    assert "max_request_bytes" in r.json()["message"]


def test_a_chunked_body_within_the_limit_is_served(served, redis_url):
    base, namespace = served
    body = json.dumps({"groups": ["g1", "g2", "never"]}).encode()

    def pieces() -> Iterator[bytes]:  # no length: httpx sends it chunked
        yield from (body[i:i + 7] for i in range(0, len(body), 7))

    r = httpx.post(base + "/v1/groups/effects", content=pieces(), timeout=10,
                   headers={**AUTH, "Content-Type": "application/json"})
    assert r.status_code == 200, r.text
    expected = [e.to_dict() for e in Client(redis_url, namespace).effects(["g1", "g2", "never"])]
    assert r.json() == {"effects": expected}


def test_healthz_stays_fast_while_30mb_requests_arrive(served):
    base, _ = served
    stop = threading.Event()
    answers: list[int] = []

    def flood() -> None:
        while not stop.is_set():
            answers.append(send_big(base, {})[0])
            answers.append(send_big(base, AUTH)[0])

    threads = [threading.Thread(target=flood, daemon=True) for _ in range(2)]
    for t in threads:
        t.start()
    waits = []
    try:
        with httpx.Client(base_url=base, timeout=5) as http:
            for _ in range(40):
                start = time.monotonic()
                assert http.get("/healthz").status_code == 200
                waits.append(time.monotonic() - start)
                time.sleep(0.02)
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    assert len(answers) >= 4 and set(answers) <= {401, 413}
    assert max(waits) < 0.5, f"/healthz took up to {max(waits):.3f} s"


def test_open_routes_need_no_token_and_unknown_ones_do(served):
    base, _ = served
    with httpx.Client(base_url=base, timeout=10) as http:
        assert http.get("/healthz").status_code == 200
        assert http.get("/readyz").status_code == 200
        assert http.get("/").status_code == 200
        assert http.get("/static/dashboard.js").status_code == 200
        r = http.get("/v1/nothing")
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        assert http.get("/v1/nothing", headers=AUTH).status_code == 404


def test_the_limit_comes_from_the_configuration(redis_url, namespace, tmp_path: Path):
    seed_store(RedisStore(redis_url, namespace, columns=SPEC.columns), *make_rows(42))
    path = write_config(tmp_path / "c.toml", redis_url, namespace)
    path.write_text(path.read_text() + "max_request_bytes = 64\n")
    from fastapi.testclient import TestClient

    http = TestClient(create_app(load_config(path, env={})))
    assert http.post("/v1/groups/effects", json={"groups": ["g1"]}).status_code == 200
    r = http.post("/v1/groups/effects", json={"groups": ["g1"] * 20})
    assert r.status_code == 413 and "64 bytes" in r.json()["message"]
