"""`ralmspec up` as a user runs it: starts Redis and every service, prints the gateway, answers, and Ctrl-C
stops everything cleanly (exit 0, no process left behind)."""

from __future__ import annotations

import pytest
from ralmspec.v1 import gateway_pb2 as pb
from ralmspec.v1 import gateway_pb2_grpc
from up_process import start_up, wait_gone

pytestmark = pytest.mark.slow


def test_up_serves_and_ctrl_c_leaves_no_orphans():
    up = start_up()
    try:
        with up.channel() as ch:
            reply = gateway_pb2_grpc.GatewayServiceStub(ch).Generate(
                pb.GenerateRequest(question="Who wrote Hamlet?"), timeout=120)
        assert reply.text and reply.token_ids
    finally:
        rest = up.stop()  # Ctrl-C
    assert up.proc.returncode == 0, rest
    assert "stopped" in rest
    assert wait_gone(up.pids, 1) == [], "processes outlived `ralmspec up`"


def test_a_killed_up_takes_its_children_with_it():
    up = start_up()
    up.proc.kill()  # SIGKILL: no cleanup code runs; the children's parent-death signal must do it
    up.proc.wait()
    assert wait_gone(up.pids, 60) == [], "orphans left after `ralmspec up` was killed"
