"""Lists a gRPC server's services through grpc.reflection.v1alpha, with the
reference Python client (grpcio-reflection): an independent check that the
Chukei servers' reflection works for standard tools.

Usage: python3 list_services.py HOST:PORT
"""

import sys

import grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc


def main() -> None:
    with grpc.insecure_channel(sys.argv[1]) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        for response in stub.ServerReflectionInfo(iter([request]), timeout=10):
            for service in response.list_services_response.service:
                print(service.name)
            break


if __name__ == "__main__":
    main()
