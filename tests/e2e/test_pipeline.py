"""End to end: a real redis-server and real service processes (tiny profile), called over gRPC.

One cluster for the module, with 2 retriever and 2 verifier replicas: the distributed runtime emits the same
tokens as the in-process controller, both RPCs work, bad requests get INVALID_ARGUMENT with a clear message,
work spreads over replicas, a killed replica loses no request, every RPC refuses a call without its token, and no
secret reaches a log or a metric.
"""

from __future__ import annotations

import os
import signal
import threading
import time
import urllib.request

import grpc
import numpy as np
import pytest
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc
from ralmspec.v1 import common_pb2 as cpb
from ralmspec.v1 import (
    datastore_pb2,
    datastore_pb2_grpc,
    gateway_pb2_grpc,
    lm_pb2,
    lm_pb2_grpc,
    retriever_pb2,
    retriever_pb2_grpc,
)
from ralmspec.v1 import gateway_pb2 as pb

from services.common import auth
from services.common.contracts import LM, RETRIEVER, SERVICES, VERIFIER, replica_stream
from services.common.transport import counter_key
from services.gateway.api import to_request
from services.gateway.controller import Controller
from services.up import Cluster

pytestmark = pytest.mark.slow

EXACT, APPROX, SPARSE = cpb.RETRIEVER_KIND_EXACT, cpb.RETRIEVER_KIND_APPROX, cpb.RETRIEVER_KIND_SPARSE
REPLICAS = {"lm": 2, "retriever": 2, "datastore": 1, "verifier": 2, "gateway": 1}


@pytest.fixture(scope="module")
def cluster():
    # Short claim and call timeouts so the crash tests recover within a minute. The call timeout must still cover
    # an LM step queued behind every other request's steps on a loaded 2-core machine.
    c = Cluster("tiny", REPLICAS, extra_env={"RALMSPEC_CLAIM_IDLE_MS": "3000", "RALMSPEC_CALL_TIMEOUT_S": "60"}).start()
    yield c
    c.stop()


@pytest.fixture(scope="module")
def channel(cluster):
    with cluster.channel() as ch:
        yield ch


@pytest.fixture(scope="module")
def stub(channel):
    return gateway_pb2_grpc.GatewayServiceStub(channel)


@pytest.fixture(scope="module")
def controller(engine, knn):
    return Controller(engine, knn=knn)


def spec(**kw) -> pb.Speculation:
    return pb.Speculation(**kw)


def cases(questions) -> list[pb.GenerateRequest]:
    """Every retriever in every mode; long prompt continuations (no newline stop) make rollbacks happen."""
    out = []
    for i, kind in enumerate((EXACT, APPROX, SPARSE)):
        q = questions[3 + 7 * i]
        prompt = f"{q.question} The answer is explained below.\n"
        out += [
            pb.GenerateRequest(question=q.question, retriever=kind, mode=pb.MODE_BASELINE_KV),
            pb.GenerateRequest(question=q.question, retriever=kind, mode=pb.MODE_BASELINE_PAPER),
            pb.GenerateRequest(question=q.question, retriever=kind),  # ralmspec, the gateway's default +PSA
            pb.GenerateRequest(prompt=prompt, retriever=kind, mode=pb.MODE_RALMSPEC, max_new_tokens=40,
                               speculation=spec(stride=3, prefetch=False, os3=False, asynchronous=False)),
            pb.GenerateRequest(prompt=prompt, retriever=kind, mode=pb.MODE_RALMSPEC, max_new_tokens=40,
                               speculation=spec(prefetch=True, prefetch_k=5, os3=True, asynchronous=True)),
            # REST drafting inside each stride: drafts from the datastore service, tree verified by the LM service
            pb.GenerateRequest(prompt=prompt, retriever=kind, mode=pb.MODE_RALMSPEC, max_new_tokens=40,
                               draft=cpb.DRAFT_SOURCE_BOTH, draft_budget=8, speculation=spec(prefetch=True)),
        ]
    return out


def assert_same_rollbacks_where_fixed(req: pb.GenerateRequest, remote: pb.GenerateReply, local) -> None:
    """Fixed strides make the same guesses, so the same rollbacks. With OS³ on (the gateway's default when a request
    names no speculation), a stride follows the measured step and verification times, which differ in process and
    across services: only the tokens must agree."""
    if req.speculation.HasField("os3") and not req.speculation.os3:
        assert remote.stats.rollbacks == local.stats.get("rollbacks", 0), req


