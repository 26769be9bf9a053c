"""Generated gRPC/protobuf stubs for the aitl v1 API (see ../generate.sh).

Import them as ``from aitl_client.aitl.v1 import support_pb2, support_pb2_grpc``.
"""
