"""SQuAD v1.1 answer metrics: exact match and token F1 after the official normalisation, max over golds."""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Sequence

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = set(string.punctuation)


def normalize(text: str) -> str:
    text = "".join(ch for ch in text.lower() if ch not in _PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, golds: Sequence[str]) -> float:
    return float(any(normalize(prediction) == normalize(g) for g in golds))


def f1(prediction: str, golds: Sequence[str]) -> float:
    def one(gold: str) -> float:
        p, g = normalize(prediction).split(), normalize(gold).split()
        common = sum((Counter(p) & Counter(g)).values())
        if common == 0:
            return 0.0
        precision, recall = common / len(p), common / len(g)
        return 2 * precision * recall / (precision + recall)

    return max((one(g) for g in golds), default=0.0)
