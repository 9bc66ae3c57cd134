"""The public API's messages <-> the controller's `Request` and `RalmResult` (validation with clear messages)."""

from __future__ import annotations

from dataclasses import replace
from typing import Any, TypeVar

from google.protobuf.message import Message
from ralmspec.v1 import common_pb2 as cpb
from ralmspec.v1 import gateway_pb2 as pb

from services.common.bounds import Bound
from services.common.errors import InvalidRequest
from services.common.wire import knn_index_name, retriever_name
from services.datastore.knn_cache import SUCCESSORS
from services.gateway.controller import Request
from services.gateway.knn_generation import KnnRequest
from services.gateway.prompts import QUESTION_CHARS, qa_prompt
from services.gateway.ralm import DEADLINE_S, DRAFT_BUDGET, MAX_NEW_TOKENS, QUERY_TOKENS, STRIDE, RalmConfig, RalmResult
from services.gateway.ralmspec import PRESETS, SpecConfig
from services.lm.types import KNN_LAM, KNN_TEMPERATURE, KnnLmConfig
from services.retriever.docstore import DocStore
from services.retriever.types import KNN_K, NO_DOC, PASSAGE_K

D = TypeVar("D", bound=Any)  # a dataclass of settings
PROMPT_CHARS = Bound(1, 20_000, unit=" characters")
# Every number and text of GenerateRequest, by field path, with its allowed range (texts: their length). The rules
# are the engines' own (one Bound each); `check_limits` applies them all here, before anything else, so an error
# names the field as the client sent it. gateway.proto's comments and the README quote these ranges.
LIMITS: dict[str, Bound] = {
    "prompt": PROMPT_CHARS,
    "question": QUESTION_CHARS,
    "max_new_tokens": MAX_NEW_TOKENS,
    "retrieval_stride": STRIDE,
    "query_tokens": QUERY_TOKENS,
    "deadline_s": DEADLINE_S,
    "draft_budget": DRAFT_BUDGET,
    "speculation.stride": Bound(1, SpecConfig.max_stride),
    "speculation.prefetch_k": PASSAGE_K,
    "knn.k": KNN_K,
    "knn.lam": KNN_LAM,
    "knn.temperature": KNN_TEMPERATURE,
    "knn.successors": SUCCESSORS,
}
MODES = {pb.MODE_BASELINE_PAPER: "paper", pb.MODE_BASELINE_KV: "kv-reuse"}
DRAFT_SOURCES: dict[int, str] = {cpb.DRAFT_SOURCE_UNSPECIFIED: "none", cpb.DRAFT_SOURCE_NONE: "none",
                                  cpb.DRAFT_SOURCE_REST: "rest", cpb.DRAFT_SOURCE_PROMPT: "prompt",
                                  cpb.DRAFT_SOURCE_BOTH: "both"}


def check_limits(req: pb.GenerateRequest) -> None:
    """Each field of LIMITS that `req` sets, in its range, or InvalidRequest naming the field and the range."""
    for path, bound in LIMITS.items():
        parent, _, name = path.rpartition(".")
        msg = getattr(req, parent) if parent else req
        if (parent and not req.HasField(parent)) or not msg.HasField(name):
            continue
        value = getattr(msg, name)
        if isinstance(value, str):
            bound.check(f"{path} length", len(value))
        else:
            bound.check(path, value)


def _draft(source: int) -> str:
    if source not in DRAFT_SOURCES:
        raise InvalidRequest(f"unknown draft source {source}; use NONE (1), REST (2), PROMPT (3) or BOTH (4)")
    return DRAFT_SOURCES[source]


