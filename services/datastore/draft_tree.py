"""REST's draft trie: every prefix of every continuation counted (weighted), the `budget` most frequent kept.

Order of preference: higher count, then shorter, then lexicographically smaller tokens. An ancestor's count
is >= each descendant's (it is a prefix of every continuation they are prefixes of) and it is shorter, so it
always ranks first: the kept set is closed under taking ancestors and forms a tree under the root. The root
is the context's last position, not a node. Nodes are stored in BFS order: by depth, then by token path.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from services.common.errors import InvalidRequest

PAD = -1


@dataclass(frozen=True, eq=False)
class DraftTree:
    tokens: np.ndarray  # [n] int64 token of each node
    parents: np.ndarray  # [n] int64 parent node index, -1 for children of the root
    depth: np.ndarray  # [n] int64 1 for children of the root
    counts: np.ndarray  # [n] float64 weighted number of continuations through the node
    _child: dict[tuple[int, int], int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        child = {(int(p), int(t)): i for i, (p, t) in enumerate(zip(self.parents.tolist(), self.tokens.tolist()))}
        object.__setattr__(self, "_child", child)

    def __len__(self) -> int:
        return len(self.tokens)

    @classmethod
    def empty(cls) -> DraftTree:
        z = np.zeros(0, np.int64)
        return cls(z, z.copy(), z.copy(), np.zeros(0, np.float64))

    @classmethod
    def from_arrays(cls, tokens: np.ndarray, parents: np.ndarray) -> DraftTree:
        """A tree received as arrays (parents already checked to precede their children); counts unknown (0)."""
        depth = np.zeros(len(parents), np.int64)
        for i, p in enumerate(parents.tolist()):
            depth[i] = 1 if p < 0 else depth[p] + 1
        return cls(tokens.astype(np.int64), parents.astype(np.int64), depth, np.zeros(len(tokens), np.float64))

    @classmethod
    def from_continuations(cls, conts: Sequence[Sequence[int]], budget: int = 64,
                           weights: Sequence[float] | None = None) -> DraftTree:
        """`conts`: token lists (empty ones ignored); `weights`: one per continuation (default 1)."""
        if weights is not None and len(weights) != len(conts):
            raise InvalidRequest("one weight per continuation")
        lengths = np.fromiter((len(c) for c in conts), dtype=np.int64, count=len(conts))
        width = int(lengths.max()) if len(conts) else 0
        block = np.full((len(conts), width), PAD, dtype=np.int64)  # [m, width]
        flat = np.fromiter(itertools.chain.from_iterable(conts), dtype=np.int64, count=int(lengths.sum()))
        if (flat < 0).any():
            raise InvalidRequest("token ids must be >= 0")
        block[np.arange(width) < lengths[:, None]] = flat
        w = np.ones(len(conts)) if weights is None else np.asarray(weights, dtype=np.float64)
        return cls.from_block(block, budget, w)

    @classmethod
    def from_block(cls, block: np.ndarray, budget: int = 64, weights: np.ndarray | None = None) -> DraftTree:
        """`block` [m, width]: one continuation per row, ending at its first PAD (-1); `weights` [m] or None."""
        m, width = block.shape
        w = np.ones(m) if weights is None else np.asarray(weights, dtype=np.float64)  # [m]
        if (w < 0).any() or (block < PAD).any():
            raise InvalidRequest("weights and token ids must be >= 0")
        if not m or not width or budget <= 0:
            return cls.empty()
        block = block.astype(np.int64)
        shift = int(block.max()) + 1
        # 1) one node per distinct prefix, depth by depth. np.unique orders a depth's nodes by (parent id,
        #    token), so node ids (assigned in that order, depth after depth) follow (depth, token path).
        rows = np.flatnonzero(w > 0)  # rows still extending: a prefix of each is a node of the last depth
        node_of_row = np.full(m, -1, dtype=np.int64)  # [m] id of the row's prefix node (-1: root)
        parts: list[tuple[np.ndarray, np.ndarray, np.ndarray, int]] = []  # (tokens, parents, counts, depth)
        n_nodes = 0
        top = np.zeros(0)  # the `budget` largest counts so far
        for d in range(width):
            rows = rows[block[rows, d] != PAD]
            if not len(rows):
                break
            uniq, inv = np.unique((node_of_row[rows] + 1) * shift + block[rows, d], return_inverse=True)
            counts = np.bincount(inv, weights=w[rows], minlength=len(uniq))
            parts.append((uniq % shift, uniq // shift - 1, counts, d + 1))
            node_of_row[rows] = n_nodes + inv
            n_nodes += len(uniq)
            # 2) prune: with `budget` nodes at count >= T already, a deeper node of count <= T never ranks
            if n_nodes >= budget:
                top = np.sort(np.concatenate([top, counts]))[-budget:]
                rows = rows[counts[inv] > top[0]]
            else:
                top = np.concatenate([top, counts])
        if not parts:
            return cls.empty()
        tokens = np.concatenate([t for t, _, _, _ in parts])
        parent = np.concatenate([p for _, p, _, _ in parts])
        count = np.concatenate([c for _, _, c, _ in parts])
        depth = np.concatenate([np.full(len(t), d) for t, _, _, d in parts])
        # 3) keep the budget best by (count desc, id asc); ancestors outrank descendants (count >=, id <),
        #    so the kept set is closed under taking ancestors
        n_keep = min(budget, int((count > 0).sum()))
        thr = np.sort(count)[-n_keep]  # n_keep-th largest count (np.partition crawls on many ties)
        above = np.flatnonzero(count > thr)
        keep = np.sort(np.concatenate([above, np.flatnonzero(count == thr)[: n_keep - len(above)]]))
        new_index = np.full(len(count), -1, dtype=np.int64)
        new_index[keep] = np.arange(len(keep))
        parents = np.where(parent[keep] >= 0, new_index[parent[keep]], -1)
        assert ((parent[keep] < 0) | (parents >= 0)).all(), "kept prefixes must be closed under ancestors"
        assert (parents < np.arange(len(keep))).all(), "a parent precedes its children"
        return cls(tokens[keep], parents, depth[keep].astype(np.int64), count[keep])

    def ancestor_mask(self) -> np.ndarray:
        """[n, n] bool: node i sees node j iff j is i or an ancestor of i."""
        n = len(self)
        mask = np.eye(n, dtype=bool)
        for d in range(2, int(self.depth.max(initial=0)) + 1):
            idx = np.flatnonzero(self.depth == d)
            mask[idx] |= mask[self.parents[idx]]
        return mask

    def children(self, i: int) -> list[int]:
        """Child node indices of node i (-1: the root), in BFS order."""
        return np.flatnonzero(self.parents == i).tolist()  # type: ignore[no-any-return]

    def child(self, parent: int, token: int) -> int | None:
        """The node under `parent` (-1: root) holding `token`, for greedy acceptance."""
        return self._child.get((parent, token))

    def paths(self) -> list[list[int]]:
        """Node indices from a root child down to each leaf, leaves in BFS order."""
        is_parent = np.zeros(len(self), dtype=bool)
        is_parent[self.parents[self.parents >= 0]] = True
        out = []
        for leaf in np.flatnonzero(~is_parent).tolist():
            path = [leaf]
            while (p := int(self.parents[path[-1]])) >= 0:
                path.append(p)
            out.append(path[::-1])
        return out

    def path_tokens(self, i: int) -> list[int]:
        """Tokens from the root down to node i."""
        out = []
        while i >= 0:
            out.append(int(self.tokens[i]))
            i = int(self.parents[i])
        return out[::-1]

