"""Consistency rules between the rendered manifests and the code. Each returns its violations (empty: it holds)."""

from __future__ import annotations

import contextlib
import io
import tempfile
from collections.abc import Callable
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from k8s_manifests import Container, Obj, containers, data_of, named, of_kind, pod_spec, servers, workload_containers

from services.common import auth, env
from services.common.contracts import SERVICES

# Services that read a Redis stream: every one but the gateway (serve_gateway passes streams=False: its requests
# arrive over gRPC). Each reads its contract's stream in the consumer group the StreamWorker defaults to, the
# stream's own name.
CONSUMERS = {name: (svc.stream, svc.stream) for name, svc in SERVICES.items() if name != "gateway"}
PROBES = ("startupProbe", "readinessProbe", "livenessProbe")
CERT_KEYS = {"tls.crt", "tls.key", "ca.crt"}  # what cert-manager writes into a Certificate's Secret (with a CA issuer)
EXTENDED_USAGES = {"any", "server auth", "client auth", "code signing", "email protection", "s/mime",
                   "ipsec end system", "ipsec tunnel", "ipsec user", "timestamping", "ocsp signing", "microsoft sgc",
                   "netscape sgc"}


def served_port(c_env: dict[str, str], argv: list[str]) -> int:
    """The port `ralmspec serve` binds: --port, else RALMSPEC_PORT (0 would be a random one)."""
    if "--port" in argv:
        return int(argv[argv.index("--port") + 1])
    return int(c_env.get(env.PORT.name, env.PORT.default))


def _pod_env(objs: list[Obj], name: str) -> dict[str, str]:
    c = servers(objs)[name]
    return c.env(objs, f"{name}-0")


def env_declared(objs: list[Obj]) -> list[str]:
    """Every environment variable of a ralmspec container is declared in services/common/env.py."""
    declared = {v.name for v in env.ALL}
    return [f"{c.kind}/{c.name}: {n} is not declared in services/common/env.py"
            for c in containers(objs) for n in sorted(c.env_names(objs) - declared)]


def commands(objs: list[Obj]) -> list[str]:
    """Every ralmspec container runs a real `ralmspec` subcommand with arguments its parser accepts, and a
    Deployment serves the service it is named after."""
    from services.cli import parser

    bad = []
    for c in containers(objs):
        argv = c.argv
        if argv[:1] != ["ralmspec"]:
            bad.append(f"{c.kind}/{c.name}: {argv} is not the ralmspec command")
            continue
        err = io.StringIO()
        try:
            with contextlib.redirect_stderr(err):
                parser().parse_args(argv[1:])
        except SystemExit:
            bad.append(f"{c.kind}/{c.name}: `{' '.join(argv)}` is refused: {err.getvalue().strip().splitlines()[-1]}")
            continue
        if c.kind == "Deployment" and c.served != c.name:
            bad.append(f"Deployment/{c.name} serves {c.served!r}, not the service it is named after")
    return bad


def ports(objs: list[Obj]) -> list[str]:
    """Each server's containerPort is the port it serves, and its Service's targetPort reaches that port."""
    bad = []
    for name, c in servers(objs).items():
        port = served_port(_pod_env(objs, name), c.argv)
        if port == 0:
            bad.append(f"Deployment/{name}: serves a random port (RALMSPEC_PORT=0)")
            continue
        if port not in [p["containerPort"] for p in c.spec.get("ports", [])]:
            bad.append(f"Deployment/{name}: serves port {port}, containerPorts are {c.spec.get('ports')}")
        labels = c.owner["spec"]["template"]["metadata"]["labels"]
        svcs = [s for s in of_kind(objs, "Service")
                if s["spec"].get("selector") and s["spec"]["selector"].items() <= labels.items()]
        if not svcs:
            bad.append(f"Deployment/{name}: no Service selects its pods")
        for s in svcs:
            for p in s["spec"]["ports"]:
                try:
                    target = c.port(p.get("targetPort", p["port"]))
                except LookupError as e:
                    bad.append(f"Service/{s['metadata']['name']}: {e}")
                    continue
                if target != port:
                    bad.append(f"Service/{s['metadata']['name']}: targetPort {target}, the service serves {port}")
    return bad


