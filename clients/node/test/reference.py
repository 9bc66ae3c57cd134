"""The Python client's answers to the Node tests' requests: `python reference.py <gateway>` reads a JSON list of
GenerateRequests (gateway.proto's field names, enums by name) on stdin and prints, for each, the Generate reply's
tokens and text, or its status code and message, as one JSON list. The API token comes in RALMSPEC_API_TOKEN (the
test's own variable; empty: none sent)."""

from __future__ import annotations

import json
import os
import sys

import grpc
from google.protobuf import json_format
from ralmspec.v1 import gateway_pb2 as pb
from ralmspec.v1 import gateway_pb2_grpc

from services.common import auth


def main(gateway: str) -> None:
    out: list[dict[str, object]] = []
    with auth.channel(gateway, os.environ.get("RALMSPEC_API_TOKEN") or None) as channel:
        stub = gateway_pb2_grpc.GatewayServiceStub(channel)
        for body in json.load(sys.stdin):
            try:
                reply = stub.Generate(json_format.ParseDict(body, pb.GenerateRequest()), timeout=300)
                out.append({"token_ids": list(reply.token_ids), "text": reply.text})
            except grpc.RpcError as e:
                out.append({"code": e.code().name, "details": e.details()})
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main(sys.argv[1])
