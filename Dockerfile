# One image for every service: `ralmspec serve <service>` picks the role, `ralmspec assets` fills the data volume.
#   CPU: docker build -t ralmspec:cpu .
#   GPU: docker build -t ralmspec:gpu --build-arg VARIANT=gpu .   (CUDA runtime base, faiss-gpu, torch's CUDA build)
# The Python install is the Makefile's own recipe (`make python-deps`), and the final stage's Debian packages are the
# Makefile's list (`make -s runtime-apt`): one source of truth, checked by tests/k8s/test_dockerfile.py.
# Assets are not baked in: they live on a volume mounted at RALMSPEC_DATA (k8s/base/assets-job.yaml builds them).
ARG VARIANT=cpu

# Bases. Both give Python 3.11 from apt (Debian 12's own; Ubuntu 22.04's universe package on the CUDA base).
FROM debian:bookworm-slim AS base-cpu
# PyTorch's CPU wheel index: the default PyPI torch is the CUDA build (gigabytes of unused libraries). A mirror (or
# empty, with a local CPU wheel in pip's find-links) can be given with --build-arg TORCH_INDEX=...
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV TORCH_INDEX=${TORCH_INDEX}

FROM nvidia/cuda:12.8.1-runtime-ubuntu22.04 AS base-gpu
# Empty: PyPI's torch, the CUDA 12 build.
ENV TORCH_INDEX=

# 1) builder: compilers, make and the venv; nothing of this stage but /app reaches the image.
FROM base-${VARIANT} AS builder
ARG VARIANT
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      python3.11 python3.11-venv python3.11-dev make g++ ca-certificates \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY . .
RUN make python-deps PYTHON=python3.11 EXTRA=${VARIANT} DEV= TORCH_INDEX=${TORCH_INDEX} \
 && make -s runtime-apt > /app/.runtime-apt \
 && rm -rf /root/.cache

# 2) runtime: Python, the Makefile's runtime packages, the built /app; no compilers, no make; a non-root user.
FROM base-${VARIANT} AS runtime
COPY --from=builder /app/.runtime-apt /tmp/runtime-apt
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      python3.11 ca-certificates $(cat /tmp/runtime-apt) \
 && rm -rf /var/lib/apt/lists/* /tmp/runtime-apt \
 && ln -s "$(dirname "$(dirname "$(readlink -f "$(command -v java)")")")" /usr/lib/jvm/default-runtime \
 && useradd --uid 10001 --user-group --no-create-home --home-dir /tmp ralmspec \
 && mkdir -p /data && chown 10001:10001 /data
# Same path as in the builder: the venv's scripts and the editable install point at /app. HOME=/tmp: pods mount the
# root filesystem read-only and /tmp as an emptyDir (where the JVM and library caches write). JAVA_HOME: pyjnius
# looks for javac to find Java unless it is set, and the runtime has a JRE only.
COPY --from=builder /app /app
ENV PATH=/app/.venv/bin:$PATH \
    HF_HUB_OFFLINE=1 \
    TOKENIZERS_PARALLELISM=false \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/tmp \
    JAVA_HOME=/usr/lib/jvm/default-runtime \
    RALMSPEC_DATA=/data \
    RALMSPEC_HOST=0.0.0.0
WORKDIR /app
USER 10001:10001
EXPOSE 50051
ENTRYPOINT ["ralmspec"]
CMD ["--help"]
