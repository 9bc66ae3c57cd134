"""A stream worker process whose `Crash` handler kills it (os._exit), for the poison-message test.

Usage: python tests/common/crashing_worker.py <redis url> <stream> <consumer> <claim idle ms> <max deliveries>
"""

from __future__ import annotations

import asyncio
import os
import sys

from google.protobuf.wrappers_pb2 import StringValue

from services.common.ops import Operation, ServiceDef
from services.common.transport import StreamWorker


async def crash(req: StringValue) -> StringValue:
    os._exit(3)  # a replica dying mid-request: no reply, no ack


async def echo(req: StringValue) -> StringValue:
    return req


def main(url: str, stream: str, consumer: str, claim_idle_ms: str, max_deliveries: str) -> None:
    service = ServiceDef.of("test.Crashing", stream, Operation("Crash", StringValue, StringValue, crash),
                            Operation("Echo", StringValue, StringValue, echo))
    worker = StreamWorker(url, service, consumer, block_ms=100, claim_idle_ms=int(claim_idle_ms),
                          max_deliveries=int(max_deliveries))
    asyncio.run(worker.run())


if __name__ == "__main__":
    main(*sys.argv[1:])
