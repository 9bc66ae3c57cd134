"""Sparse retrieval: BM25 over an Anserini/Lucene 9 index, plus a pure-Python BM25 that reproduces its scores.

Search runs Lucene's own IndexSearcher with BM25Similarity and Anserini's bag-of-words query (the query that
pyserini's LuceneSearcher builds). LuceneSearcher itself is not used: its Java side (Anserini SimpleSearcher)
rounds every score to 4 decimals and nudges near-ties down by 1e-6 steps (ScoreTiesAdjusterReranker), so its
scores are not BM25 scores; and `pyserini.search` imports openai, onnxruntime, tiktoken and PIL at load.

`bm25_score` recomputes Lucene 9's BM25Similarity bit for bit from the index's own statistics, so the
speculation cache can rank cached passages exactly as the index would:
- idf = ln(1 + (N - df + 0.5) / (df + 0.5)) in double, rounded to float32; N = docs with a `contents` field;
- a query term repeated c times is one clause with boost c: weight = float32(c) * idf;
- the document length is stored lossily in one byte (SmallFloat.intToByte4): exact below 24 tokens, above
  that 24 + (len - 24) cut to 4 significant bits (100 tokens score as 96); avgdl uses the true lengths:
  float32(sum of lengths / N);
- per term, in float32: weight - weight / (1 + tf * 1 / (k1 * ((1 - b) + b * len / avgdl))) — Lucene 9
  dropped the (k1 + 1) factor, which rescales every score equally and so never changes a ranking;
- the clause scores are summed in double and rounded to float32 once.

Ranking order everywhere: score descending, ties by passage id ascending (the dense retriever's rule).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import os
import shutil
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

from services.common.errors import InvalidRequest, NotFound, Unavailable
from services.retriever.types import Hit, check_search

log = logging.getLogger(__name__)

K1 = 0.9  # Anserini's BM25 defaults (tuned on MS MARCO; Lucene's own are 1.2 / 0.75)
B = 0.4
FIELD = "contents"  # Anserini's analysed text field; the passage id is the stored field "id"
MARKER = "ralmspec_build.json"  # written last into a finished index: its presence means complete
_INPUT_FILE = "passages.jsonl"
_DOC_CACHE = 1 << 16  # per-document vectors kept for score_documents (the speculation cache rescoring)

_f32 = np.float32


@functools.cache
def _jvm() -> SimpleNamespace:
    """Start the JVM on Anserini's fat jar and load the classes (pyjnius allows one JVM per process)."""
    os.environ.setdefault("OPENAI_API_KEY", "unused")  # some pyserini 0.25 modules read it at import
    # Only these two pyserini modules: they need nothing beyond pyjnius (pyclass sets the jar classpath).
    from pyserini.analysis import Analyzer, get_lucene_analyzer
    from pyserini.pyclass import autoclass

    return SimpleNamespace(
        Analyzer=Analyzer,
        get_lucene_analyzer=get_lucene_analyzer,
        IndexReaderUtils=autoclass("io.anserini.index.IndexReaderUtils"),
        BagOfWordsQueryGenerator=autoclass("io.anserini.search.query.BagOfWordsQueryGenerator"),
        IndexSearcher=autoclass("org.apache.lucene.search.IndexSearcher"),
        BM25Similarity=autoclass("org.apache.lucene.search.similarities.BM25Similarity"),
        Term=autoclass("org.apache.lucene.index.Term"),
    )