def test_distributed_tokens_equal_in_process(stub, controller, engine, questions):
    rollbacks = 0
    for req in cases(questions):
        local = controller.run(to_request(req))
        remote = stub.Generate(req, timeout=300)
        assert list(remote.token_ids) == local.tokens, req
        assert remote.text == local.text
        assert [p.passage_id for p in remote.passages] == list(dict.fromkeys(d for d in local.doc_ids if d >= 0))
        assert_same_rollbacks_where_fixed(req, remote, local)
        rollbacks += remote.stats.rollbacks
    assert rollbacks > 0  # speculation really guessed wrong somewhere, and the pipeline rolled back


def knn_cases(questions) -> list[pb.GenerateRequest]:
    """KNN-LM (token-level retrieval) through LM State, the datastore's KNN caches, the verifier and SearchKnn."""
    prompt = f"{questions[5].question} The answer is explained below.\n"
    sync = spec(stride=3, prefetch=False, os3=False, asynchronous=False)
    return [
        pb.GenerateRequest(prompt=prompt, max_new_tokens=16, mode=pb.MODE_BASELINE_KV, knn=pb.Knn()),
        pb.GenerateRequest(prompt=prompt, max_new_tokens=16, knn=pb.Knn()),  # the gateway's default +PSA
        pb.GenerateRequest(prompt=prompt, max_new_tokens=16, knn=pb.Knn(k=16, lam=0.5), speculation=sync),
        pb.GenerateRequest(prompt=prompt, max_new_tokens=16, knn=pb.Knn(index=cpb.KNN_INDEX_APPROX, successors=4),
                           speculation=spec(prefetch=True, os3=False, asynchronous=True)),
        pb.GenerateRequest(question=questions[6].question, knn=pb.Knn(k=64, temperature=10.0)),
    ]


def test_distributed_knnlm_equals_in_process(stub, controller, questions):
    rollbacks = 0
    for req in knn_cases(questions):
        local = controller.run(to_request(req))
        remote = stub.Generate(req, timeout=300)
        assert list(remote.token_ids) == local.tokens, req
        assert remote.text == local.text and not remote.passages
        assert_same_rollbacks_where_fixed(req, remote, local)
        rollbacks += remote.stats.rollbacks
    assert rollbacks > 0  # some guessed neighbours gave another token: the pipeline rolled back
    stream = list(stub.GenerateStream(knn_cases(questions)[1], timeout=300))
    assert [t for c in stream[:-1] for t in c.delta.token_ids] == list(stream[-1].done.token_ids)


def test_generate_stream_sends_the_reply_in_verified_pieces(stub, questions):
    req = pb.GenerateRequest(prompt=f"{questions[1].question} Here is some background.\n", retriever=EXACT,
                             max_new_tokens=40, speculation=spec(asynchronous=True, os3=False, stride=3))
    chunks = list(stub.GenerateStream(req, timeout=300))
    deltas = [c.delta for c in chunks if c.HasField("delta")]
    done = chunks[-1].done
    assert chunks[-1].HasField("done") and len(deltas) > 1
    assert [t for d in deltas for t in d.token_ids] == list(done.token_ids)
    assert "".join(d.text for d in deltas) == done.text
    assert list(stub.Generate(req, timeout=300).token_ids) == list(done.token_ids)