def probes(objs: list[Obj]) -> list[str]:
    """Each server has startup, readiness and liveness probes on its one gRPC port (which also serves
    grpc.health.v1), of a kind the kubelet can run against it: a gRPC health check on a plaintext port; on a TLS
    port (RALMSPEC_TLS_CERT) a TCP connect, since the kubelet's gRPC probe speaks plaintext unless `mode: TLS`
    (Kubernetes 1.37 alpha), which presents no client certificate, so never under mutual TLS."""
    bad = []
    for name, c in servers(objs).items():
        e = _pod_env(objs, name)
        port = served_port(e, c.argv)
        tls, mutual = bool(e.get(env.TLS_CERT.name)), e.get(env.TLS_CLIENT_AUTH.name) == "1"
        for kind in PROBES:
            probe = c.spec.get(kind)
            grpc_mode = probe.get("grpc", {}).get("mode", "Plaintext") if probe else None
            if probe is None:
                bad.append(f"Deployment/{name}: no {kind}")
            elif "tcpSocket" in probe and tls:
                if c.port(probe["tcpSocket"]["port"]) != port:
                    bad.append(f"Deployment/{name}: {kind} connects to {probe['tcpSocket']['port']}, gRPC is on {port}")
            elif "grpc" not in probe:
                bad.append(f"Deployment/{name}: {kind} is neither a gRPC health check nor (TLS port) a TCP connect")
            elif (grpc_mode == "TLS") != tls or (tls and mutual):
                bad.append(f"Deployment/{name}: {kind} is a {grpc_mode} gRPC check of a "
                           f"{'mutual TLS' if mutual else 'TLS' if tls else 'plaintext'} port")
            elif probe["grpc"]["port"] != port:  # a number: gRPC probes take no port names
                bad.append(f"Deployment/{name}: {kind} checks port {probe['grpc']['port']}, health is on {port}")
    return bad


def token_file(service: str) -> env.EnvVar:
    """The token file a service does not start without: the gateway (the public edge) reads the API tokens, every
    other service the cluster token (serving.configure_process, auth.Auth.from_env)."""
    return env.API_TOKENS_FILE if service == "gateway" else env.CLUSTER_TOKEN_FILE


def _token_error(text: str) -> str | None:
    """What auth.read_tokens says of a token file holding `text` (None: it accepts it)."""
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "tokens"
        path.write_text(text)
        try:
            auth.read_tokens(path)
        except ValueError as e:
            return str(e).replace(f" {path}", "")
    return None


def authentication(objs: list[Obj]) -> list[str]:
    """Authentication is on: no container's env and no ConfigMap sets RALMSPEC_AUTH=off; every server names the
    token file it cannot start without (token_file), and every token file a server names is a file of a Secret it
    mounts, holding tokens services/common/auth.py accepts (one a line, >= 16 characters)."""
    bad = [f"ConfigMap/{m['metadata']['name']}: {env.AUTH.name}=off" for m in of_kind(objs, "ConfigMap")
           if m.get("data", {}).get(env.AUTH.name) == "off"]
    bad += [f"{c.kind}/{c.name}: {env.AUTH.name}=off" for c in workload_containers(objs)
            if c.env(objs, f"{c.name}-0").get(env.AUTH.name) == "off"]
    for name, c in servers(objs).items():
        e = _pod_env(objs, name)
        if not e.get(token_file(name).name):
            bad.append(f"Deployment/{name}: no {token_file(name).name}: the service does not start")
        files = {f.path: f for f in c.secret_files(objs)}
        for var in (env.API_TOKENS_FILE, env.CLUSTER_TOKEN_FILE):
            path = e.get(var.name)
            if not path:
                continue
            f = files.get(path)
            if f is None:
                bad.append(f"Deployment/{name}: {var.name}={path} is no file of a Secret it mounts")
            elif (error := _token_error(data_of(named(objs, "Secret", f.secret))[f.key])) is not None:
                bad.append(f"Deployment/{name}: Secret {f.secret}, key {f.key}: {error}")
    return bad


