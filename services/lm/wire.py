"""Protobuf <-> the LM's request types (sampling settings, draft trees): light, no torch."""

from __future__ import annotations

from typing import Any

import numpy as np
from ralmspec.v1 import common_pb2, lm_pb2

from services.common.errors import InvalidRequest
from services.lm.types import Draft, SamplingParams

MAX_DRAFT_NODES = 256


def draft_from_proto(tree: common_pb2.DraftTree) -> Draft:
    """A client's tree, validated (parents must be -1 or an earlier node)."""
    tokens = np.asarray(tree.tokens, dtype=np.int64)
    parents = np.asarray(tree.parents, dtype=np.int64)
    if tokens.shape != parents.shape:
        raise InvalidRequest(f"a draft tree needs one parent per token: {len(tokens)} tokens, {len(parents)} parents")
    if len(parents) and (np.any(parents < -1) or np.any(parents >= np.arange(len(parents)))):
        raise InvalidRequest("draft tree parents must be -1 or the index of an earlier node")
    if len(tokens) > MAX_DRAFT_NODES:
        raise InvalidRequest(f"a draft tree has at most {MAX_DRAFT_NODES} nodes, got {len(tokens)}")
    return Draft(tokens, parents)


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
