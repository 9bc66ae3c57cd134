"""The Dockerfile, checked without a Docker engine: it installs through the Makefile's own recipe (so the image
and `make install` cannot drift), its final stage holds no build tools and runs as a non-root user, and the
build context leaves out the venv, the assets and git."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BUILD_TOOLS = {"make", "gcc", "g++", "build-essential", "python3.11-dev", "python3.11-venv", "git", "cmake"}


def stages() -> dict[str, list[str]]:
    """Stage name -> its instructions (continuation lines joined, comments dropped)."""
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    out: dict[str, list[str]] = {}
    current = "global"
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        m = re.match(r"FROM\s+(\S+)(?:\s+AS\s+(\S+))?", line, re.I)
        if m:
            current = m[2] or m[1]
            out[current] = [line]
        else:
            out.setdefault(current, []).append(line)
    return out


def make_dry_run(target: str, **vars: str) -> list[str]:
    """The commands `make` would run for `target` (forced: every recipe, as on a fresh clone)."""
    args = ["make", "-n", "-B", "--no-print-directory", target, *[f"{k}={v}" for k, v in vars.items()]]
    out = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return [line.strip() for line in out.splitlines() if "pip install" in line or "protoc" in line]


def test_the_image_installs_through_the_makefile():
    text = (ROOT / "Dockerfile").read_text()
    builder = " ".join(stages()["builder"])
    assert "make python-deps" in builder and "make -s runtime-apt" in builder
    assert "pip install" not in text, "the Dockerfile must not carry its own pip steps: call the Makefile"
    assert "requirements" not in text


def test_make_python_deps_is_the_install_recipe():
    """`python-deps` (the image's step) runs exactly `install`'s pip and protoc commands; DEV= drops the dev
    extra and TORCH_INDEX picks torch's wheel index, nothing else changes."""
    install = make_dry_run("install", VENV="/tmp/v")
    image = make_dry_run("python-deps", VENV="/tmp/v", DEV="", TORCH_INDEX="https://example.invalid/cpu")
    assert len(install) == len(image) >= 5
    assert [c.replace("'.[cpu,dev]'", "'.[cpu]'") for c in install] == \
        [c.replace(" --index-url https://example.invalid/cpu", "") for c in image]
    assert any("torch==2.13.0 --index-url https://example.invalid/cpu" in c for c in image)
    assert make_dry_run("python-deps", VENV="/tmp/v", EXTRA="gpu", DEV="")[2].endswith("-e '.[gpu]'")


def test_runtime_packages_come_from_the_makefile():
    runtime = " ".join(stages()["runtime"])
    assert "COPY --from=builder /app/.runtime-apt" in runtime and "$(cat /tmp/runtime-apt)" in runtime
    apt = subprocess.run(["make", "-s", "runtime-apt"], cwd=ROOT, capture_output=True, text=True, check=True)
    java = re.search(r"openjdk-(\d+)-jre-headless", apt.stdout)
    dev_java = re.search(r"openjdk-(\d+)-jdk-headless", (ROOT / "Makefile").read_text())
    assert java and dev_java and java[1] == dev_java[1], "the image's Java is not the one `make install` gives"


@pytest.mark.parametrize("stage", ["runtime"])
def test_final_stage_has_no_build_tools_and_no_root(stage):
    lines = stages()[stage]
    installs = " ".join(x for x in lines if "apt-get install" in x)
    words = set(re.findall(r"[\w.+-]+", installs))
    assert not words & BUILD_TOOLS
    users = [x.split()[1] for x in lines if x.startswith("USER")]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert list(stages())[-1] == stage, "the runtime stage must be the last (the default build target)"
    assert any(x.startswith("COPY --from=builder /app /app") for x in lines)


def test_cpu_and_gpu_variants():
    s = stages()
    assert s["global"][0] == "ARG VARIANT=cpu"
    assert s["base-cpu"][0].startswith("FROM debian:bookworm")
    assert re.match(r"FROM nvidia/cuda:[\d.]+-(cudnn-)?runtime-", s["base-gpu"][0])
    assert s["builder"][0] == "FROM base-${VARIANT} AS builder" and s["runtime"][0] == "FROM base-${VARIANT} AS runtime"
    assert "EXTRA=${VARIANT}" in " ".join(s["builder"])  # the Makefile's faiss-cpu / faiss-gpu switch


def test_build_context_leaves_out_local_state():
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".git", ".venv", "var"} <= set(ignored)
