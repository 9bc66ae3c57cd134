"""The verifier merges concurrent rounds of different requests into one retriever call: each Verify gets its own
rows and first mismatch, exactly what it gets alone; a bad request fails alone. The retriever behind it is the
real retriever service on the tiny profile's indexes, called in process through a client that counts calls."""

from __future__ import annotations

import asyncio
from collections import Counter

import numpy as np
import pytest
from ralmspec.v1 import common_pb2 as cpb
from ralmspec.v1 import verifier_pb2 as pb

from services.common.errors import InvalidRequest
from services.common.wire import vector_bytes
from services.retriever.coalescing import CoalesceSettings
from services.retriever.wire import key_to_proto

EXACT, SPARSE = cpb.RETRIEVER_KIND_EXACT, cpb.RETRIEVER_KIND_SPARSE


class InProcess:
    """Stands in for the verifier's StreamClient: calls the retriever service's handlers, counting each op."""

    def __init__(self, ops) -> None:
        self.ops, self.calls = ops, Counter()

    async def call(self, stream, op, request, *, timeout_s=None):
        self.calls[op.name] += 1
        return await self.ops[op.name].handler(request)


@pytest.fixture(scope="module")
def retriever_ops(layout, knn_ds):
    from services.retriever.retriever import open_retriever
    from services.retriever.service import RetrieverServiceSettings, retriever_service

    retrievers = {n: open_retriever(n, layout, object()) for n in ("exact", "sparse")}  # keys given: no encoder
    svc, pool = retriever_service(retrievers, knn=knn_ds,
                                  settings=RetrieverServiceSettings(coalesce=CoalesceSettings(window_ms=0)))
    yield svc.ops, retrievers
    pool.shutdown()


def verifier(retriever_ops, window_ms: float):
    from services.verifier.service import VerifierSettings, verifier_service

    client = InProcess(retriever_ops[0])
    svc = verifier_service(client, VerifierSettings(timeout_s=30, coalesce=CoalesceSettings(window_ms=window_ms)))
    return svc.ops, client


def rounds(retriever_ops) -> list[pb.VerifyRequest]:
    """Three requests' 3-step rounds on the exact retriever (keys near passages): all guesses right; the last
    one wrong; the first one wrong."""
    ret = retriever_ops[1]["exact"]
    rng = np.random.default_rng(2)
    pids = rng.choice(ret.size, 9, replace=False)
    keys = np.asarray(ret.index.vectors[pids], dtype=np.float32) + rng.normal(0, 0.02, (9, ret.dim)).astype(np.float32)
    truth = [h[0].pid for h in ret.search_embedded(list(keys), 1)]
    guesses = [truth[:3], [*truth[3:5], truth[5] + 1], [truth[0], *truth[7:9]]]  # right; wrong at 2; wrong at 0
    return [pb.VerifyRequest(retriever=EXACT, keys=[key_to_proto(k) for k in keys[3 * i : 3 * i + 3]],
                             guesses=g, k=4) for i, g in enumerate(guesses)]


def test_two_concurrent_verifies_are_served_by_one_search(retriever_ops):
    reqs = rounds(retriever_ops)

    async def together():
        ops, client = verifier(retriever_ops, window_ms=100)
        replies = await asyncio.gather(*(ops["Verify"].handler(r) for r in reqs[:2]))
        return replies, client.calls

    async def alone():
        ops, client = verifier(retriever_ops, window_ms=0)
        return [await ops["Verify"].handler(r) for r in reqs[:2]], client.calls

    got, calls = asyncio.run(together())
    want, calls_alone = asyncio.run(alone())
    assert calls == {"Search": 1} and calls_alone == {"Search": 2}
    assert [g.first_mismatch for g in got] == [-1, 2]
    for g, w in zip(got, want):
        assert g.first_mismatch == w.first_mismatch and list(g.results) == list(w.results)
        assert len(g.results) == 3 and all(len(r.hits) == 4 for r in g.results)


def test_only_rounds_with_the_same_retriever_and_k_merge_and_a_bad_round_fails_alone(retriever_ops):
    reqs = rounds(retriever_ops)
    other_k = pb.VerifyRequest(retriever=EXACT, keys=reqs[2].keys, guesses=reqs[2].guesses, k=2)
    sparse = pb.VerifyRequest(retriever=SPARSE, keys=[cpb.QueryKey(text="who wrote the constitution")], k=4)
    short = pb.VerifyRequest(retriever=EXACT, keys=[cpb.QueryKey(vector=vector_bytes(np.ones(8)))], k=4)
    nan = pb.VerifyRequest(retriever=EXACT, keys=[cpb.QueryKey(vector=vector_bytes(np.full(384, np.nan)))], k=4)

    async def run():
        ops, client = verifier(retriever_ops, window_ms=100)
        out = await asyncio.gather(*(ops["Verify"].handler(r) for r in [*reqs, other_k, sparse, short, nan]),
                                   return_exceptions=True)
        return out, client.calls

    out, calls = asyncio.run(run())
    # exact k=4 (3 rounds), exact k=2, sparse k=4 and the 8-dim key (its own group: the retriever refuses it)
    assert calls == {"Search": 4}
    assert [r.first_mismatch for r in out[:4]] == [-1, 2, 0, 0]
    assert isinstance(out[4], pb.VerifyReply) and len(out[4].results[0].hits) == 4
    assert isinstance(out[5], InvalidRequest) and "384 float32" in str(out[5])
    assert isinstance(out[6], InvalidRequest) and "NaN" in str(out[6])


def test_concurrent_knn_verifies_are_served_by_one_knn_search(retriever_ops, knn_ds):
    rng = np.random.default_rng(3)
    q = knn_ds.gather(rng.choice(knn_ds.size, 5, replace=False))
    reqs = [pb.VerifyKnnRequest(queries=[vector_bytes(v) for v in q[:2]], k=16),
            pb.VerifyKnnRequest(queries=[vector_bytes(v) for v in q[2:]], k=16)]

    async def run(window_ms: float):
        ops, client = verifier(retriever_ops, window_ms)
        return await asyncio.gather(*(ops["VerifyKnn"].handler(r) for r in reqs)), client.calls

    got, calls = asyncio.run(run(100))
    want, calls_alone = asyncio.run(run(0))
    assert calls == {"SearchKnn": 1} and calls_alone == {"SearchKnn": 2}
    assert [list(g.results) for g in got] == [list(w.results) for w in want]
    assert [len(g.results) for g in got] == [2, 3]
