"""The public API's edge: every field of GenerateRequest is bounded by one table (LIMITS), KNN-LM's cache cost is
bounded, and a deadline already past costs no LM work in any mode."""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

import numpy as np
import pytest
import torch
from google.protobuf.descriptor import FieldDescriptor
from ralmspec.v1 import common_pb2 as cpb
from ralmspec.v1 import gateway_pb2 as pb

from services.common.bounds import Bound
from services.common.errors import DeadlineExceeded, InvalidRequest, Unavailable
from services.gateway.api import LIMITS, to_request
from services.gateway.knn_generation import MAX_CACHED_PER_TOKEN
from services.lm.knn_mixing import next_token
from services.lm.types import KnnLmConfig

PARENTS = {"speculation": pb.Speculation, "knn": pb.Knn}


def request(path: str, value: Any, **extra: Any) -> pb.GenerateRequest:
    """A valid request with `path` (e.g. "knn.k") set to `value`; texts are given as their length."""
    parent, _, name = path.rpartition(".")
    if isinstance(getattr(pb.GenerateRequest() if not parent else PARENTS[parent](), name), str):
        value = "w" * value
    fields: dict[str, Any] = {"prompt": "The history of Europe"} if path not in ("prompt", "question") else {}
    fields.update({parent: PARENTS[parent](**{name: value})} if parent else {name: value})
    return pb.GenerateRequest(**{**fields, **extra})


def out_of_range(bound: Bound) -> list[Any]:
    below = bound.lo if bound.lo_open else bound.lo - (1 if isinstance(bound.lo, int) else bound.lo / 2 or 1e-3)
    above = bound.hi + 1 if isinstance(bound.hi, int) else bound.hi * 2
    if isinstance(bound.lo, int) and isinstance(bound.hi, int) and not bound.lo_open:
        return [below, above]
    return [below, above, math.nan, math.inf, -math.inf]


def test_limits_cover_every_number_and_text_of_generate_request():
    numbers = {FieldDescriptor.TYPE_INT32, FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_DOUBLE,
               FieldDescriptor.TYPE_FLOAT, FieldDescriptor.TYPE_STRING}

    def fields(desc: Any, prefix: str = "") -> set[str]:
        out: set[str] = set()
        for f in desc.fields:
            if f.type == FieldDescriptor.TYPE_MESSAGE:
                out |= fields(f.message_type, f"{prefix}{f.name}.")
            elif f.type in numbers:
                out.add(f"{prefix}{f.name}")
        return out

    assert fields(pb.GenerateRequest.DESCRIPTOR) == set(LIMITS)


CASES = [(path, value) for path, bound in LIMITS.items() for value in out_of_range(bound)
         if not (isinstance(value, float) and path in ("prompt", "question"))]  # a text's length is an int


@pytest.mark.parametrize("path, value", CASES, ids=[f"{p}={v}" for p, v in CASES])
def test_each_field_out_of_range_names_the_field_and_its_range(path, value):
    bound = LIMITS[path]
    text = path in ("prompt", "question")
    want = f"{path}{' length' * text} must be in {bound}{bound.unit}"
    if text and value < 1:
        want = f"the {path} is empty: "  # its own message, which says what to give
    with pytest.raises(InvalidRequest) as e:
        to_request(request(path, value))
    assert str(e.value).startswith(want), str(e.value)


@pytest.mark.parametrize("path", list(LIMITS))
def test_each_field_at_its_bounds_is_accepted(path):
    bound = LIMITS[path]
    ends = [bound.hi] if bound.lo_open else [bound.lo, bound.hi]
    for value in ends:
        # k = 4096 or 64 successors exceed the speculation cache's cost rule (below) with the other's default
        extra = {"mode": pb.MODE_BASELINE_KV} if path in ("knn.k", "knn.successors") else {}
        to_request(request(path, value, **extra))


def test_prefetch_k_above_the_retrievers_limit_is_refused_at_the_edge():
    with pytest.raises(InvalidRequest, match=r"^speculation.prefetch_k must be in 1\.\.1000, got 1001$"):
        to_request(pb.GenerateRequest(question="Who?", speculation=pb.Speculation(prefetch=True, prefetch_k=1001)))


def test_subnormal_knn_temperature_is_refused_and_the_lowest_allowed_is_finite():
    with pytest.raises(InvalidRequest, match=r"^knn.temperature must be in \[0.001, 1000\], got 5e-324$"):
        to_request(pb.GenerateRequest(prompt="The", knn=pb.Knn(temperature=5e-324)))
    # at T = 1e-3 and the largest squared distance the tiny keys allow ((2 x 62)^2), the mixture stays finite
    logits = torch.zeros(8)
    dists, tokens = np.array([1.0, 2.0, (2 * 62.0) ** 2], np.float32), np.array([3, 4, 5])
    tok, gap = next_token(logits, dists, tokens, KnnLmConfig(temperature=1e-3))
    assert tok == 3 and math.isfinite(gap)
    tok, gap = next_token(logits, dists, tokens, KnnLmConfig(temperature=1e3))
    assert math.isfinite(gap)


