"""TR-12: boofuzz over the HTTP request line, headers and body of a real `servekit serve`.

As Triton's ``qa/L0_http_fuzz``: boofuzz sends mutated requests over TCP to a
``servekit serve`` on 127.0.0.1 (uvicorn, an identity model), and the run must log no
``fail`` step in boofuzz's sqlite results. Fuzzed: the method, the path (health, model,
infer, predict, metrics and job routes) and the HTTP version of the request line; the
Host, Content-Type, Content-Length, ``Inference-Header-Content-Length``,
``Idempotency-Key``, ``Transfer-Encoding`` and an extra header's name and value; the
fields of a JSON infer body, a binary-extension infer body, a ``/predict`` body, a job
submission and a chunked body's chunk lines.

After every case a post-test-case callback reads the answer to the fuzzed request (a
5xx is a ``fail``; a 4xx, a closed or reset connection or no answer to an incomplete
request are fine: that is uvicorn/h11 or servekit refusing garbage) and then, on a new
connection, asks ``/v2/health/ready`` and sends a good infer request, whose answer must
be right: a crash or a hang is a ``fail``. At the end ``/v2/health/live`` answers 200 and
the server's log holds no traceback.

Bounded: each fuzzed field gets a fixed, seeded sample of boofuzz's own mutations
(``SERVEKIT_FUZZ_SAMPLE`` per field, seed ``SERVEKIT_FUZZ_SEED``; boofuzz seeds its own
random mutations too), and the run stops between messages once ``SERVEKIT_FUZZ_MAX_S``
seconds (default 150) have passed. boofuzz's web UI is off and its results database is
written under pytest's tmp dir. Run by ``nox -s fuzz``.
"""

from __future__ import annotations

import http.client
import json
import os
import random
import re
import socket
import sqlite3
import subprocess
import sys
import textwrap
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

bf = pytest.importorskip("boofuzz", reason="TR-12 needs boofuzz (nox -s fuzz installs it)")
pytest.importorskip("uvicorn")

# boofuzz 0.4 stamps its results with datetime.utcnow(), deprecated from Python 3.12.
pytestmark = pytest.mark.filterwarnings("ignore:datetime.datetime.utcnow:DeprecationWarning")

MAX_S = float(os.environ.get("SERVEKIT_FUZZ_MAX_S", "150"))
SAMPLE = int(os.environ.get("SERVEKIT_FUZZ_SAMPLE", "250"))
SEED = int(os.environ.get("SERVEKIT_FUZZ_SEED", "12"))
#: How long to wait for the answer to a fuzzed request. Complete requests are answered
#: in milliseconds; an incomplete one (a Content-Length past the body) is waited on by
#: the server for ever, so the wait bounds such cases.
ANSWER_WAIT_S = 0.5
#: Longest fuzzed string: past h11's 16 KiB header limit, short of the 64 MB body limit.
MAX_LEN = 20_000
MODEL = "echo"

# The model is the one of TR-13: an identity over whatever the request decodes to.
_APP = textwrap.dedent(
    f"""
    import servekit as sk

    def identity(batch):
        return batch

    predictor = sk.Predictor(identity, name={MODEL!r}, validate=False)
    """
)

