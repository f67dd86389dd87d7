"""Webhook signing, settings, the SSRF defence (CB-05) and delivery (CB-01..CB-06).

Receivers are real ``ThreadingHTTPServer``s on 127.0.0.1; host names go through stub
resolvers, so no test touches the network beyond loopback.
"""

from __future__ import annotations

import base64
import http.client
import http.server
import ipaddress
import math
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from servekit.errors import WebhookRefused
from servekit.jobs._webhooks import (
    DeliveryResult,
    Webhooks,
    deliver,
    generate_secret,
    is_allowed_address,
    sign,
)

SECRET = generate_secret()
PUBLIC_IP = "93.184.216.34"


# -- a receiver on 127.0.0.1 that counts connections -----------------------------------


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.connections = 0
        self.requests: list[tuple[str, dict[str, str], bytes]] = []
        self.release = threading.Event()
        self.lock = threading.Lock()

    def get_request(self) -> tuple[socket.socket, Any]:
        request = super().get_request()
        with self.lock:
            self.connections += 1
        return request


class _Handler(http.server.BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _answer(self, status: int, body: bytes = b"ok", **headers: str) -> None:
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Set-Cookie", "session=abc")
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length", "0"))
        body = self.rfile.read(length)
        with self.server.lock:
            self.server.requests.append((self.path, dict(self.headers.items()), body))
        if self.path.startswith("/status/"):
            self._answer(int(self.path.rsplit("/", 1)[1]))
        elif self.path == "/redirect":
            self._answer(302, Location="/ok")
        elif self.path == "/slow":
            self.server.release.wait(2.0)
            self._answer(200)
        elif self.path == "/big":
            size = 10 * 1024 * 1024
            self.send_response(200)
            self.send_header("Content-Length", str(size))
            self.end_headers()
            chunk = b"x" * 65536
            try:
                for _ in range(size // len(chunk)):
                    self.wfile.write(chunk)
            except OSError:
                pass  # the client stopped reading, as it should
        else:
            self._answer(200)


@pytest.fixture
def receiver() -> Iterator[_Server]:
    server = _Server()
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield server
    finally:
        server.release.set()
        server.shutdown()
        server.server_close()
        thread.join(5)


def _stub_resolver(names: dict[str, list[str]]) -> Any:
    def resolve(host: str, port: int, *args: Any, **kwargs: Any) -> list[tuple[Any, ...]]:
        if host == "localhost":
            return socket.getaddrinfo(host, port, *args, **kwargs)
        if host not in names:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        result: list[tuple[Any, ...]] = []
        for address in names[host]:
            family = socket.AF_INET6 if ":" in address else socket.AF_INET
            result.append((family, socket.SOCK_STREAM, 6, "", (address, port)))
        return result

    return resolve


def _loopback_hooks(**kwargs: Any) -> Webhooks:
    return Webhooks(SECRET, allow_networks=("127.0.0.1/32",), **kwargs)


# -- signing (CB-04) ----------------------------------------------------------------------


def _headers(msg_id: str, timestamp: int, signature: str) -> dict[str, str]:
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": signature,
    }


@pytest.mark.parametrize(
    "body",
    [b"{}", b'{"id": "job_1", "status": "succeeded"}', '{"text": "h\u00e9llo \u2603"}'.encode()],
)
def test_sign_verifies_with_standardwebhooks(body: bytes) -> None:
    now = int(time.time())
    signature = sign(SECRET, "msg_1", now, body)
    assert signature.startswith("v1,")
    Webhook(SECRET).verify(body, _headers("msg_1", now, signature))


def test_sign_accepts_bare_base64_secret() -> None:
    bare = SECRET.removeprefix("whsec_")
    now = int(time.time())
    assert sign(bare, "m", now, b"{}") == sign(SECRET, "m", now, b"{}")
    Webhook(bare).verify(b"{}", _headers("m", now, sign(bare, "m", now, b"{}")))


def test_sign_matches_published_test_vector() -> None:
    # The example in the Standard Webhooks / Svix documentation.
    secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
    body = b'{"test": 2432232314}'
    expected = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
    assert sign(secret, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body) == expected


def test_sign_tampered_body_fails_verification() -> None:
    now = int(time.time())
    signature = sign(SECRET, "msg_1", now, b'{"amount": 1}')
    with pytest.raises(WebhookVerificationError):
        Webhook(SECRET).verify(b'{"amount": 9}', _headers("msg_1", now, signature))


def test_sign_old_timestamp_fails_verification() -> None:
    old = int(time.time()) - 6 * 60
    signature = sign(SECRET, "msg_1", old, b"{}")
    with pytest.raises(WebhookVerificationError, match="too old"):
        Webhook(SECRET).verify(b"{}", _headers("msg_1", old, signature))


def test_sign_wrong_secret_fails_verification() -> None:
    now = int(time.time())
    signature = sign(generate_secret(), "msg_1", now, b"{}")
    with pytest.raises(WebhookVerificationError):
        Webhook(SECRET).verify(b"{}", _headers("msg_1", now, signature))


def test_generate_secret_is_32_random_bytes() -> None:
    first, second = generate_secret(), generate_secret()
    assert first.startswith("whsec_") and first != second
    assert len(base64.b64decode(first.removeprefix("whsec_"))) == 32


# -- settings ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"secret": "not base64!!"}, ValueError, "not base64"),
        ({"secret": "whsec_" + base64.b64encode(b"x" * 8).decode()}, ValueError, "8 bytes"),
        ({"secret": ""}, ValueError, "0 bytes"),
        ({"secret": 123}, TypeError, "must be a str"),
        ({"allow_networks": "127.0.0.1/32"}, TypeError, "list or tuple"),
        ({"allow_networks": ["nope"]}, ValueError, "not a CIDR"),
        ({"allow_networks": ["10.0.0.0/33"]}, ValueError, "not a CIDR"),
        ({"max_attempts": 0}, ValueError, "max_attempts"),
        ({"max_attempts": 1.5}, TypeError, "max_attempts"),
        ({"max_concurrency": 0}, ValueError, "max_concurrency"),
        ({"connect_timeout_s": 0}, ValueError, "connect_timeout_s"),
        ({"read_timeout_s": -1.0}, ValueError, "read_timeout_s"),
        ({"read_timeout_s": math.nan}, ValueError, "read_timeout_s"),
        ({"backoff_s": -1.0}, ValueError, "backoff_s"),
        ({"max_backoff_s": math.inf}, ValueError, "max_backoff_s"),
        ({"max_response_bytes": -1}, ValueError, "max_response_bytes"),
    ],
)
def test_webhooks_settings_are_validated(
    kwargs: dict[str, Any], error: type[Exception], match: str
) -> None:
    settings = {"secret": SECRET, **kwargs}
    with pytest.raises(error, match=match):
        Webhooks(**settings)