def test_knn_cache_cost_is_bounded_where_successors_apply():
    big = pb.Knn(k=4096, successors=64)
    with pytest.raises(InvalidRequest) as e:
        to_request(pb.GenerateRequest(prompt="The", knn=big))  # the gateway's default +PSA: prefetch on
    assert str(e.value).startswith(f"knn.k x knn.successors = 4096 x 64 = 262144 datastore entries cached per "
                                   f"verified token; the limit is {MAX_CACHED_PER_TOKEN}")
    for fine in (pb.GenerateRequest(prompt="The", knn=big, mode=pb.MODE_BASELINE_KV),  # no cache
                 pb.GenerateRequest(prompt="The", knn=big, speculation=pb.Speculation(prefetch=False)),  # one each
                 pb.GenerateRequest(prompt="The", knn=pb.Knn(k=4096, successors=4)),
                 pb.GenerateRequest(prompt="The", knn=pb.Knn())):  # the defaults: 1024 x 10
        to_request(fine)


class CountingLm:
    """An LM backend that records every call (open, step, state, close) before passing it on."""

    def __init__(self, lm: Any) -> None:
        self.lm, self.calls = lm, []

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.lm, name)

        def call(*args: Any, **kw: Any) -> Any:
            self.calls.append(name)
            return attr(*args, **kw)

        return call if callable(attr) else attr


PAST = 1e-9  # seconds: gone before the request's first step
DEADLINE_CASES = {
    "paper": pb.GenerateRequest(question="Who wrote Hamlet?", mode=pb.MODE_BASELINE_PAPER, deadline_s=PAST),
    "kv": pb.GenerateRequest(question="Who wrote Hamlet?", mode=pb.MODE_BASELINE_KV, deadline_s=PAST),
    "ralmspec": pb.GenerateRequest(question="Who wrote Hamlet?", mode=pb.MODE_RALMSPEC, deadline_s=PAST),
    "kv drafting": pb.GenerateRequest(question="Who wrote Hamlet?", mode=pb.MODE_BASELINE_KV,
                                      draft=cpb.DRAFT_SOURCE_BOTH, deadline_s=PAST),
    "ralmspec drafting": pb.GenerateRequest(question="Who wrote Hamlet?", draft=cpb.DRAFT_SOURCE_BOTH,
                                            deadline_s=PAST),
    "knn-lm": pb.GenerateRequest(prompt="The history of", mode=pb.MODE_BASELINE_KV, knn=pb.Knn(), deadline_s=PAST),
    "knn-lm ralmspec": pb.GenerateRequest(prompt="The history of", knn=pb.Knn(), deadline_s=PAST),
}


@pytest.mark.parametrize("mode", list(DEADLINE_CASES))
def test_a_deadline_already_past_does_no_lm_work_in_any_mode(engine, knn, mode):
    from services.gateway.controller import Controller
    from services.gateway.knn_generation import KnnLmEngine
    from services.gateway.ralm import RalmEngine

    lm = CountingLm(engine.backends.lm)
    ralm = RalmEngine(engine.tok, engine.max_positions, engine.docs, replace(engine.backends, lm=lm), engine.stop_sets)
    knnlm = KnnLmEngine(engine.tok, replace(knn.backends, lm=lm), stops=engine.stop_sets)
    with pytest.raises(DeadlineExceeded, match="ran past its 1e-09 s deadline"):
        Controller(ralm, verify_workers=1, knn=knnlm).run(to_request(DEADLINE_CASES[mode]))
    assert lm.calls == []  # not even a session opened


class FailingCaches:
    """A speculation-cache backend whose open fails (a datastore replica down), for both cache kinds."""

    def open(self, *args: Any) -> Any:
        raise Unavailable("the datastore is down")

    __call__ = open


@pytest.mark.parametrize("mode", ["ralmspec", "knn-lm ralmspec"])
def test_a_failed_cache_open_closes_the_lm_session(engine, knn, mode):
    from services.gateway.controller import Controller
    from services.gateway.knn_generation import KnnLmEngine
    from services.gateway.ralm import RalmEngine

    lm = CountingLm(engine.backends.lm)
    ralm = RalmEngine(engine.tok, engine.max_positions, engine.docs,
                      replace(engine.backends, lm=lm, caches=FailingCaches()), engine.stop_sets)
    knnlm = KnnLmEngine(engine.tok, replace(knn.backends, lm=lm, caches=FailingCaches()), stops=engine.stop_sets)
    msg = pb.GenerateRequest()
    msg.CopyFrom(DEADLINE_CASES[mode])
    msg.ClearField("deadline_s")
    with pytest.raises(Unavailable, match="the datastore is down"):
        Controller(ralm, verify_workers=1, knn=knnlm).run(to_request(msg))
    assert lm.calls == ["open", "close"]  # the session did not leak
