"""Inference over gRPC against the REST route, on the same models in the same server.

One ``servekit serve --grpc-port`` process on 127.0.0.1 serves two models, both with a
Batcher: ``trivial`` (returns its inputs: the figure is the transports' own cost) and
``costly`` (1 ms for a batch of 1, 5 ms for a batch of 32, one batch at a time, as on
one accelerator: the figure is how well each transport feeds the batcher). The load
generator is another process: 64 clients, each in a closed loop sending one
``ModelInfer`` of a [1, 4] FP32 tensor (gRPC: typed contents over its own channel;
REST: ``POST /v2/models/NAME/infer`` with a JSON body over its own keep-alive
connection), bounded in time and in count. Figures, each a ratio within one run:
infer calls/s over gRPC ÷ calls/s over REST, per model (median over interleaved trials).

Both clients are Python (grpc.aio; raw asyncio HTTP/1.1, which is lighter than any
HTTP client library), on the same 2 cores as the server, so the ratio includes the
client's cost of each protocol.

Run: ``python benchmarks/grpc.py`` (or ``nox -s bench -- grpc``); needs the ``serve``
and ``grpc`` extras. This script never imports grpc itself (its own name would shadow
the package): the server and the load generator are scripts it writes and runs.
"""

from __future__ import annotations

import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.request

from _util import Table  # first: pins BLAS threads

SECONDS = 3.0
WARMUP_SECONDS = 1.0
CLIENTS = 64
TRIALS = 3
MAX_CALLS_PER_CLIENT = 200_000  # the count bound, beside the time bound

_APP = textwrap.dedent(
    """
    import threading, time
    import servekit as sk

    _lock = threading.Lock()

    def costly(batch):
        # One batch at a time (as on one accelerator): 1 ms for 1 item, 5 ms for 32.
        with _lock:
            time.sleep(0.001 + (len(batch) - 1) * 0.004 / 31)
        return list(batch)

    def identity(batch):
        return list(batch)

    predictors = {
        "trivial": sk.Predictor(identity, name="trivial", validate=False,
                                batcher=sk.Batcher(max_batch_size=32)),
        "costly": sk.Predictor(costly, name="costly", validate=False, backend=sk.Threads(1),
                               batcher=sk.Batcher(max_batch_size=32)),
    }
    """
)

