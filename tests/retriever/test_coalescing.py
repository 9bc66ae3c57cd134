"""Cross-request coalescing: the Coalescer's rules (fake batched calls), and the retriever service's coalesced
Search / SearchKnn on the tiny profile's real indexes returning exactly what each call gets alone."""

from __future__ import annotations

import asyncio

import faiss
import numpy as np
import pytest
from ralmspec.v1 import common_pb2 as cpb
from ralmspec.v1 import retriever_pb2 as pb

from services.common.errors import InvalidRequest
from services.retriever.coalescing import Coalescer, CoalesceSettings

# ------------------------------------------------------------------------------------------ the Coalescer


class Recorder:
    """A fake batched call: each item's result is (item, batch number); records every batch it ran."""

    def __init__(self, fail: Exception | None = None, delay_s: float = 0.0) -> None:
        self.batches: list[tuple[str, list[int]]] = []
        self.fail, self.delay_s = fail, delay_s

    async def __call__(self, key: str, items: list[int]) -> list[tuple[int, int]]:
        self.batches.append((key, list(items)))
        n = len(self.batches)
        await asyncio.sleep(self.delay_s)
        if self.fail is not None:
            raise self.fail
        return [(it, n) for it in items]


def coalescer(run: Recorder, window_ms: float, max_batch: int = 1024) -> Coalescer[str, int, tuple[int, int]]:
    return Coalescer(run, CoalesceSettings(window_ms=window_ms, max_batch=max_batch))


@pytest.mark.asyncio
async def test_calls_within_the_window_share_one_batch_per_key_and_get_their_own_slice():
    run = Recorder()
    c = coalescer(run, window_ms=30)
    a, b, other = await asyncio.gather(c.submit("k", [1, 2]), c.submit("k", [3]), c.submit("j", [4, 5]))
    assert sorted(run.batches) == [("j", [4, 5]), ("k", [1, 2, 3])]
    assert [x for x, _ in a] == [1, 2] and [x for x, _ in b] == [3] and [x for x, _ in other] == [4, 5]
    assert a[0][1] == b[0][1] != other[0][1]  # a and b came from one call
    assert (c.stats.calls, c.stats.batches, c.stats.items, c.stats.mean_batch) == (3, 2, 5, 2.5)


@pytest.mark.asyncio
async def test_a_batch_closes_when_the_window_passes():
    run = Recorder()
    c = coalescer(run, window_ms=40)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    first = asyncio.ensure_future(c.submit("k", [1]))
    await asyncio.sleep(0.08)  # past the window: the first batch ran alone
    second = await c.submit("k", [2])
    assert first.done() and [x for x, _ in first.result()] == [1] and [x for x, _ in second] == [2]
    assert run.batches == [("k", [1]), ("k", [2])]
    assert 0.04 <= loop.time() - t0 < 0.5


@pytest.mark.asyncio
async def test_max_batch_closes_a_batch_at_once_and_an_overflowing_caller_opens_the_next():
    run = Recorder()
    c = coalescer(run, window_ms=10_000, max_batch=4)  # only the size can close these batches in time
    got = await asyncio.wait_for(asyncio.gather(c.submit("k", [1, 2, 3]), c.submit("k", [4, 5]),
                                                c.submit("k", [6, 7]), c.submit("k", [8, 9, 10, 11])), 2)
    # [4, 5] would make 5 > 4: the first batch closes with 3; [6, 7] fills the second; 4 items run alone
    assert sorted(run.batches) == [("k", [1, 2, 3]), ("k", [4, 5, 6, 7]), ("k", [8, 9, 10, 11])]
    assert [[x for x, _ in r] for r in got] == [[1, 2, 3], [4, 5], [6, 7], [8, 9, 10, 11]]


@pytest.mark.asyncio
async def test_the_batched_calls_error_goes_to_every_caller():
    c = coalescer(Recorder(fail=InvalidRequest("index on fire")), window_ms=20)
    got = await asyncio.gather(c.submit("k", [1]), c.submit("k", [2, 3]), return_exceptions=True)
    assert all(isinstance(e, InvalidRequest) and str(e) == "index on fire" for e in got)


