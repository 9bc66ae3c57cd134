"""`ralmspec up`: a local Redis (unless RALMSPEC_REDIS_URL is set) and every service as a child process.

Secured like a deployment: unless RALMSPEC_AUTH=off, `up` generates an API token, a cluster token and the local
Redis's password into `<data>/run/secrets-<pid>/` (mode 0600, removed on stop; token files given in
RALMSPEC_API_TOKENS_FILE / RALMSPEC_CLUSTER_TOKEN_FILE are used instead) and prints the API token file's path,
never a secret. `Cluster.channel` gives callers a channel that sends the right token to each service.

Children get free ports, write their logs under `<data>/run/logs/`, die with this process (PR_SET_PDEATHSIG, set
by each child itself),
and are stopped with SIGTERM (graceful drain) on Ctrl-C, then killed if they linger: no orphans.

Faults (`bench/chaos.py`): `Cluster.kill` signals one child (SIGKILL, SIGSTOP, SIGCONT) and `Cluster.respawn`
starts a dead child's service again as a kubelet restarts a crashed container in its pod: same replica name, port
and log, a fresh process.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common import auth, env
from services.common.errors import Unavailable
from services.common.redis_server import LocalRedis, free_port
from services.common.tls import redact

ORDER = ("lm", "retriever", "datastore", "verifier", "gateway")  # the gateway last: it serves the public API
DEFAULT_REPLICAS: dict[str, int] = {name: 1 for name in ORDER}


@dataclass
class Child:
    service: str
    replica: str
    port: int
    proc: subprocess.Popen[bytes]
    log: Path
    metrics_port: int = 0  # its Prometheus endpoint: http://127.0.0.1:<metrics_port>/metrics
    restarts: int = 0  # times `Cluster.respawn` started it again (a pod's RESTARTS)

    def tail(self, n: int = 20) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


@dataclass
class Secrets:
    """A local cluster's credentials: token files (given, or generated into `folder`) and a Redis password."""

    api_tokens_file: Path | None  # None: authentication off
    cluster_token_file: Path | None
    redis_password: str
    folder: Path | None = None  # generated here (removed by `remove`)

    @classmethod
    def create(cls, folder: Path, authenticate: bool) -> Secrets:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        folder.chmod(0o700)

        def secret_file(name: str, given: str) -> Path:
            if given:
                return Path(given)
            path = folder / name
            path.touch(mode=0o600)
            path.write_text(auth.new_token() + "\n")
            return path

        api = secret_file("api-tokens", env.API_TOKENS_FILE.get()) if authenticate else None
        cluster = secret_file("cluster-token", env.CLUSTER_TOKEN_FILE.get()) if authenticate else None
        return cls(api, cluster, auth.new_token(), folder)

    @property
    def api_token(self) -> str | None:
        return None if self.api_tokens_file is None else auth.read_tokens(self.api_tokens_file)[0]

    @property
    def cluster_token(self) -> str | None:
        return None if self.cluster_token_file is None else auth.read_tokens(self.cluster_token_file)[0]

    def env(self) -> dict[str, str]:
        if self.api_tokens_file is None or self.cluster_token_file is None:
            return {env.AUTH.name: "off"}
        return {env.AUTH.name: "on", env.API_TOKENS_FILE.name: str(self.api_tokens_file),
                env.CLUSTER_TOKEN_FILE.name: str(self.cluster_token_file)}

    def remove(self) -> None:
        if self.folder is not None:
            for p in self.folder.glob("*"):
                p.unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                self.folder.rmdir()


