"""TR-04 and SEC-06 under a real `servekit serve` (uvicorn on 127.0.0.1).

TR-04: shape and datatype abuse in Open Inference Protocol infer requests (a shape of
``[16, 2**60 + 2]``, negative and non-integer dimensions, a data count that does not
match the shape, an unknown datatype, BOOL given as 2, a string in FP32; JSON and
binary tensors) gets 400 with a message, and the server's peak memory does not move:
nothing is allocated from a claimed shape before the data is checked against it.
SEC-06: 10,000 rejected requests leave the server's RSS within a few MiB.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

pytest.importorskip("uvicorn")

_APP = textwrap.dedent(
    """
    import servekit as sk

    def identity(batch):
        return batch

    predictor = sk.Predictor(identity, name="m")
    """
)

MiB = 2**20


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, psutil.Process]]:
    root = tmp_path_factory.mktemp("abuse")
    (root / "tr04_app.py").write_text(_APP)
    port = _free_port()
    command = [sys.executable, "-m", "servekit", "serve", "tr04_app:predictor"]
    proc = subprocess.Popen(
        [*command, "--port", str(port), "--log-level", "warning"],
        cwd=root,
        env={**os.environ, "PYTHONPATH": str(root)},
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None
            try:
                if httpx.get(f"{base}/v2/health/ready").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline
            time.sleep(0.05)
        yield base, psutil.Process(proc.pid)
    finally:
        proc.terminate()
        proc.wait(30)


def _tensor(shape: Any, datatype: Any = "FP32", data: Any = None, **params: Any) -> bytes:
    tensor: dict[str, Any] = {"name": "x", "shape": shape, "datatype": datatype}
    if data is not None:
        tensor["data"] = data
    if params:
        tensor["parameters"] = params
    return json.dumps({"inputs": [tensor]}).encode()


def _binary(shape: Any, datatype: str, raw: bytes) -> tuple[bytes, dict[str, str]]:
    header = _tensor(shape, datatype, binary_data_size=len(raw))
    headers = {
        "content-type": "application/octet-stream",
        "inference-header-content-length": str(len(header)),
    }
    return header + raw, headers


#: (case, body, extra headers): every one is a 400 with a message naming the problem.
ABUSE: list[tuple[str, bytes, dict[str, str], str]] = [
    ("huge shape", _tensor([16, 2**60 + 2], data=[1.0, 2.0]), {}, "shape"),
    ("huge shape, 2**64", _tensor([2**32, 2**32], data=[1.0]), {}, "shape"),
    ("negative dim", _tensor([-1, 3], data=[1.0, 2.0, 3.0]), {}, ">= 0"),
    ("non-integer dim", _tensor([1.5, 2], data=[1.0, 2.0, 3.0]), {}, "integer"),
    ("string dim", _tensor(["3"], data=[1.0, 2.0, 3.0]), {}, "integer"),
    ("bool dim", _tensor([True], data=[1.0]), {}, "integer"),
    ("count mismatch", _tensor([2, 2], data=[1.0, 2.0, 3.0]), {}, "elements"),
    # Just under the element cap: allocating from the shape would cost 64 MiB.
    ("large shape, one element", _tensor([4096, 4096], data=[1.0]), {}, "elements"),
    ("unknown datatype", _tensor([1], "FP128", [1.0]), {}, "datatype"),
    ("BOOL given as 2", _tensor([2], "BOOL", [True, 2]), {}, "BOOL"),
    ("string in FP32", _tensor([2], "FP32", [1.0, "a"]), {}, "FP32"),
    ("nested data, wrong shape", _tensor([2, 2], data=[[1.0, 2.0], [3.0]]), {}, "data"),
    ("binary: huge shape", *_binary([16, 2**60 + 2], "FP32", b"\0" * 8), "shape"),
    ("binary: large shape, few bytes", *_binary([4096, 4096], "FP32", b"\0" * 8), "bytes"),
    ("binary: negative dim", *_binary([-4], "FP32", b"\0" * 16), ">= 0"),
    ("binary: BOOL given as 2", *_binary([2], "BOOL", b"\x01\x02"), "BOOL"),
]


def _peak(process: psutil.Process, field: str) -> int:
    """A peak from Linux ``/proc/PID/status``, in bytes: ``VmHWM`` (resident) or
    ``VmPeak`` (address space, which counts even pages never touched). A transient
    allocation raises it even if freed before the next sample."""
    status = Path(f"/proc/{process.pid}/status").read_text()
    line = next(x for x in status.splitlines() if x.startswith(f"{field}:"))
    return int(line.split()[1]) * 1024


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads Linux VmHWM")
def test_shape_and_datatype_abuse_is_400_without_a_large_allocation(
    server: tuple[str, psutil.Process],
) -> None:
    base, process = server
    url = f"{base}/v2/models/m/infer"
    with httpx.Client(timeout=30) as http:
        ok = http.post(
            url, json={"inputs": [{"name": "x", "shape": [2], "datatype": "FP32", "data": [1, 2]}]}
        )
        assert ok.status_code == 200
        for _ in range(3):  # warm up whatever the error path allocates once
            for _, body, headers, _ in ABUSE:
                http.post(
                    url, content=body, headers={"content-type": "application/json", **headers}
                )
        resident_peak, address_peak = _peak(process, "VmHWM"), _peak(process, "VmPeak")
        rss_before = process.memory_info().rss
        for _ in range(5):
            for case, body, headers, words in ABUSE:
                answer = http.post(
                    url, content=body, headers={"content-type": "application/json", **headers}
                )
                assert answer.status_code == 400, (case, answer.status_code, answer.text)
                message = answer.json()["error"]
                assert isinstance(message, str) and words in message, (case, message)
                assert "Traceback" not in message and "/" not in message.replace("/v2", "")
        # No request made the server allocate what its shape claimed (64 MiB and up).
        assert _peak(process, "VmHWM") - resident_peak < 8 * MiB
        assert _peak(process, "VmPeak") - address_peak < 32 * MiB
        assert process.memory_info().rss - rss_before < 8 * MiB
        assert http.get(f"{base}/v2/health/live").status_code == 200
        assert (
            http.post(
                url, content=ok.request.content, headers={"content-type": "application/json"}
            ).status_code
            == 200
        )


def test_ten_thousand_rejected_requests_leave_rss_flat(
    server: tuple[str, psutil.Process],
) -> None:
    base, process = server
    port = int(base.rsplit(":", 1)[1])
    infer = "/v2/models/m/infer"
    rejected = [_request(infer, body, headers) for _, body, headers, _ in ABUSE]
    rejected += [
        _request(infer, b"[" * 100 + b"]" * 100),  # deeper than max_json_depth
        _request(infer, _many_inputs(65)),  # more than max_inputs
        _request(infer, b"{not json"),
        _request("/v2/models/nope/infer", _tensor([1], data=[1.0])),  # 404
        _request("/predict", b'{"inputs": 1}'),
    ]
    requests = [rejected[i % len(rejected)] for i in range(10_000)]
    warm = _pipelined(port, requests[:500])
    assert set(warm) <= {400, 404}, set(warm)
    before = process.memory_info().rss
    statuses = _pipelined(port, requests)
    assert len(statuses) == 10_000
    assert set(statuses) <= {400, 404}, set(statuses)
    growth = process.memory_info().rss - before
    assert growth < 4 * MiB, growth / MiB
    assert httpx.get(f"{base}/v2/health/live").status_code == 200


def _request(path: str, body: bytes, headers: dict[str, str] | None = None) -> bytes:
    fields = {"host": "127.0.0.1", "content-type": "application/json", **(headers or {})}
    fields["content-length"] = str(len(body))
    head = "".join(f"{k}: {v}\r\n" for k, v in fields.items())
    return f"POST {path} HTTP/1.1\r\n{head}\r\n".encode() + body


def _pipelined(port: int, requests: list[bytes], window: int = 50) -> list[int]:
    """Send ``requests`` on one keep-alive connection, ``window`` at a time (HTTP/1.1
    pipelining, which uvicorn answers in order); the status of every response."""
    statuses: list[int] = []
    buffer = b""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as conn:
        for start in range(0, len(requests), window):
            batch = requests[start : start + window]
            conn.sendall(b"".join(batch))
            for _ in batch:
                while b"\r\n\r\n" not in buffer:
                    chunk = conn.recv(65536)
                    assert chunk, "the server closed the connection"
                    buffer += chunk
                head, buffer = buffer.split(b"\r\n\r\n", 1)
                lines = head.decode("latin-1").split("\r\n")
                statuses.append(int(lines[0].split()[1]))
                length = next(
                    int(line.split(":", 1)[1])
                    for line in lines[1:]
                    if line.lower().startswith("content-length:")
                )
                while len(buffer) < length:
                    chunk = conn.recv(65536)
                    assert chunk, "the server closed the connection"
                    buffer += chunk
                buffer = buffer[length:]
    return statuses


def _many_inputs(n: int) -> bytes:
    inputs = [{"name": f"x{i}", "shape": [1], "datatype": "FP32", "data": [1.0]} for i in range(n)]
    return json.dumps({"inputs": inputs}).encode()


@pytest.mark.parametrize(
    ("route", "body"),
    [
        ("/predict", b'{"input": [1.0, 2.0], "timeout_s": %s}'),
        ("/predict_many", b'{"inputs": [[1.0, 2.0]], "timeout_s": %s}'),
    ],
)
def test_a_timeout_past_a_floats_range_is_400_not_500(
    server: tuple[str, psutil.Process], route: str, body: bytes
) -> None:
    # Found by TR-12's fuzz (tests/fuzz): an integer timeout_s of 511 digits passed the
    # "number > 0" check, then float() raised OverflowError, answered 500.
    base, _ = server
    huge = b"1" * 511  # under Python's 4300-digit limit, which the JSON parser refuses
    with httpx.Client(timeout=30) as http:
        answer = http.post(
            f"{base}{route}", content=body % huge, headers={"content-type": "application/json"}
        )
        assert answer.status_code == 400, answer.text
        assert "timeout_s" in answer.json()["error"]["message"]
        # The same request with a timeout a float holds is served.
        fine = http.post(
            f"{base}{route}", content=body % b"1e308", headers={"content-type": "application/json"}
        )
        assert fine.status_code == 200, fine.text


@pytest.mark.parametrize("key", ["timeout", "servekit_timeout_s"])
def test_an_infer_timeout_past_a_floats_range_is_400_not_500(
    server: tuple[str, psutil.Process], key: str
) -> None:
    # Found by TR-12's fuzz: request.parameters.timeout of 511 digits made float() raise
    # OverflowError while the parameters were checked, answered 500.
    base, _ = server
    tensor = b'{"name": "x", "shape": [2], "datatype": "FP32", "data": [1.0, 2.0]}'
    body = b'{"inputs": [%s], "parameters": {"%s": %s}}'
    url = f"{base}/v2/models/m/infer"
    headers = {"content-type": "application/json"}
    with httpx.Client(timeout=30) as http:
        answer = http.post(url, content=body % (tensor, key.encode(), b"1" * 511), headers=headers)
        assert answer.status_code == 400, answer.text
        assert f"parameters.{key}" in answer.json()["error"]
        fine = http.post(url, content=body % (tensor, key.encode(), b"1e20"), headers=headers)
        assert fine.status_code == 200, fine.text