@pytest.mark.parametrize("req, message", [
    (pb.GenerateRequest(), "give either `prompt`"),
    (pb.GenerateRequest(question="   "), "the question is empty"),
    (pb.GenerateRequest(prompt=""), "the prompt is empty"),
    (pb.GenerateRequest(question="Who?", max_new_tokens=0), "max_new_tokens must be in 1..1024, got 0"),
    (pb.GenerateRequest(question="Who?", speculation=spec(stride=99)), "speculation.stride must be in 1..16, got 99"),
    (pb.GenerateRequest(question="Who?", speculation=spec(prefetch_k=-1)), "speculation.prefetch_k must be in 1..1000"),
    (pb.GenerateRequest(question="Who?", speculation=spec(prefetch=True, prefetch_k=1001)),
     "speculation.prefetch_k must be in 1..1000, got 1001"),
    (pb.GenerateRequest(question="Who?", retriever=7), "unknown retriever kind 7"),
    (pb.GenerateRequest(question="Who?", mode=9), "unknown mode 9"),
    (pb.GenerateRequest(prompt="word " * 5000), "prompt length must be in 1..20000 characters, got 25000"),
    (pb.GenerateRequest(question="Who? " * 500), "question length must be in 1..2000 characters, got 2499"),
    (pb.GenerateRequest(prompt="word " * 3000, max_new_tokens=8), "over the limit"),
    (pb.GenerateRequest(question="Who?", deadline_s=-1), "deadline_s must be in (0, 86400]"),
    (pb.GenerateRequest(question="Who?", deadline_s=float("nan")), "deadline_s must be in (0, 86400] s, got nan"),
    (pb.GenerateRequest(question="Who?", draft=9), "unknown draft source 9"),
    (pb.GenerateRequest(question="Who?", draft=cpb.DRAFT_SOURCE_REST, draft_budget=0),
     "draft_budget must be in 1..256"),
    (pb.GenerateRequest(question="Who?", draft=cpb.DRAFT_SOURCE_REST, mode=pb.MODE_BASELINE_PAPER),
     "the paper baseline re-prefills"),
    (pb.GenerateRequest(prompt="The", knn=pb.Knn(k=0)), "knn.k must be in 1..4096, got 0"),
    (pb.GenerateRequest(prompt="The", knn=pb.Knn(lam=1.5)), "knn.lam must be in [0, 1], got 1.5"),
    (pb.GenerateRequest(prompt="The", knn=pb.Knn(lam=float("nan"))), "knn.lam must be in [0, 1], got nan"),
    (pb.GenerateRequest(prompt="The", knn=pb.Knn(temperature=-1)), "knn.temperature must be in [0.001, 1000]"),
    (pb.GenerateRequest(prompt="The", knn=pb.Knn(temperature=5e-324)),
     "knn.temperature must be in [0.001, 1000], got 5e-324"),
    (pb.GenerateRequest(prompt="The", knn=pb.Knn(k=4096, successors=64)),
     "knn.k x knn.successors = 4096 x 64 = 262144 datastore entries cached per verified token; the limit is 16384"),
    (pb.GenerateRequest(prompt="The", knn=pb.Knn(index=7)), "unknown KNN index 7"),
    (pb.GenerateRequest(prompt="The", knn=pb.Knn(successors=0)), "successors must be in 1..64"),
    (pb.GenerateRequest(prompt="The", knn=pb.Knn(), retriever=SPARSE), "retriever do not apply to KNN-LM"),
    (pb.GenerateRequest(prompt="The", knn=pb.Knn(), draft=cpb.DRAFT_SOURCE_REST), "draft do not apply to KNN-LM"),
])
def test_bad_requests_are_invalid_argument(stub, req, message):
    for call in (lambda: stub.Generate(req, timeout=60), lambda: list(stub.GenerateStream(req, timeout=60))):
        with pytest.raises(grpc.RpcError) as e:
            call()
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert message in e.value.details()


def test_a_request_past_its_deadline_is_deadline_exceeded(stub):
    req = pb.GenerateRequest(prompt="Tell me about the history of Europe.", max_new_tokens=400, deadline_s=0.5)
    with pytest.raises(grpc.RpcError) as e:
        stub.Generate(req, timeout=120)
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED and "0.5 s deadline" in e.value.details()


@pytest.mark.parametrize("req", [
    pb.GenerateRequest(question="Who wrote Hamlet?", mode=pb.MODE_BASELINE_PAPER),
    pb.GenerateRequest(question="Who wrote Hamlet?", mode=pb.MODE_BASELINE_KV, draft=cpb.DRAFT_SOURCE_BOTH),
    pb.GenerateRequest(question="Who wrote Hamlet?", mode=pb.MODE_RALMSPEC),
    pb.GenerateRequest(prompt="The history of", mode=pb.MODE_BASELINE_KV, knn=pb.Knn()),
    pb.GenerateRequest(prompt="The history of", mode=pb.MODE_RALMSPEC, knn=pb.Knn()),
], ids=["paper", "kv drafting", "ralmspec", "knn-lm", "knn-lm ralmspec"])
def test_a_deadline_already_past_is_answered_before_any_work(stub, req):
    # tests/gateway/test_api.py shows no LM call is made, in process; here: the status, at once, through the pipeline
    past = pb.GenerateRequest(deadline_s=1e-9, max_new_tokens=400)
    past.MergeFrom(req)
    req = past
    for call in (lambda: stub.Generate(req, timeout=60), lambda: list(stub.GenerateStream(req, timeout=60))):
        t = time.monotonic()
        with pytest.raises(grpc.RpcError) as e:
            call()
        assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED and "1e-09 s deadline" in e.value.details()
        assert time.monotonic() - t < 5  # 400 tokens would take a minute