# ---------------------------------------------------------------------------------------------- index build


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _read_marker(index_dir: Path) -> dict[str, Any] | None:
    try:
        marker: dict[str, Any] = json.loads((index_dir / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return marker


def _swap_in(tmp: Path, final: Path) -> None:
    """Replace `final` with the finished `tmp` folder; a rename, so readers never see a half-written one."""
    old = final.with_name(final.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def _write_collection(passages_jsonl: Path, input_dir: Path) -> int:
    """Write Anserini's JsonCollection input (DPR style: title kept above the text); returns the count."""
    tmp = input_dir.with_name(input_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    n = 0
    with passages_jsonl.open(encoding="utf-8") as src, (tmp / _INPUT_FILE).open("w", encoding="utf-8") as dst:
        for line_no, line in enumerate(src):
            p = json.loads(line)
            where = f"{passages_jsonl}:{line_no + 1}"
            if p["id"] != line_no:  # the index maps docid -> passage id; a gap would shift every later hit
                raise InvalidRequest(f"{where}: passage id {p['id']} != line index {line_no}")
            contents = f"{p['title']}\n{p['text']}"
            if not contents.strip():  # Anserini silently skips empty documents
                raise InvalidRequest(f"{where}: passage {line_no} has no title or text")
            dst.write(json.dumps({"id": str(line_no), "contents": contents}, ensure_ascii=False) + "\n")
            n += 1
    if n == 0:
        raise InvalidRequest(f"{passages_jsonl} holds no passages")
    _swap_in(tmp, input_dir)
    return n


def build_lucene_index(passages_jsonl: Path, input_dir: Path, index_dir: Path) -> None:
    """Build the BM25 index (positions, doc vectors and raw JSON stored); a no-op when already up to date.

    `input_dir` and `index_dir` belong to this function: both are replaced wholesale.
    """
    if not passages_jsonl.exists():
        profile = passages_jsonl.parent.name
        raise Unavailable(f"{passages_jsonl} is missing: run `ralmspec assets --profile {profile}`")
    digest = _sha256(passages_jsonl)
    marker = _read_marker(index_dir)
    if marker is not None and marker.get("passages_sha256") == digest:
        log.info("BM25 index %s is up to date (%d docs)", index_dir, marker["docs"])
        return

    t0 = time.perf_counter()
    n = _write_collection(passages_jsonl, input_dir)
    tmp = index_dir.with_name(index_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable, "-m", "pyserini.index.lucene",
        "--collection", "JsonCollection", "--input", str(input_dir), "--index", str(tmp),
        "--generator", "DefaultLuceneDocumentGenerator", "--threads", "1",
        "--storePositions", "--storeDocvectors", "--storeRaw",
    ]  # fmt: skip
    # A subprocess keeps Anserini's log4j output, indexing threads and heap out of the caller's JVM.
    env = {**os.environ, "OPENAI_API_KEY": os.environ.get("OPENAI_API_KEY", "unused")}
    proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0:
        tail = "\n".join(proc.stdout.splitlines()[-20:])
        raise RuntimeError(f"Lucene indexing of {input_dir} failed (exit {proc.returncode}):\n{tail}")

    # Anserini exits 0 after a bad argument or skipped documents, so count what actually got indexed.
    reader = _jvm().IndexReaderUtils.getReader(str(tmp))
    try:
        indexed = int(reader.numDocs())
    finally:
        reader.close()
    if indexed != n:
        tail = "\n".join(proc.stdout.splitlines()[-20:])
        raise RuntimeError(f"Lucene indexed {indexed} of {n} passages from {input_dir}:\n{tail}")

    (tmp / MARKER).write_text(json.dumps({"passages_sha256": digest, "docs": n}))
    _swap_in(tmp, index_dir)
    log.info("built BM25 index %s: %d docs in %.1f s", index_dir, n, time.perf_counter() - t0)


# ------------------------------------------------------------------------------------ exact BM25 in Python


def _long_to_int4(i: int) -> int:
    """Lucene SmallFloat.longToInt4: 3 mantissa bits after the implicit one, truncated."""
    num_bits = i.bit_length()
    if num_bits < 4:
        return i
    shift = num_bits - 4
    return ((i >> shift) & 0x07) | ((shift + 1) << 3)


def _int4_to_long(i: int) -> int:
    bits, shift = i & 0x07, (i >> 3) - 1
    return bits if shift == -1 else (bits | 0x08) << shift


_NUM_FREE_VALUES = 255 - _long_to_int4(2**31 - 1)  # = 24 byte values spent on exact small lengths


def int_to_byte4(i: int) -> int:
    """Lucene SmallFloat.intToByte4 (as an unsigned byte): how BM25 stores a document length in the norm."""
    if i < 0:
        raise ValueError(f"length {i} < 0")
    return i if i < _NUM_FREE_VALUES else _NUM_FREE_VALUES + _long_to_int4(i - _NUM_FREE_VALUES)


def byte4_to_int(b: int) -> int:
    """Lucene SmallFloat.byte4ToInt: the length BM25 scores with, given the stored byte."""
    return b if b < _NUM_FREE_VALUES else _NUM_FREE_VALUES + _int4_to_long(b - _NUM_FREE_VALUES)


def lucene_doc_length(n_tokens: int) -> int:
    """The document length as Lucene's BM25 sees it after the lossy one-byte norm (<= n_tokens)."""
    return byte4_to_int(int_to_byte4(n_tokens))


def bm25_idf(df: int, n_docs: int) -> np.float32:
    return _f32(math.log(1.0 + (n_docs - df + 0.5) / (df + 0.5)))


def bm25_score(
    query_terms: Sequence[str],
    doc_tf: Mapping[str, int],
    doc_len: int,
    df: Mapping[str, int],
    n_docs: int,
    avgdl: float,
    k1: float = K1,
    b: float = B,
) -> float:
    """Lucene 9 BM25Similarity score of one document for analysed query terms (repeats count), in float32.

    `doc_len` is the true token count (the norm's rounding is applied here); `avgdl` is the float32 value
    Lucene uses, i.e. float32(sum of lengths / n_docs).
    """
    k1_, b_, avgdl_ = _f32(k1), _f32(b), _f32(avgdl)
    length = _f32(lucene_doc_length(doc_len))
    norm_inverse = _f32(1) / (k1_ * ((_f32(1) - b_) + b_ * length / avgdl_))
    total = 0.0  # Lucene's disjunction and conjunction scorers sum clause scores in a double
    for term, count in Counter(query_terms).items():
        tf = doc_tf.get(term, 0)
        if tf == 0:
            continue
        weight = _f32(count) * bm25_idf(df[term], n_docs)
        total += float(weight - weight / (_f32(1) + _f32(tf) * norm_inverse))
    return float(_f32(total))


@dataclass(frozen=True)
class DocVector:
    tf: dict[str, int]  # analysed term -> frequency, from the stored term vector
    length: int  # indexed tokens, which Lucene's norm encodes: sum of tf (the analyser emits no overlaps)


class Bm25Stats:
    """The corpus statistics BM25 needs, read from an open Lucene index (immutable, so cached freely)."""

    def __init__(self, reader: Any, analyzer: Any) -> None:
        jvm = _jvm()
        self._jvm = jvm
        self._reader = reader
        self._analyzer = jvm.Analyzer(analyzer)
        self.n_docs = int(reader.getDocCount(FIELD))  # Lucene's CollectionStatistics.docCount
        self.avgdl = float(_f32(int(reader.getSumTotalTermFreq(FIELD)) / self.n_docs))
        self._df: dict[str, int] = {}
        self.doc_vector = functools.lru_cache(maxsize=_DOC_CACHE)(self._load_doc_vector)

    def analyze(self, text: str) -> list[str]:
        """Lucene's analysis of `text` (tokenise, lower-case, drop stopwords, Porter-stem), repeats kept."""
        return list(self._analyzer.analyze(text))

    def df(self, terms: Iterable[str]) -> dict[str, int]:
        out = {}
        for t in terms:
            if t not in self._df:
                self._df[t] = int(self._reader.docFreq(self._jvm.Term(FIELD, t)))
            out[t] = self._df[t]
        return out

    def _load_doc_vector(self, pid: int) -> DocVector:
        vec = self._jvm.IndexReaderUtils.getDocumentVector(self._reader, str(pid))
        if vec is None:
            raise NotFound(f"passage {pid} is not in the BM25 index")
        tf = {str(t): int(vec.get(t)) for t in vec.keySet().toArray()}
        return DocVector(tf, sum(tf.values()))

    def score(self, query_terms: Sequence[str], pid: int, k1: float = K1, b: float = B) -> float:
        dv = self.doc_vector(pid)
        df = self.df(set(query_terms))
        return bm25_score(query_terms, dv.tf, dv.length, df, self.n_docs, self.avgdl, k1, b)


# ---------------------------------------------------------------------------------------------- retriever


class SparseRetriever:
    """BM25 top-k over the Lucene index, with exact float32 Lucene scores."""

    name = "sparse"
    dim: int | None = None  # keyed by the query text

    def __init__(self, index_dir: Path, k1: float = K1, b: float = B) -> None:
        if _read_marker(index_dir) is None:
            profile = index_dir.parent.name  # Layout keeps the index at <data>/<profile>/lucene
            raise Unavailable(f"no BM25 index at {index_dir}: run `ralmspec assets --profile {profile}`")
        jvm = _jvm()
        self._jvm = jvm
        self.index_dir = index_dir
        self.k1, self.b = k1, b
        self._reader = jvm.IndexReaderUtils.getReader(str(index_dir))
        self._searcher = jvm.IndexSearcher(self._reader)
        self._searcher.setSimilarity(jvm.BM25Similarity(float(k1), float(b)))
        self._analyzer = jvm.get_lucene_analyzer()  # Anserini's English default, as used for indexing
        self._query_generator = jvm.BagOfWordsQueryGenerator()
        self.stats = Bm25Stats(self._reader, self._analyzer)
        self.size = self.stats.n_docs
        log.info("opened BM25 index %s: %d docs, avgdl %.1f", index_dir, self.stats.n_docs, self.stats.avgdl)

    def close(self) -> None:
        self._reader.close()

    def __enter__(self) -> SparseRetriever:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def search(self, queries: Sequence[str], k: int) -> list[list[Hit]]:
        """Top-k hits per query, score descending then passage id ascending; [] for a stopword-only query."""
        check_search(queries, k)
        # One query at a time on the calling thread: on 2 shared cores a Java thread pool adds contention.
        return [self._search_one(q, k) for q in queries]

    def embed(self, queries: Sequence[str]) -> list[str]:
        """BM25 scores a query by its text: the key is the text itself."""
        check_search(queries, 1)
        return list(queries)

    def search_embedded(self, keys: Sequence[str], k: int) -> list[list[Hit]]:
        return self.search(keys, k)

    def score(self, key: str, pids: Sequence[int]) -> list[float]:
        return self.score_documents(key, list(pids))

    def _search_one(self, query: str, k: int) -> list[Hit]:
        lucene_query = self._query_generator.buildQuery(FIELD, self._analyzer, query)
        # Lucene breaks score ties by its internal docid; to break them by passage id instead, fetch until the
        # group of documents tied with the k-th one is complete, then sort.
        n = k + 1
        while True:
            docs = self._searcher.search(lucene_query, n).scoreDocs
            if len(docs) < n or docs[n - 1].score < docs[k - 1].score:
                break
            n *= 2
        hits = [Hit(float(d.score), self._pid(d.doc)) for d in docs]
        hits.sort(key=lambda h: (-h.score, h.pid))
        return hits[:k]

    def _pid(self, lucene_docid: int) -> int:
        return int(self._jvm.IndexReaderUtils.convertLuceneDocidToDocid(self._reader, lucene_docid))

    def score_documents(self, query: str, pids: list[int]) -> list[float]:
        """Lucene's BM25 score of `query` for each passage (0.0 when no term matches), computed in Python."""
        check_search([query], 1)
        terms = self.stats.analyze(query)
        return [self.stats.score(terms, pid, self.k1, self.b) for pid in pids]
