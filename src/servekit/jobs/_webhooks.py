"""Signed webhook delivery (Standard Webhooks) with an SSRF defence (CB-01..CB-06).

A delivery is one HTTP POST of a JSON body, signed as the Standard Webhooks spec says
(``webhook-id``, ``webhook-timestamp``, ``webhook-signature: v1,<base64 HMAC-SHA256>``),
so receivers can verify it with any Standard Webhooks library.

Decisions, plainly:

- **Secret.** ``whsec_<base64>`` (the Standard Webhooks form) or bare base64, padding
  optional. At least 16 decoded bytes (128 bits, past any brute force of HMAC-SHA256);
  the spec recommends 24 to 64, and :func:`generate_secret` makes 32. The secret is
  hidden from ``repr`` and never appears in an error.
- **Which addresses.** An address is allowed only if it is in ``allow_networks`` or is
  global: not private, loopback, link-local (so not 169.254.169.254, the cloud
  metadata address), unspecified, multicast or reserved. An IPv4-mapped IPv6 address
  (``::ffff:127.0.0.1``) is judged as its IPv4 address, and so are the IPv4 addresses
  embedded in 6to4 (``2002::/16``), Teredo and NAT64 (``64:ff9b::/96``) addresses.
- **Which hosts.** Only ``http`` and ``https`` URLs with a host, no ``user:password@``,
  no whitespace or control characters and an ASCII path. A host that the C resolver
  would read as an IPv4 address (``2130706433``, ``0x7f000001``, ``0177.0.0.1``,
  ``127.1``: anything ``socket.inet_aton`` accepts) is judged as that address without
  DNS. Any other host name is resolved, and refused if *any* address it resolves to is
  not allowed.
- **When.** :meth:`Webhooks.check_url` checks at submit time; :func:`deliver` checks
  again before each attempt and then connects to the checked IP address itself, never
  to the host name, so DNS that changes between the check and the connect (DNS
  rebinding) cannot reach a refused address. TLS still verifies the certificate
  against the host name (SNI and ``server_hostname``).
- **Redirects are not followed.** A 3xx answer is a failed, non-retryable delivery.
- **Outcomes.** 2xx: delivered. 408, 429, 5xx, timeouts, connection and DNS errors:
  retryable. Other answers (3xx, other 4xx) and refused URLs: not retryable.
- **Timeouts.** ``connect_timeout_s`` bounds the TCP connect and the TLS handshake;
  ``read_timeout_s`` bounds everything after it (sending the request, reading the
  status line, headers and body) *in total*, so a receiver that drips bytes cannot hold
  a delivery longer than ``connect_timeout_s + read_timeout_s`` (plus one connect
  timeout per further address a host name resolves to).
- **Response.** At most ``max_response_bytes`` of the body is read, then discarded;
  response headers (cookies included) are ignored. The connection is closed after
  every delivery.
- **Backoff.** Retry ``n`` (1-based) waits a uniformly random time in
  ``[0, min(max_backoff_s, backoff_s * 2 ** (n - 1))]`` ("full jitter"), so receivers
  that failed together are not retried together.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import http.client
import io
import ipaddress
import math
import random
import secrets
import socket
import ssl
import time
import urllib.parse
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from ..errors import WebhookRefused

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer

__all__ = [
    "DeliveryResult",
    "Resolver",
    "Webhooks",
    "deliver",
    "generate_secret",
    "is_allowed_address",
    "sign",
]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

_SECRET_PREFIX = "whsec_"
#: Fewest decoded secret bytes accepted: 128 bits.
_MIN_SECRET_BYTES = 16
_USER_AGENT = "servekit-webhooks"
_DEFAULT_PORTS = {"http": 80, "https": 443}
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_MAX_ERROR_CHARS = 200


class Resolver(Protocol):
    """A host name resolver with the shape of :func:`socket.getaddrinfo`.

    Called as ``resolver(host, port, type=socket.SOCK_STREAM)``; returns
    ``(family, type, proto, canonname, sockaddr)`` tuples whose ``sockaddr[0]`` is an
    address string.
    """

    def __call__(self, host: str, port: int, *, type: int) -> Sequence[tuple[Any, ...]]:
        """Resolve ``host`` for a stream connection to ``port``."""
        ...


def _decode_secret(secret: str) -> bytes:
    if not isinstance(secret, str):
        raise TypeError(f"Webhooks secret must be a str, not {type(secret).__name__}")
    raw = secret[len(_SECRET_PREFIX) :] if secret.startswith(_SECRET_PREFIX) else secret
    raw = raw.rstrip("=")
    try:
        key = base64.b64decode(raw + "=" * (-len(raw) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(
            "Webhooks secret is not base64: give 'whsec_<base64>' or bare base64, "
            "e.g. from generate_secret()"
        ) from None
    if len(key) < _MIN_SECRET_BYTES:
        raise ValueError(
            f"Webhooks secret decodes to {len(key)} bytes; use at least "
            f"{_MIN_SECRET_BYTES} random bytes (generate_secret() makes 32)"
        )
    return key


def generate_secret() -> str:
    """A new random webhook secret: ``"whsec_"`` + base64 of 32 random bytes."""
    return _SECRET_PREFIX + base64.b64encode(secrets.token_bytes(32)).decode("ascii")


def sign(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` header value for one message.

    ``"v1,"`` + base64 of HMAC-SHA256 over ``f"{msg_id}.{timestamp}.".encode() + body``,
    keyed with the base64-decoded ``secret`` (``whsec_`` prefix optional).
    """
    key = _decode_secret(secret)
    signed = f"{msg_id}.{int(timestamp)}.".encode() + bytes(body)
    digest = hmac.new(key, signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode("ascii")


def _public(ip: IPAddress) -> bool:
    return (
        ip.is_global
        and not ip.is_private
        and not ip.is_loopback
        and not ip.is_link_local
        and not ip.is_multicast
        and not ip.is_unspecified
        and not ip.is_reserved
    )


def is_allowed_address(ip: IPAddress | str, allow_networks: Iterable[IPNetwork] = ()) -> bool:
    """Whether a webhook may connect to ``ip``.

    True iff ``ip`` is in one of ``allow_networks`` or is a global (public) unicast
    address. IPv4-mapped, 6to4, Teredo and NAT64 IPv6 addresses are judged on the IPv4
    address they carry, so ``::ffff:127.0.0.1`` counts as ``127.0.0.1``.
    """
    if isinstance(ip, str):
        ip = ipaddress.ip_address(ip)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    for network in allow_networks:
        if ip.version == network.version and ip in network:
            return True
    if isinstance(ip, ipaddress.IPv6Address):
        embedded: list[ipaddress.IPv4Address] = []
        if ip.sixtofour is not None:
            embedded.append(ip.sixtofour)
        if ip.teredo is not None:
            embedded.append(ip.teredo[1])
        if ip in _NAT64:
            embedded.append(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
        if any(not _public(inner) for inner in embedded):
            return False
    return _public(ip)


def _literal_ip(host: str) -> IPAddress | None:
    """``host`` as an IP address if it is one to the C resolver, else None."""
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        pass
    try:
        # inet_aton reads the legacy forms too: 2130706433, 0x7f000001, 0177.0.0.1, 127.1
        return ipaddress.IPv4Address(socket.inet_aton(host))
    except (OSError, ValueError):
        return None


@dataclass(frozen=True)
class _Target:
    scheme: str
    host: str  # an ASCII host name, or a canonical IP address string
    port: int
    path: str  # path and query, as sent in the request line
    literal: IPAddress | None

    @property
    def host_header(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port == _DEFAULT_PORTS[self.scheme] else f"{host}:{self.port}"


def _refuse(url_problem: str) -> WebhookRefused:
    return WebhookRefused(f"webhook URL refused: {url_problem}")


def _parse_url(url: str) -> _Target:
    if not isinstance(url, str):
        raise _refuse(f"expected a str, got {type(url).__name__}")
    if any(ord(c) <= 0x20 or ord(c) == 0x7F for c in url):
        raise _refuse("it contains whitespace or control characters; percent-encode them")
    try:
        parts = urllib.parse.urlsplit(url)
        scheme = parts.scheme.lower()
        hostname = parts.hostname
        port = parts.port
    except ValueError as exc:
        raise _refuse(f"it is not a valid URL ({exc}); give an http(s)://host/path URL") from None
    if scheme not in _DEFAULT_PORTS:
        raise _refuse(
            f"scheme {scheme or '(none)'!r} is not allowed; use an http:// or https:// URL"
        )
    if parts.username is not None or parts.password is not None:
        raise _refuse("credentials in the URL (user:password@) are not allowed; remove them")
    if not hostname:
        raise _refuse("it has no host; give an http(s)://host/path URL")
    if port is None:
        port = _DEFAULT_PORTS[scheme]
    if not 1 <= port <= 65535:
        raise _refuse(f"port {port} is out of range; use a port from 1 to 65535")
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    if not path.isascii():
        raise _refuse("its path or query has non-ASCII characters; percent-encode them")
    literal = _literal_ip(hostname)
    if literal is not None:
        host = str(literal)
    else:
        try:
            host = hostname.encode("idna").decode("ascii")
        except UnicodeError:
            raise _refuse(f"{hostname!r} is not a valid host name") from None
    return _Target(scheme, host, port, path, literal)


class _Unresolvable(Exception):
    """The host name did not resolve (possibly a transient DNS failure)."""


def _checked_addresses(
    target: _Target, resolver: Resolver, networks: Sequence[IPNetwork]
) -> list[IPAddress]:
    """The addresses to connect to, all allowed; raises WebhookRefused or _Unresolvable."""
    if target.literal is not None:
        addresses = [target.literal]
    else:
        try:
            infos = resolver(target.host, target.port, type=socket.SOCK_STREAM)
            addresses = []
            for info in infos:
                address = ipaddress.ip_address(str(info[4][0]).split("%", 1)[0])
                if address not in addresses:
                    addresses.append(address)
        except (OSError, UnicodeError, ValueError, IndexError, TypeError) as exc:
            raise _Unresolvable(f"could not resolve host {target.host!r}: {exc}") from None
        if not addresses:
            raise _Unresolvable(f"host {target.host!r} resolved to no address")
    for address in addresses:
        if not is_allowed_address(address, networks):
            shown = str(address) if target.literal is not None else f"{target.host!r} ({address})"
            raise _refuse(
                f"{shown} is not a public address (loopback, private, link-local, "
                "metadata or reserved); use a public receiver, or allow its network "
                "explicitly with Webhooks(allow_networks=[...])"
            )
    return addresses


def _check_positive(name: str, value: float, *, allow_zero: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"Webhooks {name} must be a number, not {type(value).__name__}")
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"Webhooks {name} must be a finite number {bound}, got {value!r}")


def _check_int(name: str, value: int, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"Webhooks {name} must be an int, not {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"Webhooks {name} must be >= {minimum}, got {value}")


@dataclass(frozen=True)
class Webhooks:
    """Settings for webhook delivery, given to a JobQueue.

    ``secret`` is ``whsec_<base64>`` or bare base64 of at least 16 bytes (use
    :func:`generate_secret`); it is left out of ``repr``. ``allow_networks`` lists CIDRs
    (or single addresses) to deliver to even though they are not public, e.g.
    ``("127.0.0.1/32",)`` for a test receiver; any iterable of str is accepted and
    stored as a tuple of canonical CIDR strings. Timeouts are in seconds; see the
    module docstring for what each bounds. ``max_attempts`` deliveries are tried before
    the job's callback state becomes failed; ``max_concurrency`` deliveries run at once;
    at most ``max_response_bytes`` of a receiver's response body is read.
    """

    secret: str = field(repr=False)
    allow_networks: tuple[str, ...] = ()
    connect_timeout_s: float = 5.0
    read_timeout_s: float = 10.0
    max_attempts: int = 5
    backoff_s: float = 1.0
    max_backoff_s: float = 300.0
    max_concurrency: int = 4
    max_response_bytes: int = 65536
    _networks: tuple[IPNetwork, ...] = field(init=False, repr=False, compare=False, default=())

    def __post_init__(self) -> None:
        _decode_secret(self.secret)
        allow: Any = self.allow_networks
        if isinstance(allow, (str, bytes)) or not isinstance(allow, Iterable):
            raise TypeError(
                "Webhooks allow_networks must be a list or tuple of CIDR strings, "
                f"e.g. ('127.0.0.1/32',), not {type(allow).__name__}"
            )
        networks: list[IPNetwork] = []
        for item in allow:
            try:
                networks.append(ipaddress.ip_network(item, strict=False))
            except (ValueError, TypeError):
                raise ValueError(
                    f"Webhooks allow_networks entry {item!r} is not a CIDR network; "
                    "write it like '127.0.0.1/32' or '10.0.0.0/8'"
                ) from None
        object.__setattr__(self, "allow_networks", tuple(str(n) for n in networks))
        object.__setattr__(self, "_networks", tuple(networks))
        _check_positive("connect_timeout_s", self.connect_timeout_s)
        _check_positive("read_timeout_s", self.read_timeout_s)
        _check_positive("backoff_s", self.backoff_s, allow_zero=True)
        _check_positive("max_backoff_s", self.max_backoff_s, allow_zero=True)
        _check_int("max_attempts", self.max_attempts, 1)
        _check_int("max_concurrency", self.max_concurrency, 1)
        _check_int("max_response_bytes", self.max_response_bytes, 0)

    def backoff(self, attempt: int) -> float:
        """Seconds to wait before retry number ``attempt`` (1-based), with full jitter.

        Uniform in ``[0, min(max_backoff_s, backoff_s * 2 ** (attempt - 1))]``.
        """
        _check_int("backoff attempt", attempt, 1)
        cap = min(self.max_backoff_s, self.backoff_s * 2.0 ** min(attempt - 1, 1000))
        return random.uniform(0.0, cap)

    def check_url(self, url: str, *, resolver: Resolver = socket.getaddrinfo) -> None:
        """Check a callback URL when a job is submitted (CB-05).

        Raises :class:`~servekit.errors.WebhookRefused` if the scheme is not http(s),
        the URL has no host or has credentials, the host does not resolve, or it is
        (or resolves to any) address that is neither public nor in ``allow_networks``.
        :func:`deliver` checks again before it connects.
        """
        target = _parse_url(url)
        try:
            _checked_addresses(target, resolver, self._networks)
        except _Unresolvable as exc:
            raise _refuse(f"{exc}; check the host name in the callback URL") from None


@dataclass(frozen=True)
class DeliveryResult:
    """The outcome of one delivery attempt.

    ``status`` is the receiver's HTTP status, or None if none was received; ``error`` is
    a short reason when not delivered (never the secret); ``retryable`` says whether
    another attempt may succeed.
    """

    delivered: bool
    status: int | None
    error: str | None
    retryable: bool


class _DeadlineReader(io.RawIOBase):
    """Reads a socket, failing once a monotonic deadline passes (a total read timeout)."""

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        super().__init__()
        self._sock = sock
        self._deadline = deadline

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: WriteableBuffer, /) -> int:
        remaining = self._deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("read timed out")
        self._sock.settimeout(remaining)
        return self._sock.recv_into(buffer)


def _response_class(deadline: float) -> type[http.client.HTTPResponse]:
    class _Response(http.client.HTTPResponse):
        def __init__(self, sock: socket.socket, *args: Any, **kwargs: Any) -> None:
            super().__init__(sock, *args, **kwargs)
            self.fp.close()  # the plain makefile() reader; read through the deadline instead
            self.fp = io.BufferedReader(_DeadlineReader(sock, deadline))

    return _Response


class _PinnedConnection(http.client.HTTPConnection):
    """An HTTP(S) connection to already-checked addresses, never to the host name."""

    def __init__(self, target: _Target, addresses: Sequence[IPAddress], webhooks: Webhooks) -> None:
        super().__init__(target.host, target.port, timeout=webhooks.connect_timeout_s)
        self._target = target
        self._addresses = list(addresses)
        self._connect_timeout = webhooks.connect_timeout_s
        self._read_timeout = webhooks.read_timeout_s

    def connect(self) -> None:
        last: OSError | None = None
        sock: socket.socket | None = None
        for address in self._addresses:
            try:
                sock = socket.create_connection(
                    (str(address), self._target.port), timeout=self._connect_timeout
                )
                break
            except OSError as exc:
                last = exc
        if sock is None:
            raise last if last is not None else OSError("no address to connect to")
        try:
            if self._target.scheme == "https":
                context = ssl.create_default_context()
                sock = context.wrap_socket(sock, server_hostname=self._target.host)
            sock.settimeout(self._read_timeout)
        except BaseException:
            sock.close()
            raise
        self.sock = sock
        self.response_class = _response_class(time.monotonic() + self._read_timeout)


def _short(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timed out waiting for the receiver"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    return text[:_MAX_ERROR_CHARS]


def _check_msg_id(msg_id: str) -> None:
    if not isinstance(msg_id, str) or not msg_id:
        raise ValueError("webhook msg_id must be a non-empty str")
    if any(ord(c) < 0x21 or ord(c) == 0x7F for c in msg_id) or not msg_id.isascii():
        raise ValueError("webhook msg_id must be printable ASCII without spaces")


def deliver(
    webhooks: Webhooks,
    url: str,
    msg_id: str,
    body: bytes,
    *,
    resolver: Resolver = socket.getaddrinfo,
    now: Callable[[], float] = time.time,
) -> DeliveryResult:
    """Make one signed POST of ``body`` (JSON bytes) to ``url``; never raises for the
    receiver's or the network's failures, which come back in the result.

    The URL is checked again (scheme, host, every resolved address: CB-05) and the
    connection goes to a checked address, so a refused URL makes no connection at all.
    Redirects are not followed. ``msg_id`` is the ``webhook-id``: pass the same one on
    every retry of the same event so receivers can deduplicate (CB-01).
    """
    _check_msg_id(msg_id)
    body = bytes(body)
    try:
        target = _parse_url(url)
        addresses = _checked_addresses(target, resolver, webhooks._networks)
    except WebhookRefused as exc:
        return DeliveryResult(delivered=False, status=None, error=exc.message, retryable=False)
    except _Unresolvable as exc:
        return DeliveryResult(
            delivered=False, status=None, error=str(exc)[:_MAX_ERROR_CHARS], retryable=True
        )
    timestamp = int(now())
    headers = {
        "Host": target.host_header,
        "content-type": "application/json",
        "webhook-id": msg_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": sign(webhooks.secret, msg_id, timestamp, body),
        "user-agent": _USER_AGENT,
    }
    conn = _PinnedConnection(target, addresses, webhooks)
    try:
        try:
            conn.request("POST", target.path, body=body, headers=headers)
            response = conn.getresponse()
        except (OSError, http.client.HTTPException) as exc:
            return DeliveryResult(delivered=False, status=None, error=_short(exc), retryable=True)
        status = response.status
        try:
            response.read(webhooks.max_response_bytes)  # discarded (CB-06)
        except (OSError, http.client.HTTPException, ValueError):
            pass  # the status already decides the outcome
    finally:
        conn.close()
    if 200 <= status < 300:
        return DeliveryResult(delivered=True, status=status, error=None, retryable=False)
    if 300 <= status < 400:
        return DeliveryResult(
            delivered=False,
            status=status,
            error=f"receiver answered HTTP {status}; redirects are not followed, "
            "give the final URL",
            retryable=False,
        )
    retryable = status in (408, 429) or 500 <= status < 600
    return DeliveryResult(
        delivered=False,
        status=status,
        error=f"receiver answered HTTP {status}",
        retryable=retryable,
    )
