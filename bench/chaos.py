"""Faults under load (issue 17, item 5): replicas of every service SIGKILLed, one frozen (SIGSTOP) past the claim
timeout, `redis-server` restarted, all while clients send requests through the gateway; then: no request lost, every
answer token-identical to a clean run's, no reply delivered twice, and no secret in a log, a metric or an error.

    python -m bench.chaos            # >= 200 requests, 12 kills (every service kind), 1 SIGSTOP, 1 Redis restart
    python -m bench.chaos --quick    # make test: 36 requests, 2 kills (lm, gateway), 1 SIGSTOP, 1 Redis restart

**Cluster**: `services.up.Cluster` with 2 replicas of every service kind but the gateway (1; `--quick`: 2 LM and 2
verifier replicas, 1 of the rest), Redis with its AOF on (`appendonly`, fsync every second; a SIGTERM flushes it),
`RALMSPEC_CLAIM_IDLE_MS=3000` (an entry a dead or frozen replica holds is claimed by another after 3 s) and
`RALMSPEC_CALL_TIMEOUT_S=20` (a gateway's call to a service; past it a call on a lost LM session or cache is replayed
on a new one, any other call fails DEADLINE_EXCEEDED).

**Requests**: RaLM QA (exact retriever) with RaLMSpec and baseline-kv, RaLM QA (sparse, Lucene) with RaLMSpec,
KNN-LM with RaLMSpec and baseline-kv, and REST drafting (`bench.load.build`: prompts from the profile's questions,
each run to `max_new_tokens`), so that every service and every pinned state is in use: LM sessions, speculation and
KNN caches and REST drafts on the datastore, passage and KNN searches on the retriever, verification. RaLMSpec is
+PSA with OS³ off (a fixed speculation stride of 3): on 2 cores OS³ chooses plain retrieval steps, which would leave
the verifier idle; `RALMSPEC_SPEC_PAUSE_AT=0` keeps speculation on under load for the same reason. Three passes, one
cluster: *clean* (every distinct request once, no fault: the reference tokens), *chaos* (closed loop, `clients`
concurrent clients cycling over the distinct requests, until `requests` are done and every fault has been injected
and recovered from) and *after* (every distinct request once more, faults over: the cluster is whole again).

**Client**: GenerateStream with a deadline per request (`deadline_s`: each attempt's gRPC timeout is the time left,
which the gateway applies to the request). UNAVAILABLE is retried after 0.5 s within that deadline: the gateway was
killed (its in-flight streams break; the restarted one listens on the same address) or told us Redis was down.
Generate has no side effect, so a retry is safe, as gRPC's own retry policies assume for UNAVAILABLE; retries are
counted with their cause. Calls wait for the channel to be ready, which reconnects within 1 s of the gateway's return.

**Faults**, one every `every_s` from the start of the chaos pass:
- *kill*: SIGKILL a random live replica of a service kind taken from a seeded, shuffled cycle of all five kinds (two
  cycles cover each kind twice), then `Cluster.respawn` it at once: a kubelet restarting a crashed container in its
  pod (same replica name, port and environment; why the same name: `Cluster.respawn`). A kind with a replica down
  or frozen is passed over until it is back (a PodDisruptionBudget of maxUnavailable 1: never a whole multi-replica
  service down). The gateway is in the set: its in-flight requests fail UNAVAILABLE at the client, which retries.
  What dies with a replica: its unacked stream entries (claimed by another replica, or by its new incarnation,
  after the claim timeout), its LM sessions and datastore caches (the gateway's next call there gets NOT_FOUND from
  the new incarnation, or times out, and is replayed on a new session or a rebuilt cache: `gateway/remote.py`),
  and for a gateway the requests it was running (sessions it opened expire on the LM after
  RALMSPEC_LM_SESSION_IDLE_S).
- *stop*: SIGSTOP a verifier replica at a moment it is handling entries (delivered to it >= 10 ms before, not
  acked: looked at while it is stopped), for 3x the claim timeout, then SIGCONT. Its entries are claimed and
  answered by the other verifier meanwhile; after SIGCONT it finishes them too and writes a second reply for each,
  which the gateway's `StreamClient` drops (the future is done, or the call is over): counted below as duplicates
  written. The verifier because its handler waits on a retriever call, so a freeze catches it mid-entry; the other
  services answer a shared-stream entry in milliseconds, and a freeze mostly finds it still unread in the socket
  (a SIGCONTed reader then times out and drops it: claimed by the other replica, answered once).
- *redis*: `LocalRedis.restart` (SIGTERM, down 1 s, started again on the same port and AOF). No service is restarted:
  each reconnects (`StreamWorker`/`StreamClient` retry their reads every second; a reply that could not be written
  is left unacked and claimed later); a gateway call whose XADD failed makes its request UNAVAILABLE (retried).
Full run: the stop follows the 4th kill, the Redis restart the 8th; `--quick`: kill lm, stop a verifier, kill the
gateway, restart Redis. Processes are started (respawns, redis-server) from one supervisor thread that outlives the
cluster: a child's parent-death signal follows the thread that started it (`Cluster.respawn`).

**Measures** (chaos pass unless said):
- *lost*: a request with no final answer within its deadline + 5 s, or ending in UNKNOWN or without a message. Any
  other non-OK end is a failure with a clear status, counted in `statuses`.
- *identical*: every OK request's tokens equal its clean-run tokens (`equivalence.compare`; near-ties counted).
- *duplicates delivered*: OK streams with more than one `done` message or whose streamed deltas are not a prefix of
  the final tokens (a token sent twice). *Duplicates written*: replies written to reply streams beyond one per
  request entry, from Redis's own counts over the chaos pass, once every entry is answered: the workers' replies
  (`served` + `dead` counters, written with each reply) minus the entries added to the services' streams
  (XINFO STREAM entries-added), per consumer group. They come from the SIGCONT (and from a reply whose write Redis
  executed as it shut down); none reaches a caller twice, as the delivered count shows.
- *Redis restart recovery*: every replica not killed since the restart served entries after it (each reconnected
  by itself), and the time from the restart to the first OK request sent after it; `unexpected_exits`: replicas
  that exited without being killed (must be none).
- *secrets*: every child's log (all incarnations: a respawn appends), every live replica's /metrics page, every
  error message a client received and this results file, searched for the API token, the cluster token and the
  Redis password; hits must be 0.
- peak RSS per service (MB, largest replica), respawn time per kill, status of every replica at the end.
`passed`: 0 lost, every OK request identical (or a certified near-tie), 0 duplicates delivered, every kill
respawned, the stop and the Redis restart done and recovered from, no unexpected exit, every replica SERVING, the
after pass all OK and identical, every kind killed (full run), 0 secret hits.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import signal
import statistics
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

import grpc
import redis
from ralmspec.v1 import gateway_pb2 as pb
from ralmspec.v1 import gateway_pb2_grpc

from bench import results_io
from bench.fuzz import sample_rss, serving
from bench.load import KV, SPEC, Cell, Key, build, percentile
from services.assets import missing
from services.common import auth, env
from services.common.contracts import SERVICES, replica_stream
from services.common.equivalence import compare
from services.common.errors import Unavailable
from services.common.transport import counter_key
from services.gateway.settings import GatewaySettings
from services.retriever.corpus import read_questions
from services.up import ORDER, Child, Cluster

FULL_CELLS: tuple[Cell, ...] = (("qa-exact", SPEC), ("qa-exact", KV), ("qa-sparse", SPEC), ("knn", SPEC),
                                ("knn", KV), ("draft-rest", KV))
QUICK_CELLS: tuple[Cell, ...] = (("qa-exact", SPEC), ("qa-exact", KV), ("knn", SPEC), ("draft-rest", KV))
RETRIED = {"UNAVAILABLE"}  # the gateway down, or Redis down behind it: the request is sent again
RETRY_PAUSE_S = 0.5
LOST_SLACK_S = 5.0  # an answer later than its deadline by more than this is lost
# The client's channel: reconnect soon after the gateway comes back (gRPC's default backoff grows to 120 s).
CHANNEL_OPTIONS = [("grpc.initial_reconnect_backoff_ms", 200), ("grpc.min_reconnect_backoff_ms", 200),
                   ("grpc.max_reconnect_backoff_ms", 1000)]
RESPAWN_TIMEOUT_S = 300.0
SETTLE_S = 90.0  # after a pass: how long every stream entry may take to be answered and acked
BUSY_LOOK_S = 60.0  # the stop waits this long for its victim to hold an entry (then freezes it anyway)
LOOK_MS = 50  # from the SIGSTOP to the look at what the victim holds
HANDLING_MS = 10  # an entry delivered this long before the freeze is in the victim's hands (read, being handled)
REDIS_DOWN_S = 1.0


@dataclass(frozen=True)
class Plan:
    requests: int  # chaos pass: at least this many (more while faults are still being injected or recovered from)
    clients: int
    prompts: int  # distinct questions per cell
    max_new_tokens: int
    deadline_s: float  # per request, retries included
    cells: tuple[Cell, ...]
    replicas: dict[str, int]
    kills: int
    every_s: float  # between two faults
    stop_after: int  # the SIGSTOP follows this many kills
    redis_after: int  # the Redis restart follows this many kills
    kill_kinds: tuple[str, ...] = ()  # fixed victims' kinds, in order; () = a shuffled cycle of every kind
    stop_kind: str = ""  # "" = a random kind with >= 2 replicas (not the gateway)
    claim_idle_ms: int = 3000
    call_timeout_s: float = 20.0
    seed: int = 0

    def events(self) -> list[str]:
        """The fault sequence: "kill" x kills with "stop" and "redis" inserted after their kill counts."""
        out: list[str] = []
        for k in range(self.kills + 1):
            out += ["stop"] * (k == self.stop_after) + ["redis"] * (k == self.redis_after)
            out += ["kill"] * (k < self.kills)
        return out

    @property
    def stop_s(self) -> float:
        return 3 * self.claim_idle_ms / 1000

    def cluster_env(self) -> dict[str, str]:
        # SPEC_PAUSE_AT=0: speculation never pauses under load, so RaLMSpec requests keep the verifier busy.
        return {env.CLAIM_IDLE_MS.name: str(self.claim_idle_ms), env.CALL_TIMEOUT_S.name: str(self.call_timeout_s),
                env.SPEC_PAUSE_AT.name: "0"}


def full_plan(requests: int, kills: int, every_s: float, seed: int) -> Plan:
    return Plan(requests, clients=6, prompts=6, max_new_tokens=20, deadline_s=90.0, cells=FULL_CELLS,
                replicas={"lm": 2, "retriever": 2, "datastore": 2, "verifier": 2, "gateway": 1}, kills=kills,
                every_s=every_s, stop_after=min(4, kills), redis_after=min(8, kills), stop_kind="verifier", seed=seed)


def quick_plan(seed: int) -> Plan:
    return Plan(36, clients=4, prompts=3, max_new_tokens=16, deadline_s=60.0, cells=QUICK_CELLS,
                replicas={"lm": 2, "retriever": 1, "datastore": 1, "verifier": 2, "gateway": 1}, kills=2,
                every_s=6.0, stop_after=1, redis_after=2, kill_kinds=("lm", "gateway"), stop_kind="verifier",
                seed=seed)


@dataclass
class Outcome:
    """One request's end, over all its attempts (times: time.monotonic())."""

    key: Key
    started: float
    ended: float = 0.0
    code: str = ""  # the last attempt's status name
    message: str = ""  # its details (non-OK)
    tokens: list[int] = field(default_factory=list)
    gaps: list[float] = field(default_factory=list)
    attempts: int = 0
    retry_causes: list[str] = field(default_factory=list)
    messages: list[str] = field(default_factory=list)  # every attempt's error details (searched for secrets)
    delivered_twice: bool = False  # an OK stream with two `done`s, or a token streamed twice

    @property
    def elapsed_s(self) -> float:
        return self.ended - self.started


