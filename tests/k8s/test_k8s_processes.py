"""Manifests as processes: a rendered overlay's Deployments run as local processes, each container's command with
the environment the kubelet would give it (ConfigMap, Secret, pod name, $(VAR) expansion) and its Secret volumes as
files (items, modes), and Redis from its StatefulSet's own command, password and files. Only what belongs to the pod
network or the node is rewritten: the Redis address (a local redis-server), the gRPC port (a free one per process,
since every pod serves 50051), the bind address (loopback, not every interface of this machine), the assets volume
(this checkout's tiny assets) and each Secret volume's mount path (a folder per pod). The test waits on the probes'
own checks within the startup probes' budgets and sends requests through the gateway Service's port with the API
token the Secret holds, as a client would.

`cpu`: the tokens are compared with `ralmspec up`; without a token, or with the cluster token, the gateway answers
UNAUTHENTICATED, and the API token opens no internal service. The retriever Deployment is scaled to 2 replicas in the
rendered YAML: both pods join the stream's consumer group and both serve searches. Each pod's metrics endpoint
answers on the port its prometheus.io/port annotation names (mapped like the gRPC port).

`cpu-tls`: the Secret cert-manager would issue for the overlay's Certificate is made here for loopback
(tests/common/pki.py). The same questions get the same tokens over TLS; the probes are TCP connects, and the gRPC
health check a kubelet's gRPC probe would send (plaintext) fails on every pod; the internal services refuse a client
without a certificate the CA signed, Redis refuses plaintext."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import grpc
import pytest
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc
from k8s_manifests import ROOT, Container, Obj, data_of, named, of_kind, pod_spec, render, servers
from k8s_rules import CONSUMERS, PROBES, redis_tls, served_port
from prometheus_client.parser import text_string_to_metric_families
from ralmspec.v1 import gateway_pb2 as pb
from ralmspec.v1 import gateway_pb2_grpc, lm_pb2, lm_pb2_grpc

from services.common import auth, env
from services.common.process import DIE_WITH_PARENT
from services.common.redis_server import free_port
from services.common.tls import client_credentials
from services.common.transport import counter_key
from services.up import ORDER, Cluster

sys.path.insert(0, str(ROOT / "tests" / "common"))
from pki import make_pki  # noqa: E402

pytestmark = pytest.mark.slow

QUESTIONS = ["Who wrote Hamlet?", "Where is the Amazon rainforest?"]
SCALED = ("retriever", 2)  # the Deployment whose replicas the cpu run raises, and to how many


@dataclass
class Pod:
    name: str
    container: Container
    ports: dict[int, int]  # containerPort -> the local port this process serves it on
    env: dict[str, str]  # as the process got it (rewritten: Secret files' paths are where they are here)
    proc: subprocess.Popen[bytes]
    log: Path

    def tail(self) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-15:])

    @property
    def address(self) -> str:
        """Where it serves gRPC here."""
        return f"127.0.0.1:{served_port(self.env, self.container.argv)}"

    def calls_handled(self) -> float:
        """The calls this pod answered, from the metrics endpoint its scrape annotation names."""
        port = int(self.container.owner["spec"]["template"]["metadata"]["annotations"]["prometheus.io/port"])
        text = urllib.request.urlopen(f"http://127.0.0.1:{self.ports[port]}/metrics", timeout=10).read().decode()
        return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
                   if s.name == "ralmspec_rpc_server_handled_total")

    def tokens(self, var: env.EnvVar) -> list[str]:
        """The tokens of the Secret file `var` names."""
        return auth.read_tokens(Path(self.env[var.name]))


@dataclass
class Pods:
    objs: list[Obj]
    workdir: Path
    issued: dict[str, dict[str, str]] = field(default_factory=dict)  # Secrets cert-manager makes: name -> key -> PEM
    redis_port: int = 0
    procs: list[Pod] = field(default_factory=list)
    redis: subprocess.Popen[bytes] | None = None
    took: dict[str, float] = field(default_factory=dict)  # seconds each process took to exit on SIGTERM

    def mount_secrets(self, c: Container, pod: str) -> dict[str, Path]:
        """Each Secret file of `c` written under workdir/<pod>/ with its mode: its path in the pod -> here."""
        files = {}
        for f in c.secret_files(self.objs):
            data = self.issued[f.secret] if f.secret in self.issued else data_of(named(self.objs, "Secret", f.secret))
            here = self.workdir / pod / f.mount.strip("/").replace("/", "-") / f.path[len(f.mount):].lstrip("/")
            here.parent.mkdir(parents=True, exist_ok=True)
            here.write_text(data[f.key])
            here.chmod(f.mode)
            files[f.path] = here
        return files

    @staticmethod
    def relocate(value: str, files: dict[str, Path]) -> str:
        """`value` with every Secret file's path in the pod replaced by where it is here (also inside URLs)."""
        if not files:
            return value
        return re.sub("|".join(map(re.escape, sorted(files, key=len, reverse=True))), lambda m: str(files[m[0]]), value)

    def start_redis(self) -> None:
        """The StatefulSet's redis-server command, its $(VAR)s expanded from its env and its files mounted, on a local
        port and dir (the TLS port where it serves TLS); ready when its own readiness probe's command says so."""
        sts = named(self.objs, "StatefulSet", "redis")
        c = Container(sts, pod_spec(sts)["containers"][0])
        c_env, files = c.env(self.objs, "redis-0"), self.mount_secrets(c, "redis-0")
        argv = [self.relocate(re.sub(r"\$\((\w+)\)", lambda m: c_env[m[1]], str(a)), files) for a in c.argv]
        argv[argv.index("--dir") + 1] = str(self.workdir)
        argv[0] = shutil.which(argv[0]) or argv[0]
        self.redis_port = free_port()
        port_option = "--tls-port" if redis_tls(self.objs)[0] else "--port"
        self.redis = subprocess.Popen([*DIE_WITH_PARENT, *argv, port_option, str(self.redis_port), "--bind",
                                       "127.0.0.1"], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                                      start_new_session=True)
        probe = [self.relocate(a, files) for a in c.spec["readinessProbe"]["exec"]["command"]]
        probe[1:1] = ["-p", str(self.redis_port)]  # in the pod: its own default port
        end = time.monotonic() + 10
        while subprocess.run(probe, env={**os.environ, **c_env}, capture_output=True, text=True).stdout.strip() \
                != "PONG":
            assert self.redis.poll() is None and time.monotonic() < end, "redis-server from the StatefulSet failed"
            time.sleep(0.1)

    def pod_env(self, c: Container, pod: str) -> tuple[dict[str, str], dict[int, int]]:
        files = self.mount_secrets(c, pod)
        e = c.env(self.objs, pod)
        url = urlsplit(e[env.REDIS_URL.name])
        e[env.REDIS_URL.name] = urlunsplit(url._replace(netloc=f":{url.password}@127.0.0.1:{self.redis_port}"))
        e = {k: self.relocate(v, files) for k, v in e.items()}
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
                self.procs.append(Pod(pod, c, ports, e, proc, log))

    def wait_probes(self) -> None:
        """Each probe's check (gRPC health, plaintext as the kubelet sends it; or a TCP connect) until it passes,
        within the startup probe's budget."""
        for pod in self.procs:
            for kind in PROBES:
                probe = pod.container.spec[kind]
                budget = probe.get("periodSeconds", 10) * probe.get("failureThreshold", 3)
                end = time.monotonic() + (budget if kind == "startupProbe" else 10)
                while not probe_passes(pod, probe):
                    assert pod.proc.poll() is None, f"{pod.name} exited:\n{pod.tail()}"
                    assert time.monotonic() < end, f"{pod.name}: {kind} failed for {budget} s:\n{pod.tail()}"
                    time.sleep(0.2)

    def behind(self, service: str) -> tuple[Pod, str]:
        """A pod a Service's selector picks, and the local address behind the Service's port (its targetPort)."""
        svc = named(self.objs, "Service", service)
        labels, target = svc["spec"]["selector"], svc["spec"]["ports"][0]["targetPort"]
        pod = next(p for p in self.procs
                   if labels.items() <= p.container.owner["spec"]["template"]["metadata"]["labels"].items())
        return pod, f"127.0.0.1:{pod.ports[pod.container.port(target)]}"

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

    @contextmanager
    def running(self) -> Iterator[Pods]:
        """Started and past their probes; stopped on leaving."""
        try:
            self.start()
            self.wait_probes()
            yield self
        finally:
            self.took = self.stop()

    def redis_client(self) -> redis.Redis:
        """Redis as the services reach it (a server's URL: password, and TLS files where Redis serves TLS)."""
        return redis.Redis.from_url(self.procs[0].env[env.REDIS_URL.name], decode_responses=True)


