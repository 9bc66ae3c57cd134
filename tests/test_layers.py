"""Layering: a lower layer never imports a higher one (every import under services/, function-level and
TYPE_CHECKING ones included), and the light modules (codecs, value types, the verifier) load no model or index."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

SERVICES = Path(__file__).resolve().parents[1] / "services"

# The layer of each package under services/ (a module may import its own layer and below).
LAYERS = {
    "common": 0,  # transport, gRPC, settings, errors, shared codecs: imports nothing else of services/
    "lm": 1,  # engines: model, decoding, KNN-LM mixing
    "retriever": 1,  # engines: passage retrievers, KNN-LM datastore and its search
    "datastore": 2,  # speculation caches, REST drafts: read through the retrievers
    "verifier": 3,
    "gateway": 4,
}
ENTRY_POINTS = {"services", "services.cli", "services.serve", "services.up", "services.demo", "services.assets"}
ENTRY_LAYER = 5
LAYER_1 = ("lm", "retriever")
# Edges between the two layer-1 packages, each with its reason.
LAYER_1_EDGES = {
    ("services.lm.types", "services.retriever.types"):
        "KnnLmConfig validates its search half (k, index) with the retriever's KNN rules, the ones the retriever "
        "and datastore services apply: one rule, one message",
}
# What the datastore may import of the LM: its light value types and their codecs (no model).
LM_LIGHT = {"services.lm.types", "services.lm.wire"}
HEAVY = ("torch", "faiss", "transformers", "pyserini", "jnius")
LIGHT_MODULES = ["services.common.wire", "services.verifier.service", "services.verifier.verification",
                 "services.retriever.types", "services.retriever.wire", "services.lm.types", "services.lm.wire",
                 "services.datastore.wire"]


def module_name(path: Path) -> str:
    parts = path.relative_to(SERVICES.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_module(name: str) -> bool:
    rel = Path(*name.split("."))
    return (SERVICES.parent / rel).with_suffix(".py").exists() or (SERVICES.parent / rel / "__init__.py").exists()


def imports_of(path: Path) -> list[tuple[str, int]]:
    """(imported services module, line) for every import in the file, at any depth."""
    tree = ast.parse(path.read_text(), str(path))
    package = module_name(path).rsplit(".", 1)[0] if path.name != "__init__.py" else module_name(path)
    out: list[tuple[str, int]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for a in node.names:  # `from services.retriever import knn_build` imports a module
                sub = f"{base}.{a.name}"
                out.append((sub if is_module(sub) else base, node.lineno))
    return sorted({(m, line) for m, line in out if m == "services" or m.startswith("services.")})


def layer_of(module: str) -> tuple[str, int]:
    """(package, layer) of a services module."""
    if module in ENTRY_POINTS:
        return "entry", ENTRY_LAYER
    package = module.split(".")[1]
    if package not in LAYERS:
        raise AssertionError(f"{module}: package services.{package} has no layer; add it to LAYERS in this test")
    return package, LAYERS[package]


def is_service_module(module: str) -> bool:
    return module.endswith(".service") and module.count(".") == 2


def violations() -> list[str]:
    found = []
    for path in sorted(SERVICES.rglob("*.py")):
        src = module_name(path)
        src_pkg, src_layer = layer_of(src)
        where = path.relative_to(SERVICES.parent)
        for dst, line in imports_of(path):
            if dst == "services":
                continue
            dst_pkg, dst_layer = layer_of(dst)
            edge = (f"{src} ({src_pkg}, layer {src_layer}) imports {dst} ({dst_pkg}, layer {dst_layer}) "
                    f"at {where}:{line}")
            if src_pkg == "common" and dst_pkg != "common":
                found.append(f"common imports outside common: {edge}")
            elif dst_layer > src_layer:
                found.append(f"higher layer: {edge}")
            elif src_pkg in LAYER_1 and dst_pkg in LAYER_1 and src_pkg != dst_pkg and (src, dst) not in LAYER_1_EDGES:
                found.append(f"layer-1 cross import (add it to LAYER_1_EDGES with a reason, or move the type): {edge}")
            elif src_pkg == "datastore" and dst_pkg == "lm" and dst not in LM_LIGHT:
                found.append(f"datastore imports more than the LM's light types {sorted(LM_LIGHT)}: {edge}")
            if is_service_module(dst) and src_layer != ENTRY_LAYER and dst != src:
                found.append(f"a service module is imported by a non-entry-point module: {edge}")
    return found


def test_no_module_imports_a_higher_layer():
    found = violations()
    order = " < ".join(f"{p} {n}" for p, n in sorted(LAYERS.items(), key=lambda kv: kv[1]))
    assert not found, f"layer violations (order: {order} < entry points {ENTRY_LAYER}):\n  " + "\n  ".join(found)


def test_the_walker_sees_function_level_and_relative_imports(tmp_path, monkeypatch):
    pkg = tmp_path / "services" / "common"
    pkg.mkdir(parents=True)
    (tmp_path / "services" / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (tmp_path / "services" / "gateway").mkdir()
    (tmp_path / "services" / "gateway" / "__init__.py").write_text("")
    (tmp_path / "services" / "gateway" / "api.py").write_text("")
    (pkg / "bad.py").write_text("def f():\n    from services.gateway import api\n\n\nfrom ..gateway import api\n")
    monkeypatch.setattr(sys.modules[__name__], "SERVICES", tmp_path / "services")
    assert imports_of(pkg / "bad.py") == [("services.gateway.api", 2), ("services.gateway.api", 5)]
    assert len(violations()) == 2 and all("common imports outside common" in v for v in violations())


@pytest.mark.parametrize("module", LIGHT_MODULES)
def test_light_modules_load_no_model_or_index(module):
    code = (f"import importlib, json, sys; importlib.import_module({module!r}); "
            f"print(json.dumps(sorted(m for m in {HEAVY!r} if m in sys.modules)))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         cwd=SERVICES.parent)
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout.strip().splitlines()[-1]) == [], f"importing {module} loads {run.stdout.strip()}"