def _secret_keys(objs: list[Obj], name: str) -> set[str] | None:
    """The keys of a Secret the overlay makes: rendered, or written by cert-manager for one of its Certificates
    (None: nothing in the overlay makes it)."""
    rendered = [s for s in of_kind(objs, "Secret") if s["metadata"]["name"] == name]
    if rendered:
        return set(data_of(rendered[0]))
    return CERT_KEYS if any(c["spec"]["secretName"] == name for c in of_kind(objs, "Certificate")) else None


def secret_files(objs: list[Obj]) -> list[str]:
    """Each container (ours and Redis) mounts exactly the Secret files it names (in env values and their URLs'
    queries, args, probe commands): least privilege, so the API tokens reach the gateway alone. Every file it names
    under a Secret mount is one the mount holds, from a key of a Secret the overlay makes; Secret mounts are
    read-only, their files readable by the pod's user and group only (no write bits, nothing for others)."""
    bad = []
    for c in workload_containers(objs):
        who, files, names = f"{c.kind}/{c.name}", c.secret_files(objs), c.paths(objs)
        held = {f.path for f in files}
        bad += [f"{who}: names {p}, which its Secret mount does not hold" for p in sorted(names - held)
                if any(p.startswith(f.mount.rstrip("/") + "/") for f in files)]
        for f in files:
            keys = _secret_keys(objs, f.secret)
            if f.path not in names:
                bad.append(f"{who}: mounts {f.secret}/{f.key} at {f.path} but never uses it")
            if keys is None or f.key not in keys:
                bad.append(f"{who}: mounts {f.secret}/{f.key}, which nothing in the overlay makes")
            if f.mode & 0o227:
                bad.append(f"{who}: {f.path} has mode {f.mode:#o}: writable, or readable by other users")
            if not f.read_only:
                bad.append(f"{who}: mounts {f.path} writable")
    return bad


def pod_network(objs: list[Obj]) -> list[str]:
    """Servers bind every interface in a pod (the default, loopback, is unreachable from the kubelet and peers)."""
    return [f"Deployment/{n}: {env.HOST.name}={_pod_env(objs, n).get(env.HOST.name, env.HOST.default)}"
            for n in servers(objs) if _pod_env(objs, n).get(env.HOST.name, env.HOST.default) != "0.0.0.0"]


def drain(objs: list[Obj]) -> list[str]:
    """terminationGracePeriodSeconds covers the drain: preStop, then the stream worker's and gRPC's drains (each up
    to RALMSPEC_DRAIN_S), so a rolling update loses nothing in flight."""
    bad = []
    for name, c in servers(objs).items():
        drain_s = float(_pod_env(objs, name).get(env.DRAIN_S.name, env.DRAIN_S.default))
        pre = c.spec.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command", [])
        pre_s = float(pre[1]) if pre[:1] == ["sleep"] else 0.0
        grace = pod_spec(c.owner).get("terminationGracePeriodSeconds", 30)
        if grace < pre_s + 2 * drain_s:
            bad.append(f"Deployment/{name}: terminationGracePeriodSeconds {grace} < preStop {pre_s:.0f} + "
                       f"2 x drain {drain_s:.0f} s")
    return bad


