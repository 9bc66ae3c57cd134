"""REST drafting vs greedy decoding on the RaLM workload (one run, same prompts, outputs checked equal).

    python -m bench.rest --profile default --prompts 8 --max-new-tokens 64

Each prompt is what iterative RaLM feeds the LM: the top-1 passage for the question, then the QA prompt.
Rows: greedy; REST (corpus datastore); prompt lookup (drafts from the context itself, i.e. the passage);
both merged into one tree; HF transformers' own `generate(prompt_lookup_num_tokens=10)` as the outside peer.
Sampled rows (`--temperature` > 0): plain sampling vs drafted sampling (exact rejection-sampling acceptance, so
the outputs are equally distributed but not equal token for token: each prompt's seed is shared, the draws
are not); their speed-up is over plain sampling.
Then the RaLM combination: RaLMSpec (+P) with and without drafting inside each stride, vs both baselines.
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import replace

import torch

from bench.results_io import write
from services.common.equivalence import compare
from services.datastore.rest_datastore import RestDatastore
from services.gateway.backends import drafted_decode
from services.gateway.inprocess import open_engine
from services.gateway.prompts import qa_prompt
from services.gateway.ralm import RalmConfig
from services.gateway.ralmspec import PRESETS, SpeculativeRalm
from services.gateway.settings import GatewaySettings
from services.lm.decoder import Emitted
from services.lm.types import SamplingParams
from services.retriever.corpus import read_questions

SOURCES = (("rest", "rest"), ("prompt-lookup", "prompt"), ("rest+prompt-lookup", "both"))


def decode(engine, seq: list[int], n: int, draft: str, budget: int,  # type: ignore[no-untyped-def]
           sampling: SamplingParams | None = None) -> tuple[Emitted, float]:
    lm = engine.backends.lm
    sid = lm.open()
    t = time.perf_counter()
    try:
        out = (lm.step(sid, seq, n, False, sampling=sampling) if draft == "none"
               else drafted_decode(engine.backends, sid, seq, n, False, draft, budget, sampling))
    finally:
        lm.close(sid)
    return out, time.perf_counter() - t


def hf_prompt_lookup(engine, seq: list[int], n: int) -> tuple[list[int], float]:  # type: ignore[no-untyped-def]
    model = engine.backends.lm.lm.model
    ids = torch.tensor([seq])
    t = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                             prompt_lookup_num_tokens=10, eos_token_id=engine.tok.eos_token_id,
                             pad_token_id=engine.tok.eos_token_id)
    return out[0, len(seq):].tolist(), time.perf_counter() - t


def lookup_latency(datastore: RestDatastore, contexts: list[list[int]]) -> dict:
    """REST lookup (longest suffix 16..2, up to 5000 matches, 10-token continuations) latency over contexts."""
    times = []
    for ctx in contexts:
        t = time.perf_counter()
        datastore.lookup(ctx, max_suffix=16, min_suffix=2, max_matches=5000, continuation=10)
        times.append(1000 * (time.perf_counter() - t))
    times.sort()
    return {"tokens": datastore.n_tokens, "lookups": len(times), "p50_ms": times[len(times) // 2],
            "p99_ms": times[min(len(times) - 1, int(0.99 * len(times)))], "max_ms": times[-1]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--profile", default="default")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--budgets", nargs="+", type=int, default=[8, 16])
    ap.add_argument("--ralm-requests", type=int, default=3)
    ap.add_argument("--temperature", type=float, default=0.8, help="of the sampled rows; 0: no sampled rows")
    ap.add_argument("--top-p", type=float, default=0.95)
    ap.add_argument("--lookup-profiles", nargs="*", default=["default", "large"],
                    help="REST datastores whose lookup latency is measured on the greedy contexts")
    args = ap.parse_args()
    sampling = SamplingParams(args.temperature, args.top_p).validate()
    settings = GatewaySettings.from_env(profile=args.profile)
    engine = open_engine(settings)
    if engine.backends.drafts is None or "rest" not in engine.backends.drafts.proposers:  # type: ignore[attr-defined]
        raise SystemExit(f"no REST datastore for {args.profile}: run `ralmspec assets --profile {args.profile}`")
    questions = read_questions(settings.layout.questions)
    picked = questions[3 :: max(1, len(questions) // args.prompts)][: args.prompts]
    exact = engine.retriever("exact")
    seqs = []
    for q in picked:
        prompt = engine.encode(qa_prompt(q.question))
        pid = exact.search([engine.query(prompt, RalmConfig(), engine.query_floor(prompt))], 1)[0][0].pid
        seqs.append(engine.bos + list(engine.doc_ids(pid, 256)) + prompt)
    n = args.max_new_tokens
    decode(engine, seqs[0], 4, "none", 8)  # warm up
    methods = [("greedy", "none", 0)] + [(f"{name} (c={b})", src, b) for b in args.budgets for name, src in SOURCES]
    sampled = [] if sampling.greedy else [("sampled", "none", 0)] + [
        (f"sampled-{name} (c={b})", src, b) for b in args.budgets for name, src in SOURCES]
    runs: dict[str, list[tuple[Emitted, float]]] = {m: [] for m, _, _ in methods + sampled}
    hf: list[tuple[list[int], float]] = []
    for i, seq in enumerate(seqs):  # methods interleaved per prompt: machine drift hits all alike
        for name, src, b in methods:
            runs[name].append(decode(engine, seq, n, src, b))
        for name, src, b in sampled:  # one seed per prompt, shared by the sampled methods
            runs[name].append(decode(engine, seq, n, src, b, replace(sampling, seed=i)))
        hf.append(hf_prompt_lookup(engine, seq, n))
    base = runs["greedy"]
    tps = lambda rs: sum(len(e.tokens) for e, _ in rs) / sum(s for _, s in rs)  # noqa: E731
    rows = []
    for name, _, b in methods:
        rs = runs[name]
        verdicts = [compare(g.tokens, g.gaps, e.tokens, e.gaps) for (g, _), (e, _) in zip(base, rs)]
        rows.append({"method": name.split(" ")[0], "budget": b or None, "tokens_per_s": tps(rs),
                     "accepted_per_forward": sum(len(e.tokens) for e, _ in rs) / sum(e.forwards for e, _ in rs),
                     "speedup_vs_greedy": tps(rs) / tps(base), "identical": all(v.identical for v in verdicts),
                     "near_ties": sum(v.near_tie for v in verdicts), "mismatches": sum(not v.ok for v in verdicts)})
        print(rows[-1], flush=True)
    hf_tps = sum(len(t) for t, _ in hf) / sum(s for _, s in hf)
    rows.append({"method": "hf-prompt-lookup", "budget": 10, "tokens_per_s": hf_tps, "accepted_per_forward": None,
                 "speedup_vs_greedy": hf_tps / tps(base),
                 "identical": all(t == g.tokens for (t, _), (g, _) in zip(hf, base)), "near_ties": 0,
                 "mismatches": sum(t != g.tokens for (t, _), (g, _) in zip(hf, base))})
    print(rows[-1], flush=True)
    contexts = [seq + e.tokens[:i] for seq, (e, _) in zip(seqs, base) for i in range(len(e.tokens))]
    lookups = {p: lookup_latency(RestDatastore.load(settings.layout.for_profile(p, settings.data).rest_datastore(
        settings.model)), contexts) for p in args.lookup_profiles}
    print(lookups, flush=True)
    for name, _, b in sampled:  # no token-for-token check: the draws differ, the distribution does not
        rs = runs[name]
        rows.append({"method": name.split(" ")[0], "budget": b or None, "tokens_per_s": tps(rs),
                     "accepted_per_forward": sum(len(e.tokens) for e, _ in rs) / sum(e.forwards for e, _ in rs),
                     "speedup_vs_plain_sampling": tps(rs) / tps(runs["sampled"])})
        print(rows[-1], flush=True)
    # The RaLM combination: iterative retrieval with speculation, with and without drafting in each stride.
    spec = SpeculativeRalm(engine)
    prompts = [qa_prompt(q.question) for q in picked[: args.ralm_requests]]
    greedy_drafting = {name for name, _ in SOURCES}
    best = max((r for r in rows if r["method"] in greedy_drafting), key=lambda r: r["tokens_per_s"])
    combo = []
    for p in prompts:
        cfg = RalmConfig(max_new_tokens=128, stop_at_newline=False)
        drafted = RalmConfig(max_new_tokens=128, stop_at_newline=False, draft="both", draft_budget=best["budget"])
        kv = engine.generate(p, cfg, "exact")
        paper = engine.generate(p, RalmConfig(mode="paper", max_new_tokens=128, stop_at_newline=False), "exact")
        plain = spec.generate(p, cfg, PRESETS["+P"], "exact")
        both = spec.generate(p, drafted, PRESETS["+P"], "exact")
        combo.append({"paper": paper.total_s, "kv": kv.total_s, "ralmspec+P": plain.total_s,
                      "ralmspec+P+rest": both.total_s, "identical": both.tokens == kv.tokens == plain.tokens,
                      "forwards": (plain.lm_forwards, both.lm_forwards)})
        print(combo[-1], flush=True)
    mean = {k: statistics.mean(c[k] for c in combo) for k in ("paper", "kv", "ralmspec+P", "ralmspec+P+rest")}
    combination = {**mean, "speedup_vs_paper": mean["paper"] / mean["ralmspec+P+rest"],
                   "speedup_vs_kv": mean["kv"] / mean["ralmspec+P+rest"],
                   "speedup_vs_ralmspec": mean["ralmspec+P"] / mean["ralmspec+P+rest"],
                   "identical": all(c["identical"] for c in combo), "requests": len(combo)}
    write("rest", {"profile": args.profile, "prompts": len(seqs), "max_new_tokens": n,
                   "torch_threads": torch.get_num_threads(), "sampling": {"temperature": sampling.temperature,
                                                                         "top_p": sampling.top_p},
                   "rows": rows, "ralm_combination": combination, "lookup_latency": lookups},
          ["method", "budget", "tokens_per_s", "accepted_per_forward", "speedup_vs_greedy", "identical", "near_ties",
           "mismatches", "speedup_vs_plain_sampling"],
          f"REST on the RaLM workload ({args.profile}: passage + QA prompt, {len(seqs)} prompts x {n} tokens)",
          f"RaLM combination (exact retriever, 128 tokens, {len(combo)} requests, drafts from both sources, "
          f"c = {best['budget']}): paper {mean['paper']:.1f} s, kv {mean['kv']:.1f} s, RaLMSpec +P "
          f"{mean['ralmspec+P']:.1f} s, RaLMSpec +P with drafting {mean['ralmspec+P+rest']:.1f} s "
          f"({combination['speedup_vs_ralmspec']:.2f}x over RaLMSpec +P, {combination['speedup_vs_paper']:.2f}x over "
          f"the paper baseline); identical {combination['identical']}.\n\nREST lookup latency on the greedy contexts: "
          + ", ".join(f"{p} ({v['tokens']} tokens) p50 {v['p50_ms']:.3f} ms, p99 {v['p99_ms']:.3f} ms"
                      for p, v in lookups.items()))


if __name__ == "__main__":
    main()