def test_webhooks_normalises_allow_networks_and_hides_secret() -> None:
    hooks = Webhooks(SECRET, allow_networks=["127.0.0.1", "10.1.2.3/8", "fd00::/8"])  # type: ignore[arg-type]
    assert hooks.allow_networks == ("127.0.0.1/32", "10.0.0.0/8", "fd00::/8")
    assert SECRET not in repr(hooks)
    assert Webhooks(SECRET) == Webhooks(SECRET, allow_networks=())


def test_webhooks_backoff_is_exponential_capped_and_jittered() -> None:
    hooks = Webhooks(SECRET, backoff_s=1.0, max_backoff_s=10.0)
    for attempt in range(1, 8):
        cap = min(10.0, 2.0 ** (attempt - 1))
        draws = [hooks.backoff(attempt) for _ in range(300)]
        assert all(0.0 <= d <= cap for d in draws)
        assert max(draws) > cap / 2 and min(draws) < cap / 2  # jittered across the range
        assert len(set(draws)) > 250
    assert 0.0 <= hooks.backoff(10_000) <= 10.0
    with pytest.raises(ValueError, match="attempt"):
        hooks.backoff(0)


# -- the address rule ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1",
        "0.0.0.0",
        "10.0.0.1",
        "172.16.0.1",
        "192.168.1.1",
        "169.254.169.254",
        "100.64.0.1",
        "224.0.0.1",
        "240.0.0.1",
        "255.255.255.255",
        "::",
        "::1",
        "fd00::1",
        "fe80::1",
        "ff02::1",
        "::ffff:127.0.0.1",
        "::ffff:10.0.0.1",
        "2002:7f00:1::1",  # 6to4 carrying 127.0.0.1
        "64:ff9b::a00:1",  # NAT64 carrying 10.0.0.1
        "2001:db8::1",
    ],
)
def test_is_allowed_address_refuses_non_public(address: str) -> None:
    assert not is_allowed_address(address)
    assert not is_allowed_address(ipaddress.ip_address(address))