def retry_cause(message: str) -> str:
    return "redis down (gateway's answer)" if "redis" in message.lower() else "gateway unreachable"


async def ask(stub: gateway_pb2_grpc.GatewayServiceStub, key: Key, req: pb.GenerateRequest,
              deadline_s: float) -> Outcome:
    """`req` over GenerateStream until it ends other than UNAVAILABLE or its deadline passes."""
    out = Outcome(key, time.monotonic())
    end = out.started + deadline_s
    while True:
        out.attempts += 1
        streamed: list[int] = []
        dones: list[pb.GenerateReply] = []
        try:
            async for chunk in stub.GenerateStream(req, timeout=max(0.001, end - time.monotonic()),
                                                   wait_for_ready=True):
                if chunk.HasField("delta"):
                    streamed += chunk.delta.token_ids
                else:
                    dones.append(chunk.done)
            final = dones[-1] if dones else pb.GenerateReply()
            out.code, out.message = "OK", ""
            out.tokens, out.gaps = list(final.token_ids), list(final.gaps)
            out.delivered_twice = len(dones) != 1 or streamed != out.tokens[: len(streamed)]
        except grpc.aio.AioRpcError as e:
            out.code, out.message = e.code().name, e.details() or ""
            out.messages.append(out.message)
            if out.code in RETRIED and time.monotonic() + RETRY_PAUSE_S < end:
                out.retry_causes.append(retry_cause(out.message))
                await asyncio.sleep(RETRY_PAUSE_S)
                continue
        out.ended = time.monotonic()
        return out


