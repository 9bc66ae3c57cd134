"""The gateway's blocking bridge to the stream client (`remote.Bridge`) on a recording client: a call waits no
longer than the request it serves, and cleanup calls (closing an LM session, a cache) go out even after it ended."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
from ralmspec.v1 import lm_pb2 as lpb

from services.common.errors import DeadlineExceeded
from services.common.ops import Call
from services.gateway.remote import Bridge, RemoteLm


class Recording:
    """A stream client that answers every call at once and records its timeout."""

    def __init__(self) -> None:
        self.timeouts: list[tuple[str, float]] = []

    async def call(self, stream, op, request, *, timeout_s):  # noqa: ANN001, ANN201 (StreamClient.call's shape)
        self.timeouts.append((op.name, timeout_s))
        return lpb.OpenSessionReply(session_id="s1", replica_stream="lm:r1") if op.name == "OpenSession" \
            else op.reply()


def test_calls_wait_no_longer_than_the_request_and_cleanup_always_goes_out():
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    client = Recording()
    lm = RemoteLm(Bridge(client, loop, 120.0))  # type: ignore[arg-type]
    try:
        sid = lm.open()  # outside any request: the service's limit
        with Call.expiring_in(10.0, "its deadline").serving():
            lm.step(sid, [1, 2], 1, False)
        call = Call.expiring_in(0.01, "its 0.01 s deadline")
        time.sleep(0.02)
        with call.serving():
            with pytest.raises(DeadlineExceeded, match="ran past its 0.01 s deadline"):
                lm.step(sid, [1, 2], 1, False)  # not sent, and not replayed on a new session either
            lm.close(sid)  # sent all the same: the session is freed whether or not anyone waits
        (op0, t0), (op1, t1), (op2, t2) = client.timeouts
        assert (op0, t0) == ("OpenSession", 120.0) and op1 == "Step" and 9.0 < t1 <= 10.0
        assert (op2, t2) == ("CloseSession", 120.0)
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