@pytest.mark.asyncio
async def test_a_short_result_is_an_error_not_a_wrong_slice():
    async def short(key: str, items: list[int]) -> list[int]:
        return items[:-1]

    c: Coalescer[str, int, int] = Coalescer(short, CoalesceSettings(window_ms=5))
    with pytest.raises(RuntimeError, match="2 results for 3 items"):
        await asyncio.gather(c.submit("k", [1, 2]), c.submit("k", [3]))


@pytest.mark.asyncio
async def test_window_zero_runs_each_call_at_once():
    run = Recorder()
    c = coalescer(run, window_ms=0)
    task = asyncio.ensure_future(c.submit("k", [1]))
    await asyncio.sleep(0)  # one loop turn: the call has started (no timer was armed)
    assert run.batches == [("k", [1])]
    assert [x for x, _ in await task] == [1]
    await asyncio.gather(c.submit("k", [2]), c.submit("k", [3]))
    assert run.batches == [("k", [1]), ("k", [2]), ("k", [3])]


@pytest.mark.asyncio
async def test_a_cancelled_caller_leaves_its_batch_and_an_empty_batch_does_not_run():
    run = Recorder()
    c = coalescer(run, window_ms=30)
    gone = asyncio.ensure_future(c.submit("k", [1]))
    kept = asyncio.ensure_future(c.submit("k", [2]))
    await asyncio.sleep(0)
    gone.cancel()
    assert [x for x, _ in await kept] == [2] and run.batches == [("k", [2])]
    alone = asyncio.ensure_future(c.submit("j", [3]))
    await asyncio.sleep(0)
    alone.cancel()
    await asyncio.sleep(0.06)
    assert run.batches == [("k", [2])]


@pytest.mark.asyncio
async def test_with_slots_a_free_slot_is_taken_at_once_and_callers_that_find_all_busy_share_the_next():
    run = Recorder(delay_s=0.1)
    c: Coalescer[str, int, tuple[int, int]] = Coalescer(run, CoalesceSettings(window_ms=10_000), slots=2)
    first = [asyncio.ensure_future(c.submit("k", [i])) for i in (1, 2)]
    await asyncio.sleep(0.01)  # free slots: each went alone at once (no 10 s window, no company)
    assert run.batches == [("k", [1]), ("k", [2])]
    later = [asyncio.ensure_future(c.submit("k", [i])) for i in (3, 4, 5)]
    await asyncio.sleep(0.03)  # both slots are busy: they wait, together
    assert len(run.batches) == 2
    other = await c.submit("j", [9])  # another group has its own slots
    got = await asyncio.wait_for(asyncio.gather(*first, *later), 1)
    assert run.batches == [("k", [1]), ("k", [2]), ("j", [9]), ("k", [3, 4, 5])] and other == [(9, 3)]
    assert [r[0][1] for r in got] == [1, 2, 4, 4, 4]


def test_settings_read_the_window_from_the_environment(monkeypatch):
    monkeypatch.setenv("RALMSPEC_COALESCE_MS", "0")
    assert CoalesceSettings.from_env().window_ms == 0
    monkeypatch.setenv("RALMSPEC_COALESCE_MS", "-1")
    with pytest.raises(ValueError, match="RALMSPEC_COALESCE_MS"):
        CoalesceSettings.from_env()


# ------------------------------------------------------------ the retriever service on the real tiny indexes


class Counting:
    """A retriever (or KNN datastore) that counts its index calls; everything else is the real one's."""

    def __init__(self, inner) -> None:
        self.inner, self.calls = inner, 0

    def __getattr__(self, name: str):
        return getattr(self.inner, name)

    def search_embedded(self, keys, k):
        self.calls += 1
        return self.inner.search_embedded(keys, k)

    def neighbours(self, queries, k, index):
        self.calls += 1
        return self.inner.neighbours(queries, k, index)