@pytest.mark.parametrize(
    "address", ["93.184.216.34", "8.8.8.8", "2606:4700:4700::1111", "::ffff:8.8.8.8"]
)
def test_is_allowed_address_accepts_public(address: str) -> None:
    assert is_allowed_address(address)


def test_is_allowed_address_honours_allow_networks() -> None:
    networks = [ipaddress.ip_network("127.0.0.1/32"), ipaddress.ip_network("fd00::/8")]
    assert is_allowed_address("127.0.0.1", networks)
    assert is_allowed_address("::ffff:127.0.0.1", networks)
    assert is_allowed_address("fd00::1", networks)
    assert not is_allowed_address("127.0.0.2", networks)
    assert not is_allowed_address("10.0.0.1", networks)


# -- CB-05: refused at submit time and at delivery, with zero connections -----------------

_REFUSED_URLS = [
    "http://127.0.0.1:{port}/",
    "http://localhost:{port}/",
    "http://[::1]:{port}/",
    "http://0.0.0.0:{port}/",
    "http://10.0.0.1/",
    "http://172.16.0.1/",
    "http://192.168.1.1/",
    "http://169.254.169.254/latest/meta-data",
    "http://[fd00::1]/",
    "http://[fe80::1]/",
    "http://[::ffff:127.0.0.1]:{port}/",
    "http://2130706433:{port}/",
    "http://0x7f000001:{port}/",
    "http://0177.0.0.1:{port}/",
    "http://127.1:{port}/",
    "https://127.0.0.1:{port}/",
    "http://internal.example:{port}/",
    "http://mixed.example:{port}/",
    "file:///etc/passwd",
    "gopher://x/",
    "ftp://x/",
    "http://user:pw@93.184.216.34/",
    "http:///nohost",
    "http://93.184.216.34:0/",
    "javascript:alert(1)",
    "http://93.184.216.34/a b",
]

_RESOLVER = _stub_resolver(
    {
        "internal.example": ["10.0.0.1"],
        "mixed.example": [PUBLIC_IP, "127.0.0.1"],  # any non-public answer refuses
    }
)


@pytest.mark.parametrize("url_template", _REFUSED_URLS)
def test_webhook_url_refused_at_submit_and_delivery(receiver: _Server, url_template: str) -> None:
    url = url_template.format(port=receiver.server_address[1])
    hooks = Webhooks(SECRET, connect_timeout_s=0.5, read_timeout_s=0.5)
    with pytest.raises(WebhookRefused) as info:
        hooks.check_url(url, resolver=_RESOLVER)
    assert str(info.value).startswith("webhook URL refused:")
    result = deliver(hooks, url, "msg_1", b"{}", resolver=_RESOLVER)
    assert result == DeliveryResult(
        delivered=False, status=None, error=result.error, retryable=False
    )
    assert result.error and "refused" in result.error
    assert receiver.connections == 0