NOT_PROTOBUF = (b"\xff\xff\xff", b"\x0a\x02\xff\xfe")  # corrupt wire format; a string field that is not UTF-8


def test_a_body_that_is_not_protobuf_is_invalid_argument_without_a_traceback(cluster, channel):
    children = {c.service: c for c in cluster.children}  # the gateway and one LM replica
    logged = {s: children[s].log.stat().st_size for s in ("gateway", "lm")}
    with cluster.channel(f"127.0.0.1:{children['lm'].port}") as lm:
        calls = [(channel.unary_unary("/ralmspec.v1.GatewayService/Generate"), "GenerateRequest", False),
                 (channel.unary_stream("/ralmspec.v1.GatewayService/GenerateStream"), "GenerateRequest", True),
                 (lm.unary_unary("/ralmspec.v1.LmService/Step"), "StepRequest", False)]  # identity serializers
        for rpc, message, streaming in calls:
            for body in NOT_PROTOBUF:
                with pytest.raises(grpc.RpcError) as e:
                    list(rpc(body, timeout=30)) if streaming else rpc(body, timeout=30)
                assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (message, body, e.value)
                assert f"is not a valid ralmspec.v1.{message} message" in e.value.details()
    for service, size in logged.items():
        with open(children[service].log, "rb") as f:
            f.seek(size)
            assert b"Traceback" not in f.read(), f"{service} logged a traceback for a bad request body"


def test_backend_services_validate_too(cluster):
    port = {c.service: c.port for c in cluster.children}
    with cluster.channel(f"127.0.0.1:{port['lm']}") as ch:
        lm = lm_pb2_grpc.LmServiceStub(ch)
        with pytest.raises(grpc.RpcError) as e:
            lm.Step(lm_pb2.StepRequest(session_id="nope", tokens=[1], max_new_tokens=1))
        assert e.value.code() == grpc.StatusCode.NOT_FOUND and "no LM session" in e.value.details()
        sid = lm.OpenSession(lm_pb2.OpenSessionRequest()).session_id
        with pytest.raises(grpc.RpcError) as e:
            lm.Step(lm_pb2.StepRequest(session_id=sid, tokens=[], max_new_tokens=1))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "empty" in e.value.details()
        with pytest.raises(grpc.RpcError) as e:
            lm.State(lm_pb2.StateRequest(session_id=sid, tokens=[10**7]))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "token ids must be in" in e.value.details()
        state = lm.State(lm_pb2.StateRequest(session_id=sid, tokens=[1, 2, 3]))
        assert len(state.hidden) == 4 * 576 and len(state.logits) == 4 * 49152
        assert lm.CloseSession(lm_pb2.CloseSessionRequest(session_id=sid)).existed
    with cluster.channel(f"127.0.0.1:{port['retriever']}") as ch:
        rt = retriever_pb2_grpc.RetrieverServiceStub(ch)
        bad = cpb.QueryKey(vector=np.zeros(5, dtype="<f4").tobytes())
        with pytest.raises(grpc.RpcError) as e:
            rt.Search(retriever_pb2.SearchRequest(retriever=EXACT, keys=[bad], k=1))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "384 float32" in e.value.details()
        key = rt.Embed(retriever_pb2.EmbedRequest(retriever=EXACT, queries=["Super Bowl"])).keys[0]
        with pytest.raises(grpc.RpcError) as e:
            rt.Score(retriever_pb2.ScoreRequest(retriever=EXACT, key=key, passage_ids=[10**9]))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "passage ids must be in" in e.value.details()
        for bad_knn, message in ((retriever_pb2.SearchKnnRequest(queries=[b"\0" * 12], k=4), "576 float32 values"),
                                 (retriever_pb2.SearchKnnRequest(queries=[state.hidden], k=0), "must be in 1..4096"),
                                 (retriever_pb2.SearchKnnRequest(k=4), "no queries given")):
            with pytest.raises(grpc.RpcError) as e:
                rt.SearchKnn(bad_knn)
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and message in e.value.details()
        found = rt.SearchKnn(retriever_pb2.SearchKnnRequest(queries=[state.hidden] * 2, k=8)).results
        assert len(found) == 2 and list(found[0].entry_ids) == list(found[1].entry_ids) and len(found[0].tokens) == 8
    with cluster.channel(f"127.0.0.1:{port['datastore']}") as ch:
        dsv = datastore_pb2_grpc.DatastoreServiceStub(ch)
        cid = dsv.OpenKnnCache(datastore_pb2.OpenKnnCacheRequest()).cache_id
        with pytest.raises(grpc.RpcError) as e:
            dsv.Insert(datastore_pb2.InsertRequest(cache_id=cid, passage_ids=[1]))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "opened by OpenKnnCache" in e.value.details()
        with pytest.raises(grpc.RpcError) as e:
            dsv.InsertKnn(datastore_pb2.InsertKnnRequest(cache_id=cid, entry_ids=[10**9], successors=2))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "entry ids must be in" in e.value.details()
        assert dsv.InsertKnn(datastore_pb2.InsertKnnRequest(cache_id=cid, entry_ids=list(found[0].entry_ids),
                                                            successors=2)).size > 0
        with pytest.raises(grpc.RpcError) as e:
            dsv.LookupKnn(datastore_pb2.LookupKnnRequest(cache_id=cid, query=b"\0" * 8, k=4))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "576 float32 values" in e.value.details()
        assert len(dsv.LookupKnn(datastore_pb2.LookupKnnRequest(cache_id=cid, query=state.hidden, k=4))
                   .neighbours.entry_ids) == 4
        assert dsv.CloseCache(datastore_pb2.CloseCacheRequest(cache_id=cid)).existed


