"""Redis beyond one node: every service through Redis Sentinel (a primary, a replica, three sentinels, all started
here from the same redis-server binary), and the primary SIGKILLed while requests are in flight: the sentinels
promote the replica, and every request still answers, with the tokens it gave before the failover."""

from __future__ import annotations

import signal
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import redis
from ralmspec.v1 import gateway_pb2 as pb
from ralmspec.v1 import gateway_pb2_grpc

from services.common.process import DIE_WITH_PARENT
from services.common.redis_conn import sentinel_address
from services.common.redis_server import free_port, redis_binary
from services.up import Cluster

PASSWORD = "sentinel-test-pw"
PRIMARY = "ralmspec"
QUESTIONS = ["Who wrote Hamlet?", "Where is the Amazon rainforest?", "What is the capital of France?"]


def test_sentinel_urls():
    assert sentinel_address("redis://127.0.0.1:6379/0") is None
    assert sentinel_address("redis+sentinel://:p%40ss@a:26379,b:26380/main/2") == (
        [("a", 26379), ("b", 26380)], "main", "p@ss", 2)
    assert sentinel_address("redis+sentinel://s1,s2/main") == ([("s1", 26379), ("s2", 26379)], "main", None, 0)
    with pytest.raises(ValueError):
        sentinel_address("redis+sentinel://s1:26379")


@dataclass
class Sentinels:
    """A primary, a replica and three sentinels on loopback, persistence off."""

    workdir: Path
    primary_port: int = field(default_factory=free_port)
    replica_port: int = field(default_factory=free_port)
    sentinel_ports: list[int] = field(default_factory=lambda: [free_port() for _ in range(3)])
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{p}" for p in self.sentinel_ports)
        return f"redis+sentinel://:{PASSWORD}@{hosts}/{PRIMARY}/0"

    def _run(self, name: str, *args: str) -> None:
        log = open(self.workdir / f"{name}.log", "wb")
        self.procs[name] = subprocess.Popen([*DIE_WITH_PARENT, redis_binary(), *args], stdout=log,
                                            stderr=subprocess.STDOUT, start_new_session=True)

    def start(self) -> Sentinels:
        node = ["--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--requirepass", PASSWORD,
                "--masterauth", PASSWORD, "--dir", str(self.workdir)]
        self._run("primary", "--port", str(self.primary_port), *node)
        self._run("replica", "--port", str(self.replica_port), *node,
                  "--replicaof", "127.0.0.1", str(self.primary_port))
        for i, port in enumerate(self.sentinel_ports):
            conf = self.workdir / f"sentinel-{i}.conf"  # a sentinel rewrites its config: one file each
            conf.write_text(f"port {port}\nbind 127.0.0.1\ndir {self.workdir}\nrequirepass {PASSWORD}\n"
                            f"sentinel monitor {PRIMARY} 127.0.0.1 {self.primary_port} 2\n"
                            f"sentinel auth-pass {PRIMARY} {PASSWORD}\n"
                            f"sentinel down-after-milliseconds {PRIMARY} 1000\n"
                            f"sentinel failover-timeout {PRIMARY} 5000\n")
            self._run(f"sentinel-{i}", str(conf), "--sentinel")
        self._wait_ready(30)
        return self

    def sentinel(self, i: int = 0) -> redis.Redis:
        return redis.Redis(port=self.sentinel_ports[i], password=PASSWORD, decode_responses=True)

    def _wait_ready(self, timeout_s: float) -> None:
        """Until the replica is in sync and every sentinel knows the replica and the two other sentinels."""
        end = time.monotonic() + timeout_s
        while True:
            try:
                link = redis.Redis(port=self.replica_port, password=PASSWORD, decode_responses=True).info(
                    "replication").get("master_link_status")
                seen = [self.sentinel(i).execute_command("SENTINEL", "MASTER", PRIMARY) for i in range(3)]
                if link == "up" and all(_field(m, "num-slaves") == "1" and _field(m, "num-other-sentinels") == "2"
                                        for m in seen):
                    return
            except redis.RedisError:
                pass
            assert time.monotonic() < end, "the Sentinel setup did not come up"
            time.sleep(0.2)

    def primary(self) -> int:
        return int(self.sentinel().execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", PRIMARY)[1])

    def stop(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.terminate()
        for p in self.procs.values():
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def _field(reply: object, name: str) -> str:
    """A field of SENTINEL MASTER's flat [name, value, ...] reply (or dict, by client version)."""
    if isinstance(reply, dict):
        return str(reply.get(name))
    items = list(reply)  # type: ignore[call-overload]
    return str(items[items.index(name) + 1])


def ask(stub: gateway_pb2_grpc.GatewayServiceStub, question: str) -> tuple[list[int], float, float]:
    t = time.monotonic()
    reply = stub.Generate(pb.GenerateRequest(question=question), timeout=120)
    return list(reply.token_ids), t, time.monotonic()


@pytest.mark.slow
def test_killing_the_primary_mid_run_loses_no_request(tmp_path):
    nodes = Sentinels(tmp_path).start()
    try:
        assert nodes.primary() == nodes.primary_port
        # a dead consumer's entries are reclaimed after 3 s (a lost reply-and-ack is served again)
        with Cluster("tiny", redis_url=nodes.url, extra_env={"RALMSPEC_CLAIM_IDLE_MS": "3000"}) as cluster, \
                cluster.channel() as ch:
            stub = gateway_pb2_grpc.GatewayServiceStub(ch)
            want = {q: ask(stub, q)[0] for q in QUESTIONS}  # before the failover
            runs = [q for _ in range(3) for q in QUESTIONS]  # 9 requests, 3 at a time
            killed = threading.Event()

            def kill_primary() -> float:
                time.sleep(1.5)  # requests are in flight by now
                nodes.procs["primary"].send_signal(signal.SIGKILL)
                killed.set()
                return time.monotonic()

            with ThreadPoolExecutor(4) as pool:
                kill = pool.submit(kill_primary)
                results = list(pool.map(lambda q: (q, *ask(stub, q)), runs))
            killed_at = kill.result()
            assert nodes.primary() == nodes.replica_port, "the sentinels did not promote the replica"
            in_flight = [q for q, _, start, end in results if start < killed_at < end]
            after = [q for q, _, start, _ in results if start > killed_at]
            assert in_flight, "no request was in flight when the primary died"
            assert [(q, tokens) for q, tokens, _, _ in results] == [(q, want[q]) for q in runs]
            logs = "".join(c.log.read_text(errors="replace") for c in cluster.children)
            retried = logs.count("redis write failed (failover?)")
            assert retried + logs.count("redis error, retrying") > 0, "no service saw the failover"
            print(f"{retried} writes retried through the failover; "
                  f"primary killed with {len(in_flight)} requests in flight, {len(after)} sent after: all "
                  f"{len(results)} answered with their pre-failover tokens; longest "
                  f"{max(end - start for _, _, start, end in results):.1f} s")
    finally:
        nodes.stop()