@pytest.fixture(scope="module")
def retrievers(layout):
    """The tiny profile's three retrievers; the dense ones without their query encoder (keys are made here)."""
    from services.retriever.retriever import RETRIEVERS, open_retriever

    no_encoder = object()  # Search takes keys: the MiniLM encoder would only cost start-up time
    return {n: open_retriever(n, layout, no_encoder) for n in RETRIEVERS}  # type: ignore[arg-type]


def query_keys(ret, questions, n: int) -> list:
    """n keys: question texts (sparse); for dense, normalised passage vectors plus noise (about 45 degrees off),
    one exact passage vector and the last key sent twice."""
    if ret.dim is None:
        return [q.question for q in questions[::37][:n]]
    rng = np.random.default_rng(1)
    rows = np.asarray(ret.index.vectors[rng.choice(ret.size, n, replace=False)], dtype=np.float32)
    rows[1:] += rng.normal(0, 0.05, rows[1:].shape).astype(np.float32)
    rows[n - 1] = rows[n - 2]
    return list(rows / np.linalg.norm(rows, axis=1, keepdims=True))


def service(retrievers, knn_ds, window_ms: float):
    """The retriever service on one pool thread: of calls that arrive together, the first runs alone and all the
    others share the next index call."""
    from services.retriever.service import RetrieverServiceSettings, retriever_service

    counted = {n: Counting(r) for n, r in retrievers.items()} | {"knn": Counting(knn_ds)}
    settings = RetrieverServiceSettings(threads=1, coalesce=CoalesceSettings(window_ms=window_ms))
    svc, pool = retriever_service({n: counted[n] for n in retrievers}, knn=counted["knn"], settings=settings)
    return svc.ops, counted, pool


KINDS = {"exact": cpb.RETRIEVER_KIND_EXACT, "approx": cpb.RETRIEVER_KIND_APPROX, "sparse": cpb.RETRIEVER_KIND_SPARSE}


@pytest.mark.parametrize("name", ["exact", "approx", "sparse"])
def test_coalesced_searches_return_what_each_search_returns_alone(retrievers, knn_ds, questions, name):
    """12 concurrent Search calls of 1-4 keys: the first alone, the other 11 (29 keys: FAISS's BLAS path, where
    one key alone scans) in one index call, each equal bit for bit to its call alone and to its keys searched one
    at a time."""
    from services.retriever.wire import hits_from_proto, key_to_proto

    keys = [key_to_proto(k) for k in query_keys(retrievers[name], questions, 30)]
    sizes = [1, 4, 2, 3, 1, 1, 4, 2, 3, 1, 4, 4]
    if retrievers[name].dim:  # the premise: FAISS scans for one key, multiplies for the batch (float32 differs)
        assert retrievers[name].dim < faiss.cvar.distance_compute_blas_threshold <= 29 * retrievers[name].dim
    starts = np.cumsum([0, *sizes])
    requests = [pb.SearchRequest(retriever=KINDS[name], keys=keys[a:b], k=10) for a, b in zip(starts, starts[1:])]

    async def together() -> list[pb.SearchReply]:
        ops, counted, pool = service(retrievers, knn_ds, window_ms=200)
        try:
            replies = await asyncio.gather(*(ops["Search"].handler(r) for r in requests))
        finally:
            pool.shutdown()
        assert counted[name].calls == 2
        return list(replies)

    async def alone(reqs: list[pb.SearchRequest]) -> list[pb.SearchReply]:
        ops, counted, pool = service(retrievers, knn_ds, window_ms=0)
        try:
            return [await ops["Search"].handler(r) for r in reqs]
        finally:
            pool.shutdown()

    got = asyncio.run(together())
    want = asyncio.run(alone(requests))
    one_by_one = asyncio.run(alone([pb.SearchRequest(retriever=KINDS[name], keys=[k], k=10) for k in keys]))
    for g, w in zip(got, want):
        assert hits_from_proto(g.results) == hits_from_proto(w.results)  # pids and float scores, exactly
    flat = [row for g in got for row in hits_from_proto(g.results)]
    assert flat == [hits_from_proto(r.results)[0] for r in one_by_one]


