"""Tree verification of REST drafts: one forward over every draft node, then acceptance of a path from the root.

A draft tree is two arrays: `tokens` [n] and `parents` [n] (-1 = child of the root, i.e. of the context's last
token), parents before children. In the one forward, node i attends to the whole context, its ancestors and
itself, at position len(context) + depth(i) - 1 (a child of the root sits right after the context).

The uncached tail of the context (usually the previous step's bonus token) is fed in the same forward, ahead of
the nodes and causally: a step costs one forward, not two. Its last row gives the root logits.

Greedy acceptance: t = argmax(root logits); while a child of the current node carries t, accept it and move there.
The step emits the accepted tokens plus the model's next token (the bonus), so it equals plain greedy decoding
token for token. Sampled acceptance (temperature > 0): at each node a token is drawn by the rejection rule over
the node's children (`sampling.choose`); while it is a child, accept it and move there. The tokens are then
distributed exactly as plain sampling's. Both are one walk with a different picker.

Afterwards the KV cache keeps the context and the accepted path only; the bonus is fed lazily by the next step,
like `Session.greedy` does with its last token.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from services.lm.decoder import Emitted, Session
from services.lm.ragged import Work, run
from services.lm.sampling import Sampler, sample_work
from services.lm.types import SamplingParams

Pick = Callable[[torch.Tensor, Sequence[int]], tuple[int, float]]  # (logits [vocab], child tokens) -> (token, gap)

log = logging.getLogger(__name__)


def tree_arrays(tokens: Any, parents: Any = None) -> tuple[np.ndarray, np.ndarray]:
    """(tokens [n], parents [n]) as int64 arrays, from arrays or from a tree object with `.tokens`/`.parents`."""
    if parents is None:
        tokens, parents = tokens.tokens, tokens.parents
    tok = np.asarray(tokens, dtype=np.int64).reshape(-1)
    par = np.asarray(parents, dtype=np.int64).reshape(-1)
    if tok.shape != par.shape:
        raise ValueError(f"a draft tree needs one parent per token, got {tok.shape[0]} tokens, {par.shape[0]} parents")
    if np.any(par < -1) or np.any(par >= np.arange(len(par))):
        raise ValueError("draft tree parents must be -1 or an earlier node")
    return tok, par


def depths(parents: np.ndarray) -> np.ndarray:
    """[n] depth of each node; a child of the root has depth 1."""
    d = np.zeros(len(parents), dtype=np.int64)
    for i, p in enumerate(parents):
        d[i] = 1 if p < 0 else d[p] + 1
    return d


def tree_mask(past: int, tail: int, parents: np.ndarray) -> torch.Tensor:
    """bool [tail + n, past + tail + n], True = attend.

    Rows are the `tail` uncached context tokens (causal), then the n nodes. Columns are the `past` cached tokens,
    the tail, then the nodes: a node sees every context column, its ancestors and itself."""
    n = len(parents)
    anc = torch.zeros(n, n, dtype=torch.bool)  # [n, n] anc[i, j]: j is i or an ancestor of i
    for i, p in enumerate(parents):
        if p >= 0:
            anc[i] = anc[p]
        anc[i, i] = True
    m = tail + n
    see = torch.zeros(m, past + m, dtype=torch.bool)  # [rows, columns]
    see[:, : past + tail] = True
    see[:tail, past:] = torch.ones(tail, m, dtype=torch.bool).tril()  # tail rows: causal (never a node column)
    see[tail:, past + tail:] = anc
    return see


def tree_logits_work(session: Session, seq: Sequence[int], tokens: np.ndarray,
                     parents: np.ndarray) -> Work[tuple[torch.Tensor, torch.Tensor]]:
    """Root logits [vocab] after `seq` and node logits [n, vocab] (float32, CPU), in one forward at most.

    Leaves the cache holding `seq` then all n nodes (in node order) and `session.ids`/`last` stale: call
    `session.compact` before the session is used again."""
    past = session.hold_prefix(seq)
    tail = list(seq[past:])
    n = len(tokens)
    if not tail and n == 0:
        return session.last, torch.empty(0, 0)  # type: ignore[return-value]  # hold_prefix: cached
    pos = torch.cat([torch.arange(past, len(seq)), torch.from_numpy(len(seq) + depths(parents) - 1)])  # [tail + n]
    allowed = tree_mask(past, len(tail), parents) if n else None  # no tree: plain causal
    logits = yield from session.feed_work(tail + tokens.tolist(), pos, allowed, n + (1 if tail else 0))
    root = logits[0] if tail else session.last  # logits: [(1 +) n, vocab]
    return root, logits[1:] if tail else logits  # type: ignore[return-value]


def _top2(logits: torch.Tensor) -> tuple[int, float]:
    top = torch.topk(logits, 2)
    return int(top.indices[0]), float(top.values[0] - top.values[1])


def _argmax(logits: torch.Tensor, children: Sequence[int]) -> tuple[int, float]:
    return _top2(logits)  # greedy: the children do not change the token


def tree_step(session: Session, seq: Sequence[int], tokens: Any, parents: Any = None, max_new: int = 1,
              stop: frozenset[int] = frozenset(), sampling: SamplingParams | None = None) -> Emitted:
    """`tree_step_work` run alone."""
    return run(session.lm, tree_step_work(session, seq, tokens, parents, max_new, stop, sampling))


def tree_step_work(session: Session, seq: Sequence[int], tokens: Any, parents: Any = None, max_new: int = 1,
                   stop: frozenset[int] = frozenset(), sampling: SamplingParams | None = None) -> Work[Emitted]:
    """Verify one draft tree after `seq` and emit up to `max_new` tokens (accepted path + bonus): greedy ones, or
    with `sampling` (temperature > 0) sampled ones, distributed exactly as plain sampling's (gaps: NaN).

    `tokens`/`parents`: [n] arrays, or a tree object with `.tokens`/`.parents` and parents=None; n = 0 is a plain
    one-token step. Stops after a stop token. Afterwards the session holds `seq` + the accepted nodes, with the
    logits after them, so the next step (after `seq` + emitted) feeds only the bonus token.

    Sliding-window models (Gemma 3) whose context plus tree would outgrow the window fall back to one plain
    token (a rule from when the cache evicted positions past the window; the KvStore keeps them all now, so the
    fallback could go once trees past the window are tested)."""
    tok, par = tree_arrays(tokens, parents)
    out = Emitted()
    if max_new < 1:
        return out
    sampler = None if sampling is None or sampling.greedy else Sampler(sampling, len(seq))
    window = getattr(session.lm.model.config, "sliding_window", None)  # type: ignore[attr-defined]
    if window is not None and len(seq) + len(tok) >= window:
        return (yield from session.greedy_work(seq, 1, stop) if sampler is None
                else sample_work(session, seq, 1, stop, sampler.params))
    pick: Pick = _argmax if sampler is None else sampler
    before, fed = session.forwards, session.fed_tokens
    root, nodes = yield from tree_logits_work(session, seq, tok, par)
    kids: dict[int, dict[int, int]] = {}  # parent node -> {token: node} in node order; first equal sibling wins
    for i in range(len(tok)):
        kids.setdefault(int(par[i]), {}).setdefault(int(tok[i]), i)
    # 1) walk down the tree while the picked token is a child of the current node
    path: list[int] = []
    logits, cur = root, -1
    while len(out.tokens) < max_new:
        here = kids.get(cur, {})
        t, gap = pick(logits, list(here))
        out.tokens.append(t)
        out.gaps.append(gap)
        if t in stop:
            out.stopped = True
            break
        nxt = here.get(t)
        if nxt is None:
            break  # t is the bonus token
        path.append(nxt)
        cur, logits = nxt, nodes[nxt]
    # 2) keep the context and the accepted nodes in the cache
    keep = torch.cat([torch.arange(len(seq)), len(seq) + torch.tensor(path, dtype=torch.long)])
    session.compact(keep, list(seq) + tok[path].tolist(), nodes[path[-1]] if path else root)
    out.forwards, out.fed = session.forwards - before, session.fed_tokens - fed
    log.debug("tree step: %d nodes, %d accepted, %d emitted", len(tok), len(path), len(out.tokens))
    return out
