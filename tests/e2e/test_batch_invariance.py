"""Batch invariance through the services: the same requests run one at a time and all at once (sharing the one LM
replica's batched forwards, the retriever's coalesced searches and the verifier's merged rounds) give the same
tokens: RaLM QA with each retriever (baseline and RaLMSpec +PSA), REST drafting, KNN-LM, and seeded sampling on
the LM service. A difference is accepted only at a certified near-tie (both runs' top-2 gaps < 1e-4), counted in
the run's summary; expected: none, since the LM's forward is bit-identical whatever its batch-mates."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pytest
from ralmspec.v1 import common_pb2 as cpb
from ralmspec.v1 import gateway_pb2 as pb
from ralmspec.v1 import gateway_pb2_grpc, lm_pb2, lm_pb2_grpc

from services.up import Cluster

pytestmark = pytest.mark.slow

REPLICAS = {"lm": 1, "retriever": 1, "datastore": 1, "verifier": 1, "gateway": 1}
KINDS = (cpb.RETRIEVER_KIND_EXACT, cpb.RETRIEVER_KIND_APPROX, cpb.RETRIEVER_KIND_SPARSE)


@dataclass
class Out:
    tokens: list[int]
    gaps: list[float]


@pytest.fixture(scope="module")
def cluster():
    c = Cluster("tiny", REPLICAS, extra_env={"RALMSPEC_MAX_BATCH_SEQS": "16", "RALMSPEC_CONCURRENCY": "16"}).start()
    yield c
    c.stop()


def requests(questions) -> list[pb.GenerateRequest]:
    out = []
    for i, kind in enumerate(KINDS):
        q = questions[2 + 5 * i].question
        out += [pb.GenerateRequest(question=q, retriever=kind, mode=pb.MODE_BASELINE_KV, max_new_tokens=12),
                pb.GenerateRequest(question=q, retriever=kind, max_new_tokens=12),  # RaLMSpec +PSA
                pb.GenerateRequest(prompt=f"{q} The answer is explained below.\n", retriever=kind, max_new_tokens=16,
                                   draft=cpb.DRAFT_SOURCE_BOTH, draft_budget=8)]
    prompt = f"{questions[4].question} The answer is explained below.\n"
    out += [pb.GenerateRequest(prompt=prompt, max_new_tokens=12, mode=pb.MODE_BASELINE_KV, knn=pb.Knn()),
            pb.GenerateRequest(prompt=prompt, max_new_tokens=12, knn=pb.Knn(k=64))]
    return out


def lm_stats(cluster) -> lm_pb2.StatsReply:
    with cluster.channel(cluster.addresses("lm")[0]) as ch:
        return lm_pb2_grpc.LmServiceStub(ch).Stats(lm_pb2.StatsRequest(), timeout=10)


def test_requests_alone_and_all_at_once_give_the_same_tokens(cluster, questions, same_tokens):
    reqs = requests(questions)
    with cluster.channel() as ch:
        stub = gateway_pb2_grpc.GatewayServiceStub(ch)

        def ask(r: pb.GenerateRequest) -> Out:
            reply = stub.Generate(r, timeout=600)
            return Out(list(reply.token_ids), list(reply.gaps))

        alone = [ask(r) for r in reqs]
        before = lm_stats(cluster)
        with ThreadPoolExecutor(len(reqs)) as pool:
            together = list(pool.map(ask, reqs))
        after = lm_stats(cluster)
    for i, (a, b) in enumerate(zip(alone, together)):
        assert a.tokens and len(a.gaps) == len(a.tokens)
        same_tokens(a, b, f"request {i} ({reqs[i].WhichOneof('input')}, retriever {reqs[i].retriever}) all at once")
    rows, forwards = after.rows - before.rows, after.forwards - before.forwards
    assert rows / forwards > 1.5  # the requests really shared forwards


def test_seeded_sampling_alone_and_batched(cluster, questions):
    """Sampled steps carry no gap certificate: with a seed they must be token-identical, batched or not."""
    with cluster.channel(cluster.addresses("lm")[0]) as ch:
        lm = lm_pb2_grpc.LmServiceStub(ch)

        def sample(i: int) -> list[int]:
            sid = lm.OpenSession(lm_pb2.OpenSessionRequest(), timeout=30).session_id
            try:
                toks = [1 + (7 * i + j * 13) % 4000 for j in range(20 + 9 * i)]
                r = lm.Step(lm_pb2.StepRequest(session_id=sid, tokens=toks, max_new_tokens=10, temperature=0.9,
                                               top_p=0.95, seed=100 + i), timeout=120)
                return list(r.tokens)
            finally:
                lm.CloseSession(lm_pb2.CloseSessionRequest(session_id=sid), timeout=30)

        alone = [sample(i) for i in range(8)]
        with ThreadPoolExecutor(8) as pool:
            together = list(pool.map(sample, range(8)))
    assert together == alone
