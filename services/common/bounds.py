"""A number's allowed range, with the one check every rule on a client's number uses (the message names the
field and the range, so a person can fix the request)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeVar

from services.common.errors import InvalidRequest

N = TypeVar("N", int, float)


@dataclass(frozen=True)
class Bound:
    lo: int | float
    hi: int | float
    lo_open: bool = False  # (lo, hi]: lo itself is out (a deadline of 0 s)
    unit: str = ""  # shown after the range: " s", " characters"

    def __str__(self) -> str:
        if isinstance(self.lo, int) and isinstance(self.hi, int) and not self.lo_open:
            return f"{self.lo}..{self.hi}"
        return f"{'(' if self.lo_open else '['}{self.lo:g}, {self.hi:g}]"

    def check(self, name: str, value: N) -> N:
        """`value`, or InvalidRequest "`name` must be in <range>, got <value>" (NaN and infinities never pass)."""
        if not ((self.lo < value if self.lo_open else self.lo <= value) and value <= self.hi):
            raise InvalidRequest(f"{name} must be in {self}{self.unit}, got {value!r}")
        return value
