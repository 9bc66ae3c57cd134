"""Passage store: id -> passage, loaded once from the profile's passages.jsonl."""

from __future__ import annotations

from pathlib import Path

from services.common.errors import NotFound
from services.retriever.corpus import Passage, read_passages


class DocStore:
    def __init__(self, passages: list[Passage]) -> None:
        self._passages = passages

    @classmethod
    def load(cls, path: Path) -> DocStore:
        return cls(read_passages(path))

    def __len__(self) -> int:
        return len(self._passages)

    def get(self, pid: int) -> Passage:
        if not 0 <= pid < len(self._passages):
            raise NotFound(f"passage {pid} does not exist (the store holds ids 0..{len(self._passages) - 1})")
        return self._passages[pid]

    def document(self, pid: int) -> str:
        """The text put in front of the LM context: title line (when known) + passage text."""
        p = self.get(pid)
        return f"{p.title}\n{p.text}" if p.title else p.text
