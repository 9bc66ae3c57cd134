"""Protobuf <-> the retrievers' types (query keys, hits, KNN neighbours): light, no index or model loaded."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
from ralmspec.v1 import common_pb2

from services.common.errors import InvalidRequest
from services.retriever.types import Hit, Neighbours, QueryKey


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


def hits_to_proto(row: Iterable[Hit]) -> common_pb2.HitList:
    return common_pb2.HitList(hits=[common_pb2.Hit(passage_id=h.pid, score=h.score) for h in row])


def hits_from_proto(rows: Sequence[common_pb2.HitList]) -> list[list[Hit]]:
    return [[Hit(h.score, h.passage_id) for h in row.hits] for row in rows]


def neighbours_to_proto(n: Neighbours) -> common_pb2.Neighbours:
    return common_pb2.Neighbours(distances=n.dists.tolist(), entry_ids=n.ids.tolist(), tokens=n.tokens.tolist())


def neighbours_from_proto(n: common_pb2.Neighbours) -> Neighbours:
    # distances travel as proto floats: float32 exactly, so both runtimes mix the same numbers
    return Neighbours(np.array(n.distances, dtype=np.float32), np.array(n.entry_ids, dtype=np.int64),
                      np.array(n.tokens, dtype=np.int64))
