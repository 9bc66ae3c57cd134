"""Dense retrieval on the real tiny-profile embeddings and FAISS indexes."""

from __future__ import annotations

import numpy as np
import pytest

from services.common.errors import InvalidRequest
from services.retriever.dense import DenseIndex, exact_topk, load_index
from services.retriever.encoder import DIM, Encoder


@pytest.fixture(scope="module")
def vectors(layout):
    return np.load(layout.embeddings)


@pytest.fixture(scope="module")
def encoder():
    return Encoder()


@pytest.fixture(scope="module")
def query_vectors(encoder, questions):
    return encoder.encode_queries([q.question for q in questions[::97][:60]])


def test_embeddings_are_normalised_rows_per_passage(vectors, engine):
    assert vectors.shape == (len(engine.docs), DIM) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)


def open_index(layout, vectors, kind):
    return DenseIndex(load_index(layout.faiss_index(kind)), kind, vectors)


def test_flat_search_equals_numpy_brute_force(layout, vectors, query_vectors):
    flat = open_index(layout, vectors, "flat")
    got = flat.search_vectors(query_vectors, 10)
    want = exact_topk(vectors, query_vectors, 10)
    for g, w in zip(got, want):
        assert [h.pid for h in g] == [h.pid for h in w]
        np.testing.assert_allclose([h.score for h in g], [h.score for h in w], rtol=0, atol=1e-12)  # both float64


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivf"])
def test_batched_search_equals_one_by_one(layout, vectors, query_vectors, kind):
    flat = open_index(layout, vectors, kind)
    batched = flat.search_vectors(query_vectors, 5)
    single = [flat.search_vectors(query_vectors[i : i + 1], 5)[0] for i in range(len(query_vectors))]
    assert batched == single


@pytest.mark.parametrize("kind", ["hnsw", "ivf"])
def test_approximate_indexes_find_most_exact_neighbours(layout, vectors, query_vectors, kind):
    index = open_index(layout, vectors, kind)
    got = index.search_vectors(query_vectors, 10)
    want = exact_topk(vectors, query_vectors, 10)
    recall = np.mean([len({h.pid for h in g} & {h.pid for h in w}) / 10 for g, w in zip(got, want)])
    assert recall > 0.9, recall
    for row in got:
        assert [h.score for h in row] == sorted((h.score for h in row), reverse=True)


def test_query_encoding_is_independent_of_batch(encoder):
    qs = ["who won super bowl 50?", "what is the capital of france", "a"]
    together = encoder.encode_queries(qs)
    for i, q in enumerate(qs):
        assert np.array_equal(encoder.encode_queries([q])[0], together[i])


def test_bad_input_is_rejected(layout, vectors, query_vectors):
    flat = open_index(layout, vectors, "flat")
    with pytest.raises(InvalidRequest, match="k must be a positive"):
        flat.search_vectors(query_vectors, 0)
    with pytest.raises(InvalidRequest, match=r"\[n, 384\]"):
        flat.search_vectors(np.zeros((2, 7), np.float32), 3)
