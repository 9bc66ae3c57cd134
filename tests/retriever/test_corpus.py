"""Corpus splitting (pure logic) and the real tiny-profile passage and question files."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from services.retriever.corpus import PASSAGE_WORDS, read_passages, split_words


@given(st.lists(st.sampled_from(["a", "bb", "ccc", "Dd."]), min_size=1, max_size=700))
def test_split_keeps_every_word_in_order_in_balanced_blocks(words):
    blocks = split_words(" ".join(words))
    assert " ".join(blocks).split() == words
    sizes = [len(b.split()) for b in blocks]
    assert max(sizes) - min(sizes) <= max(1, len(blocks))
    assert len(blocks) == 1 or min(sizes) >= PASSAGE_WORDS // 2


def test_split_of_blank_text_is_empty():
    assert split_words("  \n ") == []


def test_tiny_profile_passages_and_questions(layout, questions):
    passages = read_passages(layout.passages)
    assert [p.id for p in passages] == list(range(len(passages)))
    assert len(passages) > 2000 and all(p.text.strip() for p in passages)
    assert 60 < sum(len(p.text.split()) for p in passages) / len(passages) < 130
    assert len(questions) > 10000
    gold = [q for q in questions if q.passage_ids]
    assert len(gold) / len(questions) > 0.99
    # the gold answer appears in the concatenated gold passages for nearly every question
    hit = sum(any(a in " ".join(passages[i].text for i in q.passage_ids) for a in q.answers) for q in gold[:500])
    assert hit / 500 > 0.95