def probe_passes(pod: Pod, probe: Obj) -> bool:
    if "tcpSocket" in probe:
        try:
            socket.create_connection(("127.0.0.1", pod.ports[pod.container.port(probe["tcpSocket"]["port"])]),
                                     timeout=probe.get("timeoutSeconds", 1)).close()
            return True
        except OSError:
            return False
    return health(f"127.0.0.1:{pod.ports[probe['grpc']['port']]}", None, probe["grpc"].get("service", ""),
                  probe.get("timeoutSeconds", 1)) == "SERVING"


def health(address: str, credentials: grpc.ChannelCredentials | None, service: str = "", timeout: float = 5) -> str:
    """grpc.health.v1's answer (SERVING, ...), or the status code of the call that failed."""
    ch = grpc.insecure_channel(address) if credentials is None else grpc.secure_channel(address, credentials)
    with ch:
        try:
            reply = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=service),
                                                         timeout=timeout)
            return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))
        except grpc.RpcError as e:
            return str(e.code().name)


def generate(ch: grpc.Channel) -> list[list[int]]:
    stub = gateway_pb2_grpc.GatewayServiceStub(ch)
    return [list(stub.Generate(pb.GenerateRequest(question=q), timeout=300).token_ids) for q in QUESTIONS]


def code_of(call: Callable[[], object]) -> str:
    """The status code a call ends with (OK when it returns)."""
    try:
        call()
        return "OK"
    except grpc.RpcError as e:
        return str(e.code().name)


