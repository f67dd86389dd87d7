"""LD-02: the excess of an overload is refused from the route alone (before the body is
read or decoded), counted like any rejection; and `servekit serve`'s h11 protocol writes
each response in one piece."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from typing import Any

import h11
import pytest

import servekit as sk
from servekit.transports import create_asgi_app
from servekit.transports._uvicorn import _OneWritePerResponse


@pytest.fixture
def full() -> Iterator[sk.Predictor[Any, Any]]:
    """A predictor whose one slot is busy and whose queue (one item) is full."""
    release = threading.Event()

    def stuck(batch: list[Any]) -> list[Any]:
        release.wait(30)
        return batch

    batcher = sk.Batcher(max_batch_size=1, max_queue=1)
    predictor = sk.Predictor(stuck, validate=False, backend=sk.Threads(1), batcher=batcher)
    predictor.start()
    held = [threading.Thread(target=predictor.predict, args=(i,)) for i in range(2)]
    try:
        for thread in held:  # one in the model, then one queued
            thread.start()
            while batcher.statistics().queue_depth + batcher.statistics().running_batches < (
                1 + held.index(thread)
            ):
                release.wait(0.005)
        assert batcher.statistics().queue_depth == 1
        yield predictor
    finally:
        release.set()
        for thread in held:
            thread.join(10)
        predictor.close()


def test_refuse_if_full_counts_a_rejection_only_when_full(
    full: sk.Predictor[Any, Any],
) -> None:
    batcher = full.batcher
    assert batcher is not None
    before = full.statistics()
    refused = full.refuse_if_full()
    assert isinstance(refused, sk.Overloaded)
    assert refused.retry_after_s > 0
    assert "max_queue=1" in refused.message
    assert batcher.statistics().rejected == 1
    after = full.statistics()
    assert (after.requests, after.errors) == (before.requests + 1, before.errors + 1)
    # A submission sees the same full queue.
    with pytest.raises(sk.Overloaded):
        full.predict(3)
    assert batcher.statistics().rejected == 2


def test_refuse_if_full_is_none_with_room_or_without_a_batcher() -> None:
    batcher = sk.Batcher(max_batch_size=2, max_queue=4)
    with sk.Predictor(lambda xs: xs, batcher=batcher) as predictor:
        assert predictor.refuse_if_full() is None
        assert batcher.refuse_if_full() is None
        assert batcher.statistics().rejected == 0
    with sk.Predictor(lambda x: x, per_item=True) as plain:
        assert plain.refuse_if_full() is None
    # Closed: no verdict here; the submission itself raises Closed.
    assert predictor.refuse_if_full() is None


def _scope(method: str, path: str, body: bytes) -> dict[str, Any]:
    return {
        "type": "http",
        "method": method,
        "path": path,
        "root_path": "",
        "query_string": b"",
        "headers": [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
        ],
    }


async def _call(
    app: Any, method: str, path: str, body: bytes
) -> tuple[int, dict[str, str], Any, int]:
    """(status, headers, JSON body, how many times the app called receive)."""
    received = 0
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        nonlocal received
        received += 1
        if received == 1:
            return {"type": "http.request", "body": body, "more_body": False}
        await asyncio.sleep(30)  # a client that stays: no disconnect
        raise AssertionError("not reached")

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app(_scope(method, path, body), receive, send)
    start, payload = sent
    headers = {k.decode(): v.decode() for k, v in start["headers"]}
    return start["status"], headers, json.loads(payload["body"]), received


def test_full_queue_is_refused_before_the_body_is_read(full: sk.Predictor[Any, Any]) -> None:
    app = create_asgi_app(full)

    async def run() -> None:
        body = json.dumps({"input": 1, "timeout_s": 5}).encode()
        status, headers, payload, received = await _call(app, "POST", "/predict", body)
        assert status == 429
        assert int(headers["retry-after"]) >= 1
        assert payload["error"]["code"] == "overloaded"
        assert received == 0  # refused from the route alone
        # Not even valid JSON is looked at: the overload answers first.
        status, _, _, received = await _call(app, "POST", "/predict", b"{nope")
        assert (status, received) == (429, 0)
        # The OIP infer route: the same 429, in the protocol's error shape.
        infer = {"inputs": [{"name": "input", "shape": [1], "datatype": "INT64", "data": [1]}]}
        path = f"/v2/models/{full.name}/infer"
        status, _, payload, received = await _call(app, "POST", path, json.dumps(infer).encode())
        assert (status, payload["code"], received) == (429, "overloaded", 0)
        assert isinstance(payload["error"], str)
        # predict_many keeps its answer: 200 with an error for each item without room.
        many = json.dumps({"inputs": [1, 2]}).encode()
        status, _, payload, received = await _call(app, "POST", "/predict_many", many)
        assert status == 200 and received >= 1  # read (and watched for a disconnect)
        assert [e["code"] for e in payload["errors"]] == ["overloaded", "overloaded"]
        # Health is answered as ever.
        status, _, payload, _ = await _call(app, "GET", "/v2/health/live", b"")
        assert (status, payload) == (200, {"live": True})

    asyncio.run(run())
    assert full.batcher is not None
    assert full.batcher.statistics().rejected == 5  # 3 refused early, 2 items of the batch


def test_an_unknown_model_is_still_404_when_another_is_full(
    full: sk.Predictor[Any, Any],
) -> None:
    app = create_asgi_app({"full": full})

    async def run() -> None:
        body = json.dumps({"input": 1}).encode()
        status, _, payload, _ = await _call(app, "POST", "/models/nope/predict", body)
        assert (status, payload["error"]["code"]) == (404, "not_found")
        status, _, _, _ = await _call(app, "POST", "/models/full/predict", body)
        assert status == 429

    asyncio.run(run())


class _Recorder:
    """A transport that records writes."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        self.writes.append(bytes(data))

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 1) if name == "peername" else default


