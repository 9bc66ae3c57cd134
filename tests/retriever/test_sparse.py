"""BM25 retrieval on a real Lucene index of 300 SQuAD dev paragraphs, and the pure-Python BM25 against Lucene.

The paragraphs come from the SQuAD v1.1 dev file that `ralmspec assets` extracts into the cache.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from services.common.errors import InvalidRequest, NotFound, Unavailable
from services.common.layout import Layout
from services.retriever import sparse
from services.retriever.sparse import SparseRetriever, bm25_score, build_lucene_index
from services.retriever.types import Hit

SQUAD_REL = Path("squad_shifts/squaddev_v1.1.json")
N_PASSAGES = 300
N_QUESTIONS = 50
PER_ARTICLE = 7  # paragraphs taken from each article: 48 articles give > 300, on many topics


def _squad_file() -> Path:
    cache = Layout.for_profile("tiny").cache
    for path in (cache / "bigbench" / SQUAD_REL, cache / "bb" / SQUAD_REL):
        if path.exists():
            return path
    pytest.skip(f"SQuAD dev file not found under {cache}: run `ralmspec assets --profile tiny` first")


@pytest.fixture(scope="module")
def squad() -> tuple[list[dict[str, object]], list[tuple[str, int]]]:
    """300 passages {"id","title","text","source"} and (question, gold passage id) pairs."""
    data = json.loads(_squad_file().read_text(encoding="utf-8"))["data"]
    passages: list[dict[str, object]] = []
    questions: list[tuple[str, int]] = []
    for article in data:
        for para in article["paragraphs"][:PER_ARTICLE]:
            if len(passages) == N_PASSAGES:
                break
            pid = len(passages)
            title = article["title"].replace("_", " ")
            passages.append({"id": pid, "title": title, "text": para["context"], "source": "squad_dev"})
            questions.append((para["qas"][0]["question"], pid))
    assert len(passages) == N_PASSAGES
    # Spread the questions over all articles rather than taking the first few topics.
    step = len(questions) // N_QUESTIONS
    return passages, questions[::step][:N_QUESTIONS]


def _write_passages(path: Path, passages: list[dict[str, object]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(p) + "\n" for p in passages), encoding="utf-8")


@pytest.fixture(scope="module")
def index_dir(tmp_path_factory: pytest.TempPathFactory, squad: tuple[list, list]) -> Path:
    layout = Layout(tmp_path_factory.mktemp("data"), "tiny")
    _write_passages(layout.passages, squad[0])
    t0 = time.perf_counter()
    build_lucene_index(layout.passages, layout.lucene_input, layout.lucene_index)
    print(f"index build: {time.perf_counter() - t0:.1f} s")
    return layout.lucene_index


@pytest.fixture(scope="module")
def retriever(index_dir: Path) -> Iterator[SparseRetriever]:
    with SparseRetriever(index_dir) as r:
        yield r


@pytest.fixture(scope="module")
def questions(squad: tuple[list, list]) -> list[str]:
    return [q for q, _ in squad[1]]


# ------------------------------------------------------------------------------------------------ search


def test_search_is_sorted_and_deterministic(retriever: SparseRetriever, questions: list[str]) -> None:
    first = retriever.search(questions, k=10)
    second = retriever.search(questions, k=10)
    assert first == second
    assert len(first) == len(questions)
    for hits in first:
        assert len(hits) == 10
        assert all(isinstance(h, Hit) for h in hits)
        assert hits == sorted(hits, key=lambda h: (-h.score, h.pid))
        assert len({h.pid for h in hits}) == 10
    # A batch is the same as one query at a time.
    assert [retriever.search([q], k=10)[0] for q in questions[:5]] == first[:5]


def test_gold_paragraph_is_retrieved(retriever: SparseRetriever, squad: tuple[list, list]) -> None:
    pairs = squad[1]
    results = retriever.search([q for q, _ in pairs], k=10)
    found = [gold in {h.pid for h in hits} for (_, gold), hits in zip(pairs, results, strict=True)]
    # A SQuAD question shares many words with its paragraph, so BM25 should find most of them.
    assert sum(found) / len(found) >= 0.8, sum(found)


def test_ties_are_broken_by_passage_id_at_every_cutoff(retriever: SparseRetriever) -> None:
    # One-term queries tie often: equal tf and equal (byte-encoded) length give equal scores.
    for query in ("year", "also", "first century", "known known city"):
        everything = retriever.search([query], k=N_PASSAGES)[0]
        scores = [h.score for h in everything]
        assert any(scores[k - 1] == scores[k] for k in range(1, 25)), f"{query!r}: no tie at a cutoff"
        for k in range(1, 25):
            assert retriever.search([query], k=k)[0] == everything[:k]


def test_stopword_only_query_has_no_hits(retriever: SparseRetriever) -> None:
    assert retriever.search(["the of and", "Denver"], k=5)[0] == []


# ----------------------------------------------------------------------------------------- exact BM25


def test_pure_bm25_equals_lucene_search_scores(retriever: SparseRetriever, questions: list[str]) -> None:
    queries = questions + ["Super Bowl Super Bowl champion", "Broncos", "broncos BRONCOS Broncos'"]
    results = retriever.search(queries, k=20)
    n_exact = n_total = 0
    for query, hits in zip(queries, results, strict=True):
        pure = retriever.score_documents(query, [h.pid for h in hits])
        for hit, score in zip(hits, pure, strict=True):
            assert math.isclose(score, hit.score, rel_tol=1e-5), (query, hit, score)
            n_exact += score == hit.score
            n_total += 1
    print(f"bit-identical scores: {n_exact}/{n_total}")


def test_pure_bm25_equals_compute_query_document_score(
    index_dir: Path, retriever: SparseRetriever, questions: list[str]
) -> None:
    from pyserini.index.lucene import IndexReader  # after the retriever: the JVM is already up

    reader = IndexReader(str(index_dir))
    f32 = np.float32
    for query, hits in zip(questions, retriever.search(questions, k=10), strict=True):
        pure = retriever.score_documents(query, [h.pid for h in hits])
        for hit, score in zip(hits, pure, strict=True):
            lucene = reader.compute_query_document_score(str(hit.pid), query)
            # Anserini scores (1.0 id filter + BM25) in float32, then subtracts the 1.0.
            assert math.isclose(lucene, float(f32(f32(1.0 + score) - f32(1.0))), rel_tol=1e-5, abs_tol=1e-6)


def test_bm25_score_by_hand_from_the_index_statistics(retriever: SparseRetriever) -> None:
    stats = retriever.stats
    query = "Which NFL team represented the AFC at Super Bowl 50?"
    terms = stats.analyze(query)
    assert "the" not in terms and "nfl" in terms  # stopwords dropped, lower-cased
    hit = retriever.search([query], k=1)[0][0]
    dv = stats.doc_vector(hit.pid)
    score = bm25_score(terms, dv.tf, dv.length, stats.df(terms), stats.n_docs, stats.avgdl, 0.9, 0.4)
    assert score == pytest.approx(hit.score, rel=1e-5)
    assert retriever.score_documents(query, [hit.pid]) == [score]
    assert stats.n_docs == N_PASSAGES


def test_document_lengths_match_lucene_norms(retriever: SparseRetriever, index_dir: Path) -> None:
    from pyserini.pyclass import autoclass

    small_float = autoclass("org.apache.lucene.util.SmallFloat")
    for n in [*range(0, 3000), 2**20 + 12345, 2**31 - 1]:
        byte = sparse.int_to_byte4(n)
        assert byte == small_float.intToByte4(n) & 0xFF
        assert sparse.byte4_to_int(byte) == small_float.byte4ToInt(small_float.intToByte4(n))

    utils = autoclass("io.anserini.index.IndexReaderUtils")
    reader = utils.getReader(str(index_dir))
    try:
        norms = autoclass("org.apache.lucene.index.MultiDocValues").getNormValues(reader, "contents")
        for doc in range(reader.maxDoc()):
            assert norms.advanceExact(doc)
            pid = int(utils.convertLuceneDocidToDocid(reader, doc))
            assert norms.longValue() & 0xFF == sparse.int_to_byte4(retriever.stats.doc_vector(pid).length)
    finally:
        reader.close()


# -------------------------------------------------------------------------------------------- errors


def test_bad_requests_are_rejected(retriever: SparseRetriever) -> None:
    with pytest.raises(InvalidRequest, match="k must be a positive"):
        retriever.search(["Denver"], k=0)
    with pytest.raises(InvalidRequest):
        retriever.search(["Denver"], k=-3)
    with pytest.raises(InvalidRequest, match="no queries"):
        retriever.search([], k=5)
    with pytest.raises(InvalidRequest, match="query 1 is empty"):
        retriever.search(["Denver", "  \n"], k=5)
    with pytest.raises(InvalidRequest, match="query 0 is empty"):
        retriever.score_documents("", [0])
    with pytest.raises(NotFound):
        retriever.score_documents("Denver", [N_PASSAGES + 5])


def test_missing_index_is_unavailable(tmp_path: Path) -> None:
    with pytest.raises(Unavailable, match=r"ralmspec assets --profile tiny"):
        SparseRetriever(Layout(tmp_path, "tiny").lucene_index)


# --------------------------------------------------------------------------------------------- build


def test_build_is_idempotent_and_rebuilds_on_change(
    tmp_path: Path, index_dir: Path, squad: tuple[list, list]
) -> None:
    marker = index_dir / sparse.MARKER
    before = marker.stat().st_mtime_ns
    layout = Layout(index_dir.parent.parent, "tiny")
    build_lucene_index(layout.passages, layout.lucene_input, layout.lucene_index)  # up to date: no work
    assert marker.stat().st_mtime_ns == before

    small = Layout(tmp_path, "tiny")
    passages = [dict(p) for p in squad[0][:3]]
    _write_passages(small.passages, passages)
    build_lucene_index(small.passages, small.lucene_input, small.lucene_index)
    passages[2]["text"] = "Zanzibar cloves"
    _write_passages(small.passages, passages)
    build_lucene_index(small.passages, small.lucene_input, small.lucene_index)
    with SparseRetriever(small.lucene_index) as r:
        assert [h.pid for h in r.search(["zanzibar"], k=3)[0]] == [2]
    assert not small.lucene_index.with_name("lucene.tmp").exists()


def test_build_rejects_passage_ids_that_are_not_line_numbers(tmp_path: Path) -> None:
    layout = Layout(tmp_path, "tiny")
    _write_passages(layout.passages, [{"id": 0, "title": "A", "text": "a", "source": "x"},
                                      {"id": 2, "title": "B", "text": "b", "source": "x"}])  # fmt: skip
    with pytest.raises(InvalidRequest, match="passage id 2 != line index 1"):
        build_lucene_index(layout.passages, layout.lucene_input, layout.lucene_index)
    assert not layout.lucene_index.exists()
