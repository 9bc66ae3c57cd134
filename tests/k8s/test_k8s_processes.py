"""Manifests as processes: the rendered `cpu` overlay's Deployments run as local processes, each container's
command with the environment the kubelet would give it (ConfigMap, Secret, pod name, $(VAR) expansion), and Redis
from its StatefulSet's own command and password. Only what belongs to the pod network is rewritten: the Redis
address (a local redis-server), the gRPC port (a free one per process, since every pod serves 50051), the bind
address (loopback, not every interface of this machine) and the assets volume (this checkout's tiny assets).
The test waits on the probes' own gRPC health checks within the startup probes' budgets, sends requests through
the gateway Service's port, and compares the tokens with `ralmspec up`. The retriever Deployment is scaled to 2
replicas in the rendered YAML: both pods join the stream's consumer group and both serve searches. Each pod's
metrics endpoint answers on the port its prometheus.io/port annotation names (mapped like the gRPC port)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import grpc
import pytest
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc
from k8s_manifests import Container, Obj, named, pod_spec, render, servers
from k8s_rules import CONSUMERS, PROBES, redis_password, served_port
from prometheus_client.parser import text_string_to_metric_families
from ralmspec.v1 import gateway_pb2 as pb
from ralmspec.v1 import gateway_pb2_grpc

from services.common import env
from services.common.process import DIE_WITH_PARENT
from services.common.redis_server import free_port
from services.common.transport import counter_key
from services.up import ORDER, Cluster

pytestmark = pytest.mark.slow

QUESTIONS = ["Who wrote Hamlet?", "Where is the Amazon rainforest?"]
SCALED = ("retriever", 2)  # the Deployment whose replicas the test raises, and to how many


@dataclass
class Pod:
    name: str
    container: Container
    ports: dict[int, int]  # containerPort -> the local port this process serves it on
    proc: subprocess.Popen[bytes]
    log: Path

    def tail(self) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-15:])

    def calls_handled(self) -> float:
        """The calls this pod answered, from the metrics endpoint its scrape annotation names."""
        port = int(self.container.owner["spec"]["template"]["metadata"]["annotations"]["prometheus.io/port"])
        text = urllib.request.urlopen(f"http://127.0.0.1:{self.ports[port]}/metrics", timeout=10).read().decode()
        return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
                   if s.name == "ralmspec_rpc_server_handled_total")


@dataclass
class Pods:
    objs: list[Obj]
    workdir: Path
    redis_port: int = 0
    procs: list[Pod] = field(default_factory=list)
    redis: subprocess.Popen[bytes] | None = None

    def start_redis(self) -> None:
        """The StatefulSet's redis-server command, its $(VAR)s expanded from its env, on a local port and dir."""
        c = pod_spec(named(self.objs, "StatefulSet", "redis"))["containers"][0]
        argv = [*c["command"], *c.get("args", [])]
        argv = [redis_password(self.objs) if a == "$(REDIS_PASSWORD)" else a for a in argv]
        argv[argv.index("--dir") + 1] = str(self.workdir)
        self.redis_port = free_port()
        argv[0] = shutil.which(argv[0]) or argv[0]
        self.redis = subprocess.Popen([*DIE_WITH_PARENT, *argv, "--port", str(self.redis_port), "--bind", "127.0.0.1"],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True)
        client = redis.Redis(port=self.redis_port, password=redis_password(self.objs))
        end = time.monotonic() + 10
        while True:
            try:
                client.ping()
                return
            except redis.ConnectionError:
                assert time.monotonic() < end, "redis-server from the StatefulSet's command did not start"
                time.sleep(0.05)

    def pod_env(self, c: Container, pod: str) -> tuple[dict[str, str], dict[int, int]]:
        e = c.env(self.objs, pod)
        url = urlsplit(e[env.REDIS_URL.name])
        e[env.REDIS_URL.name] = urlunsplit(url._replace(netloc=f":{url.password}@127.0.0.1:{self.redis_port}"))
        serves = served_port(e, c.argv)
        ports = {int(p["containerPort"]): free_port() for p in c.spec["ports"]}
        e[env.PORT.name] = str(ports[serves])
        if env.METRICS_PORT.name in e:  # every pod's metrics port is 9464 too: map it like the gRPC port
            e[env.METRICS_PORT.name] = str(ports[int(e[env.METRICS_PORT.name])])
        e[env.HOST.name] = "127.0.0.1"
        e[env.DATA.name] = str(env.data_dir())  # the volume the assets Job fills
        return e, ports

    def start(self) -> None:
        self.start_redis()
        base = {k: v for k, v in os.environ.items() if not k.startswith("RALMSPEC_")}  # the pod's env only
        ralmspec = str(Path(sys.executable).parent / "ralmspec")
        srv = servers(self.objs)
        for name in ORDER:  # every Deployment, in `ralmspec up`'s order
            d, c = srv[name].owner, srv[name]
            for i in range(d["spec"].get("replicas", 1)):
                pod = f"{name}-{i}"
                e, ports = self.pod_env(c, pod)
                log = self.workdir / f"{pod}.log"
                assert c.argv[0] == "ralmspec"
                with open(log, "wb") as out:
                    proc = subprocess.Popen([*DIE_WITH_PARENT, ralmspec, *c.argv[1:]], env={**base, **e}, stdout=out,
                                            stderr=subprocess.STDOUT, start_new_session=True)
                self.procs.append(Pod(pod, c, ports, proc, log))

    def wait_probes(self) -> None:
        """Each probe's gRPC health check until it passes, within the startup probe's budget."""
        for pod in self.procs:
            for kind in PROBES:
                probe = pod.container.spec[kind]
                budget = probe.get("periodSeconds", 10) * probe.get("failureThreshold", 3)
                port = pod.ports[probe["grpc"]["port"]]
                end = time.monotonic() + (budget if kind == "startupProbe" else 10)
                with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
                    stub = health_pb2_grpc.HealthStub(ch)
                    while True:
                        assert pod.proc.poll() is None, f"{pod.name} exited:\n{pod.tail()}"
                        try:
                            req = health_pb2.HealthCheckRequest(service=probe["grpc"].get("service", ""))
                            if stub.Check(req, timeout=probe.get("timeoutSeconds", 1)).status == \
                                    health_pb2.HealthCheckResponse.SERVING:
                                break
                        except grpc.RpcError:
                            pass
                        assert time.monotonic() < end, f"{pod.name}: {kind} failed for {budget} s:\n{pod.tail()}"
                        time.sleep(0.2)

    def service_address(self, service: str) -> str:
        """The local address behind a Service's port: its targetPort on a pod the selector picks."""
        svc = named(self.objs, "Service", service)
        target = svc["spec"]["ports"][0]["targetPort"]
        labels = svc["spec"]["selector"]
        for pod in self.procs:
            if labels.items() <= pod.container.owner["spec"]["template"]["metadata"]["labels"].items():
                return f"127.0.0.1:{pod.ports[pod.container.port(target)]}"
        raise LookupError(f"no pod behind Service/{service}")

    def stop(self) -> dict[str, float]:
        """SIGTERM in reverse order (the gateway first), as a rolling delete would; seconds each took to exit."""
        took: dict[str, float] = {}
        for pod in reversed(self.procs):
            if pod.proc.poll() is None:
                t = time.monotonic()
                pod.proc.send_signal(signal.SIGTERM)
                grace = pod_spec(pod.container.owner).get("terminationGracePeriodSeconds", 30)
                try:
                    pod.proc.wait(grace)
                    took[pod.name] = time.monotonic() - t
                except subprocess.TimeoutExpired:
                    pod.proc.kill()
                    pod.proc.wait()
        if self.redis is not None:
            self.redis.terminate()
            self.redis.wait(10)
        return took