def counts(cluster, counter, service) -> dict[str, int]:
    """A cluster-wide counter ("served", "claimed", "replayed") of `service`'s consumer group, by consumer."""
    r = redis.Redis.from_url(cluster.redis_url)
    return {k.decode(): int(v) for k, v in r.hgetall(counter_key(counter, service.stream)).items()}


def test_work_spreads_over_replicas(stub, cluster, questions):
    reqs = [pb.GenerateRequest(question=q.question, retriever=kind)
            for q in questions[20:26] for kind in (EXACT, SPARSE)]
    errors: list[Exception] = []

    def ask(r: pb.GenerateRequest) -> None:
        try:
            stub.Generate(r, timeout=300)
        except Exception as e:  # collected: every request must succeed
            errors.append(e)

    threads = [threading.Thread(target=ask, args=(r,)) for r in reqs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    for service in (LM, RETRIEVER, VERIFIER):
        served = counts(cluster, "served", service)
        assert len(served) == 2 and min(served.values()) > 0, (service.full_name, served)


def held_by(cluster, victim, stream: str) -> int:
    """Entries of `stream` that `victim` has read and not acked (its consumer group is its service's stream)."""
    r = redis.Redis.from_url(cluster.redis_url)
    if not r.exists(stream):
        return 0
    pending = r.xpending(stream, SERVICES[victim.service].stream)["consumers"]
    return sum(c["pending"] for c in pending if c["name"].decode() == victim.replica)


def kill_while_busy(cluster, victim, stream: str, timeout_s: float = 120.0) -> int:
    """SIGKILL `victim` at a moment it holds unacked entries of `stream`, and return how many. Each look happens
    while it is stopped (SIGSTOP), so nothing it holds is answered between the look and the kill."""
    pid, end = victim.proc.pid, time.monotonic() + timeout_s
    while time.monotonic() < end:
        os.kill(pid, signal.SIGSTOP)
        held = 0
        try:
            time.sleep(0.05)  # what it had already sent reaches Redis
            held = held_by(cluster, victim, stream)
        finally:
            os.kill(pid, signal.SIGKILL if held else signal.SIGCONT)
        if held:
            return held
        time.sleep(0.05)
    pytest.fail(f"{victim.replica} never held an entry of {stream}: the kill would test no recovery")


def run_while_killing(stub, controller, cluster, reqs, victim, stream: str) -> int:
    """Send `reqs` concurrently, SIGKILL `victim` while it holds entries of `stream`, and check every reply equals
    the in-process one; return how many entries died with it."""
    want = [controller.run(to_request(r)).tokens for r in reqs]
    got: list[list[int] | None] = [None] * len(reqs)

    def ask(i: int) -> None:
        got[i] = list(stub.Generate(reqs[i], timeout=300).token_ids)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(reqs))]
    for t in threads:
        t.start()
    try:
        held = kill_while_busy(cluster, victim, stream)
    finally:
        for t in threads:
            t.join()
    assert got == want
    return held