def generate_code(address: str, token: str | None, credentials: grpc.ChannelCredentials | None = None) -> str:
    with auth.channel(address, token, credentials) as ch:
        return code_of(lambda: generate(ch))


def lm_stats_code(address: str, token: str | None, credentials: grpc.ChannelCredentials | None = None) -> str:
    with auth.channel(address, token, credentials) as ch:
        return code_of(lambda: lm_pb2_grpc.LmServiceStub(ch).Stats(lm_pb2.StatsRequest(), timeout=30))


def run_cpu_overlay(workdir: Path) -> dict[str, Any]:
    """The rendered cpu overlay with SCALED's replicas, as processes: the tokens it answers, the codes of calls with
    the wrong token or none, the scaled service's consumers and what each served, how long each process took to
    drain; then `ralmspec up`'s tokens."""
    objs = render("cpu")
    name, replicas = SCALED
    named(objs, "Deployment", name)["spec"]["replicas"] = replicas  # scaled in the rendered YAML
    pods = Pods(objs, workdir)
    with pods.running():
        (gateway, gateway_address), (lm, lm_address) = pods.behind("gateway"), pods.behind("lm")
        api_token, cluster_token = gateway.tokens(env.API_TOKENS_FILE)[0], lm.tokens(env.CLUSTER_TOKEN_FILE)[0]
        with auth.channel(gateway_address, api_token) as ch:
            got = generate(ch)
            # A few more requests if the first ones all went to one replica (Redis hands a new entry to the
            # longest-blocked reader, so replicas take turns).
            stream, group = CONSUMERS[name]
            r = pods.redis_client()
            for _ in range(3):
                if len(r.hgetall(counter_key("served", group))) == replicas:
                    break
                generate(ch)
        wrong = {"no token": None, "the cluster token": cluster_token, "a token of no file": auth.new_token()}
        refused = {f"gateway, {what}": generate_code(gateway_address, token) for what, token in wrong.items()}
        refused["lm, the API token"] = lm_stats_code(lm_address, api_token)
        refused["lm, the cluster token"] = lm_stats_code(lm_address, cluster_token)  # the control: OK
        consumers = sorted(c["name"] for c in r.xinfo_consumers(stream, group))
        served = {k: int(v) for k, v in r.hgetall(counter_key("served", group)).items()}
        handled = {pod.name: pod.calls_handled() for pod in pods.procs}
    with Cluster("tiny") as cluster, cluster.channel() as ch:
        want = generate(ch)
    return {"tokens": got, "up_tokens": want, "identical": got == want, "processes": len(pods.procs),
            "refused": refused, "scaled": {"deployment": name, "replicas": replicas, "consumers": consumers,
                                           "served": served},
            "drain_s": {k: round(v, 2) for k, v in pods.took.items()}, "handled": handled}