def generate(address: str) -> list[list[int]]:
    with grpc.insecure_channel(address) as ch:
        stub = gateway_pb2_grpc.GatewayServiceStub(ch)
        return [list(stub.Generate(pb.GenerateRequest(question=q), timeout=300).token_ids) for q in QUESTIONS]


def run_cpu_overlay(workdir: Path) -> dict[str, Any]:
    """The rendered cpu overlay with SCALED's replicas, as processes: the tokens it answers, the scaled service's
    consumers and what each served, how long each process took to drain; then `ralmspec up`'s tokens."""
    objs = render("cpu")
    name, replicas = SCALED
    named(objs, "Deployment", name)["spec"]["replicas"] = replicas  # scaled in the rendered YAML
    pods = Pods(objs, workdir)
    try:
        pods.start()
        pods.wait_probes()
        got = generate(pods.service_address("gateway"))
        # A few more requests if the first ones all went to one replica (Redis hands a new entry to the
        # longest-blocked reader, so replicas take turns).
        stream, group = CONSUMERS[name]
        r = redis.Redis(port=pods.redis_port, password=redis_password(objs), decode_responses=True)
        for _ in range(3):
            if len(r.hgetall(counter_key("served", group))) == replicas:
                break
            generate(pods.service_address("gateway"))
        consumers = sorted(c["name"] for c in r.xinfo_consumers(stream, group))
        served = {k: int(v) for k, v in r.hgetall(counter_key("served", group)).items()}
        handled = {pod.name: pod.calls_handled() for pod in pods.procs}
    finally:
        took = pods.stop()
    with Cluster("tiny") as cluster:
        want = generate(cluster.gateway)
    return {"tokens": got, "up_tokens": want, "identical": got == want, "processes": len(pods.procs),
            "scaled": {"deployment": name, "replicas": replicas, "consumers": consumers, "served": served},
            "drain_s": {k: round(v, 2) for k, v in took.items()}, "handled": handled}


def test_manifests_run_as_processes_and_answer_like_ralmspec_up(tmp_path):
    run = run_cpu_overlay(tmp_path)
    name, replicas = SCALED
    # The scaled Deployment's replicas joined its consumer group and each served searches.
    assert run["scaled"]["consumers"] == [f"{name}-{i}" for i in range(replicas)]
    served = run["scaled"]["served"]
    assert sorted(served) == run["scaled"]["consumers"] and all(n > 0 for n in served.values()), served
    assert len(run["drain_s"]) == run["processes"], "a process outlived its terminationGracePeriodSeconds"
    assert run["tokens"] == run["up_tokens"]
    assert sorted(run["handled"]) == sorted(p for p in run["drain_s"]) and run["handled"]["gateway-0"] >= len(QUESTIONS)
    print(f"{name} replicas served {served}; drained in (s) {run['drain_s']}; tokens identical to `ralmspec up` "
          f"for {len(QUESTIONS)} questions: {run['tokens']}")