_LOAD = textwrap.dedent(
    """
    import asyncio, json, sys, time

    kind, host, port, model = sys.argv[1], "127.0.0.1", int(sys.argv[2]), sys.argv[3]
    clients, seconds, cap = int(sys.argv[4]), float(sys.argv[5]), int(sys.argv[6])
    ROW = [0.5, 1.5, 2.5, 3.5]

    async def grpc_client(stop, counts):
        import grpc
        from servekit.transports.grpc import pb2 as pb
        from servekit.transports.grpc import pb2_grpc as pbg

        tensor = pb.ModelInferRequest.InferInputTensor(name="x", datatype="FP32", shape=[1, 4])
        tensor.contents.fp32_contents.extend(ROW)
        request = pb.ModelInferRequest(model_name=model, inputs=[tensor])
        async with grpc.aio.insecure_channel(f"{host}:{port}") as channel:
            await asyncio.wait_for(channel.channel_ready(), 30)
            stub = pbg.GRPCInferenceServiceStub(channel)
            await stub.ModelInfer(request)
            await start.wait()
            n = 0
            while n < cap and time.perf_counter() < stop[0]:
                response = await stub.ModelInfer(request)
                if len(response.outputs[0].contents.fp32_contents) != 4:
                    raise RuntimeError(response)
                n += 1
        counts.append(n)

    async def rest_client(stop, counts):
        body = json.dumps({"inputs": [
            {"name": "x", "datatype": "FP32", "shape": [1, 4], "data": ROW}]}).encode()
        head = (
            f"POST /v2/models/{model}/infer HTTP/1.1\\r\\nhost: {host}\\r\\n"
            f"content-type: application/json\\r\\ncontent-length: {len(body)}\\r\\n\\r\\n"
        ).encode()
        reader, writer = await asyncio.open_connection(host, port)

        async def call():
            writer.write(head + body)
            answer = await reader.readuntil(b"\\r\\n\\r\\n")
            length = 0
            for line in answer.split(b"\\r\\n"):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            await reader.readexactly(length)
            if not answer.startswith(b"HTTP/1.1 200"):
                raise RuntimeError(answer.decode(errors="replace"))

        try:
            await call()
            await start.wait()
            n = 0
            while n < cap and time.perf_counter() < stop[0]:
                await call()
                n += 1
        finally:
            writer.close()
        counts.append(n)

    async def main():
        global start
        start = asyncio.Event()
        stop, counts = [float("inf")], []
        client = grpc_client if kind == "grpc" else rest_client
        tasks = [asyncio.ensure_future(client(stop, counts)) for _ in range(clients)]
        await asyncio.sleep(0.5)  # every client connected and made one call
        began = time.perf_counter()
        stop[0] = began + seconds
        start.set()
        await asyncio.gather(*tasks)
        return sum(counts), time.perf_counter() - began

    total, elapsed = asyncio.run(main())
    print(json.dumps({"n": total, "s": elapsed}))
    """
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _start(directory: str) -> tuple[subprocess.Popen[bytes], int, int]:
    port, grpc_port = _free_port(), _free_port()
    command = [sys.executable, "-m", "servekit", "serve", "bench_grpc_app:predictors"]
    command += ["--port", str(port), "--grpc-port", str(grpc_port), "--log-level", "warning"]
    proc = subprocess.Popen(command, cwd=directory, env={**os.environ, "PYTHONPATH": directory})
    deadline = time.monotonic() + 60
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/health/ready"):
                return proc, port, grpc_port
        except OSError:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                raise RuntimeError("servekit serve did not start") from None
            time.sleep(0.05)


def measure(directory: str, kind: str, port: int, model: str, seconds: float) -> float:
    """Infer calls/s of CLIENTS closed-loop clients, from a load generator process."""
    args = [kind, str(port), model, str(CLIENTS), str(seconds), str(MAX_CALLS_PER_CLIENT)]
    out = subprocess.run(
        [sys.executable, os.path.join(directory, "bench_grpc_load.py"), *args],
        cwd=directory,
        capture_output=True,
        text=True,
        timeout=seconds + 90,
        check=True,
    ).stdout
    result = json.loads(out.strip().splitlines()[-1])
    return float(result["n"]) / float(result["s"])


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        with open(os.path.join(tmp, "bench_grpc_app.py"), "w") as f:
            f.write(_APP)
        with open(os.path.join(tmp, "bench_grpc_load.py"), "w") as f:
            f.write(_LOAD)
        proc, port, grpc_port = _start(tmp)
        rates: dict[tuple[str, str], list[float]] = {}
        try:
            ports = {"grpc": grpc_port, "rest": port}
            for model in ("trivial", "costly"):
                for kind in ports:
                    measure(tmp, kind, ports[kind], model, WARMUP_SECONDS)
            for trial in range(TRIALS):
                for model in ("trivial", "costly"):
                    kinds = ["grpc", "rest"] if trial % 2 == 0 else ["rest", "grpc"]
                    for kind in kinds:
                        rate = measure(tmp, kind, ports[kind], model, SECONDS)
                        rates.setdefault((model, kind), []).append(rate)
        finally:
            proc.terminate()
            proc.wait(60)
    table = Table("grpc")
    for model, what in (("trivial", "trivial model"), ("costly", "batched 1-5 ms model")):
        ratios = [
            g / r for g, r in zip(rates[(model, "grpc")], rates[(model, "rest")], strict=True)
        ]
        grpc_rate = statistics.median(rates[(model, "grpc")])
        rest_rate = statistics.median(rates[(model, "rest")])
        table.row(
            f"{what}, gRPC ÷ REST /v2 infer, {CLIENTS} clients",
            f"{statistics.median(ratios):.2f}",
            f"({grpc_rate:,.0f} vs {rest_rate:,.0f} infer/s)",
        )
    table.print(
        f"servekit serve --grpc-port (1 process) on 127.0.0.1, batching on, load generator "
        f"in its own process, {SECONDS:g} s per figure, {TRIALS} interleaved trials, "
        f"{os.cpu_count()} CPUs"
    )


if __name__ == "__main__":
    main()
