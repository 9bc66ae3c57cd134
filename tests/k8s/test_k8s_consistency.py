"""The manifests agree with the code (k8s_rules.py), and each rule fails when the manifests break it."""

from __future__ import annotations

import base64

import pytest
from k8s_manifests import OVERLAYS, broken, named, pod_spec, render, servers
from k8s_rules import RULES


@pytest.mark.parametrize("overlay", OVERLAYS)
@pytest.mark.parametrize("rule", RULES)
def test_rule_holds(overlay, rule):
    assert RULES[rule](render(overlay)) == []


def container(objs, name):
    return pod_spec(named(objs, "Deployment", name))["containers"][0]


def env_entry(objs, deployment, var):
    return next(e for e in container(objs, deployment)["env"] if e["name"] == var)


def volume(objs, deployment, name):
    return next(v for v in pod_spec(named(objs, "Deployment", deployment))["volumes"] if v["name"] == name)


def with_tls(objs):
    """Break the cpu-tls overlay instead of cpu."""
    objs[:] = broken(render("cpu-tls"))


def undeclared_env(objs):
    container(objs, "retriever")["env"].append({"name": "RALMSPEC_RETRIEVERS", "value": "exact"})


def unknown_subcommand(objs):
    container(objs, "verifier")["command"] = ["ralmspec", "server", "verifier"]


def bad_option(objs):
    container(objs, "lm")["args"] = ["--replicas", "2"]


def wrong_service(objs):
    container(objs, "datastore")["command"] = ["ralmspec", "serve", "retriever"]


def container_port_off(objs):
    container(objs, "gateway")["ports"][0]["containerPort"] = 8080


def service_target_off(objs):
    svc = named(objs, "Service", "retriever")
    svc["spec"]["ports"][0]["targetPort"] = 50052


def probe_port_off(objs):
    container(objs, "lm")["readinessProbe"]["grpc"]["port"] = 50052


def probe_missing(objs):
    del container(objs, "lm")["startupProbe"]


def probe_not_grpc(objs):
    container(objs, "verifier")["livenessProbe"] = {"tcpSocket": {"port": 50051}}


def grpc_probe_on_tls_port(objs):
    with_tls(objs)
    container(objs, "gateway")["readinessProbe"] = {"grpc": {"port": 50051}}


def tls_probe_under_mutual_tls(objs):
    with_tls(objs)
    container(objs, "lm")["livenessProbe"] = {"grpc": {"port": 50051, "mode": "TLS"}}


def auth_off(objs):
    named(objs, "ConfigMap", "ralmspec-config")["data"]["RALMSPEC_AUTH"] = "off"


def gateway_without_api_tokens(objs):
    container(objs, "gateway")["env"].remove(env_entry(objs, "gateway", "RALMSPEC_API_TOKENS_FILE"))


def token_file_not_mounted(objs):
    env_entry(objs, "lm", "RALMSPEC_CLUSTER_TOKEN_FILE")["value"] = "/etc/ralmspec/cluster-token"


def short_token(objs):
    named(objs, "Secret", "ralmspec-auth")["data"]["cluster-token"] = base64.b64encode(b"secret\n").decode()


def api_tokens_in_lm(objs):
    volume(objs, "lm", "auth")["secret"]["items"].append({"key": "api-tokens", "path": "api-tokens"})


def secret_world_readable(objs):
    volume(objs, "gateway", "auth")["secret"]["defaultMode"] = 0o644


def secret_mount_writable(objs):
    next(m for m in container(objs, "verifier")["volumeMounts"] if m["name"] == "auth")["readOnly"] = False


def named_file_not_mounted(objs):
    with_tls(objs)
    items = volume(objs, "retriever", "tls")["secret"]["items"]
    items.remove(next(i for i in items if i["key"] == "ca.crt"))  # its Redis URL's ssl_ca_certs


def secret_nobody_makes(objs):
    with_tls(objs)
    objs.remove(named(objs, "Certificate", "ralmspec-tls"))


def loopback_host(objs):
    named(objs, "ConfigMap", "ralmspec-config")["data"]["RALMSPEC_HOST"] = "127.0.0.1"


def short_grace(objs):
    pod_spec(named(objs, "Deployment", "gateway"))["terminationGracePeriodSeconds"] = 30


def redis_host_off(objs):
    env_entry(objs, "lm", "RALMSPEC_REDIS_URL")["value"] = "redis://:$(RALMSPEC_REDIS_PASSWORD)@redis-master:6379/0"


def redis_password_off(objs):
    env_entry(objs, "verifier", "RALMSPEC_REDIS_URL")["value"] = "redis://redis:6379/0"


def plaintext_url_to_tls_redis(objs):
    with_tls(objs)
    env_entry(objs, "lm", "RALMSPEC_REDIS_URL")["value"] = "redis://:$(RALMSPEC_REDIS_PASSWORD)@redis:6379/0"


