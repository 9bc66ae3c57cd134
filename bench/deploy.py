"""Deployment checks as a results file: every overlay rendered and validated, the rendered `cpu` Deployments run as
processes against `ralmspec up` (and the `cpu-tls` ones over TLS), and whether the image was built here.

    python -m bench.deploy            # writes bench/results/deploy.{json,md}
    python -m bench.deploy --no-run   # render and validate only (seconds)

The rendering, validation and process-running code is tests/k8s's (k8s_manifests.py, test_k8s_processes.py), so
the file reports exactly what `make test` checks.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

from bench.results_io import write

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "k8s"))
from k8s_manifests import K8S_VERSION, OVERLAYS, kubectl_version, render, validate_all  # noqa: E402

IMAGE = "ralmspec:0.1.0-cpu"


def manifests_as_processes() -> dict:
    """The tests' runs (test_k8s_processes.run_cpu_overlay, run_tls_overlay) plus the questions they asked."""
    from test_k8s_processes import QUESTIONS, run_cpu_overlay, run_tls_overlay

    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "cpu").mkdir()
        (Path(tmp) / "tls").mkdir()
        cpu, tls = run_cpu_overlay(Path(tmp) / "cpu"), run_tls_overlay(Path(tmp) / "tls")
    return {"questions": QUESTIONS, **cpu, "tls": {**tls, "identical": tls["tokens"] == cpu["tokens"]}}


def image_built() -> dict:
    """Whether an image of this Dockerfile is in a local store (buildah's or Docker's) on this machine."""
    for tool in ("buildah", "docker"):
        if not shutil.which(tool):
            continue
        repo = "{{.Name}}" if tool == "buildah" else "{{.Repository}}"
        out = subprocess.run([tool, *(["--storage-driver", "vfs"] if tool == "buildah" else []), "images", "--format",
                              repo + ":{{.Tag}} {{.ID}} {{.CreatedAt" + ("Raw" if tool == "buildah" else "") + "}}"],
                             capture_output=True, text=True)
        for line in out.stdout.splitlines():
            if line.split()[0].rsplit("/", 1)[-1] == IMAGE:
                return {"built": True, "tool": tool, "image": " ".join(line.split())}
    return {"built": False}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--no-run", action="store_true", help="skip the manifests-as-processes run")
    args = ap.parse_args()
    rows, errors_all = [], []
    for overlay in OVERLAYS:
        objs = render(overlay)
        validated, errors = validate_all(objs)
        errors_all += errors
        kinds = Counter(o["kind"] for o in objs)
        rows.append({"overlay": overlay, "objects": len(objs), "validated": validated, "errors": len(errors),
                     "kinds": ", ".join(f"{k} {n}" for k, n in sorted(kinds.items())),
                     "names": sorted(f"{o['kind']}/{o['metadata']['name']}" for o in objs)})
    run = None if args.no_run else manifests_as_processes()
    image = image_built()
    payload = {
        "objects": sum(r["objects"] for r in rows), "validated": sum(r["validated"] for r in rows),
        "errors": len(errors_all), "overlays": list(OVERLAYS), "k8s_version": K8S_VERSION,
        "manifest_run_identical": bool(run and run["identical"]),
        "manifest_run_tls_identical": bool(run and run["tls"]["identical"]), "image_built": image["built"],
        "kubectl": kubectl_version(), "error_messages": errors_all, "manifest_run": run, "image": image,
        "rows": rows,
    }
    notes = (f"Validated against Kubernetes {K8S_VERSION} (kubernetes-validate --strict) and the KEDA, Prometheus "
             f"Operator and cert-manager schema subsets; rendered with kubectl {payload['kubectl']}. "
             "Manifests as processes: "
             + (json.dumps({k: run[k] for k in ("identical", "scaled", "drain_s", "refused")}) + "; cpu-tls: "
                + json.dumps({k: run["tls"][k] for k in ("identical", "probes", "codes")}) if run else "not run") +
             f". Image: {json.dumps(image)}."
             + (" Built here by Debian 12's buildah 1.28 (no Docker engine) from a bookworm base made with debootstrap,"
                " --build-arg TORCH_INDEX= with the CPU torch wheel in the base's pip find-links; buildah 1.28 does not"
                " resolve `FROM base-${VARIANT}`, so that build substituted `base-cpu`."
                if image.get("tool") == "buildah" else ""))
    write("deploy", payload, ["overlay", "objects", "validated", "errors", "kinds"], "Kubernetes manifests", notes)


if __name__ == "__main__":
    main()
