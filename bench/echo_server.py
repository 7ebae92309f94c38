"""The baseline: a bare grpc.aio server speaking KeyValueBasicService that does no work at all.

Whatever Prism costs beyond this is Prism (routing, validation, the plugin, the database);
what this costs is the Python gRPC floor on this machine.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import grpc
from prism.interfaces.keyvalue.v1 import keyvalue_basic_pb2 as kv
from prism.interfaces.keyvalue.v1 import keyvalue_basic_pb2_grpc as kv_grpc

from bench.common import run_fast

Ctx = grpc.aio.ServicerContext[Any, Any]


class EchoKeyValue(kv_grpc.KeyValueBasicServiceServicer):
    """Answers every call with a constant response (a 100-byte value for Get)."""

    def __init__(self) -> None:
        self._value = b"v" * 100

    async def Set(self, request: kv.SetRequest, context: Ctx) -> kv.SetResponse:
        return kv.SetResponse(revision=1)

    async def Get(self, request: kv.GetRequest, context: Ctx) -> kv.GetResponse:
        return kv.GetResponse(found=True, value=self._value, revision=1)

    async def Delete(self, request: kv.DeleteRequest, context: Ctx) -> kv.DeleteResponse:
        return kv.DeleteResponse(deleted=True)

    async def Exists(self, request: kv.ExistsRequest, context: Ctx) -> kv.ExistsResponse:
        return kv.ExistsResponse(exists=True)


async def serve(listen: str) -> None:
    server = grpc.aio.server()
    kv_grpc.add_KeyValueBasicServiceServicer_to_server(EchoKeyValue(), server)
    port = server.add_insecure_port(listen)
    await server.start()
    print(f"echo listening on 127.0.0.1:{port}", flush=True)
    await server.wait_for_termination()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--listen", default="127.0.0.1:0")
    args = parser.parse_args()
    try:
        run_fast(serve(args.listen))
    except KeyboardInterrupt:
        sys.exit(0)


if __name__ == "__main__":
    main()