def redis_url(objs: list[Obj]) -> list[str]:
    """Each server's RALMSPEC_REDIS_URL names the Redis Service and port, with the password Redis requires, and
    speaks what Redis serves on that port: rediss:// verifying it with a CA where Redis serves TLS (with a client
    certificate where Redis requires one), redis:// where it serves plaintext."""
    redis = named(objs, "StatefulSet", "redis")
    labels = redis["spec"]["template"]["metadata"]["labels"]
    svc = [s for s in of_kind(objs, "Service") if s["spec"].get("selector", {}).items() <= labels.items()
           and s["spec"].get("selector")]
    password = redis_password(objs)
    tls, mutual = redis_tls(objs)
    bad = []
    for name in servers(objs):
        url = urlsplit(_pod_env(objs, name).get(env.REDIS_URL.name, ""))
        if not any(url.hostname == s["metadata"]["name"] and url.port in [p["port"] for p in s["spec"]["ports"]]
                   for s in svc):
            bad.append(f"Deployment/{name}: Redis URL {url.hostname}:{url.port} is not the Redis Service")
        if url.password != password:
            bad.append(f"Deployment/{name}: the Redis URL's password is not the one Redis requires")
        query = parse_qs(url.query)
        want = {"ssl_ca_certs", *(["ssl_certfile", "ssl_keyfile"] if mutual else [])} if tls else set()
        if url.scheme != ("rediss" if tls else "redis") or not want <= query.keys():
            bad.append(f"Deployment/{name}: a {url.scheme}:// URL with {sorted(query)}, Redis serves "
                       f"{'TLS' if tls else 'plaintext'}" + (f", which needs {sorted(want)}" if want else ""))
    return bad


def _redis_args(objs: list[Obj]) -> dict[str, str]:
    """redis-server's options as the StatefulSet gives them (the last of a repeated one wins, as in Redis)."""
    redis = pod_spec(named(objs, "StatefulSet", "redis"))["containers"][0]
    args = [str(a) for a in [*redis.get("command", [])[1:], *redis.get("args", [])]]
    return {a[2:]: v for a, v in zip(args, [*args[1:], ""]) if a.startswith("--")}


def redis_tls(objs: list[Obj]) -> tuple[bool, bool]:
    """(whether Redis serves TLS on the port its Service targets, whether it requires client certificates there)."""
    opts = _redis_args(objs)
    redis = pod_spec(named(objs, "StatefulSet", "redis"))["containers"][0]
    target = Container(named(objs, "StatefulSet", "redis"), redis).port(
        named(objs, "Service", "redis")["spec"]["ports"][0]["targetPort"])
    tls = opts.get("tls-port") == str(target)
    if not tls and opts.get("port", "6379") != str(target):
        raise LookupError(f"Redis serves neither plaintext nor TLS on its Service's port {target}")
    return tls, tls and opts.get("tls-auth-clients", "yes") != "no"  # Redis requires them by default


def redis_password(objs: list[Obj]) -> str:
    """The password the Redis container requires (--requirepass, expanded from its env)."""
    redis = pod_spec(named(objs, "StatefulSet", "redis"))["containers"][0]
    args = [*redis.get("command", []), *redis.get("args", [])]
    value = str(args[args.index("--requirepass") + 1])
    for e in redis.get("env", []):
        ref = e.get("valueFrom", {}).get("secretKeyRef")
        if ref and value == f"$({e['name']})":
            return data_of(named(objs, "Secret", ref["name"]))[ref["key"]]
    return value