async def closed_loop(stub: gateway_pb2_grpc.GatewayServiceStub, keys: Sequence[Key],
                      reqs: dict[Key, pb.GenerateRequest], clients: int, deadline_s: float,
                      done: Callable[[int], bool]) -> list[Outcome]:
    """`clients` clients, each sending its next request when its previous one ends, cycling over `keys`, until
    `done(requests sent so far)`."""
    outcomes: list[Outcome] = []
    sent = 0

    async def client() -> None:
        nonlocal sent
        while not done(sent):
            key = keys[sent % len(keys)]
            sent += 1
            outcomes.append(await ask(stub, key, reqs[key], deadline_s))

    await asyncio.gather(*(client() for _ in range(clients)))
    return outcomes


# -- Redis's view: who holds what, who answered what -------------------------------------------------------------------
def held(r: redis.Redis, child: Child, min_idle_ms: int = 0) -> int:
    """Entries of `child`'s streams (its service's shared stream, its own pinned one) delivered to it at least
    `min_idle_ms` ago and not acked."""
    service = SERVICES[child.service]
    total = 0
    for stream in (service.stream, replica_stream(service, child.replica)):
        if r.exists(stream):
            pending = r.xpending_range(stream, service.stream, min="-", max="+", count=1000,
                                       consumername=child.replica)
            total += sum(int(e["time_since_delivered"]) >= min_idle_ms for e in pending)
    return total


def redis_client(cluster: Cluster) -> redis.Redis:
    return redis.Redis.from_url(cluster.redis_url)  # bytes: XINFO STREAM's answer holds entries' binary bodies


