"""The session controller: one request through the baseline or RaLMSpec, on whatever backends the engine has.

The same object serves the in-process runtime (engine backends) and the gateway service (remote backends);
`Request` is the engine-level request both build.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from services.common.errors import Unavailable
from services.common.ops import Call
from services.gateway.knn_generation import KnnLmEngine, KnnRequest
from services.gateway.ralm import Emit, RalmConfig, RalmEngine, RalmResult
from services.gateway.ralmspec import SpecConfig, SpeculativeRalm


@dataclass(frozen=True)
class Request:
    prompt: str
    cfg: RalmConfig  # cfg.mode: paper | kv-reuse (the baseline, or what speculation must reproduce)
    retriever: str = "exact"
    spec: SpecConfig | None = None  # None: the baseline in cfg.mode; else RaLMSpec with these switches
    knn: KnnRequest | None = None  # KNN-LM (token-level retrieval) instead of passage retrieval


class Controller:
    def __init__(self, engine: RalmEngine, verify_workers: int = 4, knn: KnnLmEngine | None = None,
                 busy: Callable[[], bool] = lambda: False) -> None:
        """`busy`: the gateway is loaded; speculative requests take plain steps until it is not."""
        self.engine, self.knn = engine, knn
        self.spec = SpeculativeRalm(engine, verify_workers, busy)
        if knn is not None:
            knn.busy = busy

    def run(self, req: Request, emit: Emit | None = None, call: Call | None = None) -> RalmResult:
        """One request; `emit` receives verified tokens as they are decided, `call` carries the client's deadline
        (the request stops at the earlier of it and `deadline_s`) and cancellation (it stops before its next LM
        step)."""
        if req.knn is not None:
            if self.knn is None:
                raise Unavailable("this gateway serves no KNN-LM (it has no KNN datastore)")
            if req.spec is None:
                return self.knn.generate(req.prompt, req.knn, emit, call)
            return self.knn.speculate(req.prompt, req.knn, req.spec, emit, call)
        if req.spec is None:
            return self.engine.generate(req.prompt, req.cfg, req.retriever, emit=emit, call=call)
        return self.spec.generate(req.prompt, req.cfg, req.spec, req.retriever, emit=emit, call=call)
