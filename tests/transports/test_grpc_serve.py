"""`servekit serve --grpc-port` as a real process on 127.0.0.1: one infer over gRPC and
one over HTTP on the same model, then SIGTERM with a gRPC call in flight (it completes)
and the process exits 0."""

from __future__ import annotations

import concurrent.futures
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import grpc
import httpx

from servekit.transports.grpc import pb2 as pb
from servekit.transports.grpc import pb2_grpc as pb_grpc

_APP = textwrap.dedent(
    """
    import time
    import servekit as sk

    @sk.model(per_item=True)
    def slow_double(x: int) -> int:
        if x >= 100:
            time.sleep(0.5)
        return 2 * x

    predictor = sk.Predictor(slow_double, name="double", backend=sk.Threads(2),
                             batcher=sk.Batcher(max_batch_size=8))
    """
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def infer(stub: pb_grpc.GRPCInferenceServiceStub, value: int) -> list[int]:
    tensor = pb.ModelInferRequest.InferInputTensor(name="x", datatype="INT64", shape=[1])
    tensor.contents.int64_contents.append(value)
    request = pb.ModelInferRequest(model_name="double", inputs=[tensor])
    response = stub.ModelInfer(request, timeout=30)
    return list(response.outputs[0].contents.int64_contents)


def test_serve_with_grpc_port_answers_both_and_drains_on_sigterm(tmp_path: Path) -> None:
    (tmp_path / "grpc_app.py").write_text(_APP)
    port, grpc_port = free_port(), free_port()
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    command = [sys.executable, "-m", "servekit", "serve", "grpc_app:predictor"]
    command += ["--port", str(port), "--grpc-port", str(grpc_port)]
    command += ["--grace-s", "10", "--log-level", "warning"]
    proc = subprocess.Popen(command, cwd=tmp_path, env=env, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    channel = grpc.insecure_channel(f"127.0.0.1:{grpc_port}")
    stub = pb_grpc.GRPCInferenceServiceStub(channel)
    try:
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            try:
                if stub.ServerReady(pb.ServerReadyRequest(), timeout=1).ready:
                    break
            except grpc.RpcError:
                pass
            assert time.monotonic() < deadline
            time.sleep(0.05)

        assert infer(stub, 21) == [42]
        body = {"inputs": [{"name": "x", "datatype": "INT64", "shape": [1], "data": [5]}]}
        response = httpx.post(f"{base}/v2/models/double/infer", json=body, timeout=30)
        assert response.status_code == 200
        assert response.json()["outputs"][0]["data"] == [10]

        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            in_flight = pool.submit(infer, stub, 100)  # sleeps 0.5 s in the model
            time.sleep(0.2)
            proc.send_signal(signal.SIGTERM)
            assert in_flight.result() == [200]  # drained, not dropped
        assert proc.wait(timeout=15) == 0
        stderr = proc.stderr.read() if proc.stderr else ""
        assert f"gRPC on 127.0.0.1:{grpc_port}" in stderr
        assert "Traceback" not in stderr
    finally:
        channel.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stderr:
            proc.stderr.close()


def test_serve_grpc_port_without_the_extra_names_the_extra(tmp_path: Path) -> None:
    # A stand-in `grpc` package that fails to import, as when grpcio is not installed.
    (tmp_path / "grpc").mkdir()
    (tmp_path / "grpc" / "__init__.py").write_text("raise ImportError('no grpc here')\n")
    (tmp_path / "grpc_app.py").write_text(_APP)
    result = subprocess.run(
        [sys.executable, "-m", "servekit", "serve", "grpc_app:predictor", "--grpc-port", "0"],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert 'pip install "servekit[grpc]"' in result.stderr
    assert "Traceback" not in result.stderr


def test_serve_exits_1_when_the_grpc_port_is_taken(tmp_path: Path) -> None:
    (tmp_path / "grpc_app.py").write_text(_APP)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        grpc_port = taken.getsockname()[1]
        command = [sys.executable, "-m", "servekit", "serve", "grpc_app:predictor"]
        command += ["--port", str(free_port()), "--grpc-port", str(grpc_port)]
        result = subprocess.run(
            [*command, "--log-level", "warning"],
            cwd=tmp_path,
            env={**os.environ, "PYTHONPATH": str(tmp_path)},
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert result.returncode == 1
    assert f"cannot serve gRPC on 127.0.0.1:{grpc_port}" in result.stderr
    assert "Traceback" not in result.stderr