def issue(objs: list[Obj], workdir: Path) -> dict[str, dict[str, str]]:
    """The Secrets cert-manager would write for the overlay's leaf Certificates, here for loopback (the processes'
    address): the CA, and a certificate that serves and authenticates clients, as the Certificate's usages ask."""
    pki = make_pki(workdir / "pki")
    pem = {"tls.crt": pki.server_cert.read_text(), "tls.key": pki.server_key.read_text(), "ca.crt": pki.ca.read_text()}
    return {c["spec"]["secretName"]: pem for c in of_kind(objs, "Certificate") if not c["spec"].get("isCA")}


def run_tls_overlay(workdir: Path) -> dict[str, Any]:
    """The rendered cpu-tls overlay as processes: its tokens over TLS, what a kubelet's plaintext gRPC probe would
    get from each pod, and the codes of the calls that TLS refuses or lets through."""
    objs = render("cpu-tls")
    pods = Pods(objs, workdir, issue(objs, workdir))
    with pods.running():
        (gateway, gateway_address), (lm, lm_address) = pods.behind("gateway"), pods.behind("lm")
        ca, cert, key = (Path(lm.env[v.name]) for v in (env.TLS_CA, env.TLS_CERT, env.TLS_KEY))
        api_token, cluster_token = gateway.tokens(env.API_TOKENS_FILE)[0], lm.tokens(env.CLUSTER_TOKEN_FILE)[0]
        with auth.channel(gateway_address, api_token, client_credentials(ca)) as ch:  # verifies the gateway
            got = generate(ch)
        operator = client_credentials(ca, cert, key)  # the Secret's certificate, as an operator's tool holds it
        codes = {
            "gateway, plaintext": generate_code(gateway_address, api_token),
            "lm, a certificate and the cluster token": lm_stats_code(lm_address, cluster_token, operator),
            "lm, a certificate, no token": lm_stats_code(lm_address, None, operator),
            "lm, no certificate": lm_stats_code(lm_address, cluster_token, client_credentials(ca)),
            "lm health, a certificate": health(lm_address, operator),
        }
        plaintext_probe = {pod.name: health(pod.address, None) for pod in pods.procs}
        try:
            password = urlsplit(gateway.env[env.REDIS_URL.name]).password
            redis.Redis(port=pods.redis_port, password=password, socket_timeout=5).ping()
            codes["redis, plaintext"] = "OK"
        except redis.ConnectionError:
            codes["redis, plaintext"] = "refused"
        probes = sorted({k for pod in pods.procs for kind in PROBES for k in pod.container.spec[kind]} - {
            "periodSeconds", "failureThreshold", "timeoutSeconds"})
    return {"tokens": got, "processes": len(pods.procs), "probes": probes, "codes": codes,
            "plaintext_grpc_probe": plaintext_probe, "drain_s": {k: round(v, 2) for k, v in pods.took.items()}}


@pytest.fixture(scope="module")
def cpu_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return run_cpu_overlay(tmp_path_factory.mktemp("cpu"))


def test_manifests_run_as_processes_and_answer_like_ralmspec_up(cpu_run):
    run = cpu_run
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


def test_the_gateway_needs_the_api_token_and_it_opens_nothing_else(cpu_run):
    assert cpu_run["refused"] == {
        "gateway, no token": "UNAUTHENTICATED", "gateway, the cluster token": "UNAUTHENTICATED",
        "gateway, a token of no file": "UNAUTHENTICATED",
        "lm, the API token": "UNAUTHENTICATED", "lm, the cluster token": "OK",  # the control
    }


@pytest.fixture(scope="module")
def tls_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return run_tls_overlay(tmp_path_factory.mktemp("tls"))


def test_tls_overlay_answers_the_same_over_tls_with_tcp_probes(tls_run, cpu_run):
    assert tls_run["tokens"] == cpu_run["tokens"]
    assert tls_run["probes"] == ["tcpSocket"]
    # What a kubelet's gRPC probe (plaintext) would get: why the TLS overlay probes with TCP connects.
    assert set(tls_run["plaintext_grpc_probe"].values()) == {"UNAVAILABLE"}, tls_run["plaintext_grpc_probe"]
    assert tls_run["codes"] == {
        "gateway, plaintext": "UNAVAILABLE",
        "lm, a certificate and the cluster token": "OK",
        "lm, a certificate, no token": "UNAUTHENTICATED",  # mutual TLS does not replace the token
        "lm, no certificate": "UNAVAILABLE",  # mutual TLS: the handshake fails
        "lm health, a certificate": "SERVING",
        "redis, plaintext": "refused",
    }
    assert len(tls_run["drain_s"]) == tls_run["processes"], "a process outlived its terminationGracePeriodSeconds"
