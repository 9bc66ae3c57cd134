"""`ralmspec assets --profile tiny|default|large`: build every asset of a profile, idempotently.

Steps (each skipped when its output exists): corpus -> passages + questions; passage embeddings;
FAISS flat / HNSW / IVF; Lucene BM25 index; the LM converted from GGUF to an HF folder; REST's datastore
(a suffix array over the passages' token ids under that LM's tokenizer); KNN-LM's datastore (the LM's final
hidden state per corpus token, capped per profile by KNN_MAX_ENTRIES, with its IVF index; resumable).
Each step's build time and size are recorded in `<profile>/manifest.json` and printed as a table.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Collection
from pathlib import Path

import numpy as np

from services.common.errors import InvalidRequest
from services.common.layout import PROFILES, Layout

log = logging.getLogger(__name__)

# KNN-LM datastore entries (corpus tokens) per profile; None = the whole corpus. Measured on 2 CPU cores (float32,
# ~420-470 tokens/s while nothing else runs): tiny in about 2 min, default (600k) in 25 min, large (2M, the scaling
# run's size) in about 75 min, resumable, or about 53 once default's is built (its 600k entries are large's first
# passages and seed them). large's whole corpus (~5.5M tokens) would take 3.5 hours and its float32 flat index
# 12.7 GB of RAM in each retriever replica: 2M keeps it at 4.6 GB (+ 2.3 GB for the fp16 twin).
KNN_MAX_ENTRIES: dict[str, int | None] = {"tiny": 40_000, "default": 600_000, "large": 2_000_000}


def _size(path: Path) -> int:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size if path.exists() else 0


def _done(manifest: dict, name: str, out: Path) -> bool:
    return out.exists() and name in manifest


def _step(manifest: dict, name: str, out: Path, build: Callable[[], None], save: Path) -> None:
    """Run one build step unless its output exists; record time and size at once (resumable)."""
    if _done(manifest, name, out):
        return
    t = time.perf_counter()
    build()
    manifest[name] = {"seconds": round(time.perf_counter() - t, 2), "bytes": _size(out), "path": str(out)}
    save.write_text(json.dumps(manifest, indent=2))


STEPS = ("corpus", "embeddings", "faiss", "lucene", "lm", "rest", "knn")  # in build order


def missing(profile: str, layout: Layout | None = None, model: str = "smollm2-135m",
            skip: Collection[str] = ()) -> list[str]:
    """The steps `build` would run now (nothing is built)."""
    todo: list[str] = []
    build(profile, layout, model, skip, plan=todo)
    return todo


def build(profile: str, layout: Layout | None = None, model: str = "smollm2-135m",
          skip: Collection[str] = (), plan: list[str] | None = None) -> dict:
    """Build every step of a profile not in `skip` (a later step still needs what it reads: skip only what
    nothing after it uses, e.g. `knn`, whose whole-corpus build takes hours on a CPU). With `plan`, only list
    the steps still to build into it."""
    if profile not in PROFILES:
        raise InvalidRequest(f"unknown profile {profile!r}; choose one of {', '.join(PROFILES)}")
    unknown = set(skip) - set(STEPS)
    if unknown:
        raise InvalidRequest(f"unknown asset steps {sorted(unknown)}; steps are {', '.join(STEPS)}")
    lay = layout or Layout.for_profile(profile)
    lay.root.mkdir(parents=True, exist_ok=True)
    manifest: dict = json.loads(lay.manifest.read_text()) if lay.manifest.exists() else {}

    def corpus() -> None:
        from services.retriever.corpus import build_passages, write_jsonl

        passages, questions = build_passages(profile, lay.cache)
        write_jsonl(lay.questions, questions)
        write_jsonl(lay.passages, passages)

    def embeddings() -> None:
        from services.retriever.corpus import read_passages
        from services.retriever.docstore import DocStore
        from services.retriever.encoder import Encoder, bf16_is_fast

        store = DocStore(read_passages(lay.passages))
        texts = [store.document(i) for i in range(len(store))]
        print(f"encoding {len(texts)} passages ({'bf16' if bf16_is_fast('cpu') else 'float32'})", flush=True)
        vecs = Encoder().encode_passages(texts, bf16=True, progress=True)
        tmp = lay.embeddings.with_name("embeddings.part.npy")
        np.save(tmp, vecs)
        tmp.rename(lay.embeddings)

    def faiss_index(kind: str) -> Callable[[], None]:
        def run() -> None:
            import faiss

            from services.retriever.dense import build_index

            vecs = np.load(lay.embeddings)
            print(f"building FAISS {kind} over {len(vecs)} vectors", flush=True)
            index = build_index(kind, vecs)
            tmp = lay.faiss_index(kind).with_suffix(".part")
            faiss.write_index(index, str(tmp))
            tmp.rename(lay.faiss_index(kind))

        return run

    def lucene() -> None:
        from services.retriever.sparse import build_lucene_index

        print("building Lucene BM25 index", flush=True)
        build_lucene_index(lay.passages, lay.lucene_input, lay.lucene_index)

    def lm() -> None:
        from services.lm.model import convert

        convert(model, lay.models)

    def rest() -> None:
        from services.datastore.rest_datastore import build_from_texts
        from services.lm.model import load_tokenizer
        from services.retriever.corpus import read_passages
        from services.retriever.docstore import DocStore

        tok, _ = load_tokenizer(model, lay.models)
        store = DocStore(read_passages(lay.passages))
        texts = (store.document(i) for i in range(len(store)))
        encode = lambda t: list(tok(t, add_special_tokens=False).input_ids)  # type: ignore[operator]  # noqa: E731
        print(f"building the REST datastore over {len(store)} passages", flush=True)
        build_from_texts(texts, encode, len(tok), lay.rest_datastore(model))  # type: ignore[arg-type]

    def knn() -> None:
        from services.lm.model import load
        from services.retriever.corpus import read_passages
        from services.retriever.docstore import DocStore
        from services.retriever.knn_build import build as build_knn

        store = DocStore(read_passages(lay.passages))
        texts = (store.document(i) for i in range(len(store)))
        cap = KNN_MAX_ENTRIES[profile]
        print(f"building the KNN-LM datastore ({cap or 'all'} tokens of {len(store)} passages)", flush=True)
        # another profile's datastore over a prefix of these passages (default's is large's first 600k) seeds it
        seeds = [Layout(lay.data, p).knn_datastore(model) for p in PROFILES if p != profile]
        build_knn(load(model, lay.models, device="auto"), texts, lay.knn_datastore(model), max_tokens=cap,
                  seeds=seeds)

    steps: list[tuple[str, str, Path, Callable[[], None]]] = [
        ("corpus", "corpus", lay.passages, corpus), ("embeddings", "embeddings", lay.embeddings, embeddings),
        *[("faiss", f"faiss_{kind}", lay.faiss_index(kind), faiss_index(kind)) for kind in ("flat", "hnsw", "ivf")],
        ("lucene", "lucene", lay.lucene_index, lucene), ("lm", f"lm_{model}", lay.models / model, lm),
        ("rest", f"rest_{model}", lay.rest_datastore(model), rest),
        ("knn", f"knn_{model}", lay.knn_datastore(model), knn)]
    for group, name, out, run in steps:
        if group in skip:
            continue
        if plan is None:
            _step(manifest, name, out, run, lay.manifest)
        elif not _done(manifest, name, out):
            plan.append(name)
    if plan is not None:
        return manifest
    with lay.passages.open() as f:
        manifest["passages"] = sum(1 for _ in f)
    with lay.questions.open() as f:
        manifest["questions"] = sum(1 for _ in f)
    lay.manifest.write_text(json.dumps(manifest, indent=2))
    return manifest


def table(profile: str, manifest: dict) -> str:
    rows = [f"profile {profile}: {manifest['passages']} passages, {manifest['questions']} questions",
            f"{'step':<18}{'build s':>10}{'size MB':>10}"]
    for name, v in manifest.items():
        if isinstance(v, dict):
            rows.append(f"{name:<18}{v['seconds']:>10.1f}{v['bytes'] / 2**20:>10.1f}")
    return "\n".join(rows)