@pytest.mark.parametrize("index", ["exact", "approx"])
def test_coalesced_knn_searches_return_what_each_search_returns_alone(retrievers, knn_ds, index):
    """SearchKnn: 10 calls of 1-3 queries (20 LM-state-like keys: stored keys, some duplicated, plus noise), the
    first alone and 9 (19 queries: the BLAS path) in one index call."""
    from services.common.wire import knn_index, vector_bytes
    from services.retriever.wire import neighbours_from_proto

    rng = np.random.default_rng(0)
    rows = knn_ds.gather(rng.choice(knn_ds.size, 20, replace=False))
    rows[5] = rows[4]  # the same state sent by two requests
    queries = [vector_bytes(r + rng.normal(0, 0.05, r.shape).astype(np.float32) * (i % 2)) for i, r in enumerate(rows)]
    sizes = [1, 3, 2, 2, 1, 3, 2, 2, 1, 3]
    assert knn_ds.dim < faiss.cvar.distance_compute_blas_threshold <= 19 * knn_ds.dim
    starts = np.cumsum([0, *sizes])
    requests = [pb.SearchKnnRequest(queries=queries[a:b], k=32, index=knn_index(index))
                for a, b in zip(starts, starts[1:])]

    async def replies(reqs: list[pb.SearchKnnRequest], window_ms: float, together: bool) -> list[pb.SearchKnnReply]:
        ops, counted, pool = service(retrievers, knn_ds, window_ms)
        handler = ops["SearchKnn"].handler
        try:
            if together:
                out = list(await asyncio.gather(*(handler(r) for r in reqs)))
                assert counted["knn"].calls == 2
                return out
            return [await handler(r) for r in reqs]
        finally:
            pool.shutdown()

    def plain(reply: pb.SearchKnnReply) -> list[tuple[list, list, list]]:
        rows = map(neighbours_from_proto, reply.results)
        return [(n.dists.tolist(), n.ids.tolist(), n.tokens.tolist()) for n in rows]

    got = asyncio.run(replies(requests, 200, together=True))
    want = asyncio.run(replies(requests, 0, together=False))
    assert [plain(g) for g in got] == [plain(w) for w in want]
    singles = asyncio.run(replies([pb.SearchKnnRequest(queries=[q], k=32, index=knn_index(index)) for q in queries],
                                  0, together=False))
    assert [row for g in got for row in plain(g)] == [plain(s)[0] for s in singles]


def test_a_bad_call_fails_alone_while_its_neighbours_share_a_batch(retrievers, knn_ds, questions):
    from services.retriever.wire import key_to_proto

    keys = [key_to_proto(k) for k in query_keys(retrievers["exact"], questions, 3)]
    good = [pb.SearchRequest(retriever=cpb.RETRIEVER_KIND_EXACT, keys=[k], k=5) for k in keys]
    bad = pb.SearchRequest(retriever=cpb.RETRIEVER_KIND_EXACT, keys=[cpb.QueryKey(vector=b"\0" * 8)], k=5)

    async def run():
        ops, counted, pool = service(retrievers, knn_ds, window_ms=100)
        try:
            out = await asyncio.gather(*(ops["Search"].handler(r) for r in [good[0], bad, *good[1:]]),
                                       return_exceptions=True)
        finally:
            pool.shutdown()
        return out, counted["exact"].calls

    out, calls = asyncio.run(run())
    assert isinstance(out[1], InvalidRequest) and calls == 2  # good[0] alone, then good[1:] together
    assert all(isinstance(r, pb.SearchReply) and len(r.results[0].hits) == 5 for r in [out[0], *out[2:]])


def test_the_verifier_window_has_its_own_setting_off_by_default(monkeypatch):
    from services.common import env

    monkeypatch.delenv("RALMSPEC_VERIFY_WINDOW_MS", raising=False)
    assert CoalesceSettings.from_env(env.VERIFY_WINDOW_MS).window_ms == 0  # a 2 ms window lost here
    monkeypatch.setenv("RALMSPEC_VERIFY_WINDOW_MS", "3")
    assert CoalesceSettings.from_env(env.VERIFY_WINDOW_MS).window_ms == 3
