"""Exact sampling: temperature / top-p decoding, and the acceptance rule that keeps drafted sampling exact.

`probs` is the distribution a token is drawn from: softmax(logits / T), then top-p (the smallest
set of most likely tokens whose mass reaches top_p, ties broken towards the lower token id), renormalised.
Temperature 0 means greedy decoding, and then nothing here runs.

Acceptance (`choose`), at a tree node with distinct draft children x1..xk, p = probs(node logits): try x1, accept
it with probability p(x1); on rejection set p(x1) = 0, renormalise and try x2 the same way, ...; when every
child is rejected, draw from what is left. The token is distributed exactly as p, whatever the children: with
one child, P(x) = p(x) and P(y != x) = (1 - p(x)) * p(y) / (1 - p(x)) = p(y); k children follow by induction
(the rule on the renormalised rest is the one-fewer-child case). So a drafted step's tokens are distributed as
plain sampling's, and drafts change only the speed. (This is speculative sampling's min(1, p/q) test and
residual norm(max(0, p - q)) for a draft that is a point mass q = delta(x).)

Randomness: a step draws from its own `torch.Generator`, seeded from (seed, position of the step's first new
token). A step is then a function of its request, so a replayed step returns the same tokens (the LM service's
idempotency), and the steps of one generation draw from distinct streams. Without a seed, every step draws a
fresh random seed: not replayable.

Sampled tokens carry NaN as their top-2 gap: a drawn token has no near-tie certificate, and sampled output is
held to the distribution, not to token equality with any other run (`equivalence.compare` does not apply).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence

import torch

from services.lm.decoder import Emitted, Session
from services.lm.ragged import Work, run
from services.lm.types import SamplingParams

NO_GAP = math.nan  # the `Emitted.gaps` entry of a sampled token


def probs(params: SamplingParams, logits: torch.Tensor) -> torch.Tensor:
    """The processed distribution [vocab] (float64, sums to 1) for logits [vocab]; needs temperature > 0."""
    z = logits.double()
    p = torch.softmax((z - z.max()) / params.temperature, -1)  # shift first: a tiny T gives -inf, never NaN
    if params.top_p >= 1:
        return p
    sp, order = torch.sort(p, descending=True, stable=True)  # stable: equal masses keep token-id order
    keep = torch.cumsum(sp, 0) - sp < params.top_p  # the mass ranked above a kept token is still short of top_p
    out = torch.zeros_like(p)
    out[order[keep]] = sp[keep]
    return out / out.sum()


def generator(params: SamplingParams, position: int) -> torch.Generator:
    """The random stream of a step whose first new token sits at `position` (= len(sequence))."""
    g = torch.Generator()
    if params.seed is None:
        g.seed()
    else:
        digest = hashlib.blake2b(f"{params.seed}:{position}".encode(), digest_size=8).digest()
        g.manual_seed(int.from_bytes(digest, "little"))
    return g


def acceptance(p: torch.Tensor, children: Sequence[int]) -> tuple[list[float], torch.Tensor]:
    """The rule's numbers: the probability of accepting each child given that the ones before it were rejected,
    and the residual weights [vocab] (p without the children, unnormalised) drawn from when all are rejected.

    Child i is accepted with p(x_i) / m_i, m_i = the mass not yet tried = p(x_i) + ... + p(x_k) + residual mass.
    The m_i are summed from the residual up, so when the residual is empty the last child's chance is exactly 1."""
    rest = p.clone()  # [vocab]
    rest[list(children)] = 0
    m = float(rest.sum())
    odds: list[float] = []
    for x in reversed(children):
        m += float(p[x])
        odds.append(float(p[x]) / m if m > 0 else 1.0)  # m = 0: unreachable (an earlier child took it all)
    return odds[::-1], rest


def choose(p: torch.Tensor, children: Sequence[int], gen: torch.Generator) -> int:
    """One token distributed exactly as p [vocab]: the draft `children` (distinct token ids) tried in order."""
    odds, rest = acceptance(p, children)
    for x, a in zip(children, odds):
        if float(torch.rand((), dtype=torch.float64, generator=gen)) < a:  # u in [0, 1): a = 1 always accepts
            return x
    return int(torch.multinomial(rest, 1, generator=gen))


class Sampler:
    """One step's token picker: `(logits [vocab], draft children) -> (token, gap)`, like the greedy picker."""

    def __init__(self, params: SamplingParams, position: int) -> None:
        self.params, self.gen = params, generator(params, position)

    def __call__(self, logits: torch.Tensor, children: Sequence[int]) -> tuple[int, float]:
        return choose(probs(self.params, logits), children, self.gen), NO_GAP


def sample(session: Session, seq: Sequence[int], n: int, stop: frozenset[int], params: SamplingParams,
           reuse: bool = True) -> Emitted:
    """`sample_work` run alone."""
    return run(session.lm, sample_work(session, seq, n, stop, params, reuse))


def sample_work(session: Session, seq: Sequence[int], n: int, stop: frozenset[int], params: SamplingParams,
                reuse: bool = True) -> Work[Emitted]:
    """Up to n sampled tokens after `seq` (plain sampled decoding, no drafts), as `Session.greedy` is for greedy:
    stops after a stop token, and the last token is fed lazily by whoever continues the sequence."""
    out = Emitted()
    ctx = list(seq)
    pick = Sampler(params, len(ctx))
    before, fed = session.forwards, session.fed_tokens
    logits = yield from session.logits_after_work(ctx, reuse=reuse)
    for i in range(n):
        tok, gap = pick(logits, ())
        out.tokens.append(tok)
        out.gaps.append(gap)
        if tok in stop:
            out.stopped = True
            break
        ctx.append(tok)
        if i + 1 < n:
            logits = yield from session.logits_after_work(ctx)
    out.forwards, out.fed = session.forwards - before, session.fed_tokens - fed
    return out