def keda(objs: list[Obj]) -> list[str]:
    """Every stream-consuming service has a ScaledObject whose redis-streams trigger names its stream and consumer
    group (services/common/contracts.py), on the Redis Service, authenticated, over TLS exactly where Redis serves it
    (KEDA's `enableTLS`, with the CA and, where Redis requires one, a client certificate); no trigger names any other
    stream."""
    bad = []
    scaled = of_kind(objs, "ScaledObject")
    if not scaled:
        return bad  # an overlay without KEDA (cpu-hpa)
    by_target = {so["spec"]["scaleTargetRef"]["name"]: so for so in scaled}
    tls, mutual = redis_tls(objs)
    want = {"password", *(["ca"] if tls else []), *(["cert", "key"] if mutual else [])}  # KEDA's auth parameters
    srv = servers(objs)
    auths = {a["metadata"]["name"] for a in of_kind(objs, "TriggerAuthentication")}
    for name, (stream, group) in CONSUMERS.items():
        so = by_target.get(name)
        if so is None:
            bad.append(f"{name}: consumes {stream} but has no ScaledObject")
            continue
        if srv.get(name) is None or srv[name].served != name:
            bad.append(f"ScaledObject/{so['metadata']['name']}: its target does not serve {name}")
        triggers = [t for t in so["spec"]["triggers"] if t["type"] == "redis-streams"]
        if not triggers:
            bad.append(f"ScaledObject/{so['metadata']['name']}: no redis-streams trigger")
        for t in triggers:
            m = t["metadata"]
            if (m.get("stream"), m.get("consumerGroup")) != (stream, group):
                bad.append(f"ScaledObject/{so['metadata']['name']}: trigger reads {m.get('stream')}/"
                           f"{m.get('consumerGroup')}, {name} consumes {stream}/{group}")
            if not {"lagCount", "pendingEntriesCount"} & m.keys():
                bad.append(f"ScaledObject/{so['metadata']['name']}: scales on neither lag nor pending entries")
            host = m.get("address", "").split(":")[0].split(".")[0]
            if host not in [s["metadata"]["name"] for s in of_kind(objs, "Service")]:
                bad.append(f"ScaledObject/{so['metadata']['name']}: address {m.get('address')} is no Service")
            if t.get("authenticationRef", {}).get("name") not in auths:
                bad.append(f"ScaledObject/{so['metadata']['name']}: no TriggerAuthentication for Redis")
                continue
            ref = named(objs, "TriggerAuthentication", t["authenticationRef"]["name"])
            params = {r["parameter"] for r in ref["spec"].get("secretTargetRef", [])}
            if m.get("enableTLS", "false") != str(tls).lower() or not want <= params:
                bad.append(f"ScaledObject/{so['metadata']['name']}: enableTLS {m.get('enableTLS', 'false')}, "
                           f"authentication {sorted(params)}; Redis serves {'TLS' if tls else 'plaintext'}"
                           + (f", which needs {sorted(want)}" if want else ""))
    for so in scaled:
        target = so["spec"]["scaleTargetRef"]["name"]
        if target not in CONSUMERS and any(t["type"] == "redis-streams" for t in so["spec"]["triggers"]):
            bad.append(f"ScaledObject/{so['metadata']['name']}: {target} consumes no stream")
    return bad


def metrics_port(objs: list[Obj]) -> list[str]:
    """Each server's Prometheus port (RALMSPEC_METRICS_PORT, not 0) is a containerPort named `metrics`, its pod
    template's prometheus.io annotations name that port and /metrics, a NetworkPolicy lets scrapers reach it, and a
    PodMonitor (when the overlay has one) selects every server and scrapes the `metrics` port's /metrics."""
    bad = []
    monitors = of_kind(objs, "PodMonitor")
    for name, c in servers(objs).items():
        port = int(_pod_env(objs, name).get(env.METRICS_PORT.name, env.METRICS_PORT.default))
        if port == 0:
            bad.append(f"Deployment/{name}: serves metrics on a random port ({env.METRICS_PORT.name}=0)")
            continue
        named_port = [p for p in c.spec.get("ports", []) if p.get("name") == "metrics"]
        if [p["containerPort"] for p in named_port] != [port]:
            bad.append(f"Deployment/{name}: serves metrics on {port}, its `metrics` containerPort is {named_port}")
        template = c.owner["spec"]["template"]["metadata"]
        notes = template.get("annotations", {})
        want = {"prometheus.io/scrape": "true", "prometheus.io/port": str(port), "prometheus.io/path": "/metrics"}
        if {k: notes.get(k) for k in want} != want:
            bad.append(f"Deployment/{name}: pod annotations {notes}, want {want}")
        labels = template["labels"]
        if not any(selects(p["spec"]["podSelector"], labels) and any(
                q.get("port") in ("metrics", port) for rule in p["spec"].get("ingress", []) if "from" not in rule
                for q in rule.get("ports", [])) for p in of_kind(objs, "NetworkPolicy")):
            bad.append(f"Deployment/{name}: no NetworkPolicy admits scrapers to its metrics port")
        for m in monitors:
            ends = m["spec"]["podMetricsEndpoints"]
            if not selects(m["spec"]["selector"], labels):
                bad.append(f"PodMonitor/{m['metadata']['name']}: does not select {name}'s pods")
            elif not any(e.get("port") == "metrics" and e.get("path", "/metrics") == "/metrics" for e in ends):
                bad.append(f"PodMonitor/{m['metadata']['name']}: scrapes {ends}, not {name}'s metrics port")
    return bad


