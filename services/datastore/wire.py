"""Protobuf <-> REST's draft trie (the Propose reply, an LM step's draft): light, no torch."""

from __future__ import annotations

from ralmspec.v1 import common_pb2

from services.datastore.draft_tree import DraftTree
from services.lm.wire import draft_from_proto


def tree_to_proto(tree: DraftTree) -> common_pb2.DraftTree:
    return common_pb2.DraftTree(tokens=tree.tokens.tolist(), parents=tree.parents.tolist())


def tree_from_proto(tree: common_pb2.DraftTree) -> DraftTree:
    """A client's tree, validated as the LM validates a draft (parents must be -1 or an earlier node)."""
    draft = draft_from_proto(tree)
    return DraftTree.from_arrays(draft.tokens, draft.parents)