@dataclass
class Cluster:
    profile: str
    replicas: Mapping[str, int] = field(default_factory=lambda: dict(DEFAULT_REPLICAS))
    redis_url: str = ""
    gateway_port: int = 0
    extra_env: Mapping[str, str] = field(default_factory=dict)
    children: list[Child] = field(default_factory=list)
    redis: LocalRedis | None = None
    appendonly: bool = False  # the local Redis keeps an AOF (survives `redis.restart()`)
    secrets: Secrets | None = None

    @property
    def gateway(self) -> str:
        return self.addresses("gateway")[0]

    def addresses(self, service: str) -> list[str]:
        """The gRPC address of each replica of `service` (e.g. every LM replica, for its Stats)."""
        return [f"127.0.0.1:{c.port}" for c in self.children if c.service == service]

    def token_for(self, target: str) -> str | None:
        """The token `target` accepts: the API token for a gateway, else the cluster token (None: auth off)."""
        if self.secrets is None:
            return None
        return self.secrets.api_token if target in self.addresses("gateway") else self.secrets.cluster_token

    def channel(self, target: str | None = None) -> grpc.Channel:
        """A blocking channel to `target` (default: the gateway) that sends the token it accepts."""
        target = target or self.gateway
        return auth.channel(target, self.token_for(target))

    def aio_channel(self, target: str | None = None) -> grpc.aio.Channel:
        """An asyncio channel to `target` (default: the gateway) that sends the token it accepts."""
        target = target or self.gateway
        return auth.aio_channel(target, self.token_for(target))

    @property
    def authenticated(self) -> bool:
        return {**os.environ, **self.extra_env}.get(env.AUTH.name, env.AUTH.default) != "off"

    def start(self, timeout_s: float = 300.0) -> Cluster:
        run = env.data_dir() / "run"
        self.secrets = Secrets.create(run / f"secrets-{os.getpid()}-{id(self):x}", self.authenticated)
        if not self.redis_url:
            self.redis = LocalRedis(password=self.secrets.redis_password, appendonly=self.appendonly).start()
            self.redis_url = self.redis.url
        logs = run / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        try:
            for service in ORDER:
                for i in range(self.replicas.get(service, 0)):
                    replica = f"{service}-{i}-{os.getpid()}"
                    port = self.gateway_port if service == "gateway" and self.gateway_port else free_port()
                    self.children.append(self._spawn(service, replica, port, free_port(), logs / f"{replica}.log"))
            self.wait_healthy(timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def _spawn(self, service: str, replica: str, port: int, metrics_port: int, log: Path,
               append: bool = False) -> Child:
        secrets = self.secrets.env() if self.secrets is not None else {}
        child_env = {**os.environ, **secrets, **self.extra_env, env.REDIS_URL.name: self.redis_url,
                     env.PROFILE.name: self.profile, env.PORT.name: str(port), env.REPLICA.name: replica,
                     env.METRICS_PORT.name: str(metrics_port)}
        cmd = [sys.executable, "-m", "services.cli", "serve", service, "--die-with-parent"]
        # Its own session: Ctrl-C reaches only `up`, which stops children in order. A respawn appends to the log.
        with open(log, "ab" if append else "wb") as out:
            proc = subprocess.Popen(cmd, env=child_env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        return Child(service, replica, port, proc, log, metrics_port)

    def kill(self, child: Child, sig: signal.Signals = signal.SIGKILL) -> None:
        """Send `sig` to `child`'s process: a fault (SIGKILL: a crash; SIGSTOP, then SIGCONT: a replica frozen, e.g.
        by a long GC pause or a throttled cgroup, that comes back)."""
        if child.proc.poll() is None:
            child.proc.send_signal(sig)
        if sig == signal.SIGKILL:
            child.proc.wait()  # reaped: its port is free for `respawn`

    def respawn(self, child: Child, timeout_s: float | None = 300.0) -> Child:
        """Start the service of `child`, whose process has exited, again, as a kubelet restarts a crashed container
        in its pod: same replica name (the pod's name, RALMSPEC_REPLICA in the manifests), same port (a Service's
        address) and log (appended to), same environment, a fresh process. Returns the new `Child`, which replaces
        `child` in `children`; waits until it is SERVING unless `timeout_s` is None.

        The same name keeps the replica's consumer in its streams' groups and its pinned stream `<stream>:<replica>`
        read: calls sent to its sessions or caches while it was down are answered (NOT_FOUND: that state died with
        the process; the gateway replays them) instead of waiting out their deadline on a stream nobody reads, and
        its unacked entries are claimed back by itself or another replica after RALMSPEC_CLAIM_IDLE_MS. Session and
        cache ids are random (uuid4), so a new incarnation never answers for an old one's.

        Call it from a thread that lives as long as the cluster (the main thread, or one kept for the purpose): a
        child's parent-death signal (PR_SET_PDEATHSIG) follows the thread that started it, so a child started from
        a pool's worker thread is SIGTERMed when that worker exits."""
        if child.proc.poll() is None:
            raise ValueError(f"{child.replica} (pid {child.proc.pid}) is still running: kill it first")
        fresh = self._spawn(child.service, child.replica, child.port, child.metrics_port, child.log, append=True)
        fresh.restarts = child.restarts + 1
        self.children[self.children.index(child)] = fresh
        if timeout_s is not None:
            self.wait_healthy(timeout_s, [fresh])
        return fresh

    def rss_mb(self) -> dict[str, float]:
        """Each service's largest resident set among its live replicas, MB (psutil, imported here only: the
        benchmarks' extra)."""
        import psutil

        out: dict[str, float] = {}
        for c in self.children:
            with contextlib.suppress(psutil.Error):
                mb = round(psutil.Process(c.proc.pid).memory_info().rss / 2**20, 1)
                out[c.service] = max(out.get(c.service, 0.0), mb)
        return out

    def wait_healthy(self, timeout_s: float, children: Sequence[Child] | None = None) -> None:
        """Wait until every child (or those given) answers its gRPC health check SERVING; Unavailable (with its log's
        tail) when one exits or is not serving after `timeout_s`."""
        end = time.monotonic() + timeout_s
        for c in self.children if children is None else children:
            with grpc.insecure_channel(f"127.0.0.1:{c.port}") as ch:
                stub = health_pb2_grpc.HealthStub(ch)
                while True:
                    if c.proc.poll() is not None:
                        raise Unavailable(f"{c.replica} exited with code {c.proc.returncode}; log {c.log}:\n{c.tail()}")
                    try:
                        if stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status == \
                                health_pb2.HealthCheckResponse.SERVING:
                            break
                    except grpc.RpcError:
                        pass
                    if time.monotonic() > end:
                        raise Unavailable(f"{c.replica} not healthy after {timeout_s:.0f} s; log {c.log}:\n{c.tail()}")
                    time.sleep(0.2)

    def stop(self, grace_s: float = 30.0) -> None:
        """SIGTERM one service kind at a time in reverse start order, waiting for each to drain: the gateway
        finishes its in-flight requests while the services they call are still up. Lingerers are killed."""
        for service in reversed(ORDER):
            group = [c for c in self.children if c.service == service]
            for c in group:
                if c.proc.poll() is None:
                    c.proc.send_signal(signal.SIGTERM)
            end = time.monotonic() + grace_s
            for c in group:
                try:
                    c.proc.wait(max(0.1, end - time.monotonic()))
                except subprocess.TimeoutExpired:
                    c.proc.kill()
                    c.proc.wait()
        self.children.clear()
        if self.redis is not None:
            self.redis.stop()
            self.redis = None
        if self.secrets is not None:
            self.secrets.remove()

    def __enter__(self) -> Cluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def up(profile: str, gateway_port: int, replicas: Mapping[str, int]) -> int:
    cluster = Cluster(profile, replicas, env.REDIS_URL.get(), gateway_port)
    stopping = False

    def on_signal(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    t = time.monotonic()
    print(f"starting {sum(replicas.values())} service processes ({profile} profile)...", flush=True)
    cluster.start()
    print(f"redis {redact(cluster.redis_url)}", flush=True)
    secrets = cluster.secrets
    if secrets is not None and secrets.api_tokens_file is not None:
        print("authentication on (RALMSPEC_AUTH=off turns it off): calls send `authorization: Bearer <token>`",
              flush=True)
        print(f"  api tokens file {secrets.api_tokens_file}  (the gateway's)", flush=True)
        print(f"  cluster token file {secrets.cluster_token_file}  (the other services')", flush=True)
    else:
        print("authentication off (RALMSPEC_AUTH=off): any local process may call the services", flush=True)
    for c in cluster.children:
        print(f"  {c.replica:<24} 127.0.0.1:{c.port}  metrics http://127.0.0.1:{c.metrics_port}/metrics  "
              f"pid {c.proc.pid}  log {c.log}", flush=True)
    print(f"gateway ready on {cluster.gateway} after {time.monotonic() - t:.1f} s (Ctrl-C stops everything)",
          flush=True)
    try:
        while not stopping:
            dead = [c for c in cluster.children if c.proc.poll() is not None]
            if dead:
                print(f"{dead[0].replica} exited ({dead[0].proc.returncode}); stopping:\n{dead[0].tail()}", flush=True)
                return 1
            time.sleep(0.5)
    finally:
        print("stopping...", flush=True)
        cluster.stop()
        print("stopped", flush=True)
    return 0
