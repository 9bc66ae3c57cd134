"""Vectors off the wire: the checks every service applies before a vector reaches FAISS or the LM."""

from __future__ import annotations

import numpy as np
import pytest

from services.common.errors import InvalidRequest
from services.common.wire import vector_from_bytes


def test_a_well_formed_vector_comes_back_as_float32():
    v = vector_from_bytes(np.arange(4, dtype="<f4").tobytes(), 4, "q")
    assert v.dtype == np.float32 and v.tolist() == [0.0, 1.0, 2.0, 3.0]


@pytest.mark.parametrize("data,dim,message", [
    (b"", None, "q must be float32 values, got 0 bytes"),
    (b"\x00" * 6, None, "q must be float32 values, got 6 bytes"),
    (b"\x00" * 8, 4, r"q must be 4 float32 values \(16 bytes\), got 8 bytes"),
    (np.array([1.0, np.nan], dtype="<f4").tobytes(), 2, "q holds NaN or infinite values"),
    (np.array([1.0, -np.inf], dtype="<f4").tobytes(), 2, "q holds NaN or infinite values"),
    # finite, but FAISS's float32 distances would be inf (found by bench/fuzz.py: exact KNN search then failed)
    (np.full(4, 3e19, dtype="<f4").tobytes(), 4, "q has values too large: its squared norm overflows float32"),
])
def test_malformed_vectors_are_refused_with_a_reason(data, dim, message):
    with pytest.raises(InvalidRequest, match=f"^{message}$"):
        vector_from_bytes(data, dim, "q")
