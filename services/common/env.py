"""Every RALMSPEC_* environment variable, declared once with its type and meaning.

Services read these once at start-up into their frozen settings dataclass; nothing else reads os.environ.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class EnvVar:
    name: str
    default: str
    help: str

    def get(self) -> str:
        return os.environ.get(self.name, self.default)


DATA = EnvVar("RALMSPEC_DATA", "./var", "data dir: assets cache, corpora, indexes, converted models")
PROFILE = EnvVar("RALMSPEC_PROFILE", "default", "asset profile: tiny | default | large")
MODEL = EnvVar("RALMSPEC_MODEL", "smollm2-135m", "language model key (see services/lm/model.py MODELS)")
DEVICE = EnvVar("RALMSPEC_DEVICE", "auto", "torch device: auto (cuda when present) | cpu | cuda")
DTYPE = EnvVar("RALMSPEC_DTYPE", "float32", "LM dtype: float32 | bfloat16 | float16")
THREADS = EnvVar("RALMSPEC_THREADS", "0", "torch intra-op threads; 0 = torch default")
REDIS_URL = EnvVar("RALMSPEC_REDIS_URL", "", "Redis URL; empty = `ralmspec up` starts a local redis-server")

ALL = [DATA, PROFILE, MODEL, DEVICE, DTYPE, THREADS, REDIS_URL]


def data_dir() -> Path:
    return Path(DATA.get()).expanduser().resolve()
