"""The manifests agree with the code (k8s_rules.py), and each rule fails when the manifests break it."""

from __future__ import annotations

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


def loopback_host(objs):
    named(objs, "ConfigMap", "ralmspec-config")["data"]["RALMSPEC_HOST"] = "127.0.0.1"


def short_grace(objs):
    pod_spec(named(objs, "Deployment", "gateway"))["terminationGracePeriodSeconds"] = 30


def redis_host_off(objs):
    env_entry(objs, "lm", "RALMSPEC_REDIS_URL")["value"] = "redis://:$(RALMSPEC_REDIS_PASSWORD)@redis-master:6379/0"


def redis_password_off(objs):
    env_entry(objs, "verifier", "RALMSPEC_REDIS_URL")["value"] = "redis://redis:6379/0"


def keda_wrong_stream(objs):
    named(objs, "ScaledObject", "retriever")["spec"]["triggers"][0]["metadata"]["stream"] = "ralmspec:verifier"


def keda_wrong_group(objs):
    named(objs, "ScaledObject", "lm")["spec"]["triggers"][0]["metadata"]["consumerGroup"] = "lm"


def keda_missing(objs):
    objs.remove(named(objs, "ScaledObject", "datastore"))


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
    "probes": [probe_port_off, probe_missing, probe_not_grpc],
    "pod_network": [loopback_host],
    "drain": [short_grace],
    "redis_url": [redis_host_off, redis_password_off],
    "keda": [keda_wrong_stream, keda_wrong_group, keda_missing],
    "one_user": [job_user_differs, root_container],
    "metrics_port": [metrics_port_undeclared, metrics_port_random, scrape_annotation_off, scrape_blocked,
                     monitor_wrong_port, monitor_misses_a_service],
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