def test_webhook_private_refusal_says_how_to_allow() -> None:
    with pytest.raises(WebhookRefused, match=r"allow_networks"):
        Webhooks(SECRET).check_url("http://10.0.0.1/")
    with pytest.raises(WebhookRefused, match=r"http:// or https://"):
        Webhooks(SECRET).check_url("file:///etc/passwd")


def test_webhook_unresolvable_host_refused_at_submit_retryable_at_delivery() -> None:
    hooks = Webhooks(SECRET)
    with pytest.raises(WebhookRefused, match="could not resolve"):
        hooks.check_url("http://nowhere.example/", resolver=_RESOLVER)
    result = deliver(hooks, "http://nowhere.example/", "m", b"{}", resolver=_RESOLVER)
    assert not result.delivered and result.retryable and result.status is None


def test_webhook_public_host_passes_submit_check() -> None:
    hooks = Webhooks(SECRET)
    resolver = _stub_resolver({"public.example": [PUBLIC_IP]})
    hooks.check_url("https://public.example/hook?x=1", resolver=resolver)
    hooks.check_url(f"http://{PUBLIC_IP}/")
    hooks.check_url("http://[2606:4700:4700::1111]/")


def test_webhook_dns_rebinding_refused_at_connect_time(receiver: _Server) -> None:
    port = receiver.server_address[1]
    url = f"http://rebind.example:{port}/hook"
    hooks = Webhooks(SECRET)
    hooks.check_url(url, resolver=_stub_resolver({"rebind.example": [PUBLIC_IP]}))
    result = deliver(
        hooks, url, "msg_1", b"{}", resolver=_stub_resolver({"rebind.example": ["127.0.0.1"]})
    )
    assert not result.delivered and not result.retryable
    assert result.error and "127.0.0.1" in result.error
    assert receiver.connections == 0


# -- delivery to an explicitly allowed loopback receiver ---------------------------------


def test_webhook_delivery_signed_and_verifiable(receiver: _Server) -> None:
    port = receiver.server_address[1]
    body = b'{"job_id": "j1", "status": "succeeded"}'
    result = deliver(
        _loopback_hooks(), f"http://127.0.0.1:{port}/hook?a=1", "msg_42", body, now=lambda: 1e9
    )
    assert result == DeliveryResult(delivered=True, status=200, error=None, retryable=False)
    [(path, headers, received)] = receiver.requests
    assert path == "/hook?a=1" and received == body
    lower = {k.lower(): v for k, v in headers.items()}
    assert lower["content-type"] == "application/json"
    assert lower["user-agent"] == "servekit-webhooks"
    assert lower["webhook-id"] == "msg_42"
    assert lower["webhook-timestamp"] == "1000000000"
    assert lower["webhook-signature"] == sign(SECRET, "msg_42", 1_000_000_000, body)
    assert lower["host"] == f"127.0.0.1:{port}"
    assert "cookie" not in lower


def test_webhook_delivery_verifies_with_standardwebhooks(receiver: _Server) -> None:
    port = receiver.server_address[1]
    body = b'{"n": 1}'
    for msg_id in ("msg_a", "msg_a"):  # a retry sends the same webhook-id
        assert deliver(_loopback_hooks(), f"http://127.0.0.1:{port}/", msg_id, body).delivered
    assert [h["webhook-id"] for _, h, _ in receiver.requests] == ["msg_a", "msg_a"]
    for _, headers, received in receiver.requests:
        assert Webhook(SECRET).verify(received, headers) == {"n": 1}