def _request(conn: h11.Connection) -> None:
    conn.receive_data(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
    assert isinstance(conn.next_event(), h11.Request)
    assert isinstance(conn.next_event(), h11.EndOfMessage)


def test_a_response_head_goes_out_with_its_body() -> None:
    async def run() -> None:
        conn = h11.Connection(h11.SERVER)
        real = _Recorder()
        held = _OneWritePerResponse(real, conn, asyncio.get_running_loop())  # type: ignore[arg-type]
        for round_ in range(2):  # two responses on one kept-alive connection
            _request(conn)
            held.write(conn.send(h11.Response(status_code=200, headers=[("content-length", "2")])))
            assert len(real.writes) == round_  # the head is held...
            held.write(conn.send(h11.Data(data=b"ok")))
            held.write(conn.send(h11.EndOfMessage()))  # b"" for a content-length body
            assert len(real.writes) == round_ + 1  # ...and written with the body
            assert real.writes[-1].startswith(b"HTTP/1.1 200 ") and real.writes[-1].endswith(b"ok")
            conn.start_next_cycle()
        await asyncio.sleep(0)  # the flush scheduled for each head finds nothing held
        assert len(real.writes) == 2
        assert held.get_extra_info("peername") == ("127.0.0.1", 1)  # the rest is the transport's

    asyncio.run(run())


def test_a_head_whose_body_comes_later_is_not_held_past_the_step() -> None:
    async def run() -> None:
        conn = h11.Connection(h11.SERVER)
        real = _Recorder()
        held = _OneWritePerResponse(real, conn, asyncio.get_running_loop())  # type: ignore[arg-type]
        _request(conn)
        held.write(
            conn.send(h11.Response(status_code=200, headers=[("transfer-encoding", "chunked")]))
        )
        assert real.writes == []
        await asyncio.sleep(0)  # a streaming response: the head leaves on the next pass
        assert len(real.writes) == 1 and real.writes[0].startswith(b"HTTP/1.1 200 ")
        held.write(conn.send(h11.Data(data=b"part")))  # later chunks are not held
        assert len(real.writes) == 2
        # close() writes a held head first.
        conn2 = h11.Connection(h11.SERVER)
        real2 = _Recorder()
        held2 = _OneWritePerResponse(real2, conn2, asyncio.get_running_loop())  # type: ignore[arg-type]
        _request(conn2)
        held2.write(conn2.send(h11.Response(status_code=204, headers=[])))
        held2.close()
        assert len(real2.writes) == 1 and real2.closed

    asyncio.run(run())