_GOOD_INFER = json.dumps(
    {
        "id": "probe",
        "inputs": [{"name": "x", "shape": [2], "datatype": "FP32", "data": [1.5, 2.5]}],
    }
).encode()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    """A `servekit serve` subprocess on 127.0.0.1 and the checks that it still works."""

    def __init__(self, root: Path) -> None:
        (root / "tr12_app.py").write_text(_APP)
        self.port = _free_port()
        self.log = root / "server.log"
        command = [sys.executable, "-m", "servekit", "serve", "tr12_app:predictor"]
        command += ["--jobs", str(root / "jobs.sqlite3"), "--port", str(self.port)]
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(
                [*command, "--log-level", "warning"],
                cwd=root,
                env={**os.environ, "PYTHONPATH": str(root)},
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def request(self, method: str, path: str, body: bytes | None = None) -> tuple[int, bytes]:
        """One request on a new connection (a hung server times out in 10 s)."""
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            headers = {"Content-Type": "application/json"} if body is not None else {}
            connection.request(method, path, body=body, headers=headers)
            response = connection.getresponse()
            return response.status, response.read()
        finally:
            connection.close()

    def wait_ready(self) -> None:
        deadline = time.monotonic() + 30
        while True:
            assert self.proc.poll() is None, self.log.read_text()
            try:
                if self.request("GET", "/v2/health/ready")[0] == 200:
                    return
            except OSError:
                pass
            assert time.monotonic() < deadline, "servekit serve did not get ready in 30 s"
            time.sleep(0.05)

    def problem(self) -> str | None:
        """What is wrong with the server now (None: it answers a good request right)."""
        if self.proc.poll() is not None:
            return f"the server exited with {self.proc.returncode}"
        try:
            status, _ = self.request("GET", "/v2/health/ready")
            if status != 200:
                return f"/v2/health/ready answered {status}"
            status, body = self.request("POST", f"/v2/models/{MODEL}/infer", _GOOD_INFER)
        except (OSError, http.client.HTTPException) as exc:
            return f"a good request failed: {exc!r}"
        if status != 200:
            return f"a good infer request answered {status}: {body[:300]!r}"
        try:
            answer = json.loads(body)
            right = answer["id"] == "probe" and answer["outputs"][0]["data"] == [1.5, 2.5]
        except (ValueError, LookupError, TypeError):
            right = False
        return None if right else f"a good infer request answered wrongly: {body[:300]!r}"

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(30)


class Loopback(bf.ITargetConnection):  # type: ignore[misc]
    """boofuzz's connection to the server: a TCP socket to 127.0.0.1 only, which can
    also read the status line of the answer to what was sent."""

    def __init__(self, port: int) -> None:
        self.port = port
        self._sock: socket.socket | None = None

    def open(self) -> None:
        try:
            self._sock = socket.create_connection(("127.0.0.1", self.port), timeout=5)
        except OSError as exc:
            raise bf.exception.BoofuzzTargetConnectionFailedError(repr(exc)) from exc

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def send(self, data: bytes) -> int:
        assert self._sock is not None
        try:
            self._sock.sendall(data)
        except (ConnectionResetError, BrokenPipeError) as exc:
            # The server answered and closed early (h11's 16 KiB limit, a bad request line).
            raise bf.exception.BoofuzzTargetConnectionReset() from exc
        except TimeoutError as exc:
            raise bf.exception.BoofuzzTargetConnectionAborted(
                socket_errno=None, socket_errmsg=repr(exc)
            ) from exc
        return len(data)

    def recv(self, max_bytes: int) -> bytes:
        assert self._sock is not None
        try:
            return self._sock.recv(max_bytes)
        except TimeoutError:
            return b""
        except ConnectionResetError as exc:
            raise bf.exception.BoofuzzTargetConnectionReset() from exc

    @property
    def info(self) -> str:
        return f"127.0.0.1:{self.port}"

    def status(self, wait_s: float) -> int | str:
        """The status code of the first answer, or why there is none: "closed" (the
        server hung up), "reset", "silent" (nothing within ``wait_s``)."""
        assert self._sock is not None
        deadline = time.monotonic() + wait_s
        data = b""
        while b"\r\n" not in data:
            left = deadline - time.monotonic()
            if left <= 0:
                return "silent"
            self._sock.settimeout(left)
            try:
                chunk = self._sock.recv(4096)
            except TimeoutError:
                return "silent"
            except ConnectionError:
                return "reset"
            if not chunk:
                return "closed" if not data else f"closed after {data[:80]!r}"
            data += chunk
        match = re.match(rb"HTTP/1\.[01] (\d{3}) ", data)
        return int(match.group(1)) if match else f"not HTTP: {data[:80]!r}"


class _Sampled:
    """Mixin for a boofuzz primitive: its mutations cut to a fixed, seeded sample
    (boofuzz's own order kept), so that a run has a known number of cases."""

    name: str

    def mutations(self, default_value: Any) -> Iterator[Any]:
        cache: dict[Any, list[Any]] = self.__dict__.setdefault("_sampled", {})
        if default_value not in cache:
            every = list(super().mutations(default_value))  # type: ignore[misc]
            keep = random.Random(f"{SEED}:{self.name}").sample(
                range(len(every)), min(SAMPLE, len(every))
            )
            cache[default_value] = [every[i] for i in sorted(keep)]
        yield from cache[default_value]

    def num_mutations(self, default_value: Any) -> int:
        return sum(1 for _ in self.mutations(default_value))


class SampledString(_Sampled, bf.String):  # type: ignore[misc]
    """boofuzz's String (at most ``MAX_LEN`` long), sampled."""

    def __init__(self, name: str, default_value: str) -> None:
        super().__init__(name=name, default_value=default_value, max_len=MAX_LEN)


class SampledSize(_Sampled, bf.Size):  # type: ignore[misc]
    """boofuzz's Size of a block, as ASCII digits (a Content-Length), sampled."""

    def __init__(self, name: str, block_name: str) -> None:
        super().__init__(name=name, block_name=block_name, output_format="ascii")


def _crlf() -> Any:
    return bf.Static(default_value="\r\n")


def _text(value: str) -> Any:
    return bf.Static(default_value=value)


def _request_line(name: str, path: str) -> Any:
    """Triton's request-line message (method, path, version fuzzed) with the two headers
    HTTP/1.1 needs to reach the application."""
    methods = ["GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH", "TRACE", "CONNECT"]
    return bf.Request(
        name,
        children=(
            bf.Group(name="method", values=methods),
            bf.Delim(name="space-1", default_value=" "),
            SampledString("path", path),
            bf.Delim(name="space-2", default_value=" "),
            SampledString("version", "HTTP/1.1"),
            _text("\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"),
        ),
    )


def _post(
    name: str, path: str, content_type: str, body: tuple[Any, ...], headers: tuple[Any, ...] = ()
) -> Any:
    """A POST whose headers and body are fuzzed: Host, Content-Type, a Content-Length
    that follows the body (fuzzed too), an extra header's name and value; ``headers``
    are more header lines, before the body."""
    return bf.Request(
        name,
        children=(
            _text(f"POST {path} HTTP/1.1\r\nHost: "),
            SampledString("host", "127.0.0.1"),
            _text("\r\nContent-Type: "),
            SampledString("content-type", content_type),
            _text("\r\nContent-Length: "),
            SampledSize("content-length", "body"),
            _crlf(),
            SampledString("header-name", "X-Request-Id"),
            bf.Delim(name="colon", default_value=":"),
            SampledString("header-value", "r-1"),
            _text("\r\nConnection: close\r\n"),
            *headers,
            _crlf(),
            bf.Block(name="body", children=body),
        ),
    )


def _infer_json() -> Any:
    datatypes = ["FP32", "FP64", "FP16", "INT64", "INT8", "UINT8", "BOOL", "BYTES", "BF16", "X"]
    body = (
        _text('{"id": "'),
        SampledString("id", "r-1"),
        _text('", "inputs": [{"name": "'),
        SampledString("input-name", "x"),
        _text('", "shape": ['),
        SampledString("shape", "2"),
        _text('], "datatype": "'),
        bf.Group(name="datatype", values=datatypes),
        _text('", "data": ['),
        SampledString("data", "1.5, 2.5"),
        _text(']}], "outputs": [{"name": "'),
        SampledString("output-name", "output"),
        _text('"}], "parameters": {"timeout": '),
        SampledString("timeout", "1000000"),
        _text(', "priority": '),
        SampledString("priority", "1"),
        _text(', "binary_data_output": '),
        SampledString("binary_data_output", "false"),
        _text("}}"),
    )
    return _post("infer-json", f"/v2/models/{MODEL}/infer", "application/json", body)


def _infer_binary() -> Any:
    """The binary tensor data extension: Inference-Header-Content-Length gives the JSON
    header's length (fuzzed), binary_data_size the tensor's (fuzzed), then raw bytes."""
    header = (
        _text('{"inputs": [{"name": "x", "shape": [2], "datatype": "'),
        bf.Group(name="datatype", values=["FP32", "INT32", "FP16", "INT64", "BYTES", "BOOL"]),
        _text('", "parameters": {"binary_data_size": '),
        SampledString("binary-data-size", "8"),
        _text('}}], "outputs": [{"name": "output", "parameters": {"binary_data": true}}]}'),
    )
    body = (
        bf.Block(name="json", children=header),
        bf.RandomData(name="tensor", default_value=b"\x00\x00\xc0?\x00\x00 @", max_length=64),
    )
    header_length = (
        _text("Inference-Header-Content-Length: "),
        SampledSize("header-length", "json"),
        _crlf(),
    )
    path = f"/v2/models/{MODEL}/infer"
    return _post("infer-binary", path, "application/octet-stream", body, header_length)


def _predict() -> Any:
    body = (
        _text('{"input": '),
        SampledString("input", "[1, 2, 3]"),
        _text(', "timeout_s": '),
        SampledString("timeout_s", "5"),
        _text(', "priority": '),
        SampledString("priority", "0"),
        _text("}"),
    )
    return _post("predict", "/predict", "application/json", body)


def _job() -> Any:
    """A job submission (the server has a SQLite job store): its idempotency key and
    body are fuzzed."""
    key = (_text("Idempotency-Key: "), SampledString("idempotency-key", "k-1"), _crlf())
    body = (
        _text('{"input": '),
        SampledString("input", "[4, 5]"),
        _text(', "timeout_s": '),
        SampledString("timeout_s", "30"),
        _text("}"),
    )
    return _post("job", "/jobs", "application/json", body, key)


def _chunked() -> Any:
    """A chunked infer body: the chunk-size line and the last chunk are fuzzed."""
    chunk = '{"inputs": [{"name": "x", "shape": [1], "datatype": "INT64", "data": [7]}]}'
    return bf.Request(
        "chunked",
        children=(
            _text(f"POST /v2/models/{MODEL}/infer HTTP/1.1\r\nHost: 127.0.0.1\r\n"),
            _text("Content-Type: application/json\r\nTransfer-Encoding: "),
            SampledString("transfer-encoding", "chunked"),
            _text("\r\nConnection: close\r\n\r\n"),
            SampledString("chunk-size", f"{len(chunk):x}"),
            _text(f"\r\n{chunk}\r\n"),
            SampledString("last-chunk", "0"),
            _text("\r\n\r\n"),
        ),
    )


PATHS = {
    "line-ready": "/v2/health/ready",
    "line-infer": f"/v2/models/{MODEL}/infer",
    "line-model": f"/v2/models/{MODEL}/versions/1/ready",
    "line-predict": "/predict",
    "line-metrics": "/metrics",
    "line-job": "/jobs/0123456789abcdef",
}
MESSAGES: list[Callable[[], Any]] = [
    *(lambda name=name, path=path: _request_line(name, path) for name, path in PATHS.items()),
    _infer_json,
    _infer_binary,
    _predict,
    _job,
    _chunked,
]


#: Cases per boofuzz session: the wall-clock cap is checked between sessions.
CHUNK = 400


def _plan() -> list[tuple[Callable[[], Any], int, int]]:
    """(message, first case, last case) of every session, round-robin over the messages
    (so that a run stopped by the cap has fuzzed every message)."""
    sizes = [(make, make().get_num_mutations()) for make in MESSAGES]
    rounds = max(-(-size // CHUNK) for _, size in sizes)
    return [
        (make, k * CHUNK + 1, min((k + 1) * CHUNK, size))
        for k in range(rounds)
        for make, size in sizes
        if k * CHUNK < size
    ]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    served = Server(tmp_path_factory.mktemp("tr12"))
    try:
        served.wait_ready()
        yield served
    finally:
        served.stop()


def _fuzz(
    server: Server, message: Any, cases: tuple[int, int], db: Path, answers: Counter[Any]
) -> int:
    """Fuzz cases ``first..last`` of one message with boofuzz; the number it ran."""
    connection = Loopback(server.port)

    def check(target: Any, fuzz_data_logger: Any, session: Any, **kwargs: Any) -> None:
        answer = connection.status(ANSWER_WAIT_S)
        answers[answer if isinstance(answer, int) else answer.split(" ")[0]] += 1
        fuzz_data_logger.log_info(f"answer: {answer}")
        if isinstance(answer, int) and answer >= 500:
            fuzz_data_logger.log_fail(f"the server answered {answer} to a fuzzed request")
        problem = server.problem()
        if problem is None:
            fuzz_data_logger.log_pass("the server still answers a good request right")
        else:
            fuzz_data_logger.log_fail(problem)

    session = bf.Session(
        target=bf.Target(connection=connection),
        web_port=None,  # no web UI: no port opened but the target's
        keep_web_open=False,
        fuzz_loggers=[],  # only the sqlite results (no console log of every case)
        db_filename=str(db),
        index_start=cases[0],
        index_end=cases[1],
        # Keep only the 10 cases before a failure: a commit per passing case is slow.
        fuzz_db_keep_only_n_pass_cases=10,
        post_test_case_callbacks=[check],
        restart_sleep_time=0,  # no restart handler: a failure is reported, not waited on
        restart_threshold=1,  # a server that refuses connections ends the run
    )
    session.connect(message)
    session.fuzz(max_depth=1)  # one mutation at a time (boofuzz goes on to pairs without it)
    return int(session.num_cases_actually_fuzzed)


def _steps(db: Path, kinds: tuple[str, ...]) -> list[tuple[Any, ...]]:
    """The steps of these types in boofuzz's results, with their case's name."""
    with sqlite3.connect(db) as results:
        marks = ", ".join("?" for _ in kinds)
        return results.execute(
            "SELECT cases.name, steps.type, steps.description FROM steps"
            " JOIN cases ON cases.number = steps.test_case_index"
            f" WHERE steps.type IN ({marks})",
            kinds,
        ).fetchall()


@pytest.mark.timeout(MAX_S + 120)
def test_boofuzz_logs_no_fail_step_and_the_server_lives(
    server: Server, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    started = time.monotonic()
    plan = _plan()
    answers: Counter[Any] = Counter()
    ran: Counter[str] = Counter()
    for make, first, last in plan:
        if time.monotonic() - started > MAX_S:
            break
        message = make()
        db = tmp_path / f"{message.name}-{first}.db"
        cases = _fuzz(server, message, (first, last), db, answers)
        # No case logged a fail, or an error (a check that broke), and every case ran (a
        # server that stopped taking connections ends boofuzz's run early).
        assert _steps(db, ("fail", "error")) == [], message.name
        assert cases == last - first + 1, (message.name, first, cases)
        ran[message.name] += cases
    took = time.monotonic() - started
    total = sum(last - first + 1 for _, first, last in plan)
    with capsys.disabled():
        print(
            f"\nTR-12: {ran.total()} of {total} boofuzz cases"
            f"{'' if ran.total() == total else ' (stopped at SERVEKIT_FUZZ_MAX_S)'}"
            f" over {len(ran)} messages in {took:.0f} s; answers {dict(answers.most_common())}"
        )
    assert len(ran) == len(MESSAGES), "the wall-clock cap left messages unfuzzed"
    # Some cases reached servekit's routes and were refused there (404, 405, 400 with a
    # message) or served, not only refused by h11: the fuzz got past the parser.
    assert answers[200] > 0
    assert answers[404] > 0
    assert answers[405] > 0
    assert answers[400] > 0
    assert server.request("GET", "/v2/health/live")[0] == 200
    assert server.problem() is None
    log = server.log.read_text(errors="replace")
    assert "Traceback" not in log, log[-4000:]
