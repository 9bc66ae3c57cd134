"""Where every asset lives under the data dir (one place, so builders and loaders agree)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from services.common.env import data_dir

PROFILES = ("tiny", "default", "large")


@dataclass(frozen=True)
class Layout:
    """Paths of one asset profile: `<data>/<profile>/...`, plus the shared cache and model dirs."""

    data: Path
    profile: str

    @classmethod
    def for_profile(cls, profile: str, data: Path | None = None) -> Layout:
        return cls(data or data_dir(), profile)

    @property
    def root(self) -> Path:
        return self.data / self.profile

    @property
    def cache(self) -> Path:  # downloads shared by every profile (bigbench archive, extracted tasks)
        return self.data / "cache"

    @property
    def models(self) -> Path:  # converted HF model folders
        return self.data / "models"

    @property
    def passages(self) -> Path:  # JSONL: {"id": int, "title": str, "text": str, "source": str}, id = line number
        return self.root / "passages.jsonl"

    @property
    def questions(self) -> Path:  # JSONL: {"id": str, "question": str, "answers": [str], "passage_ids": [int]}
        return self.root / "questions.jsonl"

    @property
    def embeddings(self) -> Path:  # float32 [N, dim], row i = passage id i, L2-normalised
        return self.root / "embeddings.npy"

    def faiss_index(self, kind: str) -> Path:  # kind: flat | hnsw | ivf
        return self.root / f"faiss_{kind}.index"

    @property
    def lucene_input(self) -> Path:  # JsonCollection input folder: {"id": str, "contents": str}
        return self.root / "lucene_input"

    @property
    def lucene_index(self) -> Path:
        return self.root / "lucene"

    def rest_datastore(self, model: str) -> Path:  # REST suffix array over this model's token ids of the passages
        return self.root / f"rest_{model}.bin"

    def knn_datastore(self, model: str) -> Path:  # KNN-LM folder: this model's hidden state per corpus token
        return self.root / f"knn_{model}"

    @property
    def manifest(self) -> Path:  # build times and sizes per step
        return self.root / "manifest.json"
