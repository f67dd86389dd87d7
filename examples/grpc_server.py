"""The Open Inference Protocol over gRPC: a grpc.aio server on 127.0.0.1 serving a
batched model, and a client that checks readiness, reads the model's metadata and sends
inference requests with typed and raw tensors, then stops the server.

Run: ``python examples/grpc_server.py`` (needs ``pip install "servekit[grpc]"``).
"""

from __future__ import annotations

import asyncio

import grpc
import numpy as np

import servekit as sk
from servekit.transports.grpc import add_to_server, server_options
from servekit.transports.grpc import pb2 as pb
from servekit.transports.grpc import pb2_grpc as pb_grpc


@sk.model
def norms(batch: list[sk.Array("float32", (3,))]) -> list[float]:  # type: ignore[valid-type]
    """The length of each 3-vector."""
    return [float(np.linalg.norm(v)) for v in batch]


async def main() -> None:
    predictor = sk.Predictor(norms, name="norms", batcher=sk.Batcher(max_batch_size=32))
    async with predictor:  # the host owns the predictor: start before, close after
        server = grpc.aio.server(options=server_options(16 * 2**20))  # 16 MiB messages
        add_to_server(server, predictor)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = pb_grpc.GRPCInferenceServiceStub(channel)
                ready = await stub.ServerReady(pb.ServerReadyRequest())
                print("ready:", ready.ready)
                meta = await stub.ModelMetadata(pb.ModelMetadataRequest(name="norms"))
                print("inputs:", [(t.name, t.datatype, list(t.shape)) for t in meta.inputs])

                # Typed contents: two vectors, the first dimension is the batch.
                tensor = pb.ModelInferRequest.InferInputTensor(
                    name="input", datatype="FP32", shape=[2, 3]
                )
                tensor.contents.fp32_contents.extend([3, 4, 0, 1, 2, 2])
                request = pb.ModelInferRequest(model_name="norms", inputs=[tensor])
                response = await stub.ModelInfer(request, timeout=5.0)  # deadline: timeout_s
                print("typed:", list(response.outputs[0].contents.fp64_contents))

                # Raw contents: little-endian bytes, and the answer comes back raw.
                raw = np.array([[6, 8, 0]], dtype="<f4")
                tensor = pb.ModelInferRequest.InferInputTensor(
                    name="input", datatype="FP32", shape=list(raw.shape)
                )
                request = pb.ModelInferRequest(
                    model_name="norms", inputs=[tensor], raw_input_contents=[raw.tobytes()]
                )
                response = await stub.ModelInfer(request, timeout=5.0)
                print("raw:", np.frombuffer(response.raw_output_contents[0], "<f8").tolist())

                # Errors carry a status code and servekit's error code.
                try:
                    await stub.ModelInfer(pb.ModelInferRequest(model_name="nope"))
                except grpc.aio.AioRpcError as error:
                    print("error:", error.code().name, dict(error.trailing_metadata() or ()))
        finally:
            await server.stop(grace=5.0)  # in-flight RPCs finish, then the predictor closes


if __name__ == "__main__":
    asyncio.run(main())