def text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def counts(r: redis.Redis, counter: str, *groups: str) -> dict[str, int]:
    """`counter` ("served", "claimed", ...) by consumer, over the given consumer groups (default: every service's;
    consumer names are replicas')."""
    out: Counter[str] = Counter()
    for group in groups or [service.stream for service in SERVICES.values()]:
        for name, n in r.hgetall(counter_key(counter, group)).items():
            out[text(name)] += int(n)
    return dict(out)


def ledger(r: redis.Redis) -> dict[str, dict[str, int]]:
    """Per consumer group: `entries` added to its streams (shared and pinned), `replies` its workers wrote (the
    served and dead-lettered counts, written with each reply) and `unanswered` entries: read and not acked
    (pending), or not read yet (after the group's last-delivered id: XINFO's `lag` is an estimate, which after an
    AOF reload stayed in the hundreds here with every entry answered)."""
    out: dict[str, dict[str, int]] = {}
    for key in r.scan_iter(match="ralmspec:*", _type="STREAM"):
        stream = text(key)
        if stream.startswith("ralmspec:reply:") or stream.endswith(":dead"):
            continue
        added = int(r.xinfo_stream(stream)["entries-added"])
        for g in r.xinfo_groups(stream):
            row = out.setdefault(text(g["name"]), {"entries": 0, "replies": 0, "pending": 0, "unread": 0})
            row["entries"] += added
            row["pending"] += int(g["pending"])
            row["unread"] += len(r.xrange(stream, min=f"({text(g['last-delivered-id'])}", max="+", count=1000))
    for group, row in out.items():
        row["unanswered"] = row["pending"] + row["unread"]
        row["replies"] = sum(int(n) for counter in ("served", "dead")
                             for n in r.hgetall(counter_key(counter, group)).values())
    return out


def settle(r: redis.Redis, timeout_s: float = SETTLE_S) -> dict[str, dict[str, int]]:
    """The ledger once no entry is unanswered (or after `timeout_s`): what killed and frozen replicas held is
    claimed and answered within a few claim timeouts."""
    end = time.monotonic() + timeout_s
    while True:
        book = ledger(r)
        if not any(row["unanswered"] for row in book.values()) or time.monotonic() > end:
            return book
        time.sleep(1.0)


