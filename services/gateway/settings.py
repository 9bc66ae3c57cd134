"""The gateway's settings (one frozen object, read from RALMSPEC_* once at start-up)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

from services.common import env
from services.common.layout import Layout


@dataclass(frozen=True)
class GatewaySettings:
    profile: str = "default"  # asset profile whose indexes and passages are served
    model: str = "smollm2-135m"  # see services/lm/model.py MODELS
    device: str = "auto"  # LM device: auto | cpu | cuda
    dtype: str = "float32"  # baseline and speculation must share it (bf16 greedy ids differ from fp32)
    threads: int = 0  # torch intra-op threads; 0 = torch's default
    data: Path = field(default_factory=env.data_dir)
    # The gateway runs RALMSPEC_CONCURRENCY requests at once (ServeSettings.concurrency, every replica's bound) and
    # queues this many more; past both it answers RESOURCE_EXHAUSTED (`admission.py`).
    max_queue: int = 256
    # Speculation pauses (plain steps: the baseline's) while this many requests or more run on the gateway; 0 =
    # never. vLLM's speculative_disable_by_batch_size: under load the CPU a verification takes is another request's.
    spec_pause_at: int = 2

    @classmethod
    def from_env(cls, **overrides: object) -> GatewaySettings:
        s = cls(profile=env.PROFILE.get(), model=env.MODEL.get(), device=env.DEVICE.get(),
                dtype=env.DTYPE.get(), threads=int(env.THREADS.get()), data=env.data_dir(),
                max_queue=int(env.MAX_QUEUE.get()), spec_pause_at=int(env.SPEC_PAUSE_AT.get()))
        return replace(s, **{k: v for k, v in overrides.items() if v is not None})  # type: ignore[arg-type]

    @property
    def layout(self) -> Layout:
        return Layout.for_profile(self.profile, self.data)
