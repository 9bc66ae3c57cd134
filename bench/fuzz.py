"""Fuzz every public input of a running cluster: generated requests to the gateway, malformed entries onto every
service's Redis stream, and check that nothing crashes, hangs or grows without bound.

    python -m bench.fuzz --profile tiny --requests 10000 --entries 10000     (the full run, ~30 min here)
    python -m bench.fuzz --quick                                              (1,000 + 1,000, in make test)

One `services.up.Cluster` (Redis + every service). Inputs come from one seeded generator:
- **gateway** (`GenerateRequest` over gRPC, raw bytes so that broken encodings go out too): a message filled field
  by field from its descriptor with values biased to edges (0, -1, 2^31 - 1, 2^63 - 1, NaN, inf, empty and
  100k-character strings, unknown enum numbers, repeated fields of 0..1000 items), or a valid seed request
  mutated at the byte level (bit flips, truncation, inserted bytes, wire-type swaps), or random bytes, or a body
  just over the gateway's message limit. Each call has a 2 s gRPC deadline.
- **streams** (every service's shared stream and each pinned replica's own stream): entries with a random
  operation (mostly a real one), a body made the same ways from the operation's request type, and a broken
  envelope now and then (no id, no reply_to, a non-numeric deadline, unknown fields, a body over the entry limit).
  Each carries a deadline 5 s ahead; at most `IN_FLIGHT` entries per stream are outstanding (streams are trimmed,
  and an entry trimmed before a worker read it would count as a hang).
After the entries, the LM sessions and speculation caches they opened are closed as their caller would (an
open one holds a replica's slot until it expires). Pass: every gateway call ends in OK, INVALID_ARGUMENT,
RESOURCE_EXHAUSTED or DEADLINE_EXCEEDED; every stream entry that names a reply stream is answered with one of those
or NOT_FOUND within its deadline + `HANG_S`; every close finds what was opened; every process is alive and SERVING
afterwards; a probe request gives the same tokens before and after; resident memory of every service stays within
`RSS_GROWTH` of its start.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import random
import struct
import time
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import grpc
import redis.asyncio as aioredis
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2, health_pb2_grpc
from ralmspec.v1 import datastore_pb2 as ds
from ralmspec.v1 import gateway_pb2 as pb
from ralmspec.v1 import lm_pb2 as lm

from bench import results_io
from services.common.contracts import GATEWAY, SERVICES, replica_stream
from services.common.grpc_server import GATEWAY_MAX_MESSAGE_BYTES
from services.common.transport import MAX_ENTRY_BYTES, StreamClient
from services.up import Cluster

GATEWAY_OK = {"OK", "INVALID_ARGUMENT", "RESOURCE_EXHAUSTED", "DEADLINE_EXCEEDED"}
STREAM_OK = GATEWAY_OK | {"NOT_FOUND"}
CALL_TIMEOUT_S = 2.0  # each gateway call's gRPC deadline
ENTRY_DEADLINE_S = 5.0  # each stream entry's deadline_ms, from when it is sent
HANG_S = 10.0  # an entry unanswered this long after its deadline is a hang
IN_FLIGHT = 32  # outstanding entries per stream
RSS_GROWTH = 1.5  # a service's peak RSS may reach this x its RSS at the start (+ RSS_SLACK_MB)
RSS_SLACK_MB = 300.0
# What a fuzzed entry may open, and how a well-behaved caller closes it: op -> (service, close op, request of an id).
CLOSERS = {"OpenSession": ("lm", "CloseSession", lambda sid: lm.CloseSessionRequest(session_id=sid)),
           "OpenCache": ("datastore", "CloseCache", lambda cid: ds.CloseCacheRequest(cache_id=cid)),
           "OpenKnnCache": ("datastore", "CloseCache", lambda cid: ds.CloseCacheRequest(cache_id=cid))}
PROBE = pb.GenerateRequest(question="Who wrote Hamlet?", max_new_tokens=8, mode=pb.MODE_BASELINE_KV)
INTS = (0, 1, 2, 3, 7, 16, 64, 1024, -1, -2, 2**31 - 1, -(2**31), 2**32 - 1)
INTS64 = (*INTS, 2**63 - 1, -(2**63), 2**64 - 1)
FLOATS = (0.0, -0.0, 0.5, 1.0, -1.0, 1e-9, 1e308, -1e308, math.inf, -math.inf, math.nan, 3.0, 100.0)
TEXTS = ("", " ", "\n\n", "Who wrote Hamlet?", "The history of", "\x00", "é" * 10, "a" * 1000, "word " * 20_000,
         "\ud7ff" * 3, "🙂" * 50)


def _int_range(f: FieldDescriptor) -> tuple[int, int]:
    unsigned = f.type in (FieldDescriptor.TYPE_UINT32, FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_FIXED32,
                          FieldDescriptor.TYPE_FIXED64)
    wide = f.type in (FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_SINT64,
                      FieldDescriptor.TYPE_FIXED64, FieldDescriptor.TYPE_SFIXED64)
    bits = 64 if wide else 32
    return (0, 2**bits - 1) if unsigned else (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)


def _scalar(f: FieldDescriptor, rng: random.Random) -> object:
    if f.type == FieldDescriptor.TYPE_BOOL:
        return rng.random() < 0.5
    if f.type in (FieldDescriptor.TYPE_FLOAT, FieldDescriptor.TYPE_DOUBLE):
        v = rng.choice(FLOATS) if rng.random() < 0.7 else rng.uniform(-10, 10)
        return v if f.type == FieldDescriptor.TYPE_DOUBLE or not math.isfinite(v) else struct.unpack(
            "f", struct.pack("f", max(-3e38, min(3e38, v))))[0]
    if f.type == FieldDescriptor.TYPE_STRING:
        return rng.choice(TEXTS) if rng.random() < 0.8 else "".join(chr(rng.randrange(32, 0x3000))
                                                                    for _ in range(rng.randrange(50)))
    if f.type == FieldDescriptor.TYPE_BYTES:
        return rng.randbytes(rng.choice((0, 1, 16, 576 * 4, 4096)))
    if f.type == FieldDescriptor.TYPE_ENUM:
        return rng.choice([v.number for v in f.enum_type.values] + [99, -1])
    lo, hi = _int_range(f)
    v = rng.choice(INTS64) if rng.random() < 0.7 else rng.randrange(-5, 50)
    return v if lo <= v <= hi else lo if v < lo else hi


def random_message(cls: type[Message], rng: random.Random, depth: int = 0) -> Message:
    """A `cls` with each field set or not, values biased to edges (the structure-aware half of the fuzzer)."""
    msg = cls()
    oneofs_done: set[str] = set()
    for f in cls.DESCRIPTOR.fields:
        if f.containing_oneof is not None:
            if f.containing_oneof.name in oneofs_done or rng.random() < 0.3:
                continue
            oneofs_done.add(f.containing_oneof.name)
        elif rng.random() < 0.35:
            continue
        if f.message_type is not None:
            if depth >= 3:
                continue
            sub = f.message_type._concrete_class
            if f.is_repeated:
                getattr(msg, f.name).extend(random_message(sub, rng, depth + 1) for _ in range(rng.choice((0, 1, 3))))
            else:
                getattr(msg, f.name).CopyFrom(random_message(sub, rng, depth + 1))
        elif f.is_repeated:
            n = rng.choice((0, 1, 2, 5, 64, 1000))
            getattr(msg, f.name).extend(_scalar(f, rng) for _ in range(n))
        else:
            setattr(msg, f.name, _scalar(f, rng))
    return msg


def mutate(body: bytes, rng: random.Random) -> bytes:
    """Byte-level damage to an encoded message (the other half)."""
    b = bytearray(body)
    for _ in range(rng.randrange(1, 4)):
        kind = rng.randrange(5)
        if kind == 0 and b:  # bit flip
            i = rng.randrange(len(b))
            b[i] ^= 1 << rng.randrange(8)
        elif kind == 1 and b:  # truncation
            del b[rng.randrange(len(b)):]
        elif kind == 2:  # inserted bytes
            i = rng.randrange(len(b) + 1)
            b[i:i] = rng.randbytes(rng.randrange(1, 9))
        elif kind == 3 and b:  # a tag with another wire type
            i = rng.randrange(len(b))
            b[i] = (b[i] & ~7) | rng.choice((0, 1, 2, 3, 4, 5, 6, 7))
        else:  # a length-delimited field claiming a huge length
            b += bytes([(rng.randrange(1, 16) << 3) | 2, 0xFF, 0xFF, 0xFF, 0xFF, 0x0F])
    return bytes(b)


def fuzz_body(cls: type[Message], seeds: Sequence[Message], rng: random.Random, limit: int) -> bytes:
    r = rng.random()
    if r < 0.55:
        return random_message(cls, rng).SerializeToString()
    if r < 0.85:
        return mutate(rng.choice(seeds).SerializeToString(), rng)
    if r < 0.98:
        return rng.randbytes(rng.randrange(0, 256))
    return b"\x0a" + b"\xff" * 4 + b"\x0f" + b"x" * (limit + 1)  # over the limit


def gateway_seeds() -> list[Message]:
    return [PROBE, pb.GenerateRequest(prompt="The history of", max_new_tokens=4, mode=pb.MODE_BASELINE_KV),
            pb.GenerateRequest(question="Who wrote Hamlet?", max_new_tokens=4),
            pb.GenerateRequest(prompt="The history of", max_new_tokens=4, knn=pb.Knn(k=16))]


@dataclass
class Tally:
    sent: int = 0
    codes: Counter[str] = field(default_factory=Counter)
    bad: list[str] = field(default_factory=list)  # examples of answers outside the allowed set
    hangs: int = 0
    opened: list[tuple[str, str, str]] = field(default_factory=list)  # (open op, replica stream, id) answered OK
    closed: int = 0  # of those, closed again at the end (the close found them)

    def record(self, code: str, allowed: set[str], what: str) -> None:
        self.codes[code] += 1
        if code not in allowed and len(self.bad) < 20:
            self.bad.append(f"{code}: {what}"[:400])


async def fuzz_gateway(cluster: Cluster, n: int, rng: random.Random, concurrency: int = 8) -> Tally:
    tally, sem = Tally(), asyncio.Semaphore(concurrency)
    seeds = gateway_seeds()
    async with cluster.aio_channel() as channel:  # with the API token: the requests reach validation
        call = channel.unary_unary(GATEWAY.method("Generate"))  # bytes in, bytes out

        async def one(body: bytes) -> None:
            async with sem:
                t = time.monotonic()
                try:
                    pb.GenerateReply.FromString(await call(body, timeout=CALL_TIMEOUT_S))
                    code, msg = "OK", ""
                except grpc.aio.AioRpcError as e:
                    code, msg = e.code().name, e.details() or ""
                if time.monotonic() - t > CALL_TIMEOUT_S + HANG_S:
                    tally.hangs += 1
                tally.record(code, GATEWAY_OK, f"{msg} <- {body[:80]!r}")

        tasks = []
        for _ in range(n):
            tasks.append(asyncio.create_task(one(fuzz_body(pb.GenerateRequest, seeds, rng,
                                                           GATEWAY_MAX_MESSAGE_BYTES))))
            tally.sent += 1
            await asyncio.sleep(0)
        await asyncio.gather(*tasks)
    return tally


async def fuzz_streams(cluster: Cluster, n: int, rng: random.Random) -> Tally:
    """XADD `n` malformed entries spread over every service stream; wait for every reply that can come."""
    tally = Tally()
    r = aioredis.from_url(cluster.redis_url)
    reply_to = f"ralmspec:reply:fuzz:{uuid.uuid4().hex}"
    targets: list[tuple[str, str]] = []  # (stream, service)
    for name, service in SERVICES.items():
        if name == "gateway":
            continue
        targets.append((service.stream, name))
        targets += [(replica_stream(service, c.replica), name) for c in cluster.children if c.service == name
                    and name in ("lm", "datastore")]
    waiting: dict[bytes, tuple[float, str]] = {}  # correlation id -> (deadline, what)
    per_stream: Counter[str] = Counter()
    last = b"0-0"

    async def collect(block_ms: int) -> None:
        nonlocal last
        got = await r.xread({reply_to: last}, count=500, block=block_ms)
        for _, entries in got or []:
            for entry_id, f in entries:
                last = entry_id
                cid = f.get(b"id", b"")
                if cid in waiting:
                    _, what = waiting.pop(cid)
                    stream, op_name = what.split(" ", 1)
                    per_stream[stream] -= 1
                    code = f.get(b"code", b"?").decode()
                    tally.record(code, STREAM_OK, f"{f.get(b'message', b'').decode(errors='replace')} <- {what}")
                    if code == "OK" and op_name in CLOSERS:
                        service = SERVICES[CLOSERS[op_name][0]]
                        got = service.ops[op_name].reply.FromString(f.get(b"body", b""))
                        tally.opened.append((op_name, got.replica_stream,
                                             got.session_id if op_name == "OpenSession" else got.cache_id))

    for i in range(n):
        stream, name = targets[i % len(targets)]
        while per_stream[stream] >= IN_FLIGHT:
            await collect(200)
            expire(waiting, per_stream, tally)
        ops = SERVICES[name].ops
        op_name = rng.choice(list(ops)) if rng.random() < 0.9 else rng.choice(("", "Nope", "step", "\x00" * 3))
        cls = ops[op_name].request if op_name in ops else pb.GenerateRequest
        cid = uuid.uuid4().hex.encode()
        deadline = time.time() + ENTRY_DEADLINE_S
        fields: dict[bytes, bytes | str | int] = {b"op": op_name, b"id": cid, b"reply_to": reply_to,
                                                   b"deadline_ms": int(deadline * 1000),
                                                   b"body": fuzz_body(cls, [cls()], rng, MAX_ENTRY_BYTES)}
        broken = rng.random()
        if broken < 0.03:
            del fields[b"reply_to"]
        elif broken < 0.06:
            fields[b"deadline_ms"] = rng.choice((b"soon", b"-1", b"1e99", b"99999999999999999999"))
        elif broken < 0.08:
            fields[b"extra" + rng.randbytes(4)] = rng.randbytes(16)
        elif broken < 0.09:
            fields[b"id"] = b""
        await r.xadd(stream, fields, maxlen=100_000, approximate=True)  # type: ignore[arg-type]
        tally.sent += 1
        if b"reply_to" in fields and fields[b"id"]:
            waiting[cid] = (deadline, f"{stream} {op_name}")
            per_stream[stream] += 1
        if i % 64 == 0:
            await collect(1)
    end = time.time() + ENTRY_DEADLINE_S + HANG_S
    while waiting and time.time() < end:
        await collect(500)
    tally.hangs += len(waiting)
    tally.bad += [f"no reply: {what}" for _, what in list(waiting.values())[:5]]
    await r.delete(reply_to)
    await r.aclose()
    await close_opened(cluster, tally)
    return tally


async def close_opened(cluster: Cluster, tally: Tally) -> None:
    """Close the LM sessions and speculation caches the fuzzed entries opened, as their caller would have (else
    they hold their replica's session slots until they expire, `RALMSPEC_LM_SESSION_IDLE_S`); each close must
    find its session."""
    async with StreamClient(cluster.redis_url, name="fuzz") as client:
        for op_name, stream, sid in tally.opened:
            service, close_op, request = CLOSERS[op_name]
            reply = await client.call(stream, SERVICES[service].ops[close_op], request(sid), timeout_s=30)
            tally.closed += bool(reply.existed)  # type: ignore[attr-defined]


def expire(waiting: dict[bytes, tuple[float, str]], per_stream: Counter[str], tally: Tally) -> None:
    """Entries unanswered `HANG_S` past their deadline are hangs (and free their stream's slot)."""
    now = time.time()
    for cid, (deadline, what) in list(waiting.items()):
        if now > deadline + HANG_S:
            waiting.pop(cid)
            per_stream[what.split(" ", 1)[0]] -= 1
            tally.hangs += 1
            if len(tally.bad) < 20:
                tally.bad.append(f"no reply: {what}")


async def sample_rss(cluster: Cluster, peak: dict[str, float], every_s: float = 0.5) -> None:
    while True:
        for service, mb in cluster.rss_mb().items():
            peak[service] = max(peak.get(service, 0.0), mb)
        await asyncio.sleep(every_s)


def probe(cluster: Cluster) -> list[int]:
    with cluster.channel() as ch:
        return list(ch.unary_unary(GATEWAY.method("Generate"), response_deserializer=pb.GenerateReply.FromString)(
            PROBE.SerializeToString(), timeout=300).token_ids)


def serving(cluster: Cluster) -> dict[str, bool]:
    """Each replica: alive and answering SERVING."""
    out = {}
    for c in cluster.children:
        ok = c.proc.poll() is None
        if ok:
            with grpc.insecure_channel(f"127.0.0.1:{c.port}") as ch:
                try:
                    ok = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10).status \
                        == health_pb2.HealthCheckResponse.SERVING
                except grpc.RpcError:
                    ok = False
        out[c.replica] = ok
    return out


async def run(cluster: Cluster, requests: int, entries: int, seed: int) -> dict:
    start_rss = cluster.rss_mb()
    peak: dict[str, float] = dict(start_rss)
    sampler = asyncio.create_task(sample_rss(cluster, peak))
    t0 = time.perf_counter()
    try:
        gw = await fuzz_gateway(cluster, requests, random.Random(seed))
        t1 = time.perf_counter()
        st = await fuzz_streams(cluster, entries, random.Random(seed + 1))
        t2 = time.perf_counter()
    finally:
        sampler.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sampler
    bounded = {s: peak[s] <= RSS_GROWTH * start_rss.get(s, 0.0) + RSS_SLACK_MB for s in peak}
    return {"gateway": {"sent": gw.sent, "codes": dict(gw.codes), "hangs": gw.hangs, "bad_examples": gw.bad,
                        "seconds": round(t1 - t0, 1)},
            "streams": {"sent": st.sent, "codes": dict(st.codes), "hangs": st.hangs, "bad_examples": st.bad,
                        "seconds": round(t2 - t1, 1), "opened": len(st.opened), "closed": st.closed},
            "start_rss_mb": start_rss, "max_rss_mb": peak, "rss_bounded": bounded,
            "unexpected_codes": (sum(n for c, n in gw.codes.items() if c not in GATEWAY_OK)
                                 + sum(n for c, n in st.codes.items() if c not in STREAM_OK)),
            "hangs": gw.hangs + st.hangs}


def main(argv: Sequence[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="1,000 requests and 1,000 entries (make test)")
    ap.add_argument("--profile", default="tiny")
    ap.add_argument("--requests", type=int, default=10_000, help="generated gateway requests")
    ap.add_argument("--entries", type=int, default=10_000, help="malformed stream entries")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--name", default=None, help="results file name (default fuzz, fuzz_quick with --quick)")
    args = ap.parse_args(argv)
    requests, entries = (1000, 1000) if args.quick else (args.requests, args.entries)
    name = args.name or ("fuzz_quick" if args.quick else "fuzz")
    with Cluster(args.profile) as cluster:
        before = probe(cluster)
        out = asyncio.run(run(cluster, requests, entries, args.seed))
        alive = serving(cluster)
        after = probe(cluster)
    crashes = sum(not ok for ok in alive.values())
    payload = {"profile": args.profile, "inputs_sent": out["gateway"]["sent"] + out["streams"]["sent"],
               "requests_sent": out["gateway"]["sent"], "entries_sent": out["streams"]["sent"], "crashes": crashes,
               "serving_after": alive, "probe_identical": before == after, **out}
    closed_all = out["streams"]["closed"] == out["streams"]["opened"]
    payload["passed"] = (crashes == 0 and out["hangs"] == 0 and out["unexpected_codes"] == 0 and closed_all
                         and payload["probe_identical"] and all(out["rss_bounded"].values()))
    rows = [{"target": t, "sent": out[t]["sent"], "seconds": out[t]["seconds"], "hangs": out[t]["hangs"],
             **{c: n for c, n in sorted(out[t]["codes"].items())}} for t in ("gateway", "streams")]
    payload["rows"] = rows
    codes = sorted({c for r in rows for c in r} - {"target", "sent", "seconds", "hangs"})
    rss = ", ".join(f"{s} {out['start_rss_mb'].get(s, 0):.0f} -> {m:.0f} MB" for s, m in out["max_rss_mb"].items())
    notes = (f"Crashes (a replica not alive and SERVING afterwards): {crashes}; hangs: {out['hangs']}; answers "
             f"outside the allowed codes: {out['unexpected_codes']}; probe tokens identical before/after: "
             f"{payload['probe_identical']}; sessions and caches the entries opened, closed again: "
             f"{out['streams']['closed']} of {out['streams']['opened']}. Peak RSS (start -> max): {rss}. "
             f"Passed: {payload['passed']}. Inputs and rules: `bench/fuzz.py`.")
    results_io.write(name, payload, ["target", "sent", "seconds", "hangs", *codes],
                     f"Fuzz: generated requests and malformed stream entries ({args.profile})", notes)
    print(f"fuzz: {payload['inputs_sent']} inputs, {crashes} crashes, {out['hangs']} hangs, "
          f"{out['unexpected_codes']} unexpected codes, passed {payload['passed']}", flush=True)
    return payload


if __name__ == "__main__":
    main()