# -- the faults --------------------------------------------------------------------------------------------------------
class Faults:
    """Injects `plan.events()` one every `every_s` into a running cluster, and records what happened."""

    def __init__(self, cluster: Cluster, plan: Plan, supervisor: Executor) -> None:
        self.cluster, self.plan = cluster, plan
        # Where processes are started (respawned replicas, redis-server): a child's parent-death signal follows the
        # thread that started it, so not asyncio.to_thread's workers, which exit with the event loop.
        self.supervisor = supervisor
        self.rng = random.Random(plan.seed)
        self.r = redis_client(cluster)  # thread-safe (a connection pool): used from worker threads too
        self.kills: list[dict] = []  # service, replica, at_s, back_after_s (or error)
        self.stop: dict = {}
        self.redis: dict = {}
        self.redis_end = 0.0  # time.monotonic() when Redis was back
        self.served_at_restart: dict[str, int] = {}
        self.killed_since_restart: set[str] = set()
        self.unexpected_exits: list[str] = []
        self.unavailable: set[str] = set()  # kinds with a replica down or frozen: not a victim until it is back
        self._killed_pids: set[int] = set()
        self._cycle: list[str] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._not_frozen = asyncio.Event()  # set while no replica is stopped: Redis restarts then, not during a stop
        self._not_frozen.set()

    def _kind(self, n: int) -> str | None:
        """The kind of the n-th kill, or None while every candidate is unavailable."""
        if self.plan.kill_kinds:
            kind = self.plan.kill_kinds[n % len(self.plan.kill_kinds)]
            return None if kind in self.unavailable else kind
        if not self._cycle:
            kinds = [k for k in ORDER if self.plan.replicas.get(k, 0)]
            self._cycle = self.rng.sample(kinds, len(kinds))
        found = next((k for k in self._cycle if k not in self.unavailable), None)
        if found is not None:
            self._cycle.remove(found)
        return found

    def _victim(self, kind: str) -> Child:
        return self.rng.choice([c for c in self.cluster.children if c.service == kind and c.proc.poll() is None])

    async def run(self, t0: float) -> None:
        kills = 0
        for n, event in enumerate(self.plan.events()):
            await asyncio.sleep(max(0.0, t0 + (n + 1) * self.plan.every_s - time.monotonic()))
            if event == "redis":
                await self._not_frozen.wait()
                await self.restart_redis(t0)
                continue
            if event == "kill":
                while (kind := self._kind(kills)) is None:
                    await asyncio.sleep(0.5)
                kills += 1
                work = self.kill(kind, self._victim(kind), t0)
            else:
                kinds = [k for k, n in self.plan.replicas.items() if n >= 2 and k != "gateway"]
                while not (free := [k for k in kinds if k not in self.unavailable]):
                    await asyncio.sleep(0.5)
                kind = self.plan.stop_kind or self.rng.choice(free)
                while kind in self.unavailable:
                    await asyncio.sleep(0.5)
                work = self.freeze(kind, self._victim(kind), t0)
                self._not_frozen.clear()
            self.unavailable.add(kind)  # before the next event chooses
            self._tasks.append(asyncio.create_task(work))
        await asyncio.gather(*self._tasks)

    async def kill(self, kind: str, victim: Child, t0: float) -> None:
        record: dict = {"service": kind, "replica": victim.replica, "at_s": round(time.monotonic() - t0, 1)}
        self.kills.append(record)
        self._killed_pids.add(victim.proc.pid)
        if self.redis:
            self.killed_since_restart.add(victim.replica)
        print(f"chaos +{record['at_s']:.0f}s: SIGKILL {victim.replica}", flush=True)
        try:
            await asyncio.to_thread(self.cluster.kill, victim)
            t = time.monotonic()
            fresh = await asyncio.get_running_loop().run_in_executor(self.supervisor, self.cluster.respawn, victim,
                                                                     None)
            await asyncio.to_thread(self.cluster.wait_healthy, RESPAWN_TIMEOUT_S, [fresh])
            record["back_after_s"] = round(time.monotonic() - t, 1)
            print(f"chaos: {victim.replica} SERVING again after {record['back_after_s']} s", flush=True)
        except Unavailable as e:
            record["error"] = str(e)[-400:]
        finally:
            self.unavailable.discard(kind)

    def _freeze_busy(self, victim: Child) -> int:
        """SIGSTOP `victim` at a moment it is handling entries: delivered to it at least HANDLING_MS before the
        freeze and not acked (looked at while it is stopped, so it cannot answer between the look and the freeze;
        an entry delivered just before it is likely still in its socket, unread). After BUSY_LOOK_S it is left
        stopped anyway. Returns how many it holds."""
        end = time.monotonic() + BUSY_LOOK_S
        while True:
            self.cluster.kill(victim, signal.SIGSTOP)
            time.sleep(LOOK_MS / 1000)  # what it had already sent reaches Redis
            try:
                n = held(self.r, victim, LOOK_MS + HANDLING_MS)
            except redis.RedisError:  # Redis restarting: look again
                n = 0
            if n or time.monotonic() > end:
                return n
            self.cluster.kill(victim, signal.SIGCONT)
            time.sleep(0.2)

    async def freeze(self, kind: str, victim: Child, t0: float) -> None:
        try:
            group = SERVICES[kind].stream
            before = await asyncio.to_thread(counts, self.r, "claimed", group)
            n = await asyncio.to_thread(self._freeze_busy, victim)
            t = time.monotonic()
            print(f"chaos +{t - t0:.0f}s: SIGSTOP {victim.replica} holding {n} entries", flush=True)
            await asyncio.sleep(self.plan.stop_s)
            await asyncio.to_thread(self.cluster.kill, victim, signal.SIGCONT)
            stopped = time.monotonic() - t
            after = await asyncio.to_thread(counts, self.r, "claimed", group)
            claimed = sum(v - before.get(k, 0) for k, v in after.items() if k != victim.replica)
            self.stop = {"service": kind, "replica": victim.replica, "at_s": round(t - t0, 1), "held": n,
                         "stopped_s": round(stopped, 1), "claim_idle_s": self.plan.claim_idle_ms / 1000,
                         "claimed_by_others": claimed}
            print(f"chaos: SIGCONT {victim.replica} after {stopped:.1f} s; others claimed {claimed}", flush=True)
        finally:
            self.unavailable.discard(kind)
            self._not_frozen.set()

    async def restart_redis(self, t0: float) -> None:
        local = self.cluster.redis
        assert local is not None, "chaos restarts its own redis-server: unset RALMSPEC_REDIS_URL"
        t = time.monotonic()
        print(f"chaos +{t - t0:.0f}s: restarting redis-server (AOF on)", flush=True)
        await asyncio.get_running_loop().run_in_executor(self.supervisor, local.restart, REDIS_DOWN_S)
        self.redis_end = time.monotonic()
        self.served_at_restart = await asyncio.to_thread(counts, self.r, "served")
        self.redis = {"at_s": round(t - t0, 1), "down_s": round(self.redis_end - t, 2), "appendonly": local.appendonly}

    async def watch(self) -> None:
        """Record replicas that exit without being killed (a crash the faults caused); runs until cancelled."""
        seen: set[int] = set()
        while True:
            for c in list(self.cluster.children):
                pid = c.proc.pid
                if c.proc.poll() is not None and pid not in self._killed_pids and pid not in seen:
                    seen.add(pid)
                    self.unexpected_exits.append(f"{c.replica} (pid {pid}) exited with code {c.proc.returncode}")
            await asyncio.sleep(0.5)


