"""Every RALMSPEC_* environment variable, declared once with its type and meaning.

Services read these once at start-up into their frozen settings dataclass; nothing else reads os.environ.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class EnvVar:
    name: str
    default: str
    help: str

    def get(self) -> str:
        return os.environ.get(self.name, self.default)


DATA = EnvVar("RALMSPEC_DATA", "./var", "data dir: assets cache, corpora, indexes, converted models")
PROFILE = EnvVar("RALMSPEC_PROFILE", "default", "asset profile: tiny | default | large")
MODEL = EnvVar("RALMSPEC_MODEL", "smollm2-135m", "language model key (see services/lm/model.py MODELS)")
DEVICE = EnvVar("RALMSPEC_DEVICE", "auto", "torch device: auto (cuda when present) | cpu | cuda")
DTYPE = EnvVar("RALMSPEC_DTYPE", "float32", "LM dtype: float32 | bfloat16 | float16")
THREADS = EnvVar("RALMSPEC_THREADS", "0", "torch intra-op threads; 0 = one for the LM (its kernels are "
                 "batch-invariant only on one thread), torch's default elsewhere")
BATCH_INVARIANT = EnvVar("RALMSPEC_BATCH_INVARIANT", "1",
                         "1: an LM row's result never depends on its batch-mates (fixed kernel classes); 0: the BLAS "
                         "library's own choice, faster for one request (a lone decode 100-130 -> ~65 ms measured on an "
                         "AMD EPYC) but tokens may differ in float noise with the batch")
REDIS_URL = EnvVar("RALMSPEC_REDIS_URL", "", "Redis URL (redis://, rediss:// for TLS with its CA as "
                   "?ssl_ca_certs=<path>, redis+sentinel://), with its password; empty = `ralmspec up` starts a local "
                   "redis-server with a generated password")
REDIS_PASSWORD = EnvVar("RALMSPEC_REDIS_PASSWORD", "",
                        "Kubernetes only: the Redis Secret's password, which the manifests splice into "
                        "RALMSPEC_REDIS_URL ($(RALMSPEC_REDIS_PASSWORD)); the code reads only the URL")
HOST = EnvVar("RALMSPEC_HOST", "127.0.0.1", "address a service's gRPC server binds")
PORT = EnvVar("RALMSPEC_PORT", "0", "a service's gRPC port; 0 = a free one (printed at start)")
METRICS_PORT = EnvVar("RALMSPEC_METRICS_PORT", "0",
                      "a service's Prometheus metrics port (HTTP /metrics, on RALMSPEC_HOST); 0 = a free one (printed "
                      "at start: the ready line's metrics=)")
REPLICA = EnvVar("RALMSPEC_REPLICA", "", "this replica's consumer name; empty = <hostname>-<pid>")
CONCURRENCY = EnvVar("RALMSPEC_CONCURRENCY", "8", "stream entries a replica handles at once")
CLAIM_IDLE_MS = EnvVar("RALMSPEC_CLAIM_IDLE_MS", "30000", "reclaim a dead consumer's entries after this idle time")
MAXLEN = EnvVar("RALMSPEC_MAXLEN", "10000", "approximate length streams are trimmed to")
CALL_TIMEOUT_S = EnvVar("RALMSPEC_CALL_TIMEOUT_S", "120", "deadline of a call to another service")
DRAIN_S = EnvVar("RALMSPEC_DRAIN_S", "30", "on SIGTERM, how long in-flight work may take to finish")
MAX_DELIVERIES = EnvVar("RALMSPEC_MAX_DELIVERIES", "3",
                        "a stream entry whose replica crashed (or could not reply) on this many deliveries is poison: "
                        "moved to the dead-letter stream <stream>:dead, its caller answered INTERNAL")
LM_SESSION_IDLE_S = EnvVar("RALMSPEC_LM_SESSION_IDLE_S", "600",
                           "an LM session (its KV cache) unused this long expires: its gateway died without closing it")
LOG = EnvVar("RALMSPEC_LOG", "", "log level: DEBUG | INFO | WARNING | ERROR; empty = WARNING (CLI), INFO (services)")
LOG_FORMAT = EnvVar("RALMSPEC_LOG_FORMAT", "",
                   "log lines: json (one object a line: time, level, service, replica, logger, message, request_id) | "
                   "text; empty = json for services (their logs go to files and collectors), text for the CLI")
OTEL_ENDPOINT = EnvVar("OTEL_EXPORTER_OTLP_ENDPOINT", "",
                       "OpenTelemetry's own variable (read by its exporter): where spans go, e.g. http://collector:4317")
OTEL = EnvVar("RALMSPEC_OTEL", "",
              "1: export OpenTelemetry spans (needs the `otel` extra) to OTEL_EXPORTER_OTLP_ENDPOINT (OTLP/gRPC, the "
              "exporter's default localhost:4317); empty: on exactly when OTEL_EXPORTER_OTLP_ENDPOINT is set; 0: off")
MAX_BATCH_SEQS = EnvVar("RALMSPEC_MAX_BATCH_SEQS", "16",
                        "LM continuous batching: sequences in one forward; 1 = one session's step at a time")
MAX_BATCH_TOKENS = EnvVar("RALMSPEC_MAX_BATCH_TOKENS", "512", "LM continuous batching: tokens in one forward")
PREFILL_CHUNK = EnvVar("RALMSPEC_PREFILL_CHUNK", "128",
                       "LM: a prefill longer than this is fed in chunks of this many tokens, between other decodes")
KV_BUDGET_TOKENS = EnvVar("RALMSPEC_KV_BUDGET_TOKENS", "65536",
                          "LM: tokens all sessions' KV caches may hold on one replica (SmolLM2: 46 KB each); past it "
                          "RESOURCE_EXHAUSTED")
PREFIX_CACHE_TOKENS = EnvVar("RALMSPEC_PREFIX_CACHE_TOKENS", "8192",
                             "LM: tokens of shared document prefixes (BOS + a retrieved document) one replica keeps "
                             "across sessions, least recently used first out (SmolLM2: 46 KB a token); 0 = off")
MAX_QUEUE = EnvVar("RALMSPEC_MAX_QUEUE", "256",
                   "calls a replica (LM scheduler, gateway) holds waiting beyond those it runs; past it "
                   "RESOURCE_EXHAUSTED")
COALESCE_MS = EnvVar("RALMSPEC_COALESCE_MS", "2",
                     "cross-request batching in the retriever: > 0 batches the searches that find its threads busy "
                     "(no timer); 0 = off")
VERIFY_WINDOW_MS = EnvVar("RALMSPEC_VERIFY_WINDOW_MS", "0",
                          "the verifier merges rounds of different requests arriving within this window into one "
                          "retriever call; 0 = off (measured: a 2 ms window loses on 2 CPU cores)")
SPEC_PAUSE_AT = EnvVar("RALMSPEC_SPEC_PAUSE_AT", "2",
                       "gateway: speculation pauses (plain steps, the baseline's) while this many requests or more "
                       "run; 0 = never (vLLM's speculative_disable_by_batch_size)")
AUTH = EnvVar("RALMSPEC_AUTH", "on",
              "on: every gRPC call needs a bearer token (gateway: an API token, other services: the cluster token; "
              "health and reflection stay open); off: no authentication (say so explicitly)")
API_TOKENS_FILE = EnvVar("RALMSPEC_API_TOKENS_FILE", "",
                         "gateway: file of the bearer tokens clients may use, one a line (# comments); a Secret mount")
CLUSTER_TOKEN_FILE = EnvVar("RALMSPEC_CLUSTER_TOKEN_FILE", "",
                            "file holding the cluster token: the only token internal services accept, and the one "
                            "ralmspec's own tools send them")
TLS_CERT = EnvVar("RALMSPEC_TLS_CERT", "", "PEM certificate chain the gRPC server serves (empty: plaintext gRPC)")
TLS_KEY = EnvVar("RALMSPEC_TLS_KEY", "", "PEM private key of RALMSPEC_TLS_CERT")
TLS_CA = EnvVar("RALMSPEC_TLS_CA", "", "PEM CA bundle that verifies client certificates (with "
                "RALMSPEC_TLS_CLIENT_AUTH=1)")
TLS_CLIENT_AUTH = EnvVar("RALMSPEC_TLS_CLIENT_AUTH", "0",
                         "1: mutual TLS, the gRPC server refuses clients without a certificate RALMSPEC_TLS_CA signed")
PRESET = EnvVar("RALMSPEC_PRESET", "+PSA", "the gateway's default RaLMSpec switches: ralmspec | +P | +S | +A | +PSA")

ALL = [DATA, PROFILE, MODEL, DEVICE, DTYPE, THREADS, BATCH_INVARIANT, REDIS_URL, HOST, PORT, METRICS_PORT, REPLICA,
       CONCURRENCY, CLAIM_IDLE_MS, MAX_DELIVERIES, MAXLEN, CALL_TIMEOUT_S, DRAIN_S, LM_SESSION_IDLE_S, MAX_BATCH_SEQS,
       MAX_BATCH_TOKENS, PREFILL_CHUNK, KV_BUDGET_TOKENS, PREFIX_CACHE_TOKENS, MAX_QUEUE, COALESCE_MS,
       VERIFY_WINDOW_MS, PRESET, LOG, LOG_FORMAT, OTEL, OTEL_ENDPOINT,
       REDIS_PASSWORD, AUTH, API_TOKENS_FILE, CLUSTER_TOKEN_FILE, TLS_CERT, TLS_KEY, TLS_CA, TLS_CLIENT_AUTH]


def data_dir() -> Path:
    return Path(DATA.get()).expanduser().resolve()
