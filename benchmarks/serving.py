"""HTTP serving on loopback: servekit's ASGI app against plain Starlette endpoints.

Every server is one uvicorn process on 127.0.0.1; the load generator is another
process (raw asyncio HTTP/1.1 keep-alive connections, each sending one request at a
time in a closed loop), bounded in time. Figures, each a ratio within one run:

1. ceiling: req/s of servekit (``create_asgi_app`` over a trivial model) ÷ req/s of a
   plain Starlette endpoint returning a constant, 64 clients; target >= 0.8;
2. batching: a model that costs 1 ms for a batch of 1 and 5 ms for a batch of 32, one
   batch at a time (a lock, as one accelerator would): servekit with a Batcher ÷ a
   plain Starlette endpoint calling the model per request, 64 clients; target >= 2;
3. latency: p50 at 1 client, servekit minus plain constant endpoint; target <= 0.3 ms.

Run: ``python benchmarks/serving.py`` (or ``nox -s bench -- serving``); needs uvicorn and
starlette (the ``serve`` extra and starlette).
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import os
import socket
import statistics
import subprocess
import sys
import textwrap
import time
import urllib.request

from _util import Table  # first: pins BLAS threads

SECONDS = 6.0
CLIENTS = 64
TARGETS = {"ceiling": 0.8, "batching": 2.0, "latency_ms": 0.3}

_APPS = textwrap.dedent(
    """
    import threading, time
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import Route
    from starlette.concurrency import run_in_threadpool
    import servekit as sk
    from servekit.transports import create_asgi_app

    _lock = threading.Lock()

    def costly(batch):
        # One batch at a time (as on one accelerator): 1 ms for 1 item, 5 ms for 32.
        with _lock:
            time.sleep(0.001 + (len(batch) - 1) * 0.004 / 31)
        return [x for x in batch]

    def identity(batch):
        return batch

    async def constant(request):
        await request.body()
        return JSONResponse({"output": 0})

    async def direct(request):
        body = await request.json()
        out = await run_in_threadpool(costly, [body["input"]])
        return JSONResponse({"output": out[0]})

    plain_constant = Starlette(routes=[Route("/predict", constant, methods=["POST"])])
    plain_model = Starlette(routes=[Route("/predict", direct, methods=["POST"])])
    servekit_trivial = create_asgi_app(sk.Predictor(identity, validate=False))
    servekit_batched = create_asgi_app(
        sk.Predictor(costly, validate=False, backend=sk.Threads(1),
                     batcher=sk.Batcher(max_batch_size=32))
    )
    """
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _start(app: str, directory: str) -> tuple[subprocess.Popen[bytes], int]:
    port = _free_port()
    command = [sys.executable, "-m", "uvicorn", f"bench_http_apps:{app}", "--port", str(port)]
    proc = subprocess.Popen(
        [*command, "--log-level", "warning", "--no-access-log"],
        cwd=directory,
        env={**os.environ, "PYTHONPATH": directory},
    )
    deadline = time.monotonic() + 30
    while True:
        try:
            body = b'{"input": 1}'
            request = urllib.request.Request(
                f"http://127.0.0.1:{port}/predict",
                data=body,
                headers={"content-type": "application/json"},
            )
            with urllib.request.urlopen(request):
                return proc, port
        except OSError:
            if time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError(f"{app} did not start") from None
            time.sleep(0.05)


async def _client(port: int, stop: float, latencies: list[float]) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    body = b'{"input": 1}'
    request = (
        b"POST /predict HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n"
        + f"content-length: {len(body)}\r\n\r\n".encode()
        + body
    )
    try:
        while time.perf_counter() < stop:
            t0 = time.perf_counter()
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            await reader.readexactly(length)
            if not head.startswith(b"HTTP/1.1 200"):
                raise RuntimeError(head.decode(errors="replace"))
            latencies.append(time.perf_counter() - t0)
    finally:
        writer.close()


def _load(port: int, clients: int, seconds: float, out: multiprocessing.Queue[str]) -> None:
    async def main() -> list[float]:
        latencies: list[float] = []
        stop = time.perf_counter() + seconds
        await asyncio.gather(*(_client(port, stop, latencies) for _ in range(clients)))
        return latencies

    latencies = asyncio.run(main())
    out.put(json.dumps({"n": len(latencies), "p50": statistics.median(latencies)}))


def measure(port: int, clients: int, seconds: float = SECONDS) -> tuple[float, float]:
    """(requests/s, p50 seconds) from a load generator in its own process."""
    out: multiprocessing.Queue[str] = multiprocessing.Queue()
    proc = multiprocessing.Process(target=_load, args=(port, clients, seconds, out))
    proc.start()
    result = json.loads(out.get(timeout=seconds + 60))
    proc.join()
    return result["n"] / seconds, result["p50"]


def main() -> None:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        with open(os.path.join(tmp, "bench_http_apps.py"), "w") as f:
            f.write(_APPS)
        results: dict[str, tuple[float, float]] = {}
        for app, clients in (
            ("plain_constant", CLIENTS),
            ("servekit_trivial", CLIENTS),
            ("plain_model", CLIENTS),
            ("servekit_batched", CLIENTS),
        ):
            proc, port = _start(app, tmp)
            try:
                measure(port, clients, 1.0)  # warm-up
                results[app] = measure(port, clients)
                if app in ("plain_constant", "servekit_trivial"):
                    results[app + "_1"] = measure(port, 1)
            finally:
                proc.terminate()
                proc.wait(30)
    table = Table("http")
    ceiling = results["servekit_trivial"][0] / results["plain_constant"][0]
    table.row(
        f"trivial model ÷ plain constant, {CLIENTS} clients",
        f"{ceiling:.2f}",
        f"({results['servekit_trivial'][0]:,.0f} vs {results['plain_constant'][0]:,.0f} req/s)",
        target=f">= {TARGETS['ceiling']}",
        met=ceiling >= TARGETS["ceiling"],
    )
    batching = results["servekit_batched"][0] / results["plain_model"][0]
    table.row(
        f"batched 1-5 ms model ÷ plain endpoint, {CLIENTS} clients",
        f"{batching:.2f}",
        f"({results['servekit_batched'][0]:,.0f} vs {results['plain_model'][0]:,.0f} req/s)",
        target=f">= {TARGETS['batching']}",
        met=batching >= TARGETS["batching"],
    )
    extra_ms = (results["servekit_trivial_1"][1] - results["plain_constant_1"][1]) * 1e3
    table.row(
        "p50 at 1 client, servekit - plain constant",
        f"{extra_ms:+.3f} ms",
        f"({results['servekit_trivial_1'][1] * 1e3:.3f} vs "
        f"{results['plain_constant_1'][1] * 1e3:.3f} ms)",
        target=f"<= {TARGETS['latency_ms']} ms",
        met=extra_ms <= TARGETS["latency_ms"],
    )
    table.print(
        f"uvicorn (1 process each) on 127.0.0.1, load generator in its own process, "
        f"{SECONDS:g} s per figure, {os.cpu_count()} CPUs"
    )


if __name__ == "__main__":
    main()
