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
        self.late = False  # answer DEADLINE_EXCEEDED once the timeout has passed, as the transport does

    async def call(self, stream, op, request, *, timeout_s):  # noqa: ANN001, ANN201 (StreamClient.call's shape)
        self.timeouts.append((op.name, timeout_s))
        if self.late:
            await asyncio.sleep(timeout_s)
            raise DeadlineExceeded(f"{op.name} on {stream}: no reply within {timeout_s:g} s")
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
        client.late = True  # the replica answers after the request's deadline: the error names that deadline
        with Call.expiring_in(0.05, "its 0.05 s deadline").serving():
            with pytest.raises(DeadlineExceeded, match="^the request ran past its 0.05 s deadline$"):
                lm.step(sid, [1, 2], 1, False)
        client.late = False
        call = Call.expiring_in(0.01, "its 0.01 s deadline")
        time.sleep(0.02)
        with call.serving():
            with pytest.raises(DeadlineExceeded, match="ran past its 0.01 s deadline"):
                lm.step(sid, [1, 2], 1, False)  # not sent, and not replayed on a new session either
            lm.close(sid)  # sent all the same: the session is freed whether or not anyone waits
        (op0, t0), (op1, t1), (op_late, _), (op2, t2) = client.timeouts
        assert (op0, t0) == ("OpenSession", 120.0) and op1 == "Step" and 9.0 < t1 <= 10.0
        assert op_late == "Step" and (op2, t2) == ("CloseSession", 120.0)  # the late Step was not replayed
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