# -- the run -----------------------------------------------------------------------------------------------------------
def phase_row(phase: str, outs: list[Outcome], ref: dict[Key, Outcome], deadline_s: float) -> dict:
    ok = [o for o in outs if o.code == "OK"]
    verdicts = [compare(ref[o.key].tokens, ref[o.key].gaps, o.tokens, o.gaps) for o in ok] if ref else []
    latency = [o.elapsed_s for o in ok]
    return {"phase": phase, "requests": len(outs), "ok": len(ok), "failed": len(outs) - len(ok),
            "lost": sum(is_lost(o, deadline_s) for o in outs),
            "identical": sum(v.identical for v in verdicts) if ref else None,
            "mismatches": sum(not v.ok for v in verdicts), "near_ties": sum(v.near_tie for v in verdicts),
            "retried": sum(bool(o.retry_causes) for o in outs), "retries": sum(len(o.retry_causes) for o in outs),
            "delivered_twice": sum(o.delivered_twice for o in ok),
            "statuses": dict(Counter(o.code for o in outs)), "p50_s": percentile(latency, 50),
            "p99_s": percentile(latency, 99), "max_s": max(latency, default=None)}


def is_lost(o: Outcome, deadline_s: float) -> bool:
    """No final answer within the deadline (+ slack), or an end that says nothing."""
    return o.elapsed_s > deadline_s + LOST_SLACK_S or o.code == "UNKNOWN" or (o.code != "OK" and not o.message)


async def run(cluster: Cluster, plan: Plan, keys: list[Key], reqs: dict[Key, pb.GenerateRequest],
              supervisor: Executor) -> dict:
    r = redis_client(cluster)
    gateway = cluster.gateway
    async with auth.aio_channel(gateway, cluster.token_for(gateway), options=CHANNEL_OPTIONS) as channel:
        stub = gateway_pb2_grpc.GatewayServiceStub(channel)

        async def once() -> list[Outcome]:  # every distinct request once, no fault
            return await closed_loop(stub, keys, reqs, plan.clients, plan.deadline_s, lambda n: n >= len(keys))

        t = time.monotonic()
        clean = await once()
        if bad := [f"{o.key}: {o.code} {o.message}" for o in clean if o.code != "OK"]:
            raise SystemExit(f"the clean pass failed (no fault injected yet): {bad[:5]}")
        ref = {o.key: o for o in clean}
        print(f"clean pass: {len(clean)} requests OK in {time.monotonic() - t:.0f} s", flush=True)
        before = await asyncio.to_thread(settle, r)

        faults, peak = Faults(cluster, plan, supervisor), dict(cluster.rss_mb())
        helpers = [asyncio.create_task(sample_rss(cluster, peak)), asyncio.create_task(faults.watch())]
        t0 = time.monotonic()
        driver = asyncio.create_task(faults.run(t0))
        try:
            chaos = await closed_loop(stub, keys, reqs, plan.clients, plan.deadline_s,
                                      lambda n: n >= plan.requests and driver.done())
            await driver
            chaos_s = time.monotonic() - t0
            print(f"chaos pass: {len(chaos)} requests in {chaos_s:.0f} s", flush=True)
            settled = await asyncio.to_thread(settle, r)
            after = await once()
        finally:
            for task in helpers:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
    served_end = await asyncio.to_thread(counts, r, "served")
    rows = [phase_row(name, outs, ref, plan.deadline_s) for name, outs in
            (("clean", clean), ("chaos", chaos), ("after", after))]
    rows[0]["identical"] = len(clean)  # the reference itself
    return {"rows": rows, "chaos_s": round(chaos_s, 1), "outcomes": chaos + after, "faults": faults,
            "streams": stream_delta(before, settled), "served_end": served_end, "max_rss_mb": peak,
            "serving_after": serving(cluster)}


def stream_delta(before: dict[str, dict[str, int]], after: dict[str, dict[str, int]]) -> dict:
    """The chaos pass's entries and replies per consumer group; duplicates written = replies - entries."""
    groups = {}
    for group, row in sorted(after.items()):
        was = before.get(group, {"entries": 0, "replies": 0})
        entries, replies = row["entries"] - was["entries"], row["replies"] - was["replies"]
        groups[group] = {"entries": entries, "replies": replies, "duplicates": replies - entries,
                         "pending": row["pending"], "unread": row["unread"], "unanswered": row["unanswered"]}
    return {"groups": groups, "entries": sum(g["entries"] for g in groups.values()),
            "duplicates_written": sum(g["duplicates"] for g in groups.values()),
            "unanswered": sum(g["unanswered"] for g in groups.values())}


def redis_recovery(faults: Faults, outs: list[Outcome], served_end: dict[str, int],
                   replicas: list[str]) -> dict:
    """Did every replica that Redis's restart did not kill serve again, by itself? And how soon did requests?"""
    if not faults.redis:
        return {"restarted": False, "recovered": False}
    served = {rep: served_end.get(rep, 0) - faults.served_at_restart.get(rep, 0) for rep in replicas}
    untouched = [rep for rep in replicas if rep not in faults.killed_since_restart]
    later = [o.ended for o in outs if o.code == "OK" and o.started >= faults.redis_end]
    first = round(min(later) - faults.redis_end, 1) if later else None
    return {"restarted": True, **faults.redis, "served_since_by_replica": served,
            "not_killed_since": untouched, "recovered": all(served[rep] > 0 for rep in untouched) and bool(later),
            "first_ok_request_sent_after_s": first}