def to_request(req: pb.GenerateRequest, default_spec: SpecConfig = PRESETS["+PSA"]) -> Request:
    which = req.WhichOneof("input")
    if which == "question":
        prompt, newline, default_len = qa_prompt(req.question), True, 32
    elif which == "prompt":
        if not req.prompt.strip():
            raise InvalidRequest("the prompt is empty: give some text to continue, or a question")
        prompt, newline, default_len = req.prompt, False, 128
    else:
        raise InvalidRequest("give either `prompt` (text to continue) or `question` (answered with the QA prompt)")
    check_limits(req)
    if req.mode not in (pb.MODE_UNSPECIFIED, pb.MODE_RALMSPEC, *MODES):
        raise InvalidRequest(f"unknown mode {req.mode}; use BASELINE_PAPER (1), BASELINE_KV (2) or RALMSPEC (3)")
    cfg = RalmConfig(
        mode=MODES.get(req.mode, "kv-reuse"),
        stride=req.retrieval_stride if req.HasField("retrieval_stride") else 4,
        query_tokens=req.query_tokens if req.HasField("query_tokens") else 32,
        max_new_tokens=req.max_new_tokens if req.HasField("max_new_tokens") else default_len,
        stop_at_newline=newline,
        deadline_s=req.deadline_s if req.HasField("deadline_s") else None,
        draft=_draft(req.draft),
        draft_budget=req.draft_budget if req.HasField("draft_budget") else 16)
    cfg.validate()
    spec = None
    if req.mode in (pb.MODE_UNSPECIFIED, pb.MODE_RALMSPEC):
        spec = _overlay(default_spec, req.speculation, ("stride", "prefetch", "prefetch_k", "os3", "asynchronous"))
        spec.validate()
    knn = _knn(req, cfg, spec) if req.HasField("knn") else None
    return Request(prompt, cfg, retriever_name(req.retriever), spec, knn)


def _knn(req: pb.GenerateRequest, cfg: RalmConfig, spec: SpecConfig | None) -> KnnRequest:
    """A KNN-LM request: passage retrieval's settings do not apply, and are refused rather than ignored."""
    passage_only = [f for f in ("retrieval_stride", "query_tokens", "draft_budget") if req.HasField(f)]
    passage_only += ["retriever"] * (req.retriever != cpb.RETRIEVER_KIND_UNSPECIFIED)
    passage_only += ["draft"] * (req.draft not in (cpb.DRAFT_SOURCE_UNSPECIFIED, cpb.DRAFT_SOURCE_NONE))
    if passage_only:
        raise InvalidRequest(f"{', '.join(passage_only)} do not apply to KNN-LM (it retrieves datastore entries at "
                             "every token, not passages): leave them unset")
    knn = _overlay(KnnLmConfig(index=knn_index_name(req.knn.index)), req.knn, ("k", "lam", "temperature"))
    out = _overlay(KnnRequest(cfg.max_new_tokens, cfg.stop_at_newline, knn, deadline_s=cfg.deadline_s), req.knn,
                   ("successors",))
    out.validate(spec)
    return out


def _overlay(default: D, msg: Message, fields: tuple[str, ...]) -> D:
    """`default` with each of `fields` the message sets (proto3 `optional`: unset fields keep the default)."""
    return replace(default, **{f: getattr(msg, f) for f in fields if msg.HasField(f)})


def to_reply(res: RalmResult, docs: DocStore) -> pb.GenerateReply:
    used = [p for p in dict.fromkeys(res.doc_ids) if p != NO_DOC]
    st = res.stats
    return pb.GenerateReply(
        text=res.text, token_ids=res.tokens, gaps=res.gaps,
        passages=[cpb.PassageRef(passage_id=p, title=docs.get(p).title) for p in used],
        stats=pb.Stats(spec_accuracy=st.get("spec_accuracy", 1.0), mean_stride=st.get("mean_stride", 0.0),
                       retrieval_calls=st.get("retrieval_calls", res.retrievals), retrievals=res.retrievals,
                       rollbacks=st.get("rollbacks", 0), lm_forwards=res.lm_forwards,
                       time=cpb.TimeSplit(retrieval_s=res.retrieval_s, lm_s=res.lm_s, total_s=res.total_s)))
