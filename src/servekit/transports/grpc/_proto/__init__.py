"""Generated from ``open_inference_grpc.proto`` (the Open Inference Protocol's gRPC
service, Apache-2.0, licence beside it) by ``nox -s grpc_stubs``; do not edit."""
