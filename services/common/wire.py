"""Protobuf <-> engine types, in one place (protobuf stays at the service edges)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
from ralmspec.v1 import common_pb2, lm_pb2

from services.common.errors import InvalidRequest
from services.datastore.draft_tree import DraftTree
from services.datastore.knn_datastore import Neighbours
from services.lm.sampling import SamplingParams
from services.retriever.retriever import QueryKey
from services.retriever.types import Hit

Kind = common_pb2.RetrieverKind  # the enum's type in the generated stubs (an int at run time)
RETRIEVER_NAMES: dict[Kind, str] = {common_pb2.RETRIEVER_KIND_EXACT: "exact",
                                    common_pb2.RETRIEVER_KIND_APPROX: "approx",
                                    common_pb2.RETRIEVER_KIND_SPARSE: "sparse"}
RETRIEVER_KINDS: dict[str, Kind] = {v: k for k, v in RETRIEVER_NAMES.items()}


def retriever_name(kind: Kind | int) -> str:
    """UNSPECIFIED means exact (the paper's main setting)."""
    if kind == common_pb2.RETRIEVER_KIND_UNSPECIFIED:
        return "exact"
    if kind not in RETRIEVER_NAMES:
        raise InvalidRequest(f"unknown retriever kind {kind}; use EXACT (1), APPROX (2) or SPARSE (3)")
    return RETRIEVER_NAMES[kind]  # type: ignore[index]  # an int from the wire


def retriever_kind(name: str) -> Kind:
    return RETRIEVER_KINDS[name]


def key_to_proto(key: QueryKey) -> common_pb2.QueryKey:
    if isinstance(key, str):
        return common_pb2.QueryKey(text=key)
    return common_pb2.QueryKey(vector=np.asarray(key, dtype="<f4").tobytes())


def key_from_proto(key: common_pb2.QueryKey) -> QueryKey:
    return key.text if key.WhichOneof("key") == "text" else np.frombuffer(key.vector, dtype="<f4").copy()


def checked_key(key: common_pb2.QueryKey, dim: int | None) -> QueryKey:
    """A client's key, validated: `dim` is the dense retriever's vector size (None: sparse, keyed by text)."""
    which = key.WhichOneof("key")
    if dim is None:
        if which != "text" or not key.text.strip():
            raise InvalidRequest("the sparse retriever needs a non-empty text query key")
        return key.text
    if which != "vector" or len(key.vector) != 4 * dim:
        raise InvalidRequest(f"a dense query key must be {dim} float32 values ({4 * dim} bytes)")
    vec = key_from_proto(key)
    if not np.isfinite(vec).all():
        raise InvalidRequest("the dense query key holds NaN or infinite values")
    return vec


def vector_bytes(v: np.ndarray) -> bytes:
    return np.ascontiguousarray(v, dtype="<f4").tobytes()


def vector_from_bytes(data: bytes, dim: int | None, what: str) -> np.ndarray:
    """A float32 vector off the wire, validated (dim None: any length); `what` names it in the error."""
    if len(data) % 4 or not data or (dim is not None and len(data) != 4 * dim):
        want = f"{dim} float32 values ({4 * dim} bytes)" if dim is not None else "float32 values"
        raise InvalidRequest(f"{what} must be {want}, got {len(data)} bytes")
    v = np.frombuffer(data, dtype="<f4").astype(np.float32)
    if not np.isfinite(v).all():
        raise InvalidRequest(f"{what} holds NaN or infinite values")
    return v


KNN_INDEXES = {common_pb2.KNN_INDEX_UNSPECIFIED: "exact", common_pb2.KNN_INDEX_EXACT: "exact",
               common_pb2.KNN_INDEX_APPROX: "approx"}


def knn_index_name(index: int) -> str:
    if index not in KNN_INDEXES:
        raise InvalidRequest(f"unknown KNN index {index}; use EXACT (1) or APPROX (2)")
    return KNN_INDEXES[index]  # type: ignore[index]  # an int from the wire


def knn_index(name: str) -> common_pb2.KnnIndex:
    return common_pb2.KNN_INDEX_APPROX if name == "approx" else common_pb2.KNN_INDEX_EXACT


def neighbours_to_proto(n: Neighbours) -> common_pb2.Neighbours:
    return common_pb2.Neighbours(distances=n.dists.tolist(), entry_ids=n.ids.tolist(), tokens=n.tokens.tolist())


def neighbours_from_proto(n: common_pb2.Neighbours) -> Neighbours:
    # distances travel as proto floats: float32 exactly, so both runtimes mix the same numbers
    return Neighbours(np.array(n.distances, dtype=np.float32), np.array(n.entry_ids, dtype=np.int64),
                      np.array(n.tokens, dtype=np.int64))


def hits_to_proto(row: Iterable[Hit]) -> common_pb2.HitList:
    return common_pb2.HitList(hits=[common_pb2.Hit(passage_id=h.pid, score=h.score) for h in row])


def hits_from_proto(rows: Sequence[common_pb2.HitList]) -> list[list[Hit]]:
    return [[Hit(h.score, h.passage_id) for h in row.hits] for row in rows]


def tree_to_proto(tree: DraftTree) -> common_pb2.DraftTree:
    return common_pb2.DraftTree(tokens=tree.tokens.tolist(), parents=tree.parents.tolist())


def tree_from_proto(tree: common_pb2.DraftTree) -> DraftTree:
    """A client's tree, validated (parents must be -1 or an earlier node)."""
    tokens = np.asarray(tree.tokens, dtype=np.int64)
    parents = np.asarray(tree.parents, dtype=np.int64)
    if tokens.shape != parents.shape:
        raise InvalidRequest(f"a draft tree needs one parent per token: {len(tokens)} tokens, {len(parents)} parents")
    if len(parents) and (np.any(parents < -1) or np.any(parents >= np.arange(len(parents)))):
        raise InvalidRequest("draft tree parents must be -1 or the index of an earlier node")
    if len(tokens) > 256:
        raise InvalidRequest(f"a draft tree has at most 256 nodes, got {len(tokens)}")
    return DraftTree.from_arrays(tokens, parents)


def sampling_to_proto(params: SamplingParams | None) -> dict[str, Any]:
    """The sampling fields of an LM StepRequest, as keyword arguments (none: greedy)."""
    if params is None or params.greedy:
        return {}
    fields: dict[str, Any] = {"temperature": params.temperature, "top_p": params.top_p}
    if params.seed is not None:
        fields["seed"] = params.seed
    return fields


def sampling_from_proto(req: lm_pb2.StepRequest) -> SamplingParams | None:
    """A client's sampling fields, validated; None for greedy (temperature 0, the default)."""
    params = SamplingParams(req.temperature, req.top_p if req.HasField("top_p") else 1.0,
                            req.seed if req.HasField("seed") else None).validate()
    return None if params.greedy else params
