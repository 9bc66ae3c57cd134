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


def start_up() -> tuple[subprocess.Popen[str], str, list[int]]:
    """`ralmspec up` on free ports; returns the process, the gateway address and every child's pid (Redis too)."""
    env = {**os.environ, "RALMSPEC_REDIS_URL": ""}  # the embedded default: up starts its own redis-server
    proc = subprocess.Popen([sys.executable, "-m", "services.cli", "up", "--profile", "tiny", "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    assert proc.stdout is not None
    lines: list[str] = []
    end = time.monotonic() + 300
    while time.monotonic() < end:
        line = proc.stdout.readline()
        assert line, "up exited early:\n" + "".join(lines)
        lines.append(line)
        if "gateway ready on" in line:
            break
    out = "".join(lines)
    gateway = re.search(r"gateway ready on (\S+)", out)
    port = re.search(r"redis://[^:]+:(\d+)", out)
    assert gateway and port, out
    pids = [int(p) for p in re.findall(r"pid (\d+)", out)]
    assert len(pids) == 5
    redis_pids = subprocess.run(["pgrep", "-f", f"redis-server .*:{port[1]}"], capture_output=True,
                                text=True).stdout.split()
    assert redis_pids
    return proc, gateway[1], pids + [int(p) for p in redis_pids]


def wait_gone(pids: list[int], timeout_s: float) -> list[int]:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end and any(alive(p) for p in pids):
        time.sleep(0.2)
    return [p for p in pids if alive(p)]


def test_up_serves_and_ctrl_c_leaves_no_orphans():
    proc, gateway, pids = start_up()
    try:
        with grpc.insecure_channel(gateway) as ch:
            reply = gateway_pb2_grpc.GatewayServiceStub(ch).Generate(
                pb.GenerateRequest(question="Who wrote Hamlet?"), timeout=120)
        assert reply.text and reply.token_ids
        proc.send_signal(signal.SIGINT)  # Ctrl-C
        rest, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0, rest
        assert "stopped" in rest
        assert wait_gone(pids, 1) == [], "processes outlived `ralmspec up`"
    finally:
        if proc.poll() is None:
            proc.kill()


def test_a_killed_up_takes_its_children_with_it():
    proc, _, pids = start_up()
    proc.kill()  # SIGKILL: no cleanup code runs; the children's parent-death signal must do it
    proc.wait()
    assert wait_gone(pids, 60) == [], "orphans left after `ralmspec up` was killed"
