"""Protobuf <-> plain values every service shares: the common.proto enums (retriever kind, KNN index) and float32
vectors. Codecs of an engine's own types sit next to them (`services/{retriever,lm,datastore}/wire.py`), so this
module imports nothing outside `services.common` (the verifier loads no torch, FAISS or transformers)."""

from __future__ import annotations

import numpy as np
from ralmspec.v1 import common_pb2

from services.common.errors import InvalidRequest

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
    with np.errstate(over="ignore"):  # float32, as FAISS computes distances: they would overflow to inf
        square = np.dot(v, v)
    if not np.isfinite(square):
        raise InvalidRequest(f"{what} has values too large: its squared norm overflows float32")
    return v


KNN_INDEXES = {common_pb2.KNN_INDEX_UNSPECIFIED: "exact", common_pb2.KNN_INDEX_EXACT: "exact",
               common_pb2.KNN_INDEX_APPROX: "approx"}


def knn_index_name(index: int) -> str:
    if index not in KNN_INDEXES:
        raise InvalidRequest(f"unknown KNN index {index}; use EXACT (1) or APPROX (2)")
    return KNN_INDEXES[index]  # type: ignore[index]  # an int from the wire


def knn_index(name: str) -> common_pb2.KnnIndex:
    return common_pb2.KNN_INDEX_APPROX if name == "approx" else common_pb2.KNN_INDEX_EXACT