def secret_hits(wanted: dict[str, str], texts: dict[str, str]) -> list[str]:
    return [f"{what} in {where}" for where, text in texts.items() for what, secret in wanted.items() if secret in text]


def metrics_pages(cluster: Cluster, tries: int = 3) -> tuple[dict[str, str], list[str]]:
    """Every replica's /metrics page, and the errors of those that could not be read in `tries` tries."""
    pages, errors = {}, []
    for c in cluster.children:
        for attempt in range(tries):
            try:
                pages[f"metrics of {c.replica}"] = urllib.request.urlopen(
                    f"http://127.0.0.1:{c.metrics_port}/metrics", timeout=30).read().decode(errors="replace")
                break
            except OSError as e:
                print(f"metrics of {c.replica}: {e!r} (try {attempt + 1} of {tries})", flush=True)
                if attempt == tries - 1:
                    errors.append(f"{c.replica}: {e}")
                time.sleep(1.0)
    return pages, errors


def main(argv: Sequence[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="36 requests, 2 kills, 1 SIGSTOP, 1 Redis restart")
    ap.add_argument("--profile", default="tiny")
    ap.add_argument("--requests", type=int, default=200, help="chaos pass: at least this many requests")
    ap.add_argument("--kills", type=int, default=12, help="SIGKILLs (12: every service kind at least twice)")
    ap.add_argument("--every-s", type=float, default=8.0, help="seconds between two faults")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--name", default=None, help="results file name (default chaos, chaos_quick with --quick)")
    args = ap.parse_args(argv)
    plan = quick_plan(args.seed) if args.quick else full_plan(args.requests, args.kills, args.every_s, args.seed)
    name = args.name or ("chaos_quick" if args.quick else "chaos")
    settings = GatewaySettings.from_env(profile=args.profile)
    if todo := missing(args.profile, settings.layout, settings.model):
        raise SystemExit(f"the {args.profile} profile lacks {', '.join(todo)}: run `ralmspec assets --profile "
                         f"{args.profile}`")
    questions = read_questions(settings.layout.questions)
    picked = [q.question for q in questions[7 :: len(questions) // plan.prompts][: plan.prompts]]
    keys = [(*cell, i) for i in range(plan.prompts) for cell in plan.cells]  # kinds interleaved
    reqs = {k: build(k[0], k[1], picked[k[2]], plan.max_new_tokens) for k in keys}
    for k, req in reqs.items():
        if k[1] == SPEC:
            req.speculation.os3 = False  # speculate every stride: the verifier is in the path (module docstring)
    t = time.monotonic()
    # The supervisor thread (respawns, Redis's restart) outlives the cluster: it is shut down after the cluster stops.
    with ThreadPoolExecutor(1, thread_name_prefix="supervisor") as supervisor, \
            Cluster(args.profile, plan.replicas, extra_env=plan.cluster_env(), appendonly=True) as cluster:
        print(f"cluster up after {time.monotonic() - t:.0f} s", flush=True)
        secrets = cluster.secrets
        assert secrets is not None and secrets.api_token and secrets.cluster_token, "chaos runs with authentication"
        wanted = {"api token": secrets.api_token, "cluster token": secrets.cluster_token,
                  "redis password": secrets.redis_password}
        out = asyncio.run(run(cluster, plan, keys, reqs, supervisor))
        pages, unread = metrics_pages(cluster)
        texts = {str(c.log): c.log.read_text(errors="replace") for c in cluster.children} | pages
        replicas = [c.replica for c in cluster.children if c.service != "gateway"]
        restarts = {c.replica: c.restarts for c in cluster.children}
    payload = summary(plan, out, replicas, restarts)
    outcomes: list[Outcome] = out["outcomes"]
    texts["error messages"] = "\n".join(m for o in outcomes for m in o.messages)
    texts["results"] = json.dumps(payload)
    hits = secret_hits(wanted, texts)
    payload["secrets"] = {"searched": {"logs": sum(k.endswith(".log") for k in texts),
                                       "metrics pages": sum(k.startswith("metrics of") for k in texts),
                                       "error messages": sum(len(o.messages) for o in outcomes)},
                          "metrics pages unread": unread,
                          "hits": len(hits), "where": hits}
    payload["passed"] = payload["passed"] and not hits and not unread
    report(name, payload, args.profile)
    return payload


def summary(plan: Plan, out: dict, replicas: list[str], restarts: dict[str, int]) -> dict:
    faults: Faults = out["faults"]
    clean, chaos, after = out["rows"]
    outcomes: list[Outcome] = out["outcomes"]
    by_service = Counter(k["service"] for k in faults.kills)
    respawn = [k["back_after_s"] for k in faults.kills if "back_after_s" in k]
    causes = Counter(c for o in outcomes[: chaos["requests"]] for c in o.retry_causes)
    redis_ = redis_recovery(faults, outcomes[: chaos["requests"]], out["served_end"], replicas)
    every_kind = {k for k, n in plan.replicas.items() if n} <= set(by_service)
    passed = (chaos["lost"] == 0 and chaos["mismatches"] == 0 and chaos["delivered_twice"] == 0
              and len(respawn) == len(faults.kills) == plan.kills and bool(faults.stop) and redis_["recovered"]
              and not faults.unexpected_exits and all(out["serving_after"].values())
              and after["ok"] == after["requests"] and after["mismatches"] == 0
              and (every_kind or bool(plan.kill_kinds)) and out["streams"]["unanswered"] == 0)
    return {
        "plan": {**asdict(plan), "events": plan.events(), "stop_s": plan.stop_s}, "cluster_env": plan.cluster_env(),
        "rows": out["rows"], "requests": chaos["requests"], "completed": chaos["ok"], "failed": chaos["failed"],
        "lost": chaos["lost"], "identical": chaos["mismatches"] == 0, "mismatches": chaos["mismatches"],
        "near_ties": chaos["near_ties"], "statuses": chaos["statuses"], "retries": chaos["retries"],
        "retried_requests": chaos["retried"], "retries_by_cause": dict(causes),
        "duplicates": {"delivered": chaos["delivered_twice"], "written": out["streams"]["duplicates_written"]},
        "kills": {"total": len(faults.kills), "by_service": dict(by_service), "every_kind": every_kind,
                  "respawn_s": {"median": statistics.median(respawn), "max": max(respawn)} if respawn else None,
                  "events": faults.kills},
        "stop": faults.stop, "redis_restart": redis_, "unexpected_exits": faults.unexpected_exits,
        "restarts": restarts, "streams": out["streams"], "chaos_s": out["chaos_s"],
        "serving_after": out["serving_after"], "max_rss_mb": out["max_rss_mb"],
        "failures": [f"{o.key}: {o.code} {o.message}"[:300] for o in outcomes[: chaos["requests"]]
                     if o.code != "OK"][:20],
        "passed": passed}


def report(name: str, p: dict, profile: str) -> None:
    plan, k, s, rr = p["plan"], p["kills"], p["stop"], p["redis_restart"]
    kills = ", ".join(f"{svc} {n}" for svc, n in sorted(k["by_service"].items()))
    respawn = f"median {k['respawn_s']['median']:.1f} s, max {k['respawn_s']['max']:.1f} s" if k["respawn_s"] else "-"
    stop = (f"{s['replica']} stopped {s['stopped_s']} s (claim timeout {s['claim_idle_s']} s) holding {s['held']} "
            f"entries; the other replicas claimed {s['claimed_by_others']}" if s else "not done")
    redis_line = (f"down {rr['down_s']} s at +{rr['at_s']} s; every replica not killed since served again by itself: "
                  f"{rr['recovered']}; first OK request sent after it finished {rr['first_ok_request_sent_after_s']} s "
                  "after" if rr["restarted"] else "not done")
    rss = ", ".join(f"{svc} {mb:.0f}" for svc, mb in p["max_rss_mb"].items())
    notes = (f"Chaos pass: {p['requests']} requests ({plan['clients']} clients, {plan['max_new_tokens']} tokens, "
             f"deadline {plan['deadline_s']:.0f} s each) over {p['chaos_s']:.0f} s. **Lost: {p['lost']}**; completed "
             f"{p['completed']}, failed with a clear status {p['failed']}: statuses {p['statuses']}; identical to the "
             f"clean run: {p['identical']} ({p['mismatches']} mismatches, {p['near_ties']} near-ties); retries "
             f"(UNAVAILABLE) {p['retries']} on {p['retried_requests']} requests: {p['retries_by_cause']}.\n\n"
             f"Kills: {k['total']} ({kills}), every one respawned SERVING ({respawn}). SIGSTOP: {stop}. Redis "
             f"restart: {redis_line}. Duplicate replies delivered: {p['duplicates']['delivered']}; written to reply "
             f"streams and dropped by their caller: {p['duplicates']['written']} (of {p['streams']['entries']} stream "
             f"entries; unanswered at the end: {p['streams']['unanswered']}). Unexpected exits: "
             f"{len(p['unexpected_exits'])}. Secrets (API token, cluster token, Redis password) found in "
             f"{p['secrets']['searched']['logs']} logs, {p['secrets']['searched']['metrics pages']} metrics pages, "
             f"{p['secrets']['searched']['error messages']} error messages and this file: {p['secrets']['hits']}. "
             f"Peak RSS (MB, largest replica): {rss}. Passed: {p['passed']}. Faults, client and measures: "
             "`bench/chaos.py`.")
    columns = ["phase", "requests", "ok", "failed", "lost", "identical", "mismatches", "near_ties", "retries",
               "delivered_twice", "p50_s", "p99_s", "max_s"]
    results_io.write(name, p, columns, f"Chaos: faults under load ({profile})", notes)


if __name__ == "__main__":
    main()