def long_requests(questions, first: int) -> list[pb.GenerateRequest]:
    """Passage requests and a KNN-LM one (its States, SearchKnn and VerifyKnn calls take the same recovery)."""
    sync = spec(asynchronous=False, os3=False, stride=2)
    return [pb.GenerateRequest(prompt=f"{q.question} Background:\n", retriever=EXACT, max_new_tokens=24,
                               speculation=sync) for q in questions[first : first + 4]] + [
        pb.GenerateRequest(prompt=f"{questions[first].question} Background:\n", max_new_tokens=24, knn=pb.Knn(),
                           speculation=sync)]


def test_a_killed_retriever_replica_loses_no_request(stub, controller, cluster, questions):
    # The entries it held unacked are taken over by the other replica (XAUTOCLAIM after RALMSPEC_CLAIM_IDLE_MS).
    victim, survivor = [c for c in cluster.children if c.service == "retriever"]
    before = counts(cluster, "claimed", RETRIEVER).get(survivor.replica, 0)
    held = run_while_killing(stub, controller, cluster, long_requests(questions, 30), victim, RETRIEVER.stream)
    end = time.monotonic() + 15  # an entry whose caller stopped waiting (an earlier test's) is claimed all the same
    while (claimed := counts(cluster, "claimed", RETRIEVER).get(survivor.replica, 0) - before) < held and \
            time.monotonic() < end:
        time.sleep(0.5)
    assert claimed >= held > 0, f"the survivor claimed {claimed} of the {held} entries the killed replica held"


def test_a_killed_lm_replica_loses_no_request(stub, controller, cluster, questions):
    # It is killed holding a step of a session pinned to it: that step times out (RALMSPEC_CALL_TIMEOUT_S) and the
    # gateway replays it on a new session elsewhere (a step carries the whole sequence: it only re-prefills).
    victim = next(c for c in cluster.children if c.service == "lm")
    before = sum(counts(cluster, "replayed", LM).values())
    own = replica_stream(LM, victim.replica)  # where the steps of its sessions wait
    run_while_killing(stub, controller, cluster, long_requests(questions, 40), victim, own)
    replayed = sum(counts(cluster, "replayed", LM).values()) - before
    assert replayed > 0, "no LM call was replayed on a new session after its replica died"


def test_every_rpc_of_every_service_refuses_an_unauthenticated_call(cluster):
    """The walk over the real processes: each operation of each contract, with no token and with a token of the
    wrong kind (the API token at an internal service, the cluster token at the gateway), is UNAUTHENTICATED with
    the one message; health stays open."""
    secrets = cluster.secrets
    assert secrets.api_token and secrets.cluster_token
    refused = 0
    for name, service in SERVICES.items():
        target = next(f"127.0.0.1:{c.port}" for c in cluster.children  # a live one: the kill tests ran before
                      if c.service == name and c.proc.poll() is None)
        wrong = secrets.cluster_token if name == "gateway" else secrets.api_token
        for token in (None, wrong):
            with auth.channel(target, token) as ch:
                for op in service.ops.values():
                    method = service.method(op.name)
                    call = ch.unary_stream(method) if op.streaming else ch.unary_unary(method)
                    with pytest.raises(grpc.RpcError) as e:
                        reply = call(b"", timeout=30)
                        list(reply) if op.streaming else reply
                    assert (e.value.code(), e.value.details()) == (grpc.StatusCode.UNAUTHENTICATED, auth.REFUSED), \
                        method
                    refused += 1
                assert health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=30).status == \
                    health_pb2.HealthCheckResponse.SERVING
    assert refused == 2 * sum(len(s.ops) for s in SERVICES.values())


def test_no_secret_in_any_log_or_metric(cluster):
    """Last in the module: after every test above (bad input, kills, refusals), no child's log and no metrics page
    holds the API token, the cluster token or the Redis password."""
    secrets = cluster.secrets
    wanted = {"api token": secrets.api_token, "cluster token": secrets.cluster_token,
              "redis password": secrets.redis_password}
    texts = {str(c.log): c.log.read_text(errors="replace") for c in cluster.children}
    texts |= {f"metrics of {c.replica}": urllib.request.urlopen(
        f"http://127.0.0.1:{c.metrics_port}/metrics", timeout=10).read().decode() for c in cluster.children
        if c.proc.poll() is None}
    assert sum(map(len, texts.values())) > 10_000  # the logs are there to search
    leaks = [(what, where) for where, text in texts.items() for what, secret in wanted.items() if secret in text]
    assert leaks == []