def test_webhook_delivery_connects_to_checked_ip_keeps_host_header(receiver: _Server) -> None:
    port = receiver.server_address[1]
    resolver = _stub_resolver({"receiver.test": ["127.0.0.1"]})
    url = f"http://receiver.test:{port}/"
    _loopback_hooks().check_url(url, resolver=resolver)
    result = deliver(_loopback_hooks(), url, "m", b"{}", resolver=resolver)
    assert result.delivered
    [(_, headers, _)] = receiver.requests
    assert headers["Host"] == f"receiver.test:{port}"


@pytest.mark.parametrize(
    ("status", "retryable"),
    [(500, True), (503, True), (408, True), (429, True), (404, False), (400, False)],
)
def test_webhook_delivery_failure_statuses(receiver: _Server, status: int, retryable: bool) -> None:
    port = receiver.server_address[1]
    result = deliver(_loopback_hooks(), f"http://127.0.0.1:{port}/status/{status}", "m", b"{}")
    assert result.delivered is False and result.status == status
    assert result.retryable is retryable and result.error


def test_webhook_delivery_accepts_any_2xx(receiver: _Server) -> None:
    port = receiver.server_address[1]
    result = deliver(_loopback_hooks(), f"http://127.0.0.1:{port}/status/204", "m", b"{}")
    assert result.delivered and result.status == 204


def test_webhook_redirect_not_followed(receiver: _Server) -> None:
    port = receiver.server_address[1]
    result = deliver(_loopback_hooks(), f"http://127.0.0.1:{port}/redirect", "m", b"{}")
    assert result.delivered is False and result.retryable is False and result.status == 302
    assert result.error and "redirect" in result.error
    assert [path for path, _, _ in receiver.requests] == ["/redirect"]
    assert receiver.connections == 1


def test_webhook_slow_receiver_bounded_by_read_timeout(receiver: _Server) -> None:
    port = receiver.server_address[1]
    hooks = _loopback_hooks(read_timeout_s=0.3)
    started = time.monotonic()
    result = deliver(hooks, f"http://127.0.0.1:{port}/slow", "m", b"{}")
    elapsed = time.monotonic() - started
    assert result.delivered is False and result.retryable is True and result.status is None
    assert result.error and "timed out" in result.error
    assert elapsed < 1.5


def test_webhook_large_response_read_is_capped(
    receiver: _Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    read_sizes: list[int] = []
    original = http.client.HTTPResponse.read

    def recording_read(self: http.client.HTTPResponse, amt: int | None = None) -> bytes:
        data = original(self, amt)
        read_sizes.append(len(data))
        return data

    monkeypatch.setattr(http.client.HTTPResponse, "read", recording_read)
    port = receiver.server_address[1]
    hooks = _loopback_hooks(max_response_bytes=1000)
    started = time.monotonic()
    result = deliver(hooks, f"http://127.0.0.1:{port}/big", "m", b"{}")
    assert result == DeliveryResult(delivered=True, status=200, error=None, retryable=False)
    assert sum(read_sizes) <= 1000
    assert time.monotonic() - started < 2.0


def test_webhook_connection_refused_is_retryable() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    result = deliver(_loopback_hooks(), f"http://127.0.0.1:{port}/", "m", b"{}")
    assert result.delivered is False and result.retryable is True and result.status is None
    assert result.error == "connection refused"


def test_webhook_https_to_plain_http_receiver_fails_retryable(receiver: _Server) -> None:
    port = receiver.server_address[1]
    hooks = _loopback_hooks(connect_timeout_s=1.0, read_timeout_s=1.0)
    result = deliver(hooks, f"https://127.0.0.1:{port}/", "m", b"{}")
    assert result.delivered is False and result.retryable is True


def test_webhook_deliver_rejects_bad_msg_id() -> None:
    with pytest.raises(ValueError, match="msg_id"):
        deliver(_loopback_hooks(), "http://127.0.0.1:1/", "a\r\nb", b"{}")
    with pytest.raises(ValueError, match="msg_id"):
        deliver(_loopback_hooks(), "http://127.0.0.1:1/", "", b"{}")