def redis_url_without_client_certificate(objs):
    with_tls(objs)
    url = env_entry(objs, "datastore", "RALMSPEC_REDIS_URL")
    url["value"] = url["value"].partition("&")[0]  # ssl_ca_certs only


def keda_wrong_stream(objs):
    named(objs, "ScaledObject", "retriever")["spec"]["triggers"][0]["metadata"]["stream"] = "ralmspec:verifier"


def keda_wrong_group(objs):
    named(objs, "ScaledObject", "lm")["spec"]["triggers"][0]["metadata"]["consumerGroup"] = "lm"


def keda_missing(objs):
    objs.remove(named(objs, "ScaledObject", "datastore"))


def keda_plaintext_to_tls_redis(objs):
    with_tls(objs)
    del named(objs, "ScaledObject", "retriever")["spec"]["triggers"][0]["metadata"]["enableTLS"]


def keda_without_client_certificate(objs):
    with_tls(objs)
    refs = named(objs, "TriggerAuthentication", "ralmspec-redis")["spec"]["secretTargetRef"]
    refs.remove(next(r for r in refs if r["parameter"] == "cert"))


def certificate_misses_redis(objs):
    with_tls(objs)
    named(objs, "Certificate", "ralmspec-tls")["spec"]["dnsNames"].remove("redis")


def server_only_certificate(objs):
    with_tls(objs)
    named(objs, "Certificate", "ralmspec-tls")["spec"]["usages"] = ["digital signature", "server auth"]


def job_user_differs(objs):
    pod_spec(named(objs, "Job", "ralmspec-assets"))["securityContext"]["runAsUser"] = 10002


def root_container(objs):
    container(objs, "gateway")["securityContext"]["runAsUser"] = 0


def metrics_port_undeclared(objs):
    ports = container(objs, "retriever")["ports"]
    ports.remove(next(p for p in ports if p["name"] == "metrics"))


def metrics_port_random(objs):
    named(objs, "ConfigMap", "ralmspec-config")["data"]["RALMSPEC_METRICS_PORT"] = "0"


def scrape_annotation_off(objs):
    named(objs, "Deployment", "lm")["spec"]["template"]["metadata"]["annotations"]["prometheus.io/port"] = "9090"


def scrape_blocked(objs):
    objs.remove(named(objs, "NetworkPolicy", "metrics-scrape"))


def monitor_wrong_port(objs):
    objs.append(named(render("cpu-monitoring"), "PodMonitor", "ralmspec"))
    objs[-1]["spec"]["podMetricsEndpoints"][0]["port"] = "grpc"


def monitor_misses_a_service(objs):
    objs.append(named(render("cpu-monitoring"), "PodMonitor", "ralmspec"))
    objs[-1]["spec"]["selector"]["matchExpressions"][0]["values"].remove("verifier")


BREAKS = {
    "env_declared": [undeclared_env],
    "commands": [unknown_subcommand, bad_option, wrong_service],
    "ports": [container_port_off, service_target_off],
    "probes": [probe_port_off, probe_missing, probe_not_grpc, grpc_probe_on_tls_port, tls_probe_under_mutual_tls],
    "pod_network": [loopback_host],
    "drain": [short_grace],
    "redis_url": [redis_host_off, redis_password_off, plaintext_url_to_tls_redis, redis_url_without_client_certificate],
    "keda": [keda_wrong_stream, keda_wrong_group, keda_missing, keda_plaintext_to_tls_redis,
             keda_without_client_certificate],
    "one_user": [job_user_differs, root_container],
    "metrics_port": [metrics_port_undeclared, metrics_port_random, scrape_annotation_off, scrape_blocked,
                     monitor_wrong_port, monitor_misses_a_service],
    "authentication": [auth_off, gateway_without_api_tokens, token_file_not_mounted, short_token],
    "secret_files": [api_tokens_in_lm, secret_world_readable, secret_mount_writable, named_file_not_mounted,
                     secret_nobody_makes],
    "tls_names": [certificate_misses_redis, server_only_certificate],
}


def test_every_rule_has_a_break():
    assert set(BREAKS) == set(RULES)


@pytest.mark.parametrize("rule,brk", [(r, b) for r, bs in BREAKS.items() for b in bs],
                         ids=lambda x: x if isinstance(x, str) else x.__name__)
def test_rule_fails_when_broken(rule, brk):
    objs = broken(render("cpu"))
    brk(objs)
    violations = RULES[rule](objs)
    assert violations, f"{rule} did not notice {brk.__name__}"
    print(f"{rule} / {brk.__name__}: {violations}")


def test_servers_are_the_five_services():
    assert sorted(servers(render("cpu"))) == ["datastore", "gateway", "lm", "retriever", "verifier"]
