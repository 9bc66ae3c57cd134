"""The `ralmspec` CLI as a user runs it (subprocesses, real assets)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

QUESTION = "Who were special guests for the Super Bowl halftime show?"


def ralmspec(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "services.cli", *args], capture_output=True, text=True,
                          timeout=300, env={**__import__("os").environ, "RALMSPEC_PROFILE": "tiny"})


@pytest.mark.slow
def test_ask_prints_answer_passages_and_time_split():
    p = ralmspec("ask", QUESTION, "--retriever", "sparse")
    assert p.returncode == 0, p.stderr
    assert "answer:" in p.stdout and "passages (sparse" in p.stdout and "retrieval" in p.stdout
    assert "Super Bowl 50" in p.stdout  # the title of the passage used


@pytest.mark.slow
def test_ask_is_deterministic_across_processes():
    runs = [json.loads(ralmspec("ask", QUESTION, "--json", "--max-new-tokens", "16").stdout)
            for _ in range(2)]
    assert runs[0]["tokens"] == runs[1]["tokens"] and runs[0]["passages"] == runs[1]["passages"]


@pytest.mark.parametrize("args,message", [
    (["ask", "   "], "question is empty"),
    (["ask", "x", "--retriever", "bogus"], "invalid choice: 'bogus'"),
    (["ask", "x", "--stride", "0"], "stride must be in 1..64, got 0"),
    (["ask", "word " * 1900], "question length must be in 1..2000 characters, got 9499"),
    (["ask", "Who?", "--max-new-tokens", "1900"], "max_new_tokens must be in 1..1024, got 1900"),
    (["knn", "  "], "prompt is empty"),
    (["knn", "The", "--lam", "2"], "lambda"),
    (["knn", "The", "--k", "0"], "neighbours per token"),
])
def test_bad_input_exits_2_with_a_message_not_a_traceback(args, message):
    p = ralmspec(*args)
    assert p.returncode == 2
    assert message in p.stderr and "Traceback" not in p.stderr


def test_assets_is_idempotent_and_prints_the_table():
    p = ralmspec("assets", "--profile", "tiny")  # already built by `make test`: every step is skipped
    assert p.returncode == 0, p.stderr
    assert "profile tiny: 2600 passages" in p.stdout
    for step in ("embeddings", "faiss_flat", "faiss_hnsw", "faiss_ivf", "lucene"):
        assert step in p.stdout
    assert "encoding" not in p.stdout and "building" not in p.stdout


@pytest.mark.slow
def test_knn_speculation_prints_the_baseline_tokens():
    base, spec = (json.loads(ralmspec("knn", "The Super Bowl is", "--json", "--max-new-tokens", "8", *extra).stdout)
                  for extra in ([], ["--speculate", "+P"]))  # a fixed stride: OS³ would not guess at 40k
    s = spec["stats"]
    assert spec["tokens"] == base["tokens"]
    assert s["speculated"] > 0, f"the speculative run never speculated: {s}"
    assert 0 < s["spec_accuracy"] <= 1 and s["matched"] == round(s["spec_accuracy"] * s["speculated"])
    assert s["retrieval_calls"] < len(base["tokens"])  # batched verification: fewer searches than one per token