def selects(selector: Obj, labels: dict[str, str]) -> bool:
    """Whether a label selector (matchLabels, matchExpressions) matches `labels`."""
    if not selector.get("matchLabels", {}).items() <= labels.items():
        return False
    for e in selector.get("matchExpressions", []):
        has, value = e["key"] in labels, labels.get(e["key"])
        ok = {"In": has and value in e.get("values", []), "NotIn": not has or value not in e.get("values", []),
              "Exists": has, "DoesNotExist": not has}[e["operator"]]
        if not ok:
            return False
    return True


def one_user(objs: list[Obj]) -> list[str]:
    """Every ralmspec pod (the services and the assets Job) runs as one non-root user: the Job writes some assets
    owner-only (the converted model is 0600), and the services read them from the shared volume."""
    users: dict[str, tuple[object, object]] = {}
    for c in containers(objs):
        pod = pod_spec(c.owner).get("securityContext", {})
        own = c.spec.get("securityContext", {})
        users[f"{c.kind}/{c.name}"] = (own.get("runAsUser", pod.get("runAsUser")),
                                       own.get("runAsNonRoot", pod.get("runAsNonRoot")))
    bad = [f"{w}: runs as root or an unset user" for w, (uid, non_root) in users.items()
           if uid in (None, 0) or non_root is not True]
    if len({uid for uid, _ in users.values()}) > 1:
        bad.append(f"ralmspec pods run as different users: {users}")
    return bad


def tls_names(objs: list[Obj]) -> list[str]:
    """A certificate that servers or Redis serve (a Certificate whose Secret they mount) names every host its
    clients dial: each Service (short, .<namespace>.svc and the cluster FQDN), the Redis URLs' host and the KEDA
    scalers' address; and it is a client certificate too where mutual TLS asks for one."""
    served = {f.secret for c in workload_containers(objs) for f in c.secret_files(objs)}
    certs = [c for c in of_kind(objs, "Certificate") if c["spec"]["secretName"] in served]
    hosts = set()
    for s in of_kind(objs, "Service"):
        name, ns = s["metadata"]["name"], s["metadata"].get("namespace", "default")
        hosts |= {name, f"{name}.{ns}.svc", f"{name}.{ns}.svc.cluster.local"}
    hosts |= {urlsplit(_pod_env(objs, n).get(env.REDIS_URL.name, "")).hostname or "" for n in servers(objs)}
    hosts |= {t["metadata"]["address"].rpartition(":")[0] for so in of_kind(objs, "ScaledObject")
              for t in so["spec"]["triggers"] if "address" in t.get("metadata", {})}
    mutual = redis_tls(objs)[1] or any(_pod_env(objs, n).get(env.TLS_CLIENT_AUTH.name) == "1" for n in servers(objs))
    bad = []
    for c in certs:
        spec = c["spec"]
        bad += [f"Certificate/{c['metadata']['name']}: does not name {h}"
                for h in sorted(hosts - set(spec.get("dnsNames", [])))]
        # No extended key usage at all (cert-manager's default usages): the certificate serves any purpose.
        extended = set(spec.get("usages", [])) & EXTENDED_USAGES
        for usage in ["server auth", *(["client auth"] if mutual else [])]:
            if extended and not {usage, "any"} & extended:
                bad.append(f"Certificate/{c['metadata']['name']}: its extended usages {sorted(extended)} lack {usage}")
    return bad


RULES: dict[str, Callable[[list[Obj]], list[str]]] = {
    "env_declared": env_declared, "commands": commands, "ports": ports, "probes": probes,
    "pod_network": pod_network, "drain": drain, "redis_url": redis_url, "keda": keda, "one_user": one_user,
    "metrics_port": metrics_port, "authentication": authentication, "secret_files": secret_files,
    "tls_names": tls_names,
}
