"""`ralmspec up --profile tiny` run as a user runs it, for the end-to-end tests: free ports, its own redis-server,
the gateway address, every child's pid and log file read from what it prints."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from services.common import auth


@dataclass
class Up:
    proc: subprocess.Popen[str]
    gateway: str  # host:port
    pids: list[int]  # the five services', then redis-server's
    logs: dict[str, Path]  # replica name (e.g. "lm-0-<pid>") -> its log file
    metrics: dict[str, str] = field(default_factory=dict)  # replica name -> its Prometheus endpoint (URL)
    addresses: dict[str, str] = field(default_factory=dict)  # replica name -> its gRPC host:port
    api_token: str | None = None  # read from the files `up` names (None: authentication off)
    cluster_token: str | None = None

    def channel(self, target: str | None = None) -> grpc.Channel:
        """A channel to `target` (default: the gateway) sending the token it accepts."""
        target = target or self.gateway
        return auth.channel(target, self.api_token if target == self.gateway else self.cluster_token)

    def grpc_of(self, service: str) -> str:
        """The gRPC address of `service`'s (first) replica."""
        return next(a for replica, a in sorted(self.addresses.items()) if replica.startswith(f"{service}-"))

    def metrics_of(self, service: str) -> str:
        """The /metrics URL of `service`'s (first) replica."""
        return next(url for replica, url in sorted(self.metrics.items()) if replica.startswith(f"{service}-"))

    def log_of(self, service: str) -> Path:
        """The log file of `service`'s (first) replica."""
        return next(path for replica, path in sorted(self.logs.items()) if replica.startswith(f"{service}-"))

    def stop(self, timeout_s: float = 120) -> str:
        """Ctrl-C (SIGINT), as a user stops it; returns what it printed from then on. Killed if it lingers."""
        try:
            self.proc.send_signal(signal.SIGINT)
            rest, _ = self.proc.communicate(timeout=timeout_s)
            return rest
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()


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


def wait_gone(pids: list[int], timeout_s: float) -> list[int]:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end and any(alive(p) for p in pids):
        time.sleep(0.2)
    return [p for p in pids if alive(p)]


def start_up(extra_env: Mapping[str, str] | None = None) -> Up:
    """`ralmspec up` on free ports, with `extra_env` on top of ours; returns once the gateway is ready."""
    env = {**os.environ, "RALMSPEC_REDIS_URL": "", **(extra_env or {})}  # empty URL: up starts its own redis-server
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
    children = re.findall(r"^\s+(\S+)\s+.*\bpid (\d+)\s+log (\S+)$", out, re.MULTILINE)
    assert len(children) == 5, out
    redis_pids = subprocess.run(["pgrep", "-f", f"redis-server .*:{port[1]}"], capture_output=True,
                                text=True).stdout.split()
    assert redis_pids
    served = re.findall(r"^\s+(\S+)\s+(\S+)\s+metrics (http://\S+)", out, re.MULTILINE)
    tokens = {kind: auth.read_tokens(Path(path))[0]
              for kind, path in re.findall(r"^\s+(api tokens|cluster token) file (\S+)", out, re.MULTILINE)}
    return Up(proc, gateway[1], [int(pid) for _, pid, _ in children] + [int(p) for p in redis_pids],
              {replica: Path(log) for replica, _, log in children}, {r: url for r, _, url in served},
              {r: address for r, address, _ in served}, tokens.get("api tokens"), tokens.get("cluster token"))
