"""`ralmspec up` as a user runs it: starts Redis and every service, prints the gateway, answers, and Ctrl-C
stops everything cleanly (exit 0, no process left behind)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import grpc
import pytest
from ralmspec.v1 import gateway_pb2 as pb
from ralmspec.v1 import gateway_pb2_grpc

pytestmark = pytest.mark.slow


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is gone for our purposes
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except OSError:
        return False


def test_up_serves_and_ctrl_c_leaves_no_orphans():
    env = {**os.environ, "RALMSPEC_REDIS_URL": ""}  # the embedded default: up starts its own redis-server
    proc = subprocess.Popen([sys.executable, "-m", "services.cli", "up", "--profile", "tiny", "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    lines: list[str] = []
    try:
        assert proc.stdout is not None
        end = time.monotonic() + 300
        while time.monotonic() < end:
            line = proc.stdout.readline()
            assert line, "up exited early:\n" + "".join(lines)
            lines.append(line)
            if "gateway ready on" in line:
                break
        out = "".join(lines)
        gateway = re.search(r"gateway ready on (\S+)", out)
        assert gateway, out
        pids = [int(p) for p in re.findall(r"pid (\d+)", out)]
        assert len(pids) == 5
        port = re.search(r"redis://[^:]+:(\d+)", out)
        assert port, out
        redis_pids = subprocess.run(["pgrep", "-f", f"redis-server .*:{port[1]}"], capture_output=True,
                                    text=True).stdout.split()
        assert redis_pids
        with grpc.insecure_channel(gateway[1]) as ch:
            reply = gateway_pb2_grpc.GatewayServiceStub(ch).Generate(
                pb.GenerateRequest(question="Who wrote Hamlet?"), timeout=120)
        assert reply.text and reply.token_ids
        proc.send_signal(signal.SIGINT)  # Ctrl-C
        rest, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0, rest
        assert "stopped" in rest
        for pid in pids + [int(p) for p in redis_pids]:
            assert not alive(pid), f"process {pid} outlived `ralmspec up`"
    finally:
        if proc.poll() is None:
            proc.kill()
